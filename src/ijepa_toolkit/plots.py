"""Figures that explain themselves: every one has a title, axis labels with units, a legend or a
colour bar (or, for pictures, a caption), and is at least 1000x625 px.

Each function takes data (``results.json`` dicts, ``log.jsonl`` rows, images) and an output path,
writes a PNG and returns the matplotlib ``Figure`` (drawn with the Agg canvas, no pyplot state).
``python -m ijepa_toolkit.plots DEMO_FOLDER PLOTS_FOLDER`` writes the demo's figures from its run
folders; ``python -m ijepa_toolkit.plots --table TABLE.csv OUT.png`` draws a ``make_tables`` CSV
(ours vs paper) as bars.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SIZE = (10.0, 6.25)  # inches at DPI: 1000 x 625 px
DPI = 100
PathLike = Union[str, Path]
# what ``demo_figures`` writes
FIGURES = ("pretrain_loss.png", "knn_over_k.png", "logistic_lambd.png", "linprobe_grid.png",
           "finetune_curves.png", "demo_table.png")  # fmt: skip


def new_figure(size: tuple[float, float] = SIZE) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # (matplotlib: only here)
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: PathLike) -> Figure:
    """Write ``fig`` as a PNG at ``DPI`` (parents made); returns it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return fig


def label_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, title, a light grid and the legend of a line plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def lr_wd_grid(results: Mapping, path: PathLike, title: str = "Linear probe") -> Figure:
    """Held-out top-1 % of each (lr, weight decay) head of a linear-probe ``results.json``
    (``settings.held_out_top1`` keyed ``lr<lr>_wd<wd>``), as a heat map with the selected head
    starred and each cell's value written in it."""
    s = results["settings"]
    cells = {}
    for name, acc in s["held_out_top1"].items():
        m = re.fullmatch(r"lr(.+)_wd(.+)", name)
        if m is None:
            raise UserError(f"settings.held_out_top1: key {name!r} is not lr<lr>_wd<wd>")
        cells[float(m[1]), float(m[2])] = float(acc)
    lrs, wds = sorted({k[0] for k in cells}), sorted({k[1] for k in cells})
    acc = np.array([[cells.get((lr, wd), np.nan) for lr in lrs] for wd in wds])
    from matplotlib.patches import Rectangle

    fig = new_figure()
    ax = fig.add_subplot()
    im = ax.imshow(acc, cmap="viridis", aspect="auto", origin="lower")
    mid = np.nanmean([np.nanmin(acc), np.nanmax(acc)])
    for (r, c), v in np.ndenumerate(acc):
        colour = "black" if v > mid else "white"
        ax.text(c, r, f"{v:.1f}", ha="center", va="center", color=colour, fontsize=12)
    col, row = lrs.index(float(s["lr_selected"])), wds.index(float(s["wd_selected"]))
    ax.add_patch(Rectangle((col - 0.48, row - 0.48), 0.96, 0.96, fill=False, ec="red", lw=3,
                           label="selected (best held-out)"))  # fmt: skip
    ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs])
    ax.set_yticks(range(len(wds)), [f"{v:g}" for v in wds])
    ax.set_xlabel("learning rate (after the batch-size rule)")
    ax.set_ylabel("weight decay")
    ax.set_title(f"{title}: held-out top-1 over the lr x weight-decay grid")
    fig.colorbar(im, ax=ax, label="held-out top-1 (%)")
    ax.legend(loc="upper left")
    return save(fig, path)


def lambd_sweep(results: Mapping[str, Mapping], path: PathLike) -> Figure:
    """Held-out top-1 % over ``lambd`` (log axis) of logistic ``results.json`` per label
    (``settings.held_out_top1`` keyed by lambd), the selected lambd starred."""
    fig = new_figure()
    ax = fig.add_subplot()
    for label, res in results.items():
        s = res["settings"]
        pts = sorted((float(k), float(v)) for k, v in s["held_out_top1"].items())
        ax.plot(*zip(*pts), "o-", label=label)
        sel = float(s["lambd_selected"])
        ax.plot([sel], [dict(pts)[sel]], "*", ms=16, color="black")
    ax.plot([], [], "*", ms=12, color="black", label="selected lambd")
    ax.set_xscale("log")
    label_axes(ax, "lambd (L2 penalty x n_train, log scale)", "held-out top-1 (%)",
               "Logistic regression: held-out accuracy over lambd")  # fmt: skip
    return save(fig, path)


