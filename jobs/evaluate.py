"""`RAY_AUTH_MODE=token ray job submit ... -- python jobs/evaluate.py [asd-ray evaluate options]`: see `asd-ray evaluate --help`."""

import sys

from asd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
