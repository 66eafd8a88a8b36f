"""The finetuning config: the official I-JEPA sections plus ``mixup`` and ``finetune``.

Defaults are MAE's ``main_finetune.py`` defaults (https://github.com/facebookresearch/mae).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ..config import EncoderSection, LoggingSection, MetaSection
from ..data.subsets import SubsetSection
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class DataSection:
    """ImageFolder roots (``root/<class>/<image>``), transforms and loader settings."""

    train_root: str = ""
    val_root: str = ""
    digits_root: Optional[str] = None  # build scikit-learn's digits here and use them (demo/tests)
    digits_per_class: int = 0  # 0: all 1797 digits
    img_size: int = 224
    crop_ratio: float = 0.875  # eval: resize to img_size / crop_ratio, center crop img_size
    batch_size: int = 32  # per device
    num_workers: int = 8
    pin_mem: bool = True
    on_error: str = "skip"  # skip | raise: an unreadable image is skipped (warned, counted)
    augment: bool = True  # False: train with the eval transform (parity/debug runs)
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area
    hflip: float = 0.5
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm RandAugment policy
    color_jitter: Optional[float] = None  # MAE passes None (RandAugment instead)
    interpolation: str = "bicubic"
    reprob: float = 0.25  # random erasing probability
    remode: str = "pixel"
    recount: int = 1
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))


@dataclass
class MixupSection:
    """timm ``Mixup``; the loss follows from these (see ``recipe.build_criterion``)."""

    mixup: float = 0.8  # mixup alpha, 0 = off
    cutmix: float = 1.0  # cutmix alpha, 0 = off
    cutmix_minmax: Optional[List[float]] = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"  # batch | pair | elem
    smoothing: float = 0.1  # label smoothing


@dataclass
class OptimizationSection:
    """AdamW with layer-wise lr decay; per-iteration warmup then cosine."""

    epochs: int = 50
    warmup_epochs: float = 5.0
    blr: float = 1e-3  # base lr: lr = blr * effective_batch / 256
    lr: Optional[float] = None  # absolute lr; overrides blr
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: Optional[float] = None  # max grad norm; None: no clipping (the norm is logged)
    accum_iter: int = 1  # gradient accumulation steps


@dataclass
class FinetuneSection:
    """Head, regularisation and run options."""

    pool: str = "avg"  # avg (mean of final-norm tokens) | concat4 (last 4 blocks, 4*D)
    head_batchnorm: bool = False
    head_init_std: float = 2e-5  # MAE: trunc_normal_(head.weight, std=2e-5)
    freeze_encoder: bool = False  # train the head only
    drop_path: float = 0.1
    grad_checkpointing: bool = False  # activation checkpointing in the encoder blocks
    use_fp16: bool = False  # CUDA: fp16 autocast + GradScaler instead of bf16
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    checkpoint_every: int = 0  # also write checkpoint-last.pth every N optimizer steps (0: epochs)
    eval_batch_size: Optional[int] = None  # default: 2 * data.batch_size


@dataclass
class FinetuneConfig:
    meta: MetaSection = field(default_factory=MetaSection)
    data: DataSection = field(default_factory=DataSection)
    subset: SubsetSection = field(default_factory=SubsetSection)  # train on part of train_root
    mixup: MixupSection = field(default_factory=MixupSection)
    model: EncoderSection = field(default_factory=EncoderSection)
    optimization: OptimizationSection = field(default_factory=OptimizationSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
