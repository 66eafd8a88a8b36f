"""What the opt-in ``torch.compile`` (``features.compile``, ``finetune.compile``) buys: an
extraction forward (inference mode, pooled features) and a finetuning step (forward, backward,
AdamW) of the same ViT, eager against ``engine.utils.maybe_compile``. Prints the compile time
(first call), the steady-state median per batch of both, their ratio, and the largest
difference of the outputs (extraction: the features; finetuning: the weights after the steps).

    python bench/compile_gain.py [--width 384 --depth 12 --img-size 224 --batch-size 8]
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import statistics
import time

import torch

from ijepa_toolkit.engine.utils import adamw, maybe_compile
from ijepa_toolkit.models.heads import EncoderClassifier, pooled_features
from ijepa_toolkit.models.vit import EncoderArch, create_encoder


def timed(fn, repeat: int) -> tuple[float, float, torch.Tensor]:
    """(first call s, median of the next ``repeat`` calls s, last output)."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def extraction(pool, images: torch.Tensor, repeat: int) -> tuple:
    def step():
        with torch.inference_mode():
            return pool(images)

    return timed(step, repeat)


def finetune_step(model: torch.nn.Module, images: torch.Tensor, repeat: int) -> tuple:
    opt = adamw(model.parameters(), lr=1e-4)
    labels = torch.arange(len(images)) % 10

    def step():
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return torch.cat([p.detach().flatten() for p in model.parameters()])  # the weights

    return timed(step, repeat)


def compare(name: str, run, eager_model, repeat: int, images: torch.Tensor) -> None:
    """``eager_model`` (a module or the extraction's pooled forward) against its compiled copy
    (``maybe_compile``, as ``features.compile`` / ``finetune.compile`` apply it)."""
    compiled_model = maybe_compile(copy.deepcopy(eager_model), True)
    first_e, eager, out_e = run(eager_model, images, repeat)
    first_c, compiled, out_c = run(compiled_model, images, repeat)
    diff = float((out_e - out_c).abs().max())
    print(f"{name}: eager {eager * 1e3:.1f} ms/batch (first {first_e:.2f} s), compiled "
          f"{compiled * 1e3:.1f} ms/batch (first call incl. compile {first_c:.1f} s): "
          f"{eager / compiled:.2f}x; max |diff| {diff:.2e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=384, help="embed dim (multiple of 64)")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5, help="timed calls after the first")
    a = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    arch = EncoderArch(img_size=a.img_size, patch_size=16, embed_dim=a.width, depth=a.depth,
                       num_heads=a.width // 64)  # fmt: skip
    print(f"ViT width {a.width} depth {a.depth} at {a.img_size} px, batch {a.batch_size}")
    torch.manual_seed(0)
    encoder = create_encoder(arch).eval()
    images = torch.randn(a.batch_size, 3, a.img_size, a.img_size)
    pool = functools.partial(pooled_features, encoder, pool="avg")  # as eval/features.py
    compare("extraction forward", extraction, pool, a.repeat, images)
    torch.manual_seed(0)
    classifier = EncoderClassifier(create_encoder(arch), 10).train()
    compare("finetune step", finetune_step, classifier, a.repeat, images)


if __name__ == "__main__":
    main()