def knn_over_k(results: Mapping[str, Mapping], path: PathLike) -> Figure:
    """Test top-1 % over k of kNN ``results.json`` per label (``metrics.top1@k<k>``)."""
    from matplotlib.ticker import NullLocator

    fig = new_figure()
    ax = fig.add_subplot()
    for label, res in results.items():
        pts = sorted((int(k[len("top1@k") :]), float(v)) for k, v in res["metrics"].items()
                     if k.startswith("top1@k"))  # fmt: skip
        if not pts:
            raise UserError(f"kNN results {label!r}: no metrics.top1@k<k> keys")
        ax.plot(*zip(*pts), "o-", label=label)
    ax.set_xscale("log")
    ks = sorted({int(x) for line in ax.lines for x in line.get_xdata()})
    ax.set_xticks(ks, [str(k) for k in ks], minor=False)
    ax.xaxis.set_minor_locator(NullLocator())
    label_axes(ax, "k (neighbours, log scale)", "test top-1 (%)", "kNN: test accuracy over k")
    return save(fig, path)


def _epoch_rows(rows: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def finetune_curves(log_rows: Mapping[str, Sequence[Mapping]], path: PathLike) -> Figure:
    """Per label, a finetuning ``log.jsonl``'s per-epoch ``train_loss`` / ``val_loss`` (left)
    and ``val_acc1`` (right) over epochs."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure()
    loss_ax, acc_ax = fig.subplots(1, 2)
    for n, (label, rows) in enumerate(log_rows.items()):
        colour = f"C{n}"
        loss_ax.plot(*_epoch_rows(rows, "train_loss"), "o-", color=colour, label=f"{label} train")
        loss_ax.plot(*_epoch_rows(rows, "val_loss"), "s--", color=colour, label=f"{label} val")
        acc_ax.plot(*_epoch_rows(rows, "val_acc1"), "o-", color=colour, label=f"{label} val")
    label_axes(loss_ax, "epoch", "cross-entropy loss (nats)", "train / val loss")
    label_axes(acc_ax, "epoch", "val top-1 (%)", "val accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Finetuning curves")
    return save(fig, path)


def loss_curve(log_rows: Sequence[Mapping], path: PathLike, key: str = "loss",
               title: str = "Pretraining loss") -> Figure:  # fmt: skip
    """``key`` of a ``log.jsonl``'s rows over their ``step`` (and its moving average over 10
    rows when there are more than 20)."""
    pts = [(r.get("step", i), r[key]) for i, r in enumerate(log_rows)
           if isinstance(r.get(key), (int, float))]  # fmt: skip
    if not pts:
        raise UserError(f"no numeric '{key}' values in the log rows")
    steps, values = (np.array(v, dtype=float) for v in zip(*pts))
    fig = new_figure()
    ax = fig.add_subplot()
    ax.plot(steps, values, color="C0", alpha=0.6, label=key)
    if len(values) > 20:
        avg = np.convolve(values, np.ones(10) / 10, mode="valid")
        ax.plot(steps[9:], avg, color="C1", lw=2, label=f"{key}, mean of 10 rows")
    label_axes(ax, "optimizer step", f"{key} (as logged)", title)
    return save(fig, path)


def table_bars(rows: Sequence[Mapping], path: PathLike, series: Sequence[str] = ("ours", "paper"),
               ylabel: str = "top-1 (%)", title: str = "Ours vs paper") -> Figure:  # fmt: skip
    """Grouped bars: per row (``{"label": ..., <series>: value or None}``) one bar per series,
    each labelled with its value; a missing value draws no bar."""
    fig = new_figure()
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    width = 0.8 / len(series)
    for n, name in enumerate(series):
        values = [r.get(name) for r in rows]
        bars = ax.bar(x + (n - (len(series) - 1) / 2) * width, [v or 0 for v in values], width,
                      label=name, color=f"C{n}")  # fmt: skip
        texts = ["" if v is None else f"{v:.1f}" for v in values]
        ax.bar_label(bars, texts, padding=2)
    ax.margins(y=0.15)  # room for the value labels and the legend
    ax.set_xticks(x, [r["label"] for r in rows], rotation=10 if len(rows) > 3 else 0)
    ax.set_xlabel("protocol")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return save(fig, path)


def rows_from_table_csv(path: PathLike) -> list[dict]:
    """``make_tables``' CSV as ``table_bars`` rows: label ``row / column``, ours, paper."""
    with open(path, newline="") as f:
        lines = list(csv.DictReader(f))
    try:
        return [{"label": f"{r['row']} / {r['column']}",
                 **{k: float(r[k]) if r[k] else None for k in ("ours", "paper")}}
                for r in lines]  # fmt: skip
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: not a make_tables CSV (row, column, ours, paper): {e}") from e


