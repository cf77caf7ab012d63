"""`RAY_AUTH_MODE=token ray job submit ... -- python jobs/score_stream.py --banks DIR (--data ROOT | --clips DIR --machine M | --simulate S)`.

Fleet scoring through the per-machine bank actors and the router (asd-ray serve-fleet).
"""

import sys

from asd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve-fleet", *sys.argv[1:]]))
