"""The device check (issue 19 item 4): throughput and MFU of the toolkit's three hot paths on one
accelerator, written as JSON. Run it whenever a task is lent a GPU (``bash bench/device.sh
--size vith14 --out $OUT/device.json``, < 10 min on one H100/H200); ``--size tiny`` is the CPU
version the test suite runs so the script cannot rot.

Parts: ``extraction`` (``models.heads.pooled_features`` under ``torch.inference_mode()``, bf16
autocast on CUDA vs fp32, and Hugging Face ``IJepaModel`` of the same size, random weights);
``finetune`` (``finetune.recipe`` classifier with activation checkpointing, one
``finetune.engine.train_one_epoch`` pass: img/s, MFU, peak memory); ``pretrain`` (``Pretrainer.
train_step``: it/s, MFU; vs the official code's step when ``--official-src`` names a checkout of
facebookresearch/ijepa). A part that cannot run is recorded with ``skipped``: the reason; a part
that fails is recorded with ``error`` and the exit status is 1.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` with the attention written as
matmuls (timm's ``fused_attn`` off for the count), which for a ViT forward of N tokens, width D,
depth L, MLP width M, patch p, C channels equals (``vit_forward_flops``)

    F(N) = 2 N C p^2 D + L (2 N (4 D^2 + 2 D M) + 4 N^2 D)

(patch embedding; qkv + proj + fc1 + fc2; q k^T and attn v). Training counts the backward too
(about 2x the forward); activation-checkpointing recomputation is not counted (MFU, not HFU).
MFU = counted FLOPs per second / the device's dense peak (``PEAK_TFLOPS``; null on the CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from ijepa_toolkit.engine.logger import RunLogger
from ijepa_toolkit.engine.utils import autocast
from ijepa_toolkit.finetune import recipe
from ijepa_toolkit.finetune.config import FinetuneConfig
from ijepa_toolkit.finetune.engine import StepOptions, TrainState, train_one_epoch
from ijepa_toolkit.models.heads import pooled_features
from ijepa_toolkit.models.vit import EncoderArch, create_encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for pretrain_step.py
from contenders import counted_flops  # noqa: E402
from pretrain_step import RefStep, make_trainer, official_modules  # noqa: E402

# Dense (no sparsity) peak TFLOP/s, (bf16 tensor core, fp32 non-tensor), from NVIDIA's data
# sheets: H200 (SXM) 989 / 67 and H200 NVL 835 / 60 (nvidia.com/en-us/data-center/h200, "with
# sparsity" figures halved); H100 SXM 989 / 67, H100 NVL 835 / 60, H100 PCIe 756 / 51
# (nvidia.com/en-us/data-center/h100); A100 312 / 19.5 (A100 data sheet, SXM and PCIe).
# First matching substring of torch.cuda.get_device_name() wins.
PEAK_TFLOPS = (
    ("H200 NVL", 835.0, 60.0),
    ("H200", 989.0, 67.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
)


@dataclass
class Size:
    """One benchmark size: the encoder, the pretraining predictor, batches and step counts."""

    arch: dict
    pretrain_model: str
    pretrain_extra: list = field(default_factory=list)
    extract_batch: int = 128
    finetune_batch: int = 64
    pretrain_batch: int = 64
    warmup: int = 2
    iters: int = 10
    budget_s: float = 60.0  # timed seconds per measurement at most (fewer iterations if hit)


SIZES = {
    "vith14": Size(
        arch=dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16),
        pretrain_model="vit_huge",
        pretrain_extra=["model.patch_size=14", "model.pred_depth=12", "model.pred_emb_dim=384"],
    ),
    "tiny": Size(
        arch=dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4),
        pretrain_model="vit_tiny",
        pretrain_extra=[
            "model.patch_size=4",
            "model.arch={embed_dim: 64, depth: 2, num_heads: 4}",
            "model.pred_depth=1",
            "model.pred_emb_dim=32",
            "mask.min_keep=4",
        ],
        extract_batch=8,
        finetune_batch=8,
        pretrain_batch=8,
        warmup=1,
        iters=2,
        budget_s=5.0,
    ),  # fmt: skip
}


def vit_forward_flops(arch: EncoderArch, tokens: int) -> int:
    """FLOPs of one image's ViT forward over ``tokens`` patches (the formula in the docstring)."""
    n, d, m = tokens, arch.embed_dim, int(arch.embed_dim * arch.mlp_ratio)
    embed = 2 * n * arch.in_chans * arch.patch_size**2 * d
    return embed + arch.depth * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, size: Size) -> tuple[int, float]:
    """``size.warmup`` untimed calls, then up to ``size.iters`` timed ones (stopping early past
    ``size.budget_s``); returns (timed calls, seconds)."""
    for _ in range(size.warmup):
        fn()
    sync(device)
    start, done = time.perf_counter(), 0
    while done < size.iters and (done == 0 or time.perf_counter() - start < size.budget_s):
        fn()
        done += 1
        sync(device)
    return done, time.perf_counter() - start


