"""kNN speed: ``knn_scores`` (k in {10, 20, 100, 200}, one pass) against scikit-learn's
brute-force ``KNeighborsClassifier`` (cosine, k=200, weights exp(sim/T)) and against the one
similarity matmul it cannot avoid (test @ train.T in the same chunks), on clustered random
features. Prints the three times and both ratios.

    python bench/knn.py                       # 50k x 1024 train, 10k test, 1000 classes
    python bench/knn.py --n-train 5000 --n-test 1000   # quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.neighbors import KNeighborsClassifier

from ijepa_toolkit.eval.knn import knn_scores


def clustered(n: int, centres: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(centres), size=n)
    feats = centres[labels] + rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    return feats.astype(np.float32), labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=1024)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.classes, args.dim), dtype=np.float32) * 0.2
    x_tr, y_tr = clustered(args.n_train, centres, rng)
    x_te, y_te = clustered(args.n_test, centres, rng)
    tr, te = torch.from_numpy(x_tr), torch.from_numpy(x_te)
    print(f"train {x_tr.shape}, test {x_te.shape}, {args.classes} classes, "
          f"{torch.get_num_threads()} threads")  # fmt: skip

    start = time.perf_counter()
    trn = F.normalize(tr, dim=1)
    for s in range(0, len(te), args.chunk):
        torch.mm(F.normalize(te[s : s + args.chunk], dim=1), trn.T)
    t_mm = time.perf_counter() - start
    print(f"similarity matmul alone: {t_mm:.2f} s")

    start = time.perf_counter()
    scores = knn_scores(tr, torch.from_numpy(y_tr), te, args.classes, chunk_size=args.chunk)
    t_ours = time.perf_counter() - start
    ours = scores[200].argmax(1).numpy()
    print(f"knn_scores, k in (10, 20, 100, 200): {t_ours:.2f} s")

    start = time.perf_counter()
    knn = KNeighborsClassifier(n_neighbors=200, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / 0.07), n_jobs=-1)  # fmt: skip
    pred = knn.fit(x_tr, y_tr).predict(x_te)
    t_sk = time.perf_counter() - start
    print(f"sklearn KNeighborsClassifier brute, k=200 only: {t_sk:.2f} s")
    agree = 100.0 * (pred == ours).mean()
    acc_ours, acc_sk = 100 * (ours == y_te).mean(), 100 * (pred == y_te).mean()
    print(f"top-1 ours {acc_ours:.2f}%, sklearn {acc_sk:.2f}%, same prediction on {agree:.2f}%")
    print(
        f"speed-up vs sklearn: {t_sk / t_ours:.2f}x (target >= 2); "
        f"time / matmul: {t_ours / t_mm:.2f} (target <= 1.2)"
    )


if __name__ == "__main__":
    main()