def image_figure(image: np.ndarray, path: PathLike, title: str, caption: str,
                 legend: Sequence[tuple[str, Sequence[int]]] = ()) -> Figure:  # fmt: skip
    """An (H, W, 3) uint8 picture (drawn pixel for pixel when it fits) with a title, a caption
    under it and optional legend entries ``(label, (r, g, b))``."""
    h, w = image.shape[:2]
    width = 12.0  # inches; the height follows the picture, within 5..14 (title, caption, legend)
    from matplotlib.patches import Patch

    fig = new_figure((width, min(max(width * h / w + 1.6, 5.0), 14.0)))
    ax = fig.add_subplot()
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    fig.supxlabel(caption, fontsize=10, wrap=True)
    if legend:
        handles = [Patch(color=np.array(rgb) / 255, label=label) for label, rgb in legend]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02),
                  ncol=min(len(handles), 6), frameon=False)  # fmt: skip
    return save(fig, path)


def depth_figure(rgb: np.ndarray, gt: np.ndarray, pred: np.ndarray, valid: np.ndarray,
                 path: PathLike, title: str = "Depth") -> Figure:  # fmt: skip
    """``input | ground truth | prediction`` on one colour scale (the gt's valid range, metres,
    with a colour bar); pixels without valid ground truth are black in the gt panel."""
    lo, hi = (float(gt[valid].min()), float(gt[valid].max())) if valid.any() else (0.0, 10.0)
    from matplotlib import colormaps

    fig = new_figure()
    axes = fig.subplots(1, 3)
    axes[0].imshow(rgb)
    cmap = colormaps["viridis"].with_extremes(bad="black")
    for ax, data in zip(axes[1:], (np.ma.masked_where(~valid, gt), pred)):
        im = ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi)
    names = ("input", "ground truth (black: invalid)", "prediction")
    return _finish_panels(fig, axes, names, im, "depth (m)", title, path)


def _finish_panels(fig: Figure, axes, names: Sequence[str], im, label: str, title: str,
                   path: PathLike) -> Figure:  # fmt: skip
    """Titles and pixel axes of side-by-side pictures, one colour bar for ``im``, saved."""
    for ax, name in zip(axes, names):
        ax.set_title(name)
        ax.set_xlabel("x (px)")
        ax.set_ylabel("y (px)")
    fig.colorbar(im, ax=axes, label=label, shrink=0.8)
    fig.suptitle(title)
    return save(fig, path)


def loss_heatmap(mean_loss: np.ndarray, counts: np.ndarray, path: PathLike,
                 title: str = "Mean prediction loss per target position") -> Figure:  # fmt: skip
    """A (gh, gw) per-position mean loss map as a heat map ('hot', the colour scale clipped to
    the 1% / 99% quantiles as the featurenorm seed's ``plot-mean-loss``); positions never
    predicted (``counts`` 0) are grey."""
    seen = counts > 0
    lo, hi = np.quantile(mean_loss[seen], [0.01, 0.99]) if seen.any() else (0.0, 1.0)
    from matplotlib import colormaps

    fig = new_figure()
    ax = fig.add_subplot()
    cmap = colormaps["hot"].with_extremes(bad="grey")
    im = ax.imshow(np.ma.masked_where(~seen, mean_loss), cmap=cmap, vmin=lo, vmax=hi)
    ax.set_xlabel("patch column")
    ax.set_ylabel("patch row")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="mean loss per token (1%-99% quantile range)")
    return save(fig, path)


def histogram(values: Sequence[float], path: PathLike, xlabel: str, title: str,
              bins: int = 20) -> Figure:  # fmt: skip
    """Density histogram of ``values`` (``bins`` bins) with its cumulative distribution."""
    fig = new_figure()
    ax = fig.add_subplot()
    ax.hist(values, bins=bins, density=True, color="skyblue", edgecolor="black",
            label="density")  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    cum = ax.twinx()
    cum.hist(values, bins=bins, density=True, cumulative=True, histtype="step", color="C1",
             lw=2, label="cumulative")  # fmt: skip
    cum.set_ylabel("cumulative fraction")
    handles = [h for a in (ax, cum) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="upper left")
    return save(fig, path)


