"""`RAY_AUTH_MODE=token ray job submit ... -- python jobs/run.py [asd-ray run options]`: the main job.

Inside a job, RAY_ADDRESS is set and the run joins that cluster; elsewhere it starts a local Ray. The head runs with
Ray's token authentication and the submitting client sets RAY_AUTH_MODE=token (docs/security.md); the job's
driver takes both from its node.
"""

import sys

from asd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
