"""What every comparison bench shares: the machine line, result rows, timing in turn, FLOPs.

Not a package module: the bench scripts put ``bench/`` on ``sys.path`` and import it as
``from contenders import ...``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU model, cores, torch version and threads, load averages (1/5/15 min)."""
    import torch

    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average {load}")  # fmt: skip


@dataclass
class Row:
    """One comparison: the toolkit's figure and a contender's, in ``unit`` (seconds or a rate).

    ``ratio`` is always "how many times faster the toolkit is" (> 1: the toolkit wins): for times
    (a unit starting with ``s``) contender / toolkit, for rates toolkit / contender. A row with
    ``skipped`` set names why the contender was not measured."""

    bench: str
    contender: str
    unit: str = "s"
    toolkit: Optional[float] = None
    other: Optional[float] = None
    skipped: str = ""
    note: str = ""

    @property
    def ratio(self) -> Optional[float]:
        if self.toolkit is None or self.other is None:
            return None
        return self.other / self.toolkit if self.unit.startswith("s") else self.toolkit / self.other

    def line(self) -> str:
        """``bench vs contender: toolkit X, contender Y, ratio Z``, or the reason it was skipped."""
        if self.skipped:
            return f"{self.bench} vs {self.contender}: skipped ({self.skipped})"
        note = f"; {self.note}" if self.note else ""
        return (
            f"{self.bench} vs {self.contender}: toolkit {self.toolkit:.4g} {self.unit}, "
            f"{self.contender} {self.other:.4g} {self.unit}, toolkit {self.ratio:.2f}x{note}"
        )


def table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (ratio: > 1 means the toolkit is faster)."""
    out = ["| bench | contender | unit | toolkit | contender | toolkit speed-up |",
           "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        if r.skipped:
            out.append(f"| {r.bench} | {r.contender} | | | | skipped: {r.skipped} |")
        else:
            out.append(f"| {r.bench} | {r.contender} | {r.unit} | {r.toolkit:.4g} | "
                       f"{r.other:.4g} | {r.ratio:.2f}x |")  # fmt: skip
    return "\n".join(out)


def turn_order(names: list[str], r: int) -> list[str]:
    """The order of round ``r`` when callables are timed in turn: rotated by ``r``, so each one
    runs first as often as the others (the first of a round ran measurably slower here:
    extraction 0.85x with the toolkit always first, 1.07x rotated)."""
    k = r % len(names)
    return names[k:] + names[:k]


def alternating(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, tuple[float, float]]:
    """(median wall seconds, median CPU seconds) of each callable, timed in turn ``rounds`` times
    after ``warmup`` untimed calls each, so all of them see the same background load. Each round
    starts one callable later (round r: the r-th first), so no callable always runs first or
    after the same neighbour."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict = {name: [] for name in fns}
    cpu: dict = {name: [] for name in fns}
    for r in range(rounds):
        for name in turn_order(list(fns), r):
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def counted_flops(fn: Callable[[], object], *modules: Any) -> int:
    """FLOPs of ``fn()`` (forward and any backward it runs, ``torch.utils.flop_counter``), timm
    attention in ``modules`` written out for the count (the counter does not see the CPU's fused
    SDPA kernel; the products are the same)."""
    from torch.utils.flop_counter import FlopCounterMode

    attns = [a for m in modules for a in m.modules() if hasattr(a, "fused_attn")]
    saved = [a.fused_attn for a in attns]
    for a in attns:
        a.fused_attn = False
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for a, s in zip(attns, saved):
            a.fused_attn = s
    return counter.get_total_flops()


def missing(module: str) -> Optional[str]:
    """None when ``module`` imports, else the reason it does not (for a ``skipped`` row)."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"{module} is not installed ({e})"
    return None
