"""I-JEPA / StoP pretraining: ``python main_pretrain.py --fname pretrain/X [--resume] [k=v ...]``.

Many GPUs or nodes: ``torchrun --nproc_per_node N main_pretrain.py --fname ...``. The run folder
(``logging.folder``) receives config.yaml, log.jsonl, tensorboard events, checkpoint-last.pth
(official I-JEPA layout; ``--resume`` continues from it) and results.json. The code is
``ijepa_toolkit.pretrain.train``.
"""

import sys

from ijepa_toolkit.pretrain.train import main

if __name__ == "__main__":
    sys.exit(main())
