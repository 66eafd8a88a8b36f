"""Every figure of ``plots``: a PNG of at least 800x500 px whose Figure has a title, axis labels
and a legend or colour bar (pictures: a caption), on small inputs written here."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from ijepa_toolkit import plots
from ijepa_toolkit.errors import UserError
from ijepa_toolkit.masks.render import CAPTION, legend


def titles(fig: Figure) -> list[str]:
    found = [ax.get_title() for ax in fig.axes]
    return [t for t in [*found, fig._suptitle.get_text() if fig._suptitle else ""] if t]


def colour_bars(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def check(fig: Figure, path, image: bool = False) -> None:
    """Readable size, a title; plots: every data axes labelled and a legend or a colour bar;
    pictures: a caption."""
    with Image.open(path) as im:
        assert im.width >= 800 and im.height >= 500, im.size
    assert titles(fig)
    if image:
        assert fig._supxlabel is not None and len(fig._supxlabel.get_text()) > 40
        return
    data = [ax for ax in fig.axes if ax not in colour_bars(fig)]
    for ax in data:
        assert ax.get_xlabel() and ax.get_ylabel(), ax
    legends = [ax.get_legend() for ax in data if ax.get_legend() is not None]
    assert legends or colour_bars(fig)
    if colour_bars(fig):
        assert all(cb.get_ylabel() for cb in colour_bars(fig))  # the bar says what and in what


def test_lr_wd_grid_heat_map_holds_every_head(tmp_path):
    held = {"lr0.5_wd0": 30.0, "lr5_wd0": 70.0, "lr0.5_wd0.05": 35.0, "lr5_wd0.05": 80.0}
    res = {"settings": {"held_out_top1": held, "lr_selected": 5.0, "wd_selected": 0.05}}
    fig = plots.lr_wd_grid(res, tmp_path / "g.png")
    check(fig, tmp_path / "g.png")
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (2, 2) and grid[1, 1] == 80.0 and grid[0, 0] == 30.0  # rows: wd
    assert fig.axes[0].get_xlabel().startswith("learning rate")
    with pytest.raises(UserError, match="'bad'"):
        plots.lr_wd_grid({"settings": {"held_out_top1": {"bad": 1.0}}}, tmp_path / "x.png")


def test_lambd_sweep_and_knn_over_k_draw_one_line_per_encoder(tmp_path):
    lr = {"settings": {"held_out_top1": {"0.0001": 90.0, "0.01": 94.0, "0.1": 93.0},
                       "lambd_selected": 0.01}}  # fmt: skip
    fig = plots.lambd_sweep({"pretrained": lr, "random init": lr}, tmp_path / "l.png")
    check(fig, tmp_path / "l.png")
    assert fig.axes[0].get_xscale() == "log"
    x, y = fig.axes[0].lines[0].get_data()
    assert list(x) == [0.0001, 0.01, 0.1] and list(y) == [90.0, 94.0, 93.0]
    knn = {"metrics": {"top1@k20": 70.0, "top5@k20": 99.0, "top1@k10": 75.0, "top1@k200": 50.0}}
    fig = plots.knn_over_k({"pretrained": knn}, tmp_path / "k.png")
    check(fig, tmp_path / "k.png")
    x, y = fig.axes[0].lines[0].get_data()
    assert list(x) == [10, 20, 200] and list(y) == [75.0, 70.0, 50.0]  # top-5 left out
    with pytest.raises(UserError, match="top1@k"):
        plots.knn_over_k({"x": {"metrics": {"top1": 1.0}}}, tmp_path / "e.png")


def test_finetune_curves_and_loss_curve_follow_the_log_rows(tmp_path):
    rows = [{"step": 5 * e, "epoch": e, "loss": 2.0}  for e in range(1, 4)] + [
        {"step": 10 * e, "epoch": e, "train_loss": 2.0 / e, "val_loss": 2.5 / e,
         "val_acc1": 20.0 * e} for e in range(1, 4)]  # fmt: skip
    fig = plots.finetune_curves({"pretrained": rows}, tmp_path / "f.png")
    check(fig, tmp_path / "f.png")
    assert list(fig.axes[1].lines[0].get_ydata()) == [20.0, 40.0, 60.0]
    log = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(30)] + [{"step": 30, "knn": 5.0}]
    fig = plots.loss_curve(log, tmp_path / "c.png")
    check(fig, tmp_path / "c.png")
    assert len(fig.axes[0].lines) == 2  # the values and their moving average
    assert len(fig.axes[0].lines[0].get_xdata()) == 30  # the knn row has no loss
    with pytest.raises(UserError, match="'loss'"):
        plots.loss_curve([{"step": 0, "knn": 1.0}], tmp_path / "e.png")


def test_table_bars_from_a_make_tables_csv(tmp_path):
    csv = tmp_path / "t.csv"
    lines = [
        "table,row,protocol,column,ours,paper,diff",
        "t,ViT-H/14,linprobe,IN-1k,79.1,79.3,-0.2",
        "t,ViT-L/16,linprobe,IN-1k,,77.5,",
    ]
    csv.write_text("\n".join(lines) + "\n")
    rows = plots.rows_from_table_csv(csv)
    assert rows[1] == {"label": "ViT-L/16 / IN-1k", "ours": None, "paper": 77.5}
    fig = plots.table_bars(rows, tmp_path / "b.png")
    check(fig, tmp_path / "b.png")
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [79.1, 0, 79.3, 77.5]  # ours (missing: no bar), then paper
    assert plots.main(["--table", str(csv), str(tmp_path / "m.png")]) == 0
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert plots.main(["--table", str(tmp_path / "bad.csv"), str(tmp_path / "n.png")]) == 2


def test_pictures_have_a_title_caption_legend_and_depth_a_colour_bar_in_metres(tmp_path):
    strip = np.random.default_rng(0).integers(0, 255, (36, 290, 3), dtype=np.uint8)
    fig = plots.image_figure(strip, tmp_path / "m.png", "masks", CAPTION, legend(2))
    check(fig, tmp_path / "m.png", image=True)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["context", "target 1", "target 2", "neither (dimmed)"]
    rgb = np.zeros((48, 64, 3), dtype=np.uint8)
    gt = np.linspace(1, 5, 48 * 64).reshape(48, 64)
    valid = gt < 4.5
    fig = plots.depth_figure(rgb, gt, gt * 1.1, valid, tmp_path / "d.png")
    check(fig, tmp_path / "d.png")
    (bar,) = colour_bars(fig)
    assert bar.get_ylabel() == "depth (m)"
    assert bar.get_ylim() == pytest.approx((1.0, float(gt[valid].max())))  # the gt's valid range
