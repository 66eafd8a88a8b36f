"""MAE-recipe finetuning of an I-JEPA encoder.

    python main_finetuning.py --fname finetune/tiny_cpu [--resume] [--eval [CKPT]] \
        [section.key=value ...]

Under ``torchrun`` (see ``finetune.sh``) every process joins the group from the environment.
"""

import sys

from ijepa_toolkit.finetune.run import main

if __name__ == "__main__":
    sys.exit(main())
