"""Label-free rank scores of frozen features: RankMe (smooth rank of the (N, D) feature matrix,
from the feature cache) and LiDAR (smooth rank of the LDA matrix over augmented views).

    python rank_eval.py --fname rank/digits [section.key=value ...]

The code is ``ijepa_toolkit.eval.rank`` (also ``python -m ...``, ``ijepa-rank``).
"""

import sys

from ijepa_toolkit.eval.rank import main

if __name__ == "__main__":
    sys.exit(main())
