"""Cost of ``load_encoder`` on a ViT-H/14 release: time and peak RSS, before vs after.

Writes a synthetic checkpoint in the official I-JEPA layout (``encoder``, ``predictor``,
``target_encoder`` with ``module.`` prefixes; constant weights, same sizes and key names as
``IN1K-vit.h.14-300e.pth.tar`` without the optimizer state) to ``--out``, reads it once to warm
the page cache, then loads ``target_encoder`` in a fresh process per path, each ``--repeat``
times (best time, peak RSS of the process):

- ``before``: timm's random initialisation on the CPU, then ``load_state_dict`` copies the
  weights into it (``build_encoder(..., empty_init=False)``);
- ``after``: ``load_encoder`` as shipped: built on the meta device, the memory-mapped tensors
  assigned as the parameters (one copy in memory).

Both include the zip CRC-32 check of the records read (``io.read.verify_records``), timed
separately in the ``after`` process.

    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/load.py          # ViT-H/14, ~5 GB in /tmp
    PYTHONPATH=src python bench/load.py --model vit_base --out /tmp/vitb.pth.tar
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from ijepa_toolkit.models.pos_embed import sincos_2d
from ijepa_toolkit.models.predictor import IJEPAPredictor, PredictorArch
from ijepa_toolkit.models.vit import MODEL_SIZES, EncoderArch, create_encoder


def write_release(path: Path, model: str) -> None:
    """The official layout at ``model``'s size, patch 14, 224 px; predictor 12 x 384."""
    width, depth, heads, ratio = MODEL_SIZES[model]
    arch = EncoderArch(img_size=224, patch_size=14, embed_dim=width, depth=depth,
                       num_heads=heads, mlp_ratio=ratio)  # fmt: skip
    with torch.device("meta"):
        encoder = create_encoder(arch)
        predictor = IJEPAPredictor(PredictorArch(16, width, 384, 12, heads))
    ckpt = {"epoch": 300}
    for i, (name, module) in enumerate(
        (("encoder", encoder), ("target_encoder", encoder), ("predictor", predictor))
    ):
        state = module.state_dict()
        ckpt[name] = {f"module.{k}": torch.full(v.shape, 0.01 * (i + 1)) for k, v in state.items()}
        table = "module.predictor_pos_embed" if name == "predictor" else "module.pos_embed"
        ckpt[name][table] = sincos_2d(ckpt[name][table].shape[-1], (16, 16))
    torch.save(ckpt, path)


def child(path: str, empty_init: bool) -> None:
    """One load in this process: print seconds, CRC seconds and peak RSS as JSON."""
    from ijepa_toolkit import load_encoder, loader
    from ijepa_toolkit.formats import contents_of
    from ijepa_toolkit.formats.canonical import encoder_of
    from ijepa_toolkit.io import read

    crc = [0.0]
    verify = read.verify_records

    def timed_verify(*args):
        start = time.perf_counter()
        n = verify(*args)
        crc[0] += time.perf_counter() - start
        return n

    loader.verify_records = timed_verify
    base = peak_rss_gib()  # torch, timm and the toolkit imported
    start = time.perf_counter()
    if empty_init:
        model = load_encoder(path)
    else:
        raw = read.read_raw(path)
        canonical = encoder_of(contents_of(raw), "target_encoder")
        timed_verify(raw, canonical.state_dict.values())
        model = loader.build_encoder(canonical, empty_init=False)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
    rss = peak_rss_gib()
    print(json.dumps({"s": seconds, "crc_s": crc[0], "rss_gib": rss, "base_gib": base,
                      "params": params}))  # fmt: skip


def peak_rss_gib() -> float:
    """This process's peak resident set (``VmHWM``: reset by exec, unlike ``ru_maxrss``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # KiB -> GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_child(path: Path, empty_init: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--empty-init", str(int(empty_init))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="vit_huge", choices=sorted(MODEL_SIZES))
    p.add_argument("--out", type=Path, default=Path("/tmp/ijepa_bench_vith14.pth.tar"))
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--empty-init", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, bool(args.empty_init))
    if not args.out.exists():
        start = time.perf_counter()
        write_release(args.out, args.model)
        print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    size = args.out.stat().st_size / 2**30
    with open(args.out, "rb") as f:  # warm the page cache
        while f.read(64 << 20):
            pass
    results = {}
    for name, empty in (("before", False), ("after", True)):
        runs = [run_child(args.out, empty) for _ in range(args.repeat)]
        results[name] = min(runs, key=lambda r: r["s"])
        r = results[name]
        print(
            f"{name:6s}: {r['s']:.2f} s (CRC {r['crc_s']:.2f} s), peak RSS {r['rss_gib']:.2f} GiB "
            f"({r['rss_gib'] - r['base_gib']:.2f} GiB above the imports), "
            f"{r['params'] / 1e6:.0f}M parameters (file {size:.2f} GiB)"
        )
    b, a = results["before"], results["after"]
    print(f"ratio: {b['s'] / a['s']:.1f}x faster, {b['rss_gib'] / a['rss_gib']:.2f}x less peak RSS")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
