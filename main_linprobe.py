"""Linear probes on frozen features: one head per (learning rate, weight decay), all trained in
one pass (DINOv2 style), the reported head picked on a held-out part of the training set.

    python main_linprobe.py --fname linprobe/digits [section.key=value ...]
    python main_linprobe.py --fname ... linprobe.mode=online   # images + augmentation each step
    python main_linprobe.py --fname ... --resume   # continue from logging.folder's checkpoint

The code is ``ijepa_toolkit.eval.linear`` (also ``python -m ...``, ``ijepa-linprobe``).
"""

import sys

from ijepa_toolkit.eval.linear import main

if __name__ == "__main__":
    sys.exit(main())
