"""NaViT-style sample packing for variable-resolution I-JEPA.

Each image is resized to a random longer side in ``[min_side, max_side]`` pixels with its aspect
kept, both sides rounded to whole ``patch * window`` units, and split into context and target
(``packing.split``, packing_split.py). Images are first-fit packed into rows with a fixed
context budget and a fixed target budget (no image is ever dropped: one that fits no empty row is
an error, and every image lands in exactly one row). Per token: ids ``(sample, register, row,
col)`` (sample ``-1`` = padding) and the flattened patch pixels. Attention is restricted to tokens
of the same image with a boolean ``scaled_dot_product_attention`` mask; padding only attends to
padding and is never in the loss.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, UserError
from ..models.diffmoe import DiffMoEMlp
from ..models.pos_embed import sincos_2d
from ..models.tome import tome_blocks
from .packing_split import enhanced_crop, split_image
from .sections import BLOCKS_NO_DROP, PackingSection
from .token_drop import sample_units, unit_positions

PAD = -1


@dataclass
class PredictorView:
    """The predictor's copies of R packed rows: copy ``j`` of row ``r`` is row ``j * R + r``.

    ``ctx_index`` / ``tgt_index``: (C*R, k) positions into the row's context / target tokens
    the copy keeps (None: all); ``tgt_valid``: (C*R, kt) bool, the kept target tokens this copy
    predicts (and the loss counts)."""

    copies: int
    ctx_index: Optional[torch.Tensor]
    tgt_index: Optional[torch.Tensor]
    tgt_valid: torch.Tensor

    def to(self, device) -> PredictorView:
        """The same view on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PredictorView(self.copies, move(self.ctx_index), move(self.tgt_index),
                             self.tgt_valid.to(device))  # fmt: skip


@dataclass
class PackedBatch:
    """Rows of packed tokens. ``*_ids``: (R, L, 4) long (sample-in-row, register, row, col);
    ``*_px``: (R, L, C*p*p) patch pixels; ``*_gsample``: (R, L) index into ``grids`` (-1 pad)."""

    ctx_px: torch.Tensor
    ctx_ids: torch.Tensor
    ctx_gsample: torch.Tensor
    tgt_px: torch.Tensor
    tgt_ids: torch.Tensor
    tgt_gsample: torch.Tensor
    grids: list  # (gh, gw) of every input image, in input order
    rows: list  # input indices packed in each row
    tgt_blocks: Optional[torch.Tensor] = None  # (R, Lt, M) bool: target rectangle membership
    view: Optional[PredictorView] = None  # the predictor's copies (predictor_view)

    def to(self, device) -> PackedBatch:
        """The same batch with its tensors (and its view's) on ``device``."""
        moved = {k: v.to(device) for k, v in vars(self).items() if torch.is_tensor(v)}
        if self.view is not None:
            moved["view"] = self.view.to(device)
        return PackedBatch(**{**vars(self), **moved})

    def drop_row(self, r: int) -> PackedBatch:
        """The batch without row ``r`` (its images stay listed in ``grids``, in no row)."""
        keep = [i for i in range(len(self.rows)) if i != r]
        rows = {k: v[keep] for k, v in vars(self).items() if torch.is_tensor(v)}
        return PackedBatch(**{**vars(self), **rows, "rows": [self.rows[i] for i in keep]})

    @property
    def padding_rate(self) -> float:
        """Fraction of token slots (context + target) holding padding."""
        pads = (self.ctx_gsample == PAD).sum() + (self.tgt_gsample == PAD).sum()
        return float(pads) / (self.ctx_gsample.numel() + self.tgt_gsample.numel())


def resized_shape(h: int, w: int, side: int, unit: int) -> tuple[int, int]:
    """(H, W) with the longer side ``side``, aspect kept, both rounded to multiples of ``unit``."""
    scale = side / max(h, w)
    return (max(unit, round(h * scale / unit) * unit), max(unit, round(w * scale / unit) * unit))


