"""The MAE finetuning recipe from timm's pieces: transforms, Mixup/CutMix and the loss they imply,
layer-wise lr decay groups, AdamW, per-iteration warmup + cosine, the classifier.
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn

from ..build import build_encoder
from ..data.transforms import eval_transform
from ..engine.utils import adamw, warmup_cosine
from ..models.heads import EncoderClassifier
from .config import DataSection, FinetuneConfig, MixupSection, OptimizationSection


def train_transform(data: DataSection):
    """MAE's training transform via timm: bicubic RandomResizedCrop, flip, RandAugment, erasing.

    ``data.augment=False`` gives the evaluation transform instead. Output (3, S, S), normalized.
    """
    if not data.augment:
        return eval_transform(data.img_size, data.crop_ratio, data.mean, data.std)
    _patch_timm_posterize()
    return create_transform(
        input_size=data.img_size,
        is_training=True,
        scale=tuple(data.scale),
        hflip=data.hflip,
        color_jitter=data.color_jitter,
        auto_augment=data.auto_augment or None,
        interpolation=data.interpolation,
        re_prob=data.reprob,
        re_mode=data.remode,
        re_count=data.recount,
        mean=tuple(data.mean),
        std=tuple(data.std),
    )


def _posterize(img, bits_to_keep, **__):
    """timm's ``posterize`` op, also for 0 bits (a black image, as Pillow < 11 gave).

    ``rand-m9-mstd0.5-inc1`` draws magnitudes up to 10, i.e. ``PosterizeIncreasing`` with 0 bits,
    which newer Pillow refuses with ``ValueError`` (timm 1.0.x passes it through).
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize


def build_mixup(m: MixupSection, num_classes: int) -> Optional[Mixup]:
    """timm ``Mixup`` told the dataset's class count, or None when mixing is off.

    It pairs images within a batch: ``run.check_config`` refuses an odd per-device batch.
    """
    if not m.active():
        return None
    return Mixup(
        mixup_alpha=m.mixup,
        cutmix_alpha=m.cutmix,
        cutmix_minmax=m.cutmix_minmax,
        prob=m.prob,
        switch_prob=m.switch_prob,
        mode=m.mode,
        label_smoothing=m.smoothing,
        num_classes=num_classes,
    )


def build_criterion(m: MixupSection) -> nn.Module:
    """Soft-target CE when mixing (Mixup makes smoothed soft targets), label-smoothing CE when
    only smoothing, plain CE when neither (MAE's rule)."""
    if m.active():
        return SoftTargetCrossEntropy()
    if m.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=m.smoothing)
    return nn.CrossEntropyLoss()


def build_classifier(cfg: FinetuneConfig, num_classes: int) -> EncoderClassifier:
    """Encoder (checkpoint or random init, drop path in the blocks) + pooling + linear head."""
    ft = cfg.finetune
    encoder = build_encoder(cfg.model, drop_path_rate=ft.drop_path)
    grid = cfg.data.img_size // encoder.patch_embed.patch_size[0]
    if encoder.pos_embed_kind == "sincos" and (grid, grid) != tuple(encoder.patch_embed.grid_size):
        # The fixed table is recomputed for this grid, so the stored parameter is unused.
        encoder.pos_embed.requires_grad_(False)
    if ft.freeze_encoder:
        encoder.requires_grad_(False)
    if ft.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    return EncoderClassifier(
        encoder, num_classes, pool=ft.pool, batchnorm=ft.head_batchnorm, init_std=ft.head_init_std
    )


def param_groups(model: EncoderClassifier, opt: OptimizationSection) -> list[dict]:
    """timm's layer-decay groups with MAE's layer ids (``EncoderClassifier.group_matcher``).

    Scales: head and final norm 1.0, ``blocks.i`` ``decay ** (depth - i)``, embeddings
    ``decay ** (depth + 1)``. No weight decay on biases, norms (1-D tensors) and ``pos_embed``.
    """
    return param_groups_layer_decay(
        model,
        weight_decay=opt.weight_decay,
        no_weight_decay_list=("encoder.pos_embed",),
        layer_decay=opt.layer_decay,
    )


def absolute_lr(opt: OptimizationSection, effective_batch: int) -> float:
    """``opt.lr`` if set, else ``blr * effective_batch / 256`` (the linear scaling rule)."""
    return opt.lr if opt.lr is not None else opt.blr * effective_batch / 256


def build_optimizer(groups: list[dict], opt: OptimizationSection, lr: float) -> torch.optim.AdamW:
    """AdamW over the layer-decay ``groups`` (``engine.utils.adamw``: fused on CUDA, foreach
    otherwise)."""
    return adamw(groups, lr=lr, betas=tuple(opt.betas))


def build_scheduler(optimizer, opt: OptimizationSection, steps_per_epoch: int):
    """Per-step linear warmup from 0 over ``warmup_epochs``, then cosine to ``min_lr``
    (``engine.utils.warmup_cosine``); call ``step_update(step)`` before each optimizer step."""
    return warmup_cosine(optimizer, opt.epochs, steps_per_epoch, opt.warmup_epochs, opt.min_lr)


def group_table(model: nn.Module, optimizer, lr: float) -> str:
    """One line per parameter group: lr scale, peak lr, weight decay, size, first..last tensor."""
    names = {id(p): n for n, p in model.named_parameters()}
    lines = [
        f"{'group':>5} {'lr_scale':>9} {'peak_lr':>10} {'wd':>6} {'tensors':>7} "
        f"{'params':>10}  names"
    ]
    for i, g in enumerate(optimizer.param_groups):
        ps = g["params"]
        first, last = names[id(ps[0])], names[id(ps[-1])]
        span = first if first == last else f"{first} .. {last}"
        lines.append(
            f"{i:>5} {g.get('lr_scale', 1.0):>9.4g} {lr * g.get('lr_scale', 1.0):>10.3e} "
            f"{g['weight_decay']:>6.3g} {len(ps):>7} {sum(p.numel() for p in ps):>10}  {span}"
        )
    return "\n".join(lines)
