"""`RAY_AUTH_MODE=token ray job submit ... -- python jobs/sweep.py [asd-ray sweep options]`: see `asd-ray sweep --help`."""

import sys

from asd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
