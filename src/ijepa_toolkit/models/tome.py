"""ToMe token merging (Bolya et al., 2023) for the encoder blocks, packed-row aware.

As the seeds run it (elucidating-featurenorm-ijepa ``src/tome.py`` + ``src/model.py``;
ijepa-enhanced ``ijepa_enhanced/tome/tome.py`` + ``vit.py``; see docs/tome.md):

- the similarity metric is the block's attention keys as the attention uses them (after the
  q/k norm and RoPE, when there are any), **averaged over heads**: (B, N, head_dim);
- tokens are split into alternating sets A (even positions) and B (odd); each A token is scored
  against every B token by cosine similarity; the ``r`` best-matched A tokens merge into their B
  partner by an **unweighted** mean (``scatter_reduce(..., "mean")`` over the B token and the A
  tokens it receives, whatever they absorbed before) or, in ``drop`` mode, are discarded;
- scores between different images are ``finfo.min`` and padding-to-padding pairs ``finfo.max``,
  so merges never cross images and padding merges first;
- ``placement``: ``block`` merges after the whole block (featurenorm), ``attention`` after the
  attention residual, before the MLP (ijepa-enhanced);
- integer positions (RoPE) merge by the mean truncated to an integer, and RoPE is recomputed;
- after the final norm the merges are undone (each merged token is copied back to every position
  it absorbed), giving the input's (B, N, D) shape -- or, as IJEPA-Enhanced's
  ``should_unmerge: false``, kept merged, with ``TomeState.merge_all`` to merge any per-token
  tensor (positions, target masks) the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import UserError

PAD = -1
MERGE_MODES = ("mean", "drop")
PLACEMENTS = ("block", "attention")


def _expand(index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, K) index -> (B, K, *x.shape[2:]) for gather/scatter along dim 1 of ``x``."""
    return index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, ids: Optional[torch.Tensor] = None
) -> tuple[Callable, Callable, torch.Tensor]:
    """Plan ``r`` merges per row of (B, N, C) ``metric``; ``ids`` (B, N) image ids (-1 padding).

    Returns ``merge(x, mode="mean")`` ((B, N, ...) -> (B, N - r, ...); ``mode`` ``mean`` or
    ``drop``), ``unmerge`` ((B, N - r, ...) -> (B, N, ...)) and the (B, N - r) merged ids.
    Raises ``UserError`` when a row has fewer than ``r`` same-image pairs to merge.
    """
    n = metric.shape[1]
    r = min(r, n // 2)
    m = F.normalize(metric.float(), dim=-1)
    scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)  # (B, Na, Nb) in [-1, 1]
    if ids is None:
        ids = torch.zeros(metric.shape[:2], dtype=torch.long, device=metric.device)
    ia, ib = ids[:, ::2, None], ids[:, None, 1::2]
    low, high = torch.finfo(scores.dtype).min, torch.finfo(scores.dtype).max
    scores = scores.masked_fill(ia != ib, low).masked_fill((ia == PAD) & (ib == PAD), high)
    node_max, node_idx = scores.max(dim=-1)  # best B partner of each A token
    order = node_max.argsort(dim=-1, descending=True)
    unm_idx, src_idx = order[:, r:], order[:, :r]  # A tokens kept / merged away
    dst_idx = node_idx.gather(1, src_idx)
    if r and bool((node_max.gather(1, src_idx) == low).any()):
        raise UserError(f"ToMe merge rate {r} is more than the same-image pairs available")

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        if mode not in MERGE_MODES:
            raise UserError(f"ToMe merge mode must be one of {MERGE_MODES}, got {mode!r}")
        xa, xb = x[:, ::2], x[:, 1::2]
        unm = xa.gather(1, _expand(unm_idx, xa))
        if mode == "mean":
            src = xa.gather(1, _expand(src_idx, xa)).float()
            xb = xb.float().scatter_reduce(1, _expand(dst_idx, xb), src, reduce="mean")
        return torch.cat([unm, xb.to(x.dtype)], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        n_unm = unm_idx.shape[1]
        unm, xb = x[:, :n_unm], x[:, n_unm:]
        out = x.new_zeros(x.shape[0], n, *x.shape[2:])
        out[:, 1::2] = xb
        even = out[:, ::2].scatter(1, _expand(unm_idx, unm), unm)
        out[:, ::2] = even.scatter(1, _expand(src_idx, unm), xb.gather(1, _expand(dst_idx, xb)))
        return out

    new_ids = torch.cat([ids[:, ::2].gather(1, unm_idx), ids[:, 1::2]], dim=1)
    return merge, unmerge, new_ids


def attention_keys(attn, h: torch.Tensor) -> torch.Tensor:
    """The keys a timm ``Attention`` (or ``RopeAttention``) computes from (B, N, D) ``h``, after
    its ``k_norm`` and RoPE, averaged over heads: (B, N, head_dim)."""
    b, n, _ = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim)
    k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # (B, H, N, hd)
    rope = getattr(attn, "_rope", [None])[0]
    if rope is not None:
        angles = rope.angles(rope.pos.to(k.dtype))
        start = n - angles.shape[2]  # register tokens are not rotated
        k = torch.cat([k[:, :, :start], rope.rotate(k[:, :, start:], angles)], dim=2)
    return k.mean(dim=1)


