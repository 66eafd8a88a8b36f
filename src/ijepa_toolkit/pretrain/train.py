"""The I-JEPA / StoP pretraining behind ``main_pretrain.py``: config, checks, ``main``.

One iteration: the EMA target encoder sees the full images, its tokens are normalised
(``model.target_norm``) and gathered at the target positions; the context encoder sees the context
patches, the predictor predicts the target tokens; smooth-L1 (or L2) loss; AdamW step; EMA update
of the target encoder. Learning rate, weight decay and EMA momentum follow the official
per-iteration schedules (``schedules.py``).

Checkpoints use the official layout (``encoder``, ``predictor``, ``target_encoder`` with DDP
``module.`` prefixes, ``opt``, ``scaler``, ``epoch``, ``loss``, ``batch_size``, ``world_size``,
``lr``) plus ``step``, per-rank ``rng``, ``target_norm``, per-rank ``packing_waiting`` (the
images packing carries over to the next step) and ``config`` for an exact resume.

The machinery (``Pretrainer``) is ``trainer.py``, imported when work starts: ``--help``,
``--print-config`` and config errors answer without torch (the sections: ``sections.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

from ..config import (
    LoggingSection,
    MetaSection,
    config_parser,
    parse_config,
    require,
    require_paths,
    save_config,
    to_dict,
)
from ..engine.distributed import DistInfo, cleanup, init_distributed
from ..engine.logger import setup_console_logging
from ..errors import ConfigError
from ..masks.multiblock import MaskSection
from ..run_folder import ALWAYS_ALLOWED, RunFolder, add_run_flags, open_run
from ..runs import run_main, write_results
from .sections import BLOCKS_NO_DROP, DataSection, ModelSection, PackingSection

if TYPE_CHECKING:
    from .seed_views import ViewOptions

logger = logging.getLogger("ijepa_toolkit")
# what a --resume may change besides run_folder.ALWAYS_ALLOWED: when checkpoints and RankMe
# rows are written (RankMe reads the step's targets, it draws no random number)
RESUME_ALLOWED = (*ALWAYS_ALLOWED, "logging.checkpoint_freq", "logging.rankme_freq")


@dataclass
class OptimizationSection:
    """The official ``optimization`` section; ``warmup`` and ``epochs`` in epochs."""

    ema: tuple[float, float] = (0.996, 1.0)
    epochs: int = 300
    final_lr: float = 1.0e-6
    final_weight_decay: float = 0.4
    ipe_scale: float = 1.0
    lr: float = 0.001
    start_lr: float = 0.0002
    warmup: float = 40
    weight_decay: float = 0.04
    clip_grad: float = 0.0  # max grad norm; 0 = no clipping (official)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW (beta1, beta2); default: torch's, official
    # lr: warmup_cosine (official, `warmup` epochs) or warmup_steady_cooldown (featurenorm seed:
    # start_lr -> lr over lr_steps[0] iterations, lr for lr_steps[1], -> final_lr over lr_steps[2])
    lr_schedule: Literal["warmup_cosine", "warmup_steady_cooldown"] = "warmup_cosine"
    lr_steps: tuple[int, int, int] = (10000, 250000, 50000)  # iterations (warmup_steady_cooldown)
    # EMA momentum: linear `ema` (official) or three_phase (featurenorm seed: ema_phases[0] ->
    # ema_phases[1] over ema_steps[0] iterations, then towards ema_phases[2] over ema_steps[1])
    ema_schedule: Literal["linear", "three_phase"] = "linear"
    ema_phases: tuple[float, float, float] = (0.8, 0.996, 0.9999)  # start, steady, end momentum
    ema_steps: tuple[int, int] = (1000, 400000)  # iterations (three_phase)

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        lo, hi = self.ema
        return [
            ("ema", self.ema, 0 <= lo <= hi <= 1, "[start, end] with 0 <= start <= end <= 1"),
            ("epochs", self.epochs, self.epochs >= 1, ">= 1"),
            ("betas", self.betas, all(0 <= b < 1 for b in self.betas), "[beta1, beta2] in [0, 1)"),
            ("lr_steps", self.lr_steps, min(self.lr_steps) >= 0, "iteration counts >= 0"),
            ("ema_steps", self.ema_steps, min(self.ema_steps) >= 0, "iteration counts >= 0"),
            ("ema_phases", self.ema_phases, all(0 <= m <= 1 for m in self.ema_phases),
             "[start, steady, end] momenta in [0, 1]"),
        ]  # fmt: skip


@dataclass
class PretrainLogging(LoggingSection):
    checkpoint_freq: int = 1  # epochs between checkpoint-last.pth writes (and the last epoch)
    rankme_freq: int = 100  # iterations between RankMe rows (global batch); 0 = off
    knn_freq: int = 0  # epochs between kNN probes on data.knn_*_folder; 0 = off
    knn_k: int = 20
    lidar_freq: int = 0  # epochs between LiDAR rows; 0 = off
    # toolkit: target encoder, pretraining transform, data.knn_train_folder; featurenorm: the
    # seed's protocol (context encoder in eval mode, random resize + random context windows of
    # data.train_folder's images, mean over context tokens, the seed's LiDAR constants)
    lidar_protocol: Literal["toolkit", "featurenorm"] = "toolkit"
    lidar_images: Optional[int] = None  # None: 256 (toolkit) / 1000 (featurenorm)
    lidar_views: Optional[int] = None  # None: 4 (toolkit) / 50 (featurenorm)
    lidar_sides: tuple[int, int] = (64, 256)  # featurenorm: mean side drawn in [min, max] px
    lidar_window: int = 2  # featurenorm: context windows of window x window patches
    # featurenorm: context windows between [0] and [1] of the windows, at most [2] of the
    # largest image's patches
    lidar_context: tuple[float, float, float] = (0.25, 0.5, 0.5)

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        lo, hi, top = self.lidar_context
        return [*super().checks(),
            ("lidar_images", self.lidar_images, (self.lidar_images or 1) >= 1, ">= 1 (or null)"),
            ("lidar_views", self.lidar_views, (self.lidar_views or 2) >= 2, ">= 2 (or null)"),
            ("lidar_sides", self.lidar_sides, 1 <= self.lidar_sides[0] <= self.lidar_sides[1],
             "[min, max] with 1 <= min <= max"),
            ("lidar_window", self.lidar_window, self.lidar_window >= 1, ">= 1"),
            ("lidar_context", self.lidar_context, 0 <= lo <= top <= hi <= 1,
             "[min, max, absolute max] with 0 <= min <= absolute max <= max <= 1"),
        ]  # fmt: skip

    def lidar_counts(self) -> tuple[int, int]:
        """(images, views) of the LiDAR probe: the keys, or the protocol's defaults."""
        images, views = (1000, 50) if self.lidar_protocol == "featurenorm" else (256, 4)
        return self.lidar_images or images, self.lidar_views or views

    def view_options(self, patch: int) -> ViewOptions:
        """The featurenorm protocol's view options for an encoder of ``patch`` pixels."""
        from .seed_views import ViewOptions

        lo, hi, top = self.lidar_context
        return ViewOptions(patch, self.lidar_window, *self.lidar_sides, lo, hi, top)


