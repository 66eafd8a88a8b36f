"""Iterations/s of one I-JEPA pretraining step: this toolkit vs an official-style reference.

The reference is written the way the official code is: manual attention (``q @ k^T``, softmax),
per-mask Python loops in the encoder, the predictor and ``apply_masks``, and a per-parameter
Python loop for the EMA update. Both start from the same weights and masks; the first step's
losses are printed so the two can be seen to compute the same thing. The two steps are timed
alternately in one run, which prints both rates and their ratio.

    python bench/pretrain_step.py [--model vit_tiny] [--batch 8] [--iters 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ijepa_toolkit.config import load_config
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.engine.utils import autocast
from ijepa_toolkit.pretrain.train import PretrainConfig, Pretrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for reference.py
from reference import (  # noqa: E402
    RefEncoder,
    RefPredictor,
    ref_apply_masks,
    ref_repeat_interleave_batch,
)

REPO = Path(__file__).resolve().parents[1]


# -- official-style training step (models in bench/reference.py) ------------------------------
class RefStep:
    """The official ``train_step`` (fp32 on the CPU): schedules, forward, AdamW, EMA loop."""

    def __init__(self, trainer: Pretrainer, modules: Optional[tuple] = None):
        """``modules``: the (encoder, target, predictor) to step (e.g. the official code's own);
        default: official-style copies of the trainer's. bf16 autocast as the trainer's config."""
        self.encoder, self.target, self.predictor = modules or (
            RefEncoder.copy_of(trainer.encoder), RefEncoder.copy_of(trainer.target_encoder),
            RefPredictor.copy_of(trainer.predictor),
        )  # fmt: skip
        self.device, self.bf16 = trainer.device, trainer.cfg.meta.use_bfloat16
        for p in self.target.parameters():
            p.requires_grad = False
        groups = [
            {"params": [p for n, p in m.named_parameters() if "bias" not in n and p.ndim != 1]}
            for m in (self.encoder, self.predictor)
        ] + [
            {"params": [p for n, p in m.named_parameters() if "bias" in n or p.ndim == 1],
             "WD_exclude": True, "weight_decay": 0}
            for m in (self.encoder, self.predictor)
        ]  # fmt: skip
        self.optimizer = torch.optim.AdamW(groups)
        self.schedules, self.step = trainer.schedules, 0

    def __call__(self, imgs, masks_enc, masks_pred) -> float:
        lr, wd, m = self.schedules.at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            if not g.get("WD_exclude"):
                g["weight_decay"] = wd
        with autocast(self.device, self.bf16):
            with torch.no_grad():
                h = self.target(imgs)
                h = F.layer_norm(h, (h.size(-1),))
                h = ref_apply_masks(h, masks_pred)
                h = ref_repeat_interleave_batch(h, len(imgs), repeat=len(masks_enc))
            z = self.predictor(self.encoder(imgs, masks_enc), masks_enc, masks_pred)
            loss = F.smooth_l1_loss(z, h)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            for param_q, param_k in zip(self.encoder.parameters(), self.target.parameters()):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
        self.step += 1
        return loss.item()


# -- benchmark -------------------------------------------------------------------------------
def make_trainer(
    model: str,
    batch: int,
    folder: Path,
    size: int = 224,
    extra: Sequence[str] = (),
    device: Optional[torch.device] = None,
) -> Pretrainer:
    """A ``Pretrainer`` on ``batch`` random ``size``-px images; ``extra`` overrides come last."""
    data = folder / "images" / "x"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(batch):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            data / f"{i}.png"
        )
    overrides = [
        f"model.model_name={model}", "model.patch_size=16", "model.arch=null",
        "model.pred_depth=6", "model.pred_emb_dim=192", "mask.min_keep=10",
        "data.digits_root=null", f"data.train_folder={folder / 'images'}", f"data.crop_size={size}",
        f"data.batch_size={batch}", "logging.rankme_freq=0", "logging.tensorboard=false",
        f"logging.folder={folder / 'run'}", *extra,
    ]  # fmt: skip
    cfg = load_config(PretrainConfig, "pretrain/tiny_cpu", overrides)
    return Pretrainer(cfg, DistInfo(device=device or torch.device("cpu")))


def interleaved_rates(fn_a, fn_b, iters: int) -> tuple[float, float]:
    """Iterations/s of two step functions timed alternately (after one warm-up step each), so
    both see the same background load."""
    fn_a(), fn_b()
    spent = [0.0, 0.0]
    for _ in range(iters):
        for i, fn in enumerate((fn_a, fn_b)):
            start = time.perf_counter()
            fn()
            spent[i] += time.perf_counter() - start
    return iters / spent[0], iters / spent[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(args.model, args.batch, Path(tmp))
        reference = RefStep(trainer)
        imgs = torch.randn(args.batch, 3, 224, 224)
        groups = trainer.sample_masks(args.batch)
        trainer.sample_masks = lambda n: groups  # the same masks for both
        ((_, masks_enc, masks_pred),) = groups
        ours_loss = trainer.train_step(imgs)["loss"]
        ref_loss = reference(imgs, masks_enc, masks_pred)
        print(f"first-step loss: toolkit {ours_loss:.6f}  reference {ref_loss:.6f}")
        assert math.isclose(ours_loss, ref_loss, rel_tol=1e-4), "the two steps disagree"
        ours, ref = interleaved_rates(
            lambda: trainer.train_step(imgs),
            lambda: reference(imgs, masks_enc, masks_pred),
            args.iters,
        )
        trainer.log.close()
    sizes = f"context {masks_enc[0].shape[1]} / target {masks_pred[0].shape[1]} x 4 patches"
    arch = trainer.encoder.arch
    print(f"{args.model}/16 (width {arch.embed_dim}, depth {arch.depth}) at 224, batch "
          f"{args.batch}, {args.threads} threads, {sizes}")  # fmt: skip
    print(f"toolkit   {ours:.3f} it/s")
    print(f"reference {ref:.3f} it/s")
    print(f"ratio     {ours / ref:.2f}x")


if __name__ == "__main__":
    main()
