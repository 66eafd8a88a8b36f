"""``main_finetuning.py``: build what a finetuning config names, train, evaluate, write results.

Run folder (``logging.folder``): ``config.yaml``, ``log.jsonl``, ``tensorboard/``,
``checkpoint-last.pth`` (every epoch, and every ``finetune.checkpoint_every`` steps),
``checkpoint-best.pth`` (best top-1 so far: weights only) and ``results.json``.
The training machinery is ``finetune/trainer.py``, imported when work starts: ``--help``,
``--print-config``, ``--check`` and config errors answer without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..config import config_parser, parse_config, require_paths
from ..engine.distributed import cleanup
from ..errors import ConfigError
from ..run_folder import ALWAYS_ALLOWED, add_run_flags, lock_run, open_run
from ..runs import run_main
from .config import FinetuneConfig

# what a --resume may change besides run_folder.ALWAYS_ALLOWED: when checkpoints are written
RESUME_ALLOWED = (*ALWAYS_ALLOWED, "finetune.checkpoint_every")


def check_config(cfg: FinetuneConfig) -> None:
    """The check across sections (each section checks its own values when the config is built):
    Mixup/CutMix need an even per-device batch."""
    d = cfg.data
    if cfg.mixup.active() and d.batch_size % 2:
        raise ConfigError(
            f"data.batch_size={d.batch_size} is odd, but Mixup/CutMix pair images within each "
            "per-device batch: use an even batch size or set mixup.mixup=0 mixup.cutmix=0"
        )


def check_folders(cfg: FinetuneConfig) -> None:
    """The image folders (digits are built at start) and the checkpoint file exist: before any
    model is built or the run folder touched."""
    d, paths = cfg.data, []
    if not d.digits_root:
        paths += [("data.train_folder", d.train_folder, "folder"),
                  ("data.val_folder", d.val_folder, "folder")]  # fmt: skip
    if cfg.model.checkpoint:
        found = cfg.model.checkpoint
        if not Path(found).is_file():  # a release name or a transformers folder -> its file
            from ..formats import locate  # (formats import torch: only here)

            found = str(locate(found))
        paths.append(("model.checkpoint", found, "file"))
    require_paths(paths)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``--fname cfg.yaml [--resume | --overwrite] [--eval [CKPT]] key=value ...``; returns the
    exit status (``runs.run_main``: bad input 2, a diverged loss 1)."""
    parser = config_parser("MAE-recipe finetuning of an I-JEPA encoder")
    add_run_flags(parser)
    parser.add_argument(
        "--eval", nargs="?", const="", default=None, metavar="CKPT",
        help="only evaluate CKPT (default: logging.folder/checkpoint-best.pth)",
    )  # fmt: skip
    parser.add_argument(
        "--check", action="store_true",
        help="check config, folders and checkpoint file, then exit (finetune.sh: before torchrun)",
    )  # fmt: skip

    def work() -> None:
        cfg, args = parse_config(FinetuneConfig, parser, argv)
        if args.check:
            check_config(cfg)
            check_folders(cfg)
            return
        run(cfg, resume=args.resume, eval_ckpt=args.eval, overwrite=args.overwrite)

    return run_main(work, cleanup)


def run(
    cfg: FinetuneConfig,
    resume: bool = False,
    eval_ckpt: Optional[str] = None,
    overwrite: bool = False,
) -> dict:
    """Finetune (or, with ``eval_ckpt``, only evaluate) as ``cfg`` says; returns final metrics.

    The run owns ``logging.folder`` (``run_folder.open_run``: locked; another run's outputs
    need ``resume`` or ``overwrite``); an evaluation only locks it."""
    check_config(cfg)
    check_folders(cfg)
    from .trainer import train_and_evaluate  # torch, timm and the model code

    folder = Path(cfg.logging.folder)
    if eval_ckpt is not None:
        own = lock_run(folder)
    else:
        own = open_run(folder, cfg, resume=resume, overwrite=overwrite,
                       allowed=RESUME_ALLOWED)  # fmt: skip
    with own:
        return train_and_evaluate(cfg, own, eval_ckpt)


if __name__ == "__main__":
    raise SystemExit(main())