def peak_flops(device: torch.device, bf16: bool) -> Optional[float]:
    """The dense peak FLOP/s of ``device`` in bf16 or fp32; None when unknown (or the CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bf16_peak, fp32_peak in PEAK_TFLOPS:
        if key in name:
            return (bf16_peak if bf16 else fp32_peak) * 1e12
    return None


def rates(calls: int, seconds: float, items: int, flops_per_call: int, peak: Optional[float]):
    """The figures of one measurement: items/s, calls/s, achieved TFLOP/s and MFU."""
    achieved = flops_per_call * calls / seconds
    return {
        "items_per_s": items * calls / seconds, "calls_per_s": calls / seconds,
        "timed_calls": calls, "seconds": seconds, "flops_per_call": flops_per_call,
        "tflops_per_s": achieved / 1e12, "mfu": achieved / peak if peak else None,
    }  # fmt: skip


def bench_extraction(size: Size, device: torch.device) -> dict:
    """Encoder forward + mean pooling, inference mode: bf16 autocast (CUDA) vs fp32, and HF."""
    torch.manual_seed(0)
    arch = EncoderArch(**size.arch)
    encoder = create_encoder(arch).to(device).eval()
    images = torch.randn(size.extract_batch, 3, arch.img_size, arch.img_size, device=device)
    tokens = (arch.img_size // arch.patch_size) ** 2
    flops = counted_flops(lambda: pooled_features(encoder, images[:1]), encoder)
    out = {"batch": size.extract_batch, "tokens": tokens, "formula_flops_per_image":
           vit_forward_flops(arch, tokens)}  # fmt: skip
    for bf16 in (True, False) if device.type == "cuda" else (False,):

        @torch.inference_mode()
        def forward(bf16=bf16):
            with autocast(device, bf16):
                return pooled_features(encoder, images)

        key = "toolkit_bf16" if bf16 else "toolkit_fp32"
        n, s = time_calls(forward, device, size)
        out[key] = rates(n, s, size.extract_batch, flops * size.extract_batch,
                         peak_flops(device, bf16))  # fmt: skip
    out["hf_transformers"] = bench_hf(size, device, images, flops)
    ours = out["toolkit_bf16" if device.type == "cuda" else "toolkit_fp32"]
    hf = out["hf_transformers"]
    if "items_per_s" in hf:
        out["ratio_toolkit_vs_hf"] = ours["items_per_s"] / hf["items_per_s"]
    return out


def bench_hf(size: Size, device: torch.device, images: torch.Tensor, flops: int) -> dict:
    """Hugging Face ``IJepaModel`` (random weights, same size, SDPA), same precision and images."""
    try:
        import transformers
        from transformers import IJepaConfig, IJepaModel
    except ImportError as e:
        return {"skipped": f"transformers is not installed ({e})"}
    a = size.arch
    config = IJepaConfig(
        hidden_size=a["embed_dim"], num_hidden_layers=a["depth"],
        num_attention_heads=a["num_heads"], intermediate_size=4 * a["embed_dim"],
        image_size=a["img_size"], patch_size=a["patch_size"], layer_norm_eps=1e-6,
    )  # fmt: skip
    model = IJepaModel._from_config(config, attn_implementation="sdpa").to(device).eval()
    bf16 = device.type == "cuda"

    @torch.inference_mode()
    def forward():
        with autocast(device, bf16):
            return model(pixel_values=images).last_hidden_state.mean(dim=1)

    n, s = time_calls(forward, device, size)
    out = rates(n, s, len(images), flops * len(images), peak_flops(device, bf16))
    return {**out, "version": transformers.__version__, "precision": "bf16" if bf16 else "fp32"}


def bench_finetune(size: Size, device: torch.device) -> dict:
    """``train_one_epoch`` steps of the recipe's classifier, activation checkpointing on."""
    torch.manual_seed(0)
    cfg = FinetuneConfig()
    cfg.model.arch, cfg.data.img_size = dict(size.arch), size.arch["img_size"]
    cfg.finetune.drop_path, cfg.finetune.grad_checkpointing = 0.1, True
    cfg.optimization.warmup_epochs, classes, b = 0.0, 1000, size.finetune_batch
    model = recipe.build_classifier(cfg, classes).to(device)
    optimizer = recipe.build_optimizer(recipe.param_groups(model, cfg.optimization),
                                       cfg.optimization, 1e-4)  # fmt: skip
    opts = StepOptions(device=device, amp_dtype=torch.bfloat16 if device.type == "cuda" else None,
                       scaler=torch.amp.GradScaler(device.type, enabled=False),
                       mixup=recipe.build_mixup(cfg.mixup, classes), log_freq=10**9,
                       steps_per_epoch=1)  # fmt: skip
    scheduler = recipe.build_scheduler(optimizer, cfg.optimization, 1)
    criterion, log = recipe.build_criterion(cfg.mixup), RunLogger(".", False)
    data = TensorDataset(torch.randn(b, 3, cfg.data.img_size, cfg.data.img_size),
                         torch.randint(0, classes, (b,)))  # fmt: skip
    loader = DataLoader(data, batch_size=b)

    def step():
        train_one_epoch(model, criterion, loader, optimizer, scheduler, TrainState(), opts, log)

    image = data.tensors[0][:1].to(device)
    with torch.no_grad():
        flops = 3 * counted_flops(lambda: model(image), model)  # forward + backward (2x)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n, s = time_calls(step, device, size)
    out = rates(n, s, b, flops * b, peak_flops(device, device.type == "cuda"))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {**out, "batch": b, "grad_checkpointing": True, "peak_memory_bytes": peak}


