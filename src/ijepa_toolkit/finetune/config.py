"""The finetuning config: the official I-JEPA sections plus ``mixup`` and ``finetune``.

Where each default comes from (facebookresearch/mae at commit
efb2a8062c206524e35e47d04501ed4f544c0ae8): "MAE argparse" is a default of ``main_finetune.py``'s
``get_args_parser``; "FINETUNE.md" is the published ImageNet recipe of ``FINETUNE.md`` (the
ViT-L/H commands: ``--batch_size 32`` (ViT-L), ``--mixup 0.8 --cutmix 1.0``, ``--epochs 50
--blr 1e-3 --layer_decay 0.75``, the last three equal to the argparse defaults); "MAE
datasets.py" is ``util/datasets.py:build_transform``; "timm" is a ``create_transform`` default
that MAE does not pass; "toolkit" is this toolkit's own choice (MAE has no such option).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional

from ..config import EncoderSection, LoggingSection, MetaSection
from ..data.subsets import SubsetSection
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, transform_checks

Check = tuple[str, Any, bool, str]


def _probability(key: str, value: float) -> Check:
    return key, value, 0 <= value <= 1, "in [0, 1]"


@dataclass
class DataSection:
    """Image folders (``folder/<class>/<image>``), transforms and loader settings."""

    train_folder: str = ""  # ImageFolder of the training images
    val_folder: str = ""  # ImageFolder of the evaluation images (same class folders)
    digits_root: Optional[str] = None  # build scikit-learn's digits here and use them (demo/tests)
    digits_per_class: int = 0  # 0: all 1797 digits
    img_size: int = 224  # MAE argparse --input_size
    crop_ratio: float = (
        0.875  # eval: resize to img_size / crop_ratio, center crop (MAE datasets.py)
    )
    batch_size: int = 32  # per device (FINETUNE.md; MAE argparse: 64)
    num_workers: int = 8  # toolkit (MAE argparse: 10)
    pin_mem: bool = True  # MAE argparse
    on_error: Literal["skip", "raise"] = "skip"  # skip: an unreadable image is warned, counted
    augment: bool = True  # False: train with the eval transform (parity/debug runs; toolkit)
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop (timm)
    hflip: float = 0.5  # horizontal flip probability (timm)
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm RandAugment policy (MAE argparse)
    color_jitter: Optional[float] = None  # MAE argparse: None (RandAugment instead)
    interpolation: Literal[
        "bicubic", "bilinear", "nearest", "box", "hamming", "lanczos", "random"
    ] = "bicubic"  # train crop resampling (MAE datasets.py)
    reprob: float = 0.25  # random erasing probability (MAE argparse, FINETUNE.md)
    remode: Literal["pixel", "rand", "const"] = "pixel"  # random erasing fill (MAE argparse)
    recount: int = 1  # random erasing count (MAE argparse)
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # MAE datasets.py
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))  # MAE datasets.py

    def checks(self) -> list[Check]:
        s = self.scale
        return [
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            *transform_checks(self.img_size, self.crop_ratio),
            ("digits_per_class", self.digits_per_class, self.digits_per_class >= 0, ">= 0"),
            (
                "train_folder",
                self.train_folder,
                not (self.train_folder and self.digits_root),
                "empty when data.digits_root is set (give one of the two)",
            ),
            ("num_workers", self.num_workers, self.num_workers >= 0, ">= 0"),
            ("scale", s, len(s) == 2 and 0 < s[0] <= s[1] <= 1, "[min, max] in (0, 1]"),
            _probability("hflip", self.hflip),
            _probability("reprob", self.reprob),
            ("recount", self.recount, self.recount >= 1, ">= 1"),
            ("mean", self.mean, len(self.mean) == 3, "3 values (RGB)"),
            ("std", self.std, len(self.std) == 3 and min(self.std) > 0, "3 values > 0 (RGB)"),
        ]


@dataclass
class MixupSection:
    """timm ``Mixup``; the loss follows from these (see ``recipe.build_criterion``)."""

    mixup: float = 0.8  # mixup alpha, 0 = off (FINETUNE.md; MAE argparse: 0)
    cutmix: float = 1.0  # cutmix alpha, 0 = off (FINETUNE.md; MAE argparse: 0)
    cutmix_minmax: Optional[List[float]] = None  # MAE argparse
    prob: float = 1.0  # probability of mixing a batch (MAE argparse --mixup_prob)
    switch_prob: float = 0.5  # mixup -> cutmix switch probability (MAE argparse)
    mode: Literal["batch", "pair", "elem"] = "batch"  # timm Mixup mode (MAE argparse)
    smoothing: float = 0.1  # label smoothing (MAE argparse)

    def checks(self) -> list[Check]:
        return [
            ("mixup", self.mixup, self.mixup >= 0, ">= 0"),
            ("cutmix", self.cutmix, self.cutmix >= 0, ">= 0"),
            _probability("prob", self.prob),
            _probability("switch_prob", self.switch_prob),
            ("smoothing", self.smoothing, 0 <= self.smoothing < 1, "in [0, 1)"),
        ]

    def active(self) -> bool:
        """Whether Mixup or CutMix mixes images (timm ``Mixup`` is built)."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


