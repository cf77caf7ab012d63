"""`RAY_AUTH_MODE=token ray job submit ... -- python jobs/embed.py [asd-ray embed options]`: see `asd-ray embed --help`."""

import sys

from asd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
