"""`RAY_AUTH_MODE=token ray job submit ... -- python jobs/serve.py --banks DIR [--set serve.port=8000 ...]`: the HTTP scoring service.

Deploys the Ray Serve application over the banks (asd-ray serve) and returns; the service keeps running on
the cluster until `python jobs/serve.py --banks DIR --stop` (the same `--set` values) stops it and its bank
actors (or `--block` keeps the job running with it).
"""

import sys

from asd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
