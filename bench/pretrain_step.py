"""Seconds per I-JEPA pretraining step: the toolkit's ``Pretrainer.train_step`` against the
official code's own step, and against an official-style re-implementation (bench/reference.py).

The official step is facebookresearch/ijepa's: its ``VisionTransformer`` / predictor modules and
its ``train_step`` body (``RefStep``: target forward + layer norm + ``apply_masks``, context
forward, smooth-L1, AdamW with its parameter groups, its ``grad_logger`` of the encoder's
gradients, the per-parameter EMA loop), imported from a checkout outside the project
(``--official-src DIR``, the folder holding ``src/``, or the ``IJEPA_OFFICIAL_SRC`` variable;
skipped with a line saying so when neither is given). All
steps start from the toolkit's weights and use the same masks (one draw of the toolkit's sampler,
the official layout) and images; the first 3 steps' losses are printed for each, then the
steps are timed in turn (median wall and CPU seconds).

    python bench/pretrain_step.py [--model vit_tiny] [--batch 8] [--rounds 10] [--threads 1]
        [--official-src /path/to/ijepa] [--reference]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
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
from contenders import Row, alternating, counted_flops, machine  # noqa: E402
from reference import (  # noqa: E402
    RefEncoder,
    RefPredictor,
    ref_apply_masks,
    ref_grad_norms,
    ref_repeat_interleave_batch,
)


# -- official-style training step (models in bench/reference.py) ------------------------------
class RefStep:
    """The official ``train_step`` (fp32 on the CPU): schedules, forward, AdamW, the encoder's
    gradient norms (its ``grad_logger``, every step), EMA loop."""

    def __init__(self, trainer: Pretrainer, modules: Optional[tuple] = None,
                 helpers: tuple = (ref_apply_masks, ref_repeat_interleave_batch,
                                   ref_grad_norms)):  # fmt: skip
        """``modules``: the (encoder, target, predictor) to step (e.g. the official code's own);
        default: official-style copies of the trainer's. ``helpers``: the ``apply_masks``,
        ``repeat_interleave_batch`` and ``grad_logger`` to use. bf16 autocast as the trainer's
        config."""
        self.apply_masks, self.repeat_interleave_batch, self.grad_logger = helpers
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
                h = self.apply_masks(h, masks_pred)
                h = self.repeat_interleave_batch(h, len(imgs), repeat=len(masks_enc))
            z = self.predictor(self.encoder(imgs, masks_enc), masks_enc, masks_pred)
            loss = F.smooth_l1_loss(z, h)
        loss.backward()
        self.optimizer.step()
        self.grad_logger(self.encoder.named_parameters())  # train.py: after the step, every step
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


def official_src(given: Optional[Path]) -> Optional[Path]:
    """``given``, else ``$IJEPA_OFFICIAL_SRC``, else None; a folder without ``src/models`` is an
    error naming what was expected."""
    src = given or (Path(os.environ["IJEPA_OFFICIAL_SRC"]) if os.environ.get("IJEPA_OFFICIAL_SRC")
                    else None)  # fmt: skip
    if src is not None and not (src / "src" / "models").is_dir():
        raise SystemExit(f"official source {src}: no src/models/ there (expected a checkout of "
                         "facebookresearch/ijepa, the folder holding src/)")  # fmt: skip
    return src


def official_step(src: Path, trainer: Pretrainer) -> RefStep:
    """The official step: its modules (``official_modules``), its mask helpers and its
    ``grad_logger``."""
    modules = official_modules(src, trainer, trainer.device)
    from src.masks.utils import apply_masks  # the official checkout, bench-only
    from src.utils.logging import grad_logger
    from src.utils.tensors import repeat_interleave_batch

    return RefStep(trainer, modules, (apply_masks, repeat_interleave_batch, grad_logger))


def official_modules(src: Path, trainer: Pretrainer, device: torch.device) -> tuple:
    """The official code's (encoder, target encoder, predictor), the trainer's sizes and weights."""
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    from src.models import vision_transformer as vit  # the official checkout, bench-only

    a, m = trainer.encoder.arch, trainer.cfg.model

    def make() -> torch.nn.Module:
        return vit.VisionTransformer(
            img_size=[a.img_size], patch_size=a.patch_size, embed_dim=a.embed_dim, depth=a.depth,
            num_heads=a.num_heads, mlp_ratio=a.mlp_ratio, qkv_bias=True,
            norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
        )  # fmt: skip

    encoder, target = make(), make()
    predictor = vit.vit_predictor(
        num_patches=encoder.patch_embed.num_patches, embed_dim=a.embed_dim,
        predictor_embed_dim=m.pred_emb_dim, depth=m.pred_depth, num_heads=a.num_heads,
    )  # fmt: skip
    for ours, theirs in ((trainer.encoder, encoder), (trainer.target_encoder, target),
                         (trainer.predictor, predictor)):  # fmt: skip
        theirs.load_state_dict(ours.state_dict())
    return encoder.to(device), target.to(device), predictor.to(device)


def compare(
    model: str = "vit_tiny",
    batch: int = 8,
    rounds: int = 10,
    src: Optional[Path] = None,
    reference: bool = False,
    size: int = 224,
    extra: Sequence[str] = (),
) -> list[Row]:
    """Rows of the toolkit's step vs the official step (and the re-implementation); prints the
    first 3 losses of each. Raises AssertionError when a contender's losses differ."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(model, batch, Path(tmp), size, extra)
        trainer.log.close()
    groups = trainer.sample_masks(batch)
    trainer.sample_masks = lambda n: groups  # the same masks for every step
    ((_, masks_enc, masks_pred),) = groups
    contenders = {}
    if src is not None:
        contenders["official code's step"] = official_step(src, trainer)
    if reference:
        contenders["official-style re-implementation"] = RefStep(trainer)
    torch.manual_seed(0)
    imgs = torch.randn(batch, 3, size, size)
    fns = {"toolkit": lambda: trainer.train_step(imgs)["loss"]}
    fns.update({k: (lambda s=s: s(imgs, masks_enc, masks_pred)) for k, s in contenders.items()})
    losses = {k: [fn() for _ in range(3)] for k, fn in fns.items()}
    for k, v in losses.items():
        print(f"  {k} losses, steps 1-3: " + " ".join(f"{x:.9f}" for x in v))
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(v, losses["toolkit"])), k
    modules = (trainer.encoder, trainer.target_encoder, trainer.predictor)
    flops = {
        k: counted_flops(fn, *(modules if k == "toolkit" else ())) / 1e9 for k, fn in fns.items()
    }
    print("  GFLOP per step: " + ", ".join(f"{k} {v:.2f}" for k, v in flops.items()))
    times = alternating(fns, rounds, warmup=0)  # (the 3 checked steps warmed them up)
    a = trainer.encoder.arch
    bench = (
        f"pretrain step {model}/{a.patch_size} at {size} (width {a.embed_dim}), batch {batch}, "
        f"context {masks_enc[0].shape[1]} / target 4x{masks_pred[0].shape[1]} patches"
    )
    rows = (
        []
        if src is not None
        else [
            Row(
                bench,
                "official code's step",
                skipped=(
                    "no --official-src DIR or IJEPA_OFFICIAL_SRC (a checkout of "
                    "facebookresearch/ijepa)"
                ),
            )
        ]
    )
    for k in contenders:
        same = "equal" if losses[k] == losses["toolkit"] else "equal to 1e-5"
        rows.append(
            Row(
                bench,
                k,
                "s/step",
                times["toolkit"][0],
                times[k][0],
                note=(
                    f"CPU s/step {times['toolkit'][1]:.3f} vs {times[k][1]:.3f} "
                    f"({times[k][1] / times['toolkit'][1]:.2f}x); losses of 3 steps {same}; "
                    f"GFLOP/step {flops['toolkit']:.2f} vs {flops[k]:.2f} "
                    f"({flops[k] / flops['toolkit']:.3f}x)"
                ),
            )
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--official-src", type=Path, default=None)
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also time the official-style re-implementation (bench/reference.py)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine())
    rows = compare(args.model, args.batch, args.rounds, official_src(args.official_src),
                   args.reference)  # fmt: skip
    for row in rows:
        print(row.line())


if __name__ == "__main__":
    main()
