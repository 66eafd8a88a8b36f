"""Weighted kNN on frozen features (DINOv2 protocol): L2-normalised features, cosine similarity,
top-k neighbours weighted ``exp(sim / T)``, top-1 and top-5 for each k.

    python knn_eval.py --fname knn/digits [section.key=value ...]
    torchrun --nproc_per_node 2 knn_eval.py --fname ...   # bank sharded across ranks

The code is ``ijepa_toolkit.eval.knn`` (also ``python -m ijepa_toolkit.eval.knn``, ``ijepa-knn``).
"""

import sys

from ijepa_toolkit.eval.knn import main

if __name__ == "__main__":
    sys.exit(main())