@dataclass
class PretrainConfig:
    meta: MetaSection = field(default_factory=MetaSection)
    data: DataSection = field(default_factory=DataSection)
    mask: MaskSection = field(default_factory=MaskSection)
    model: ModelSection = field(default_factory=ModelSection)
    optimization: OptimizationSection = field(default_factory=OptimizationSection)
    logging: PretrainLogging = field(default_factory=PretrainLogging)
    packing: PackingSection = field(default_factory=PackingSection)


def check_values(cfg: PretrainConfig) -> None:
    """Checks across sections (each section checks its own values when the config is built)."""
    mk, m, b = cfg.mask, cfg.model, cfg.data.batch_size
    require([
        ("mask.group_size", mk.group_size, not mk.group_size or b % mk.group_size == 0,
         f"a divisor of data.batch_size={b} (or 0: the batch)"),
    ])  # fmt: skip
    if cfg.packing.enabled:
        check_packing(cfg.packing, m)
    if (m.tome_rates or m.target_tome_rates) and not cfg.packing.enabled:
        raise ConfigError(
            "model.tome_rates / target_tome_rates are implemented for packed rows: set "
            "packing.enabled"
        )


def check_packing(p: PackingSection, m: ModelSection) -> None:
    """What packed rows support: no registers, StoP or DiffMoE (its expert-choice routing
    would route the padding tokens); token drop windows are whole packed windows."""
    if m.num_registers or m.pred_num_registers or m.stop:
        raise ConfigError(
            "packing.enabled=true works without model.num_registers, model.pred_num_registers "
            "and model.stop"
        )
    if m.moe_experts and (any(m.tome_rates) or any(m.target_rates())):
        raise ConfigError(
            "model.moe_experts under packing works without ToMe (model.tome_rates, "
            "model.target_tome_rates): merged rows lose the padding mask"
        )
    dropping = m.pred_capacity < 1 or m.pred_repeats > 1
    if dropping and p.split == "enhanced_blocks":
        raise ConfigError(BLOCKS_NO_DROP)
    if m.pred_window > 1 and (p.split != "featurenorm_windows" or p.window != m.pred_window):
        raise ConfigError(
            f"model.pred_window={m.pred_window} under packing needs packing.split="
            f"featurenorm_windows and packing.window={m.pred_window}, got split={p.split!r}, "
            f"window={p.window}"
        )


