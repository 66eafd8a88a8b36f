"""Seeding, RNG state for exact resume, the GPU path (one precision decision, autocast,
GradScaler, DataLoader settings, AdamW implementation, opt-in ``torch.compile``), progress
reports (bars or log lines).

torch is imported inside the functions: importing this module (``--help`` of every entrypoint)
does not import it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..errors import UserError
from .distributed import group

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("ijepa_toolkit")


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; each rank gets ``seed + rank``."""
    import torch

    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict:
    """Every RNG state a run depends on, for an exact resume (saved in checkpoints)."""
    import torch

    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(_to_python_state(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> dict:
    """numpy's global RNG state as tensors and numbers (loadable with weights_only=True)."""
    import torch

    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _to_python_state(state):
    """``random.setstate`` needs tuples; a checkpoint round trip may give lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def amp_dtype(
    device: torch.device,
    use_bfloat16: bool = True,
    use_fp16: bool = False,
    bf16_supported: Optional[bool] = None,
) -> Optional[torch.dtype]:
    """The toolkit's one precision decision (extraction, finetuning, pretraining, probes).

    ``None`` (float32, no autocast) off CUDA and when neither half precision is asked; on CUDA
    float16 when ``use_fp16``, else bfloat16 when ``use_bfloat16`` and the GPU supports it,
    float16 when it does not (training then needs ``grad_scaler``). ``bf16_supported``:
    whether the GPU computes bf16 natively (default
    ``torch.cuda.is_bf16_supported(including_emulation=False)``)."""
    import torch

    if device.type != "cuda" or not (use_fp16 or use_bfloat16):
        return None
    if use_fp16:
        return torch.float16
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if bf16_supported else torch.float16


def precision_name(dtype: Optional[torch.dtype]) -> str:
    """``"bfloat16"``, ``"float16"`` or ``"float32"`` (``None``) of an ``amp_dtype`` answer."""
    return "float32" if dtype is None else str(dtype).replace("torch.", "")


def autocast(device: torch.device, enabled: bool = True, dtype: Optional[torch.dtype] = None):
    """Autocast to ``dtype`` (default: ``amp_dtype(device, enabled)``: bf16 on CUDA, fp16 where
    the GPU lacks bf16); a no-op on the CPU, which runs fp32, and when not ``enabled``."""
    dtype = dtype if dtype is not None else amp_dtype(device, enabled)
    if not enabled or dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    import torch

    return torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device, dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler`` enabled only for float16 training (bf16 and fp32 need no loss
    scaling: disabled, ``scale`` returns the loss and ``step`` is ``optimizer.step``)."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


PREFETCH_FACTOR = 4  # batches each DataLoader worker keeps ready (torch's default: 2)


def loader_kwargs(num_workers: int, device: torch.device, pin_memory: bool = True) -> dict:
    """``DataLoader`` keyword arguments for feeding ``device``: pinned host memory on CUDA (copy
    with ``.to(device, non_blocking=True)``), and with workers, persistent workers (no re-spawn
    each epoch) that each prefetch ``PREFETCH_FACTOR`` batches."""
    kwargs: dict[str, Any] = {"num_workers": num_workers}
    kwargs["pin_memory"] = pin_memory and device.type == "cuda"
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=PREFETCH_FACTOR)
    return kwargs


def adamw_implementation(on_cuda: Sequence[bool]) -> dict[str, Optional[bool]]:
    """``{"fused": True}`` when every parameter is on CUDA (``on_cuda`` per tensor): one kernel
    for the whole update. Else torch's default, the per-parameter loop on the CPU: the official
    code's numbers bit for bit, and faster there than ``foreach`` (55 vs 80 ms of a ViT-Ti
    pretraining step, docs/benchmarks.md)."""
    if on_cuda and all(on_cuda):
        return {"fused": True, "foreach": None}
    return {"fused": None, "foreach": None}


def adamw(params: Iterable, **options: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **options)`` (tensors or param groups) with the implementation
    of ``adamw_implementation``."""
    import torch

    params = [{**g, "params": list(g["params"])} if isinstance(g, dict) else g for g in params]
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return torch.optim.AdamW(
        params, **adamw_implementation([p.is_cuda for p in tensors]), **options
    )


def clip_grad_norm(params: Sequence[torch.nn.Parameter], max_norm: Optional[float]) -> torch.Tensor:
    """The total 2-norm of the gradients of ``params`` (those with one), clipped to ``max_norm``
    as ``torch.nn.utils.clip_grad_norm_``. ``max_norm`` None, 0 or inf only measures: no pass
    that multiplies every gradient by 1 (5 of 11 ms of a ViT-Ti pretraining step on the CPU)."""
    import math

    import torch

    if max_norm and not math.isinf(max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)  # what clip_grad_norm_ computes (one device)
    return torch.linalg.vector_norm(torch.stack(norms))


def maybe_compile(fn: Callable, enabled: bool) -> Callable:
    """``fn`` through ``torch.compile`` when ``enabled`` (the first calls pay the compilation):
    a module is compiled in place (``nn.Module.compile``: its calls, state dict names
    unchanged), a function is wrapped. Unchanged when not ``enabled``."""
    if not enabled:
        return fn
    import torch

    if isinstance(fn, torch.nn.Module):
        fn.compile()
    else:
        fn = torch.compile(fn)
    logger.info("torch.compile: %s (the first batches are slower)", getattr(fn, "__name__", fn))
    return fn


PROGRESS_SECONDS = 30.0  # a log line at least this often (env IJEPA_PROGRESS_SECONDS)
PROGRESS_ITEMS = (
    50  # ... and every this many iterations, as timm's log_interval (IJEPA_PROGRESS_ITEMS)
)


def progress(
    iterable: Iterable,
    desc: str = "",
    total: Optional[int] = None,
    enabled: bool = True,
    unit: str = "it",
    size: Optional[Callable[[Any], int]] = None,
    every_s: Optional[float] = None,
    every_n: Optional[int] = None,
) -> Progress:
    """``iterable`` with progress reports: a tqdm bar when stderr is a terminal, otherwise
    (``nohup``, SLURM, torchrun logs) periodic INFO lines on the ``ijepa_toolkit`` logger::

        features last: 1280/50000 img (2.6%), 85.3 img/s, ETA 9m32s, loss 0.4123

    ``total``: in ``unit`` (default ``len(iterable)``); ``size(item)``: the units an item counts
    for (e.g. the images of a batch; default 1); a line every ``every_s`` seconds or every
    ``every_n`` iterations, whichever comes first (defaults ``PROGRESS_SECONDS`` and
    ``PROGRESS_ITEMS``, overridden by the environment variables of the same names prefixed
    ``IJEPA_``; 0 turns a trigger off), and a closing line when any was written.
    ``enabled=False``, and any rank but 0 under torch.distributed, iterate silently.
    ``.set(loss=..., lr=...)`` adds fields to the reports."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    every_s = (
        _env_number("IJEPA_PROGRESS_SECONDS", PROGRESS_SECONDS) if every_s is None else every_s
    )
    every_n = (
        int(_env_number("IJEPA_PROGRESS_ITEMS", PROGRESS_ITEMS)) if every_n is None else every_n
    )
    dist = group()
    enabled = enabled and (dist is None or dist.get_rank() == 0)
    return Progress(
        iterable, desc, total, enabled, unit, size or (lambda item: 1), every_s, every_n
    )


@dataclass
class Progress:
    """What ``progress`` returns: iterate over it; ``set(**fields)`` for loss, lr, ..."""

    iterable: Iterable
    desc: str
    total: Optional[int]
    enabled: bool
    unit: str
    size: Callable[[Any], int]
    every_s: float
    every_n: int
    fields: dict = field(default_factory=dict)
    _bar: Any = None

    def set(self, **fields: Any) -> None:
        """Extra fields shown from now on (floats and 0-d tensors printed with 4 digits)."""
        self.fields.update({k: _short(v) for k, v in fields.items()})
        if self._bar is not None:
            self._bar.set_postfix(self.fields, refresh=False)

    def __iter__(self) -> Iterator:
        if not self.enabled:
            yield from self.iterable
        elif sys.stderr.isatty():
            yield from self._tqdm()
        else:
            yield from self._lines()

    def _tqdm(self) -> Iterator:
        from tqdm import tqdm

        with tqdm(total=self.total, desc=self.desc, unit=self.unit, dynamic_ncols=True,
                  leave=False) as self._bar:  # fmt: skip
            for item in self.iterable:
                yield item
                self._bar.update(self.size(item))
        self._bar = None

    def _lines(self) -> Iterator:
        start = last = time.monotonic()
        done = since = 0
        written = False
        for item in self.iterable:
            yield item
            done, since = done + self.size(item), since + 1
            now = time.monotonic()
            if self.total and done >= self.total:
                continue  # the closing line says it
            if (self.every_n and since >= self.every_n) or (
                self.every_s and now - last >= self.every_s
            ):
                logger.info("%s", self._line(done, now - start))
                last, since, written = now, 0, True
        if written:  # say that it finished
            seconds = time.monotonic() - start
            logger.info("%s (done in %s)", self._line(done, seconds), _hms(seconds))

    def _line(self, done: int, seconds: float) -> str:
        rate = done / seconds if seconds > 0 else float("inf")
        parts = [
            f"{self.desc}: {done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        ]
        if self.total:
            parts[0] += f" ({100.0 * done / self.total:.1f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_hms(max(self.total - done, 0) / rate)}")
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        return ", ".join(parts)


def _env_number(name: str, default: float) -> float:
    """The number in environment variable ``name`` (``default`` when unset)."""
    text = os.environ.get(name, "")
    try:
        return float(text) if text.strip() else default
    except ValueError:
        raise UserError(f"environment variable {name}={text!r}: expected a number") from None


def _short(value: Any) -> Any:
    """A float or 0-d tensor as a 4-significant-digit string; anything else unchanged."""
    if hasattr(value, "numel") and value.numel() == 1:  # a tensor
        value = value.item()
    return f"{value:.4g}" if isinstance(value, float) else value


def _hms(seconds: float) -> str:
    """``1h02m03s``, ``9m32s`` or ``12s``."""
    s = int(round(seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    epochs: float,
    steps_per_epoch: int,
    warmup_epochs: float,
    min_lr: float = 0.0,
):
    """timm ``CosineLRScheduler`` in optimizer steps, equal at every step to MAE's
    ``adjust_learning_rate`` (``util/lr_sched.py``) at the fractional epoch ``e = step /
    steps_per_epoch``: ``lr * e / warmup_epochs`` while ``e < warmup_epochs``, then ``min_lr +
    (lr - min_lr) * (1 + cos(pi * (e - warmup_epochs) / (epochs - warmup_epochs))) / 2``.
    Warmup and decay lengths are not rounded to whole steps (0.5 epochs of 25 steps is 12.5).

    The one warmup + cosine of the toolkit (finetuning, linear and depth probes). Call
    ``step_update(step)`` before each optimizer step; each group starts from its own ``lr`` and
    is scaled by its ``lr_scale`` (layer decay), as in MAE."""
    from timm.scheduler import CosineLRScheduler

    total = epochs * steps_per_epoch
    warmup = warmup_epochs * steps_per_epoch
    return CosineLRScheduler(
        optimizer, t_initial=max(total - warmup, 1), lr_min=min_lr, warmup_t=warmup,
        warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
    )  # fmt: skip
