"""`RAY_AUTH_MODE=token ray job submit ... -- python jobs/finetune.py --data ROOT... [--init PATH_OR_HUB_ID] [--workers N] [--gpu]`.

DDP masked-prediction fine-tuning on Ray Train (asd-ray finetune); prints the checkpoint to embed with.
"""

import sys

from asd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
