"""Command-line tools: ``ijepa-export`` and ``ijepa-inspect``.

Also runnable as ``python -m ijepa_toolkit.cli export|inspect ...``. A checkpoint that cannot be
used ends the command with one ``error: ...`` line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from typing import Callable, Optional, Sequence

from .config import EncoderSection
from .errors import UserError
from .export import EXPORT_FORMATS, export_encoder

# the sub-models of an I-JEPA checkpoint (formats.canonical.SUBMODELS) as the config spells them;
# the loading stack (torch, timm) is imported only when a command runs
SUBMODELS = typing.get_args(typing.get_type_hints(EncoderSection)["which"])


def _run(action: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run a command with the loader's INFO lines shown on stderr; errors as one line, status 1."""
    log = logging.getLogger("ijepa_toolkit")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        action(args)
    except (UserError, OSError) as e:  # bad input or an unwritable output; bugs: traceback
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    return 0


# -- ijepa-export -------------------------------------------------------------------------------


def _export_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write one encoder of a checkpoint (an encoder-only file, also of a multi-GB "
        "training checkpoint): --format timm (default) a safetensors file that plain timm loads "
        "plus a .json spec beside it (a finetuned classifier keeps its head); --format hf a "
        "folder that transformers.IJepaModel.from_pretrained loads.",
    )
    parser.add_argument(
        "checkpoint",
        help="checkpoint file (.pth.tar, .pth, .safetensors), transformers folder or timm name",
    )
    parser.add_argument(
        "out", help="timm: output .safetensors path (the spec goes to OUT with .json); hf: folder"
    )
    parser.add_argument(
        "--format", choices=EXPORT_FORMATS, default="timm", help="output format (default: timm)"
    )
    parser.add_argument(
        "--which",
        choices=SUBMODELS,
        default="target_encoder",
        help="sub-model of an I-JEPA checkpoint (default: target_encoder, the EMA encoder)",
    )
    parser.add_argument(
        "--num-heads", type=int, default=None, help="attention heads, for non-standard widths"
    )
    return parser


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    spec = export_encoder(
        args.checkpoint, args.out, which=args.which, num_heads=args.num_heads, fmt=args.format
    )
    out = Path(args.out)
    if args.format == "hf":
        print(f"wrote {out}/config.json and {out}/model.safetensors (transformers IJepaModel)")
        return
    print(f"wrote {out}")
    print(f"wrote {out.with_suffix('.json')} (timm architecture {spec['architecture']})")


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    """``ijepa-export CKPT OUT [--format timm|hf] [--which ...] [--num-heads N]``."""
    args = _export_parser("ijepa-export").parse_args(argv)
    return _run(_export, args)


# -- ijepa-inspect ------------------------------------------------------------------------------


def _inspect_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Summarise a checkpoint without building any model: format, epoch, "
        "sub-models, their architecture and position embedding.",
    )
    parser.add_argument(
        "checkpoint",
        help="checkpoint file (.pth.tar, .pth, .safetensors), transformers folder or timm name",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def _format_arch(arch) -> str:
    if not isinstance(arch, dict):
        return str(arch)
    heads = arch.get("num_heads")
    heads_text = heads if heads is not None else "? (non-standard width: pass num_heads)"
    if "predictor_embed_dim" in arch:
        grid = arch["grid"]
        return (
            f"predictor depth={arch['depth']} width={arch['predictor_embed_dim']} "
            f"(encoder width {arch['embed_dim']}) mlp_ratio={arch['mlp_ratio']:.4g} "
            f"grid={grid}x{grid} heads={heads_text}"
        )
    grid = arch["img_size"] // arch["patch_size"]
    return (
        f"ViT depth={arch['depth']} width={arch['embed_dim']} patch={arch['patch_size']} "
        f"mlp_ratio={arch['mlp_ratio']:.4g} img_size={arch['img_size']} (grid {grid}x{grid}) "
        f"qkv_bias={arch['qkv_bias']} heads={heads_text}"
    )


def format_summary(info: dict) -> str:
    """The human-readable ``ijepa-inspect`` text for an ``inspect_checkpoint`` result."""
    from .formats import DESCRIPTIONS

    fmt = info["format"]
    lines = [
        info["path"],
        f"  format: {fmt} ({DESCRIPTIONS.get(fmt, fmt)})",
        f"  epoch:  {info['epoch'] if info.get('epoch') is not None else '-'}",
    ]
    for name, entry in info["submodels"].items():
        lines.append(f"  {name}: {entry['tensors']} tensors, {entry['params']:,} parameters")
        if "arch" in entry:
            lines.append(f"    arch: {_format_arch(entry['arch'])}")
        if "pos_embed" in entry:
            reason = entry.get("pos_embed_reason")
            lines.append(
                f"    pos_embed: {entry['pos_embed']}" + (f" ({reason})" if reason else "")
            )
    meta = info.get("meta", {})
    others = [f"{k}={meta[k]!r}" if k in meta else k for k in info.get("other_keys", [])]
    if others:
        lines.append(f"  other keys: {', '.join(others)}")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> None:
    from .loader import inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_summary(info))


def inspect_main(argv: Optional[Sequence[str]] = None) -> int:
    """``ijepa-inspect CKPT [--json]``."""
    args = _inspect_parser("ijepa-inspect").parse_args(argv)
    return _run(_inspect, args)


# -- python -m ijepa_toolkit.cli ----------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ijepa_toolkit.cli {export,inspect} ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"export": export_main, "inspect": inspect_main}
    if not argv or argv[0] not in commands:
        print(
            "usage: python -m ijepa_toolkit.cli {export,inspect} ... "
            "(same arguments as ijepa-export / ijepa-inspect)",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
