"""ToMe token merging (Bolya et al., 2023) for the encoder blocks, packed-row aware.

In each block with merge rate ``r > 0``, after the attention residual, the tokens are split into
two alternating sets A (even positions) and B (odd); every A token is scored against every B token
by the cosine similarity of their attention keys, and the ``r`` best-matched A tokens are merged
into their B partner (size-weighted mean). Scores between tokens of different images are
``-inf``, so merges never cross images; padding-to-padding pairs score above any real pair, so
padding merges first. After the last block the merges are undone in reverse order (each merged
token is copied back to every position it absorbed), giving the input's (B, N, D) shape for the
loss or the pooling. The key metric is the full (all-heads) key vector of the block's ``qkv``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

PAD = -1


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, ids: Optional[torch.Tensor] = None
) -> tuple[Callable, Callable, torch.Tensor]:
    """Plan ``r`` merges per row of (B, N, C) ``metric``; ``ids`` (B, N) image ids (-1 padding).

    Returns ``merge`` ((B, N, D) -> (B, N - r, D), size-weighted when given sizes), ``unmerge``
    ((B, N - r, D) -> (B, N, D)) and the (B, N - r) ids of the merged tokens.
    """
    n = metric.shape[1]
    r = min(r, n // 2)
    m = F.normalize(metric.float(), dim=-1)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (B, Na, Nb) in [-1, 1]
    if ids is None:
        ids = torch.zeros(metric.shape[:2], dtype=torch.long, device=metric.device)
    ia, ib = ids[:, ::2, None], ids[:, None, 1::2]
    scores = scores.masked_fill(ia != ib, float("-inf"))
    scores = scores.masked_fill((ia == PAD) & (ib == PAD), 2.0)  # padding merges first
    node_max, node_idx = scores.max(dim=-1)  # best B partner of each A token
    order = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = order[:, r:], order[:, :r]  # A tokens kept / merged away
    dst_idx = node_idx[..., None].gather(1, src_idx)
    if r and not bool(torch.isfinite(node_max.gather(1, src_idx[..., 0])).all()):
        raise ValueError(f"merge rate {r} is more than the same-image pairs available")

    def merge(x: torch.Tensor) -> torch.Tensor:
        xa, xb = x[:, ::2], x[:, 1::2]
        d = x.shape[-1]
        unm = xa.gather(1, unm_idx.expand(-1, -1, d))
        src = xa.gather(1, src_idx.expand(-1, -1, d))
        xb = xb.scatter_reduce(1, dst_idx.expand(-1, -1, d), src, reduce="sum")
        return torch.cat([unm, xb], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        n_unm = unm_idx.shape[1]
        unm, xb = x[:, :n_unm], x[:, n_unm:]
        src = xb.gather(1, dst_idx.expand(-1, -1, d))
        out = x.new_zeros(x.shape[0], n, d)
        out[:, 1::2] = xb
        out[:, ::2] = out[:, ::2].scatter(1, unm_idx.expand(-1, -1, d), unm)
        out[:, ::2] = out[:, ::2].scatter(1, src_idx.expand(-1, -1, d), src)
        return out

    new_ids = torch.cat([ids[:, ::2].gather(1, unm_idx[..., 0]), ids[:, 1::2]], dim=1)
    return merge, unmerge, new_ids


def merge_weighted(merge: Callable, x: torch.Tensor, size: torch.Tensor):
    """Size-weighted merge of (B, N, D) tokens with (B, N, 1) sizes -> merged tokens, sizes."""
    summed = merge(x * size)
    new_size = merge(size)
    return summed / new_size, new_size


def tome_blocks(
    blocks, x: torch.Tensor, rates: list, ids: Optional[torch.Tensor] = None,
    attn_mask_fn: Optional[Callable] = None,
) -> torch.Tensor:  # fmt: skip
    """Run timm ``blocks`` on (B, N, D) tokens merging ``rates[i]`` tokens after block i's
    attention; returns (B, N, D) unmerged outputs. ``attn_mask_fn(ids)`` gives the attention mask
    for the current tokens (packed rows), else none."""
    if len(rates) != len(blocks):
        raise ValueError(f"model.tome_rates has {len(rates)} entries for {len(blocks)} blocks")
    size = x.new_ones(x.shape[0], x.shape[1], 1)
    undo = []
    for block, r in zip(blocks, rates):
        mask = attn_mask_fn(ids) if attn_mask_fn is not None else None
        h = block.norm1(x)
        x = x + block.drop_path1(block.ls1(block.attn(h, attn_mask=mask)))
        if r > 0:
            qkv = block.attn.qkv
            d = x.shape[-1]
            bias = qkv.bias[d : 2 * d] if qkv.bias is not None else None
            keys = F.linear(h, qkv.weight[d : 2 * d], bias)
            merge, unmerge, ids_new = bipartite_soft_matching(keys, r, ids)
            x, size = merge_weighted(merge, x, size)
            undo.append(unmerge)
            ids = ids_new if ids is not None else None
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    for unmerge in reversed(undo):
        x = unmerge(x)
    return x
