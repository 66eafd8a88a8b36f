"""kNN classification speed: the toolkit's ``knn_scores`` (k in {10, 20, 100, 200} in one pass)
against faiss (``IndexFlatIP`` on the L2-normalised features, one exact search at k=200, then the
same vote) and scikit-learn (brute-force cosine ``NearestNeighbors.kneighbors`` at k=200, the same
vote), and against the one similarity matmul none of them can avoid. The vote, DINO's: class
scores are the sum of ``exp(sim / T)`` (T = 0.07) over the k nearest neighbours. Clustered random
features; every contender must give the same k=200 predictions as the toolkit (the agreement is
printed). Each is timed once, in turn, after a small warm-up search.

    python bench/knn.py                                    # 50k x 1024 bank, 10k queries
    python bench/knn.py --n-train 5000 --n-test 1000       # quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for contenders.py
from contenders import Row, machine, missing  # noqa: E402

KS = (10, 20, 100, 200)
T = 0.07


def clustered(n: int, centres: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) float32 features around ``centres`` (unit noise), (n,) labels."""
    labels = rng.integers(0, len(centres), size=n)
    feats = centres[labels] + rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    return feats.astype(np.float32), labels


def vote(sims: np.ndarray, idx: np.ndarray, labels: np.ndarray, classes: int,
         ks: Sequence[int]) -> dict[int, np.ndarray]:  # fmt: skip
    """The same vote as ``knn_scores`` from (N, k_max) neighbour similarities and indices, sorted
    nearest first: {k: (N, classes) scores}."""
    weights = torch.from_numpy(np.exp((sims.astype(np.float32) - 1.0) / T))
    neighbour = torch.from_numpy(labels[idx])
    out = {}
    for k in ks:
        scores = torch.zeros(len(sims), classes)
        out[k] = scores.scatter_add_(1, neighbour[:, :k], weights[:, :k]).numpy()
    return out


def faiss_search(train: np.ndarray, test: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(train.shape[1])
    index.add(np.ascontiguousarray(train))
    return index.search(np.ascontiguousarray(test), k)


def sklearn_search(train: np.ndarray, test: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute", n_jobs=-1)
    dist, idx = nn.fit(train).kneighbors(test)
    return 1.0 - dist, idx


def timed(fn: Callable[[], dict]) -> tuple[float, dict]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compare(n_train: int = 50_000, n_test: int = 10_000, dim: int = 1024,
            classes: int = 1000) -> list[Row]:  # fmt: skip
    """Rows of the toolkit's kNN vs the similarity matmul, faiss and scikit-learn."""
    from ijepa_toolkit.eval.knn import knn_scores

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((classes, dim), dtype=np.float32) * 0.2
    x_tr, y_tr = clustered(n_train, centres, rng)
    x_te, _ = clustered(n_test, centres, rng)
    tr_n = F.normalize(torch.from_numpy(x_tr), dim=1)
    te_n = F.normalize(torch.from_numpy(x_te), dim=1)
    kmax = min(KS[-1], n_train)
    bench = f"kNN {n_train}x{dim} bank, {n_test} queries, k {'/'.join(map(str, KS))}"

    def ours() -> dict:
        got = knn_scores(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
                         classes, ks=KS)  # fmt: skip
        return {k: v.numpy() for k, v in got.items()}

    def matmul() -> dict:
        for s in range(0, n_test, 1024):
            torch.mm(te_n[s : s + 1024], tr_n.T)
        return {}

    contenders = {"similarity matmul alone": matmul}
    for name, module, search in (("faiss IndexFlatIP + same vote", "faiss", faiss_search),
                                 ("sklearn NearestNeighbors + same vote", "sklearn",
                                  sklearn_search)):  # fmt: skip
        reason = missing(module)
        if reason:
            contenders[name] = reason
        else:
            contenders[name] = lambda search=search: vote(
                *search(tr_n.numpy(), te_n.numpy(), kmax), y_tr, classes, KS
            )
    knn_scores(tr_n[:2000], torch.from_numpy(y_tr[:2000]), te_n[:256], classes, ks=KS)  # warm-up
    t_ours, scores = timed(ours)
    rows = []
    for name, fn in contenders.items():
        if isinstance(fn, str):
            rows.append(Row(bench, name, skipped=fn))
            continue
        t, theirs = timed(fn)
        note = ""
        if theirs:
            same = (theirs[kmax].argmax(1) == scores[kmax].argmax(1)).mean()
            note = f"same k={kmax} prediction on {100 * same:.2f}% of queries"
        rows.append(Row(bench, name, "s", t_ours, t, note=note))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--classes", type=int, default=1000)
    a = p.parse_args(argv)
    print(machine())
    for row in compare(a.n_train, a.n_test, a.dim, a.classes):
        print(row.line())


if __name__ == "__main__":
    main()