def check_folders(cfg: PretrainConfig) -> None:
    """The data folders exist: cheap, before any model is built."""
    d = cfg.data
    if not d.digits_root:  # (digits: built at start, the kNN folders are their splits)
        knn = [(f"data.{k}", getattr(d, k), "folder") for k in ("knn_train_folder",
               "knn_val_folder") if getattr(d, k)]  # fmt: skip
        require_paths([("data.train_folder", d.train_folder, "folder"), *knn])


def pretrain(
    cfg: PretrainConfig, dist_info: DistInfo, resume: bool = False, overwrite: bool = False
) -> dict:
    """Run (``resume``: continue) a pretraining; writes config, logs, checkpoint, results.json.

    The run owns ``logging.folder`` (``run_folder.open_run``): a folder holding another run's
    outputs needs ``resume`` or ``overwrite``, and a resume with changed settings is refused."""
    check_values(cfg)
    check_folders(cfg)  # (before --overwrite deletes anything)
    own = open_run(cfg.logging.folder, cfg, resume=resume, overwrite=overwrite,
                   allowed=RESUME_ALLOWED, is_main=dist_info.is_main)  # fmt: skip
    with own:
        return _pretrain(cfg, dist_info, own)


def _pretrain(cfg: PretrainConfig, dist_info: DistInfo, own: RunFolder) -> dict:
    from .trainer import Pretrainer  # torch and the model code: only when work starts

    logger.info("pretraining %s", describe(cfg))
    trainer = Pretrainer(cfg, dist_info)
    if dist_info.is_main:
        save_config(cfg, trainer.folder)
    if own.start is not None:
        trainer.resume()
    own.resumed(trainer.log, trainer.step if own.start is not None else -1)
    try:
        metrics = trainer.run()
    finally:
        trainer.log.close()
    if dist_info.is_main:
        write_results(trainer.folder, "pretrain", metrics, encoder_checkpoint=None,
                      which="random_init", output_checkpoint=str(trainer.ckpt_path),
                      settings=to_dict(cfg), epochs=trainer.epoch, steps=trainer.step,
                      model=dataclasses.asdict(trainer.encoder.arch))  # fmt: skip
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``main_pretrain.py --fname CFG [--resume | --overwrite] [key=value ...]`` (under torchrun
    for many processes); returns the exit status (``runs.run_main``: bad input 2, a diverged
    loss 1)."""
    parser = config_parser("I-JEPA / StoP pretraining")
    add_run_flags(parser)

    def work() -> None:
        cfg, args = parse_config(PretrainConfig, parser, argv)
        check_values(cfg)
        check_folders(cfg)  # (cheap: before torch and the process group)
        dist_info = init_distributed(cfg.meta.device)
        setup_console_logging(dist_info.is_main)
        pretrain(cfg, dist_info, resume=args.resume, overwrite=args.overwrite)

    return run_main(work, cleanup)


def describe(cfg: PretrainConfig) -> str:
    """One line naming the variant a config trains (for logs)."""
    m = cfg.model
    parts = [m.model_name, f"patch {m.patch_size}", f"out-norm {m.output_norm}",
             f"target-norm {m.target_norm}"]  # fmt: skip
    if m.stop:
        parts.append(f"StoP sigma {m.stop_sigma}")
    if cfg.mask.legacy:
        parts.append("legacy masks")
    return ", ".join(parts)


def __getattr__(name: str) -> Any:
    """``Pretrainer`` and ``param_groups`` (``trainer.py``, torch), imported on first use."""
    if name in ("Pretrainer", "param_groups"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    raise SystemExit(main())
