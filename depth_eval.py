"""Depth probe on a frozen I-JEPA encoder: ``python depth_eval.py --fname depth/X``.

Trains a linear or bins head on frozen patch features (NYU-Depth v2 protocol), evaluates it, and
writes config.yaml, log.jsonl, tensorboard events, checkpoint-last.pth, visualisations/ and
results.json into ``logging.folder``. ``--resume`` continues an interrupted run.
"""

import sys

from ijepa_toolkit.eval.depth import main

if __name__ == "__main__":
    sys.exit(main())