@dataclass
class OptimizationSection:
    """AdamW with layer-wise lr decay; per-iteration warmup then cosine (MAE argparse defaults)."""

    epochs: int = 50  # MAE argparse (FINETUNE.md ViT-L/H)
    warmup_epochs: float = 5.0  # MAE argparse (an int there)
    blr: float = 1e-3  # base lr: lr = blr * effective_batch / 256 (MAE argparse, FINETUNE.md L/H)
    lr: Optional[float] = None  # absolute lr; overrides blr (MAE argparse)
    min_lr: float = 1e-6  # MAE argparse
    weight_decay: float = 0.05  # MAE argparse, FINETUNE.md
    layer_decay: float = 0.75  # MAE argparse (FINETUNE.md ViT-L/H)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # torch AdamW (MAE: unset)
    clip_grad: Optional[float] = (
        None  # max grad norm; None: no clipping, norm logged (MAE argparse)
    )
    accum_iter: int = 1  # gradient accumulation steps (MAE argparse)

    def checks(self) -> list[Check]:
        b, lr, clip = self.betas, self.lr, self.clip_grad
        return [
            ("epochs", self.epochs, self.epochs >= 1, ">= 1"),
            ("warmup_epochs", self.warmup_epochs, self.warmup_epochs >= 0, ">= 0"),
            ("blr", self.blr, self.blr > 0, "> 0"),
            ("lr", lr, lr is None or lr > 0, "> 0 or null"),
            ("min_lr", self.min_lr, self.min_lr >= 0, ">= 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("layer_decay", self.layer_decay, 0 < self.layer_decay <= 1, "in (0, 1]"),
            ("betas", b, len(b) == 2 and all(0 <= x < 1 for x in b), "[beta1, beta2] in [0, 1)"),
            ("clip_grad", clip, clip is None or clip > 0, "> 0 or null"),
            ("accum_iter", self.accum_iter, self.accum_iter >= 1, ">= 1"),
        ]


@dataclass
class FinetuneSection:
    """Head, regularisation and run options."""

    pool: Literal["avg", "concat4"] = "avg"  # avg: mean of final-norm tokens; concat4: last 4, 4*D
    head_batchnorm: bool = False  # BatchNorm1d(affine=False) before the head (MAE linprobe)
    head_init_std: float = 2e-5  # MAE main_finetune.py: trunc_normal_(head.weight, std=2e-5)
    freeze_encoder: bool = False  # train the head only (toolkit)
    drop_path: float = 0.1  # MAE argparse (FINETUNE.md: 0.1 ViT-B, 0.2 ViT-L, 0.3 ViT-H)
    grad_checkpointing: bool = False  # activation checkpointing in the encoder blocks (toolkit)
    use_fp16: bool = False  # CUDA: fp16 autocast + GradScaler instead of bf16 (toolkit)
    compile: bool = False  # torch.compile the classifier (first steps slower; see bench/)
    model_ema: bool = False  # timm ModelEmaV3 of the weights (toolkit; not in MAE)
    model_ema_decay: float = 0.9999  # DeiT's default
    checkpoint_every: int = 0  # also write checkpoint-last.pth every N optimizer steps (0: epochs)
    eval_batch_size: Optional[int] = None  # default: 2 * data.batch_size (MAE: data.batch_size)

    def checks(self) -> list[Check]:
        ev = self.eval_batch_size
        return [
            ("head_init_std", self.head_init_std, self.head_init_std >= 0, ">= 0"),
            ("drop_path", self.drop_path, 0 <= self.drop_path < 1, "in [0, 1)"),
            _probability("model_ema_decay", self.model_ema_decay),
            ("checkpoint_every", self.checkpoint_every, self.checkpoint_every >= 0, ">= 0"),
            ("eval_batch_size", ev, ev is None or ev >= 1, ">= 1 or null"),
        ]


@dataclass
class FinetuneConfig:
    """``main_finetuning.py``'s config (``--fname`` YAML, then ``section.key=value``)."""

    meta: MetaSection = field(default_factory=MetaSection)
    data: DataSection = field(default_factory=DataSection)
    subset: SubsetSection = field(default_factory=SubsetSection)  # part of data.train_folder
    mixup: MixupSection = field(default_factory=MixupSection)
    model: EncoderSection = field(default_factory=EncoderSection)
    optimization: OptimizationSection = field(default_factory=OptimizationSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