def bench_pretrain(size: Size, device: torch.device, official_src: Optional[Path]) -> dict:
    """``Pretrainer.train_step`` at fixed masks; the official step on the same masks if given."""
    b, bf16 = size.pretrain_batch, device.type == "cuda"
    extra = [*size.pretrain_extra, f"meta.use_bfloat16={str(bf16).lower()}",
             f"meta.device={device.type}"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(size.pretrain_model, b, Path(tmp), size.arch["img_size"], extra,
                               device)  # fmt: skip
        trainer.log.close()
    groups = trainer.sample_masks(b)
    trainer.sample_masks = lambda n: groups  # the same masks for every step (and the count)
    ((_, masks_enc, masks_pred),) = groups
    images = torch.randn(b, 3, size.arch["img_size"], size.arch["img_size"], device=device)
    models = (trainer.encoder, trainer.predictor, trainer.target_encoder)
    flops = counted_flops(lambda: trainer.train_step(images), *models)
    n, s = time_calls(lambda: trainer.train_step(images), device, size)
    peak = peak_flops(device, bf16)
    out = {**rates(n, s, b, flops, peak), "batch": b, "context_tokens": masks_enc[0].shape[1],
           "target_tokens": masks_pred[0].shape[1]}  # fmt: skip
    if official_src is None:
        out["official"] = {"skipped": "no --official-src (a checkout of facebookresearch/ijepa)"}
        return out
    official = RefStep(trainer, official_modules(official_src, trainer, device))
    n, s = time_calls(lambda: official(images, masks_enc, masks_pred), device, size)
    out["official"] = {**rates(n, s, b, flops, peak), "src": str(official_src)}
    out["ratio_toolkit_vs_official"] = out["calls_per_s"] / out["official"]["calls_per_s"]
    return out


def environment(device: torch.device) -> dict:
    """Device name, library versions and the matmul settings the figures depend on."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": name or "cpu", "device_type": device.type, "torch": torch.__version__,
        "timm": timm.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }  # fmt: skip


def run_parts(size: Size, device: torch.device, official_src: Optional[Path]) -> dict:
    """Every part's figures; a failing part is recorded (``error``) and the others still run."""
    parts = {
        "extraction": lambda: bench_extraction(size, device),
        "finetune": lambda: bench_finetune(size, device),
        "pretrain": lambda: bench_pretrain(size, device, official_src),
    }
    results = {}
    for name, part in parts.items():
        start = time.perf_counter()
        try:
            results[name] = part()
        except Exception as e:  # recorded, and the exit status says so
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback":
                             traceback.format_exc()}  # fmt: skip
        results[name]["wall_s"] = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="vith14")
    p.add_argument("--out", type=Path, default=Path("device.json"), help="JSON results file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--official-src", type=Path, default=None,
                   help="a facebookresearch/ijepa checkout (the folder holding src/)")  # fmt: skip
    args = p.parse_args(argv)
    if args.official_src is not None and not (args.official_src / "src" / "models").is_dir():
        p.error(f"--official-src {args.official_src}: no src/models/ there (expected a checkout "
                "of facebookresearch/ijepa)")  # fmt: skip
    device, start = torch.device(args.device), time.perf_counter()
    results = {"size": args.size, "environment": environment(device),
               "parts": run_parts(SIZES[args.size], device, args.official_src)}  # fmt: skip
    results["wall_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    failed = [k for k, v in results["parts"].items() if "error" in v]
    print(f"{args.size} on {results['environment']['device']}: {args.out}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