def sample_loss_figure(image: np.ndarray, loss_map: np.ndarray, path: PathLike,
                       title: str) -> Figure:  # fmt: skip
    """``image | image x scaled loss | loss`` for one (H, W, 3) float image in [0, 1] and its
    (H, W) per-pixel mean loss (the seed's per-sample picture); the loss scale is the 1% / 99%
    quantile range."""
    lo, hi = np.quantile(loss_map, [0.01, 0.99])
    scaled = np.clip((loss_map - lo) / max(hi - lo, 1e-12), 0, 1)
    fig = new_figure()
    axes = fig.subplots(1, 3)
    axes[0].imshow(image)
    axes[1].imshow(image * scaled[..., None])
    im = axes[2].imshow(loss_map, cmap="hot", vmin=lo, vmax=hi)
    names = ("view", "view x scaled loss", "mean loss per pixel")
    return _finish_panels(fig, axes, names, im, "mean loss per token", title, path)


def layer_accuracy(accuracies: Sequence[float], path: PathLike,
                   title: str = "Linear probe accuracy per encoder layer") -> Figure:  # fmt: skip
    """Top-1 % of one linear probe per layer (0: the patch embeddings, i: after block i)."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure()
    ax = fig.add_subplot()
    ax.plot(range(len(accuracies)), accuracies, "o-", label="probe top-1")
    best = int(np.argmax(accuracies))
    ax.plot([best], [accuracies[best]], "*", ms=16, color="black", label=f"best: layer {best}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    label_axes(ax, "layer (0: patch embeddings, i: after block i)", "val top-1 (%)", title)
    return save(fig, path)


def _read(folder: Path, encoders: Sequence[str]) -> dict[str, dict]:
    return {e.replace("_", " "): json.loads((folder / e / "results.json").read_text())
            for e in encoders if (folder / e / "results.json").is_file()}  # fmt: skip


def demo_figures(demo: Path, out: Path) -> list[Path]:
    """The demo's figures from its run folders (``runs/demo``) into ``out``; returns the
    paths written."""
    from .demo import ENCODERS, ROWS
    from .engine.logger import read_jsonl

    encoders = [k.replace(" ", "_") for k in ENCODERS]
    paths = {name: out / name for name in FIGURES}
    loss_curve(read_jsonl(demo / "pretrain" / "log.jsonl"), paths["pretrain_loss.png"],
               title="Pretraining loss (I-JEPA smooth L1, demo run)")  # fmt: skip
    knn_over_k(_read(demo / "knn", encoders), paths["knn_over_k.png"])
    lambd_sweep(_read(demo / "logistic", encoders), paths["logistic_lambd.png"])
    lr_wd_grid(_read(demo / "linprobe", encoders)["pretrained"], paths["linprobe_grid.png"],
               title="Linear probe (pretrained)")  # fmt: skip
    logs = {e.replace("_", " "): read_jsonl(demo / "finetune" / e / "log.jsonl") for e in encoders}
    finetune_curves(logs, paths["finetune_curves.png"])
    rows = []
    for row in ROWS:
        if row.unit != "top-1 %":
            continue
        res = _read(demo / row.folder, encoders)
        metric = row.metric.removeprefix("metrics.")
        rows.append({"label": row.label.split(" (")[0],
                     **{k: r["metrics"][metric] for k, r in res.items()}})  # fmt: skip
    table_bars(rows, paths["demo_table.png"], series=[k for k in ENCODERS], title="Demo table: "
               "pretrained I-JEPA vs random init (top-1 rows)")  # fmt: skip
    return list(paths.values())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ijepa_toolkit.plots DEMO OUT`` or ``--table CSV OUT.png``; exit status."""
    from .runs import run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) not in (2, 3) or (len(argv) == 3) != (argv[0] == "--table"):
        print("usage: python -m ijepa_toolkit.plots DEMO_FOLDER OUT_FOLDER | --table CSV OUT.png",
              file=sys.stderr)  # fmt: skip
        return 2

    def report() -> None:
        if argv[0] == "--table":
            table_bars(rows_from_table_csv(argv[1]), argv[2])
            paths = [Path(argv[2])]
        else:
            paths = demo_figures(Path(argv[0]), Path(argv[1]))
        for path in paths:
            print(f"wrote {path}")

    return run_main(report)


if __name__ == "__main__":
    raise SystemExit(main())
