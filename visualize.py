"""Pictures for checking the toolkit by eye: ``python visualize.py MODE [--fname CFG] [k=v ...]``.

``masks`` (with a pretraining config): ``masks_step<S>.png``, images with the context (blue) and
target blocks that the config's mask sampler draws at step S.
``pca``: ``<logging.folder>/pca.png``, each image next to its patch features' first 3 principal
components as RGB. ``losses``: ``<logging.folder>/losses.png``, each image next to the I-JEPA
prediction loss of every patch over many random maskings (needs a checkpoint with a predictor).
"""

import sys

from ijepa_toolkit.viz import main

if __name__ == "__main__":
    sys.exit(main())
