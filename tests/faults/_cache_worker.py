"""One process (or torchrun rank) extracting one feature-cache key, for the cache fault tests.

``python _cache_worker.py FOLDER CACHE OUT [options]``: features of FOLDER through a seeded tiny
ViT; writes ``OUT/rank<r>.json`` (images this rank forwarded, reused or not) and
``OUT/rank<r>.npz`` (the FeatureSet's arrays). ``--go FILE``: wait for FILE before starting (so
several processes start extracting at the same moment); ``--kill-after N``: SIGKILL itself at
the first forward after N chunks are recorded; ``--sleep S``: seconds per forwarded batch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from ijepa_toolkit.engine.distributed import cleanup, init_distributed
from ijepa_toolkit.eval.features import EvalDataSection, build_eval_dataset, load_or_extract
from ijepa_toolkit.models.vit import EncoderArch, create_encoder

ARCH = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4)
DATA = EvalDataSection(img_size=16, crop_ratio=1.0, batch_size=8, num_workers=0)
IDENTITY = {"random_init": ARCH, "seed": 0}


def counting_encoder(cache: Path, forwarded: list, sleep: float, kill_after: int):
    """The seeded tiny encoder; a hook on its patch embedding counts the images it forwards."""
    torch.manual_seed(0)
    enc = create_encoder(EncoderArch(**ARCH)).eval()

    def hook(module, inputs):
        if kill_after and len(list(cache.glob(".*.partial/chunks/[0-9]*.done"))) >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        forwarded[0] += len(inputs[0])
        time.sleep(sleep)

    enc.patch_embed.register_forward_pre_hook(hook)
    return enc


def run(folder: str, cache: Path, out: Path, args: argparse.Namespace) -> None:
    dist_info = init_distributed("cpu")
    if args.go:
        (out / f"ready.{os.getpid()}").touch()
        while not Path(args.go).exists():
            time.sleep(0.01)
    forwarded = [0]
    options = {"chunk": args.chunk} if args.chunk else {}
    fs = load_or_extract(
        build_eval_dataset(folder, DATA), IDENTITY,
        lambda: counting_encoder(cache, forwarded, args.sleep, args.kill_after), "last", cache,
        dist_info, batch_size=DATA.batch_size, **options,
    )  # fmt: skip
    r = dist_info.rank
    np.savez(out / f"rank{r}.npz", feats=np.asarray(fs.feats), labels=fs.labels)
    (out / f"rank{r}.json").write_text(json.dumps({"forwarded": forwarded[0], "reused": fs.reused}))
    cleanup(finished=True)  # leave the process group together (a no-op in one process)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("cache", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--chunk", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--kill-after", type=int, default=0)
    p.add_argument("--go", default="")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    run(a.folder, a.cache, a.out, a)
