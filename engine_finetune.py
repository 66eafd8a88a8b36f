"""``train_one_epoch`` / ``evaluate`` of the finetuning recipe (MAE's ``engine_finetune.py``).

The code lives in the installed package, ``ijepa_toolkit.finetune.engine``; this module names it at
the place MAE users look for it.
"""

from ijepa_toolkit.finetune.engine import TrainState, evaluate, train_one_epoch

__all__ = ["TrainState", "evaluate", "train_one_epoch"]
