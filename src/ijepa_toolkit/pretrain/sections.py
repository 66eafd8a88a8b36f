"""The pretraining config sections whose code imports torch (``data``, ``model``, ``packing``):
here, so that ``--help``, ``--print-config`` and config errors read them without torch. Their
modules (``data.py``, ``model.py``, ``packing.py``) import them from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass
class DataSection:
    """The official ``data`` section, with the toolkit's one folder key: images come from
    ``train_folder`` (class sub-folders; labels unused), the official ``root_path/image_folder``.
    ``digits_root`` builds scikit-learn's digits there and trains on them instead. kNN / LiDAR
    probes use ``knn_train_folder`` / ``knn_val_folder`` (the digits splits for ``digits_root``).
    """

    train_folder: str = ""  # ImageFolder of the training images (official root_path/image_folder)
    digits_root: Optional[str] = None  # build scikit-learn's digits here and use them (demo/tests)
    batch_size: int = 128  # per process
    crop_size: int = 224
    crop_scale: tuple[float, float] = (0.3, 1.0)
    use_horizontal_flip: bool = False
    use_color_distortion: bool = False
    color_jitter_strength: float = 0.0
    use_gaussian_blur: bool = False
    num_workers: int = 10
    pin_mem: bool = True
    knn_train_folder: Optional[str] = None
    knn_val_folder: Optional[str] = None

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        lo, hi = self.crop_scale
        return [
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("crop_size", self.crop_size, self.crop_size >= 1, ">= 1"),
            ("crop_scale", self.crop_scale, 0 < lo <= hi <= 1,
             "[min, max] with 0 < min <= max <= 1"),
            ("color_jitter_strength", self.color_jitter_strength,
             self.color_jitter_strength >= 0, ">= 0"),
            ("num_workers", self.num_workers, self.num_workers >= 0, ">= 0"),
            ("train_folder", self.train_folder, not (self.train_folder and self.digits_root),
             "empty when data.digits_root is set (give one of the two)"),
        ]  # fmt: skip


@dataclass
class ModelSection:
    """Encoder, predictor and the StoP / feature-normalisation switches."""

    model_name: Literal[
        "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant"
    ] = "vit_huge"
    patch_size: int = 14
    arch: Optional[dict] = None  # EncoderArch fields overriding the named size (tiny tests)
    pred_depth: int = 12
    pred_emb_dim: int = 384
    drop_path: float = 0.0
    output_norm: Literal["layernorm", "dyntanh"] = "layernorm"  # the encoder's final norm
    block_norm: Literal["layernorm", "dyntanh"] = "layernorm"  # norm1/norm2 inside the blocks
    norm_affine: bool = True  # DynTanh weight/bias
    norm_out_affine: Optional[bool] = None  # the output DynTanh's weight/bias (null: norm_affine)
    # encoder attention / MLP (models/vit_variants.py; featurenorm: layernorm, false, gelu_tanh)
    qk_norm: Optional[Literal["layernorm", "dyntanh"]] = None  # per-head q/k norm (null: none)
    qkv_bias: bool = True  # bias of the attention's qkv projection (arch.qkv_bias overrides it)
    mlp_act: Literal["gelu", "gelu_tanh"] = "gelu"  # MLP activation: exact or tanh-approximated
    pred_num_heads: int = 0  # predictor attention heads (0: the encoder's)
    # predictor blocks (models/predictor.py; featurenorm: dyntanh, layernorm, false, gelu_tanh)
    pred_block_norm: Literal["layernorm", "dyntanh"] = "layernorm"  # predictor norm1/norm2
    pred_norm_affine: bool = True  # the predictor block DynTanh's weight/bias
    pred_qk_norm: Optional[Literal["layernorm", "dyntanh"]] = None  # per-head q/k (null: none)
    pred_qkv_bias: bool = True  # bias of the predictor attention's qkv projection
    pred_proj_bias: bool = True  # bias of the predictor attention's output projection
    pred_mlp_act: Literal["gelu", "gelu_tanh"] = "gelu"  # predictor MLP activation
    pred_layernorm_eps: float = 1e-6  # eps of the predictor's LayerNorms (torch's default: 1e-5)
    target_norm: Literal[
        "layernorm", "batchnorm", "running_batchnorm", "running_batchnorm_singleton", "none"
    ] = "layernorm"  # pretrain/targets.py
    stop: bool = False  # StoP: stochastic positions for the predictor's target tokens
    stop_sigma: float = 0.25  # std of the StoP noise, in the encoder width
    loss: Literal["smooth_l1", "l2"] = "smooth_l1"
    # variable-resolution options (models/vit_variants.py), off by default
    pos_embed: Literal["sincos", "learned", "factorized", "rope"] = "sincos"
    rope_theta: float = 10000.0
    num_registers: int = 0  # encoder register tokens (not targets, not pooled)
    pred_num_registers: int = 0  # predictor register tokens (never predictions, never in the loss)
    # predictor token dropping + batch repeat (token_drop.py); 1.0 / 1 = off
    pred_capacity: float = 1.0  # fraction of context and of target tokens per predictor copy
    pred_repeats: int = 1  # predictor copies per image
    pred_replacement: bool = True  # copies draw independently (seed), else disjoint subsets
    pred_window: int = 1  # token-drop units: window x window patches (featurenorm: 2)
    tome_rates: list = field(default_factory=list)  # ToMe: tokens merged per encoder block
    # ToMe merge point: after the attention (ijepa-enhanced) or after the whole block (featurenorm)
    tome_placement: Literal["attention", "block"] = "attention"
    tome_mode: Literal["mean", "drop"] = "mean"  # merged tokens: unweighted mean, or dropped
    target_tome_rates: Optional[list] = None  # ToMe in the target encoder (null: tome_rates)
    tome_unmerge: bool = True  # false: the loss on merged tokens (IJEPA-Enhanced should_unmerge)
    pred_tome_rates: list = field(default_factory=list)  # ToMe: tokens merged per predictor block
    pred_tome_mode: Literal["mean", "drop"] = "drop"  # IJEPA-Enhanced's predictor default
    pred_encoder_registers: bool = False  # encoder registers enter the predictor (featurenorm)
    pred_zero_encoder_registers: bool = True  # ... replaced by pred_num_registers (else: added)
    moe_experts: int = 0  # DiffMoE MLPs in the encoder (0: dense MLP)
    moe_capacity: float = 1.0  # training: each expert takes capacity * tokens / experts tokens
    moe_threshold: float = 0.5  # eval: capacity-predictor probability to use an expert
    moe_aux_weight: float = 1.0  # weight of the capacity predictor's BCE in the loss

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        cap, rep = self.pred_capacity, self.pred_repeats
        disjoint_ok = self.pred_replacement or cap * rep <= 1 + 1e-9
        return [
            ("patch_size", self.patch_size, self.patch_size >= 1, ">= 1"),
            ("pred_depth", self.pred_depth, self.pred_depth >= 1, ">= 1"),
            ("pred_emb_dim", self.pred_emb_dim, self.pred_emb_dim >= 1, ">= 1"),
            ("pred_layernorm_eps", self.pred_layernorm_eps, self.pred_layernorm_eps > 0, "> 0"),
            ("pred_num_heads", self.pred_num_heads, self.pred_num_heads >= 0 and
             self.pred_emb_dim % (self.pred_num_heads or 1) == 0,
             "0 (the encoder's) or a divisor of model.pred_emb_dim"),
            ("drop_path", self.drop_path, 0 <= self.drop_path < 1, "in [0, 1)"),
            ("stop_sigma", self.stop_sigma, self.stop_sigma >= 0, ">= 0"),
            ("rope_theta", self.rope_theta, self.rope_theta > 0, "> 0"),
            ("num_registers", self.num_registers, self.num_registers >= 0, ">= 0"),
            ("pred_num_registers", self.pred_num_registers, self.pred_num_registers >= 0, ">= 0"),
            ("pred_capacity", cap, 0 < cap <= 1, "in (0, 1]"),
            ("pred_repeats", rep, rep >= 1, ">= 1"),
            ("pred_window", self.pred_window, self.pred_window >= 1, ">= 1"),
            ("pred_capacity", cap, disjoint_ok,
             f"<= 1 / pred_repeats ({rep}) for disjoint subsets (or set model.pred_replacement)"),
            *[(key, rates, _counts(rates), "a list of ints >= 0") for key, rates in (
              ("tome_rates", self.tome_rates), ("target_tome_rates", self.target_rates()),
              ("pred_tome_rates", self.pred_tome_rates))],
            ("tome_unmerge", self.tome_unmerge,
             self.tome_unmerge or (any(self.tome_rates) and any(self.target_rates())),
             "true unless model.tome_rates and the target encoder's rates merge tokens"),
            ("tome_unmerge", self.tome_unmerge, self.tome_unmerge or (cap == 1 and rep == 1),
             "true with predictor token dropping (model.pred_capacity / pred_repeats)"),
            ("pred_tome_rates", self.pred_tome_rates,
             len(self.pred_tome_rates) in (0, self.pred_depth),
             f"one count per predictor block (model.pred_depth={self.pred_depth}) or []"),
            ("pred_encoder_registers", self.pred_encoder_registers,
             not self.pred_encoder_registers or (self.num_registers > 0 and
             self.pred_num_registers in (0, self.num_registers)),
             "false unless model.num_registers > 0 and pred_num_registers is 0 or the same"),
            ("moe_experts", self.moe_experts, self.moe_experts >= 0, ">= 0"),
            ("moe_capacity", self.moe_capacity, self.moe_capacity > 0, "> 0"),
            ("moe_threshold", self.moe_threshold, 0 <= self.moe_threshold <= 1, "in [0, 1]"),
            ("moe_aux_weight", self.moe_aux_weight, self.moe_aux_weight >= 0, ">= 0"),
        ]  # fmt: skip

    def target_rates(self) -> list:
        """ToMe counts of the target encoder: ``target_tome_rates``, else ``tome_rates``."""
        return self.tome_rates if self.target_tome_rates is None else self.target_tome_rates


def _counts(rates) -> bool:
    return isinstance(rates, list) and all(isinstance(r, int) and r >= 0 for r in rates)


BLOCKS_NO_DROP = (
    "packing.split=enhanced_blocks predicts every target rectangle in full: set "
    "model.pred_capacity=1 and model.pred_repeats=1"
)


@dataclass
class PackingSection:
    """The ``packing`` config section (off by default)."""

    enabled: bool = False
    min_side: int = 16  # pixels, longer side (enhanced_crop: side of the crop's area)
    max_side: int = 32
    resize: Literal["longer_side", "enhanced_crop"] = "longer_side"  # how images are sized
    window: int = 1  # sides are multiples of patch * window (2: 2x2 windows)
    ctx_budget: int = 256  # context tokens per packed row
    tgt_budget: int = 64  # target tokens per packed row
    # context/target split (packing_split.py): one block (the toolkit's), featurenorm's shuffled
    # windows, ijepa-enhanced's target rectangles
    split: Literal["block", "featurenorm_windows", "enhanced_blocks"] = "block"  # docs/packing.md
    target_scale: list = field(default_factory=lambda: [0.15, 0.25])  # block area / image area
    target_aspect: list = field(default_factory=lambda: [0.75, 1.5])  # block height / width
    context_fraction: list = field(default_factory=lambda: [0.25, 0.5])  # windows in the context
    num_targets: int = 4  # enhanced_blocks: target rectangles per image
    drop_chance: float = 0.0  # enhanced_blocks: each patch dropped before the split
    carry_over: bool = True  # the least full row's images wait for the next step (less padding)

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        lo, hi = self.context_fraction
        unit = self.window * self.window
        return [
            ("window", self.window, self.window >= 1, ">= 1"),
            ("context_fraction", self.context_fraction, 0 < lo <= hi < 1,
             "[min, max] with 0 < min <= max < 1"),
            ("num_targets", self.num_targets, self.num_targets >= 1, ">= 1"),
            ("drop_chance", self.drop_chance, 0 <= self.drop_chance < 1, "in [0, 1)"),
            *[(key, value, self.split != "featurenorm_windows" or value % unit == 0,
               f"a multiple of window**2 = {unit} with split featurenorm_windows")
              for key, value in (("ctx_budget", self.ctx_budget), ("tgt_budget", self.tgt_budget))],
        ]  # fmt: skip