def first_fit(lengths: list, ctx_budget: int, tgt_budget: int) -> list:
    """Rows of item indices: items, longest first, each go into the first row with room for both
    their ``(ctx, tgt)`` lengths (first-fit decreasing); every item lands in exactly one row.

    Raises ``UserError`` for an item larger than the budgets (it could never be packed).
    """
    rows, used = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -sum(lengths[i])):
        c, t = lengths[i]
        if c > ctx_budget or t > tgt_budget:
            raise UserError(
                f"image {i} has {c} context / {t} target tokens, more than the row budgets "
                f"{ctx_budget} / {tgt_budget}; raise packing.ctx_budget / tgt_budget or lower "
                "packing.max_side"
            )
        for r, (uc, ut) in enumerate(used):
            if uc + c <= ctx_budget and ut + t <= tgt_budget:
                rows[r].append(i)
                used[r] = (uc + c, ut + t)
                break
        else:
            rows.append([i])
            used.append((c, t))
    return rows


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """(C, H, W) -> (H/p * W/p, C*p*p), row-major patches flattened (channel, row, column)."""
    c, h, w = image.shape
    x = image.reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 0, 2, 4)
    return x.reshape((h // patch) * (w // patch), c * patch * patch)


def pack(images: list, patch: int, section: PackingSection, gen: torch.Generator) -> PackedBatch:
    """Resize, split and pack (C, H, W) images (any sizes) into rows; see the module docstring."""
    unit = patch * section.window
    items, lengths, grids = [], [], []
    for img in images:
        x = _sized(img, section, unit, gen)
        gh, gw = x.shape[-2] // patch, x.shape[-1] // patch
        ctx, tgt, blocks = split_image(gh, gw, section, gen)
        items.append((patchify(x, patch), ctx, tgt, gw, blocks))
        lengths.append((len(ctx), len(tgt)))
        grids.append((gh, gw))
    rows = first_fit(lengths, section.ctx_budget, section.tgt_budget)
    parts = [_pack_part(items, rows, budget, which)
             for budget, which in ((section.ctx_budget, 1), (section.tgt_budget, 2))]  # fmt: skip
    blocks = None
    if items[0][4] is not None:
        blocks = torch.zeros(len(rows), section.tgt_budget, section.num_targets, dtype=torch.bool)
        for r, members in enumerate(rows):
            at = 0
            for i in members:
                blocks[r, at : at + len(items[i][4])] = items[i][4]
                at += len(items[i][4])
    return PackedBatch(*parts[0], *parts[1], grids=grids, rows=rows, tgt_blocks=blocks)


def _sized(img: torch.Tensor, section: PackingSection, unit: int, gen) -> torch.Tensor:
    """(C, H, W) at its packed size: resized to a random longer side (``longer_side``), or
    ijepa-enhanced's random crop (``enhanced_crop``, packing_split.py)."""
    if section.resize == "enhanced_crop":
        return enhanced_crop(img, section.min_side, section.max_side, unit, gen)
    side = int(torch.randint(section.min_side, section.max_side + 1, (1,), generator=gen))
    hw = resized_shape(img.shape[-2], img.shape[-1], side, unit)
    x = F.interpolate(img[None], size=hw, mode="bilinear", antialias=True, align_corners=False)
    return x[0]


def _pack_part(items: list, rows: list, budget: int, which: int) -> tuple:
    """(pixels, ids, gsample) of the context (``which`` 1) or target (2) tokens of each row."""
    px = torch.zeros(len(rows), budget, items[0][0].shape[1])
    ids = torch.full((len(rows), budget, 4), PAD, dtype=torch.long)
    ids[..., 1] = 0
    gsample = torch.full((len(rows), budget), PAD, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            tokens, index, gw = items[i][0], items[i][which], items[i][3]
            n = len(index)
            px[r, at : at + n] = tokens[index]
            ids[r, at : at + n, 0] = s
            ids[r, at : at + n, 2] = index // gw
            ids[r, at : at + n, 3] = index % gw
            gsample[r, at : at + n] = i
            at += n
    return px, ids, gsample


class PackingStream:
    """Packs each step's images together with those carried over from the previous step.

    With ``carry_over`` the least full row of a step (when there are several) is not emitted: its
    images are packed again, first, with the next step's images. No image is dropped: each one
    comes out in exactly one emitted row, or is still ``waiting``.
    """

    def __init__(self, patch: int, section: PackingSection):
        self.patch, self.section = patch, section
        self.waiting: list = []  # (key, image) carried to the next step

    def __call__(self, images: list, keys: list, gen: torch.Generator) -> tuple[PackedBatch, list]:
        """Pack ``waiting + images``; returns the batch and the keys of its images, in order."""
        pending = self.waiting + list(zip(keys, images))
        batch = pack([img for _, img in pending], self.patch, self.section, gen)
        self.waiting = []
        if self.section.carry_over and len(batch.rows) > 1:
            fill = (batch.ctx_gsample != PAD).sum(1) + (batch.tgt_gsample != PAD).sum(1)
            last = int(fill.argmin())
            self.waiting = [pending[i] for i in batch.rows[last]]
            batch = batch.drop_row(last)
        return batch, [pending[i][0] for i in range(len(pending))]

    def state_dict(self) -> dict:
        """The carried-over items as plain lists (``keys``, (C, H, W) ``images``) for a checkpoint
        read with ``weights_only=True``."""
        return {"keys": [k for k, _ in self.waiting], "images": [img for _, img in self.waiting]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the items ``state_dict`` saved; they are packed first at the next step."""
        self.waiting = list(zip(state["keys"], state["images"]))


def same_image_mask(ids: torch.Tensor) -> torch.Tensor:
    """(R, L, 4) ids -> (R, 1, L, L) boolean SDPA mask: True where both tokens share an image.

    Padding (sample -1) attends only to padding, so no softmax row is empty.
    """
    return _sample_mask(ids[..., 0])


def _sample_mask(sample: torch.Tensor) -> torch.Tensor:
    return (sample[:, :, None] == sample[:, None, :]).unsqueeze(1)


def _positions(tables: list, gsample: torch.Tensor, ids: torch.Tensor, grids: list):
    """(R, L, D) rows of per-image position tables (zeros at padding)."""
    flat = torch.cat(tables, dim=0)
    offsets = torch.tensor([0] + [gh * gw for gh, gw in grids]).cumsum(0)[:-1]
    widths = torch.tensor([gw for _, gw in grids])
    g = gsample.clamp(min=0)
    index = offsets[g] + ids[..., 2].clamp(min=0) * widths[g] + ids[..., 3].clamp(min=0)
    pos = flat[index.to(flat.device)]
    return pos * (gsample != PAD).unsqueeze(-1).to(pos.device, pos.dtype)


def encode_packed(
    encoder, px, ids, gsample, grids, tome_rates: Sequence = (), tome_placement: str = "attention",
    tome_mode: str = "mean", tome_unmerge: bool = True,
):  # fmt: skip
    """Encoder over packed rows: (R, L, C*p*p) pixels -> (R, L, D) tokens after the final norm.

    Positions come from ``encoder.pos_embed_for_grid`` at each image's own grid (sin-cos exact,
    learned resampled, factorised, or RoPE on q/k); attention stays within each image.
    ``tome_rates``: tokens merged per block (ToMe within images, models/tome.py; merged RoPE
    positions are averaged); the final norm sees the merged tokens, which are then unmerged --
    or, with ``tome_unmerge=False``, returned merged with their ``TomeState`` (models/tome.py).
    """
    if getattr(encoder, "reg_token", None) is not None:
        raise UserError("packing with encoder registers is not supported")
    proj = encoder.patch_embed.proj
    x = F.linear(px.to(proj.weight.dtype), proj.weight.flatten(1), proj.bias)
    tables = [encoder.pos_embed_for_grid(g)[0] for g in grids]
    x = x + _positions(tables, gsample, ids, grids)
    rope = getattr(encoder, "rope", None)
    if rope is not None:
        rope.pos = ids[..., 2:].clamp(min=0).float()
    if any(tome_rates):
        return tome_blocks(
            encoder.blocks, x, list(tome_rates), ids[..., 0], _sample_mask, tome_placement,
            tome_mode, rope, encoder.norm, tome_unmerge,
        )  # fmt: skip
    mask = same_image_mask(ids)
    with moe_padding(encoder, gsample == PAD):
        for block in encoder.blocks:
            x = block(x, attn_mask=mask)
    return encoder.norm(x)


@contextmanager
def moe_padding(encoder, padding: torch.Tensor):
    """Tell the encoder's DiffMoE MLPs which (R, L) tokens are padding, for one forward."""
    moes = [m for m in encoder.modules() if isinstance(m, DiffMoEMlp)]
    for m in moes:
        m.padding = padding
    try:
        yield
    finally:
        for m in moes:
            m.padding = None


def predict_packed(predictor, ctx, ctx_ids, ctx_gsample, tgt_ids, tgt_gsample, grids):
    """The I-JEPA predictor over packed rows: context (R, Lc, D) -> predictions (R, Lt, D).

    Context tokens and mask tokens get the predictor's sin-cos positions at each image's grid;
    attention stays within each image (context and targets of the same sample).
    """
    width = predictor.predictor_embed.out_features
    tables = [sincos_2d(width, g).to(ctx.device, ctx.dtype)[0] for g in grids]
    x = predictor.predictor_embed(ctx) + _positions(tables, ctx_gsample, ctx_ids, grids)
    t = predictor.mask_token.to(x.dtype) + _positions(tables, tgt_gsample, tgt_ids, grids)
    x = torch.cat([x, t], dim=1)
    ids = torch.cat([ctx_ids, tgt_ids], dim=1)[..., 0]
    x = predictor.blocks_forward(x, ids, _sample_mask)  # blocks + norm (+ predictor ToMe)
    return predictor.predictor_proj(x[:, ctx.shape[1] :])


def per_image_mean(tokens: torch.Tensor, gsample: torch.Tensor, n: int) -> torch.Tensor:
    """(R, L, D) packed tokens -> (n', D) mean over the tokens of each of the n' images present
    (padding ignored), in image order."""
    valid = gsample != PAD
    sums = tokens.new_zeros(n, tokens.shape[-1]).index_add_(0, gsample[valid], tokens[valid])
    counts = torch.bincount(gsample[valid], minlength=n).to(tokens.dtype)
    present = counts > 0
    return sums[present] / counts[present, None]


def packed_loss(pred: torch.Tensor, target: torch.Tensor, gsample: torch.Tensor, kind: str):
    """Mean smooth-L1 / squared error over the non-padding (R, L, D) target tokens only."""
    valid = gsample != PAD
    p, t = pred[valid], target[valid]
    return F.smooth_l1_loss(p, t) if kind == "smooth_l1" else F.mse_loss(p, t)


def predictor_view(
    batch: PackedBatch, capacity: float = 1.0, repeats: int = 1, replacement: bool = True,
    window: int = 1, generator: Optional[torch.Generator] = None,
) -> PredictorView:  # fmt: skip
    """The predictor's copies of ``batch``: one per target rectangle (``enhanced_blocks``), or
    ``repeats`` token-dropped copies (featurenorm: ``round(capacity * windows)`` of each row's
    consecutive ``window**2``-token windows, all-padding windows drawn last; context first, then
    targets, as ``token_drop.sample_units``), or the batch itself."""
    valid = batch.tgt_gsample != PAD
    dropping = capacity < 1 or repeats > 1
    if batch.tgt_blocks is not None:
        if dropping:
            raise ConfigError(BLOCKS_NO_DROP)
        m = batch.tgt_blocks.shape[-1]
        blocks = batch.tgt_blocks.permute(2, 0, 1).reshape(-1, valid.shape[1])
        return PredictorView(m, None, None, blocks & valid.repeat(m, 1))
    if not dropping:
        return PredictorView(1, None, None, valid)
    draw = (capacity, repeats, replacement, window, generator)
    ctx_index = _drop_index(batch.ctx_gsample, *draw)
    tgt_index = _drop_index(batch.tgt_gsample, *draw)
    tgt_valid = valid.repeat(repeats, 1).gather(1, tgt_index)
    return PredictorView(repeats, ctx_index, tgt_index, tgt_valid)


def _drop_index(gsample, capacity, repeats, replacement, window, generator) -> torch.Tensor:
    """(repeats * R, k * window**2) sorted token positions of the drawn windows of each row."""
    rows, length = gsample.shape
    unit = window * window
    if length % unit:
        raise ConfigError(f"model.pred_window={window} needs row budgets that are multiples of "
                          f"{unit} tokens, got {length}")  # fmt: skip
    padding = (gsample == PAD).reshape(rows, length // unit, unit).all(-1)
    units = sample_units(rows, length // unit, capacity, repeats, replacement, generator, padding)
    return unit_positions(units.to(gsample.device), unit).sort(dim=1).values


def _copies(x: torch.Tensor, copies: int, index: Optional[torch.Tensor]) -> torch.Tensor:
    """(R, L, ...) -> (copies * R, k, ...): repeated, then the ``index`` positions of each row."""
    x = x.repeat(copies, *[1] * (x.dim() - 1))
    if index is None:
        return x
    return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


def predict_batch(predictor, ctx: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """``predict_packed`` on ``batch.view`` (default: the rows themselves): encoded context
    (R, Lc, D) -> predictions (C*R, kt, D); target tokens a copy does not predict are padding."""
    v = batch.view or predictor_view(batch)
    c = v.copies
    ctx_ids, ctx_gs = (_copies(t, c, v.ctx_index) for t in (batch.ctx_ids, batch.ctx_gsample))
    tgt_ids, tgt_gs = (_copies(t, c, v.tgt_index) for t in (batch.tgt_ids, batch.tgt_gsample))
    tgt_ids = tgt_ids.clone()
    tgt_ids[..., 0] = tgt_ids[..., 0].masked_fill(~v.tgt_valid, PAD)
    return predict_packed(predictor, _copies(ctx, c, v.ctx_index), ctx_ids, ctx_gs, tgt_ids,
                          tgt_gs.masked_fill(~v.tgt_valid, PAD), batch.grids)  # fmt: skip


def view_targets(target: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, Lt, D) targets -> the (C*R, kt, D) targets of ``batch.view``'s copies and their
    (C*R, kt) image index, PAD where a copy predicts nothing (for ``packed_loss``)."""
    v = batch.view or predictor_view(batch)
    gsample = _copies(batch.tgt_gsample, v.copies, v.tgt_index).masked_fill(~v.tgt_valid, PAD)
    return _copies(target, v.copies, v.tgt_index), gsample