@dataclass
class TomeState:
    """The merges of one ``merge_blocks`` run over (B, N) tokens: ``ids`` (B, N') merged image
    ids (None without ids), one ``merge`` / ``unmerge`` pair per merging block."""

    n: int
    ids: Optional[torch.Tensor] = None
    merges: list = field(default_factory=list)
    undo: list = field(default_factory=list)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N', ...) -> (B, N, ...): each merged token copied back to every token it holds."""
        for unmerge in reversed(self.undo):
            x = unmerge(x)
        return x

    def members(self, like: torch.Tensor) -> torch.Tensor:
        """(B, N', N) float: 1 where merged token i holds input token j (in ``drop`` mode too:
        a dropped token belongs to its partner, as IJEPA-Enhanced's ``adm``)."""
        m = torch.eye(self.n, dtype=torch.float32, device=like.device).expand(like.shape[0], -1, -1)
        for merge in self.merges:
            m = (merge(m, "mean") > 0).float()
        return m

    def merge_all(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) per-input-token values -> (B, N', ...) the mean over the input tokens
        each merged token holds, in float32 (IJEPA-Enhanced ``TokenMerger.merge_all``)."""
        m = self.members(t)
        flat = t.reshape(t.shape[0], self.n, -1).float()
        out = (m @ flat) / m.sum(-1, keepdim=True)
        return out.reshape(t.shape[0], -1, *t.shape[2:])


def merge_blocks(
    blocks, x: torch.Tensor, rates: list, ids: Optional[torch.Tensor] = None,
    attn_mask_fn: Optional[Callable] = None, placement: str = "attention", mode: str = "mean",
    rope=None,
) -> tuple[torch.Tensor, TomeState]:  # fmt: skip
    """Run timm ``blocks`` on (B, N, D) tokens merging ``rates[i]`` tokens in block i (after the
    attention or after the whole block, see ``placement``): the (B, N', D) merged tokens and
    their ``TomeState``.

    ``ids`` (B, N) image ids (-1 padding); ``attn_mask_fn(ids)`` gives the attention mask of the
    current tokens (packed rows). With ``rope`` (a ``Rope2D`` whose ``pos`` holds the (B, N, 2)
    positions) the positions are merged too and RoPE follows the merged tokens.
    """
    if len(rates) != len(blocks):
        raise UserError(
            f"ToMe rates {list(rates)} have {len(rates)} entries for {len(blocks)} blocks "
            "(model.tome_rates / target_tome_rates / pred_tome_rates: one count per block)"
        )
    if placement not in PLACEMENTS:
        raise UserError(f"model.tome_placement must be one of {PLACEMENTS}, got {placement!r}")
    pos = rope.pos.round().long() if rope is not None else None
    state = TomeState(x.shape[1], ids)

    def step(x, keys, r):
        nonlocal pos
        merge, unmerge, new_ids = bipartite_soft_matching(keys, r, state.ids)
        state.merges.append(merge)
        state.undo.append(unmerge)
        state.ids = new_ids if state.ids is not None else None
        if pos is not None:
            pos = merge(pos)
            rope.pos = pos.float()
        return merge(x, mode)

    for block, r in zip(blocks, rates):
        mask = attn_mask_fn(state.ids) if attn_mask_fn is not None else None
        h = block.norm1(x)
        keys = attention_keys(block.attn, h) if r > 0 else None
        x = x + block.drop_path1(block.ls1(block.attn(h, attn_mask=mask)))
        if r > 0 and placement == "attention":
            x = step(x, keys, r)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        if r > 0 and placement == "block":
            x = step(x, keys, r)
    return x, state


def tome_blocks(
    blocks, x: torch.Tensor, rates: list, ids: Optional[torch.Tensor] = None,
    attn_mask_fn: Optional[Callable] = None, placement: str = "attention", mode: str = "mean",
    rope=None, norm: Optional[Callable] = None, unmerge: bool = True,
):  # fmt: skip
    """``merge_blocks``, then ``norm`` (default none) on the merged tokens; returns the unmerged
    (B, N, D) tokens, or with ``unmerge=False`` the (B, N', D) merged tokens and their
    ``TomeState`` (IJEPA-Enhanced ``should_unmerge: false``)."""
    x, state = merge_blocks(blocks, x, rates, ids, attn_mask_fn, placement, mode, rope)
    if norm is not None:
        x = norm(x)
    return state.unmerge(x) if unmerge else (x, state)
