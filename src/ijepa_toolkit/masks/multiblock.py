"""I-JEPA multiblock masks: target blocks to predict and a context block with them removed.

Per step one target block size (scale ``pred_mask_scale``, aspect ``aspect_ratio``) and one
context block size (scale ``enc_mask_scale``, aspect 1) are drawn for the whole batch, as in the
official sampler; each image then gets ``num_pred_masks`` target blocks and ``num_enc_masks``
context blocks at random positions, the context losing every target patch. All index tensors are
row-major patch indices, ``(B, K)``, with ``K`` equal across the batch.

Default mode fixes two quirks of the official sampler: blocks may touch the last row and column
(the official ``randint(0, H - h)`` never does, and it caps a block at ``H - 1`` rows), and masks
are made equal in length by keeping a random subset of each (the official sampler cuts every mask's
tail, which drops bottom-right patches first). ``legacy=True`` reproduces the official sampler
call for call, including its use of the global torch RNG for block positions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ..errors import ConfigError

if TYPE_CHECKING:  # (torch is imported where masks are drawn: the mask section reads without it)
    import torch

logger = logging.getLogger("ijepa_toolkit")


@dataclass
class MaskSection:
    """The official ``mask`` config section (``patch_size`` lives in the ``model`` section)."""

    enc_mask_scale: tuple[float, float] = (0.85, 1.0)
    pred_mask_scale: tuple[float, float] = (0.15, 0.2)
    aspect_ratio: tuple[float, float] = (0.75, 1.5)
    num_enc_masks: int = 1
    num_pred_masks: int = 4
    min_keep: int = 10
    allow_overlap: bool = False
    legacy: bool = False  # reproduce the official sampler exactly (quirks included)
    group_size: int = 0  # images whose masks share one length; 0: the per-process batch

    def checks(self) -> list[tuple[str, Any, bool, str]]:
        return [
            ("enc_mask_scale", self.enc_mask_scale, _interval(self.enc_mask_scale, 0, 1),
             "[min, max] with 0 <= min <= max <= 1"),
            ("pred_mask_scale", self.pred_mask_scale, _interval(self.pred_mask_scale, 0, 1),
             "[min, max] with 0 <= min <= max <= 1"),
            ("aspect_ratio", self.aspect_ratio, _interval(self.aspect_ratio, 1e-6, math.inf),
             "[min, max] with 0 < min <= max"),
            ("num_enc_masks", self.num_enc_masks, self.num_enc_masks >= 1, ">= 1"),
            ("num_pred_masks", self.num_pred_masks, self.num_pred_masks >= 1, ">= 1"),
            ("min_keep", self.min_keep, self.min_keep >= 0, ">= 0"),
            ("group_size", self.group_size, self.group_size >= 0, ">= 0 (0: the batch)"),
        ]  # fmt: skip


def _interval(pair: tuple[float, float], lo: float, hi: float) -> bool:
    """``pair`` is ``(a, b)`` with ``lo <= a <= b <= hi``."""
    return lo <= pair[0] <= pair[1] <= hi


class MultiBlockMaskSampler:
    """Sample context and target masks for a batch on a ``grid`` of (H, W) patches.

    ``sample(batch_size, step, generator)`` returns ``(masks_enc, masks_pred)``: lists of
    ``num_enc_masks`` and ``num_pred_masks`` index tensors of shape (B, K) (int64, sorted rows).
    ``step`` seeds the block sizes (the official per-call counter); ``generator`` drives block
    positions and the equal-length subsets (the global torch RNG when None).
    """

    def __init__(self, grid: tuple[int, int], cfg: MaskSection, max_tries: int = 1000):
        self.height, self.width = grid
        self.cfg = cfg
        self.max_tries = max_tries
        n = self.height * self.width
        if cfg.min_keep >= n:
            raise ConfigError(
                f"mask.min_keep={cfg.min_keep} must be below the {n} patches per image"
            )

    def block_size(self, generator: torch.Generator, scale, aspect) -> tuple[int, int]:
        """(h, w) of a block covering ``scale`` of the grid at aspect ``h / w`` (official draw)."""
        import torch

        rand = torch.rand(1, generator=generator).item()
        mask_scale = scale[0] + rand * (scale[1] - scale[0])
        max_keep = int(self.height * self.width * mask_scale)
        aspect_ratio = aspect[0] + rand * (aspect[1] - aspect[0])
        h = int(round(math.sqrt(max_keep * aspect_ratio)))
        w = int(round(math.sqrt(max_keep / aspect_ratio)))
        if self.cfg.legacy:
            while h >= self.height:
                h -= 1
            while w >= self.width:
                w -= 1
            return h, w
        return min(max(h, 1), self.height), min(max(w, 1), self.width)

    def _blocks(self, size: tuple[int, int], shape: tuple[int, ...], generator) -> torch.Tensor:
        """(*shape, H, W) bool masks of blocks of ``size`` at uniform positions, the last row and
        column included."""
        import torch

        h, w = size
        top = torch.randint(0, self.height - h + 1, (*shape, 1, 1), generator=generator)
        left = torch.randint(0, self.width - w + 1, (*shape, 1, 1), generator=generator)
        rows = torch.arange(self.height).view(-1, 1)
        cols = torch.arange(self.width).view(1, -1)
        return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)

    def _legacy_block(self, size, generator, acceptable=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The official ``_sample_block_mask``: (indices, complement) with its relaxation loop."""
        import torch

        h, w = size
        tries, timeout = 0, 20
        while True:
            top = torch.randint(0, self.height - h, (1,), generator=generator)
            left = torch.randint(0, self.width - w, (1,), generator=generator)
            mask = torch.zeros((self.height, self.width), dtype=torch.int32)
            mask[top : top + h, left : left + w] = 1
            if acceptable is not None:
                for region in acceptable[: max(len(acceptable) - tries, 0)]:
                    mask *= region
            idx = torch.nonzero(mask.flatten())
            if len(idx) > self.cfg.min_keep:
                break
            timeout -= 1
            if timeout == 0:
                tries, timeout = tries + 1, 20
                logger.warning(
                    "mask sampler: no valid mask found, relaxing constraints [%d]", tries
                )
        complement = torch.ones((self.height, self.width), dtype=torch.int32)
        complement[top : top + h, left : left + w] = 0
        return idx.squeeze(), complement

    def sample(
        self, batch_size: int, step: int, generator: Optional[torch.Generator] = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(masks_enc, masks_pred)`` for ``batch_size`` images; see the class docstring."""
        import torch

        g = torch.Generator()
        g.manual_seed(step)
        cfg = self.cfg
        p_size = self.block_size(g, cfg.pred_mask_scale, cfg.aspect_ratio)
        e_size = self.block_size(g, cfg.enc_mask_scale, (1.0, 1.0))
        if cfg.legacy:
            return self._sample_legacy(batch_size, p_size, e_size, generator)
        n = self.height * self.width
        targets = torch.zeros(batch_size, cfg.num_pred_masks, n, dtype=torch.bool)
        contexts = torch.zeros(batch_size, cfg.num_enc_masks, n, dtype=torch.bool)
        todo = torch.arange(batch_size)  # images whose context is still below min_keep
        for _ in range(self.max_tries):
            t = self._blocks(p_size, (len(todo), cfg.num_pred_masks), generator).flatten(2)
            c = self._blocks(e_size, (len(todo), cfg.num_enc_masks), generator).flatten(2)
            if not cfg.allow_overlap:
                c = c & ~t.any(dim=1, keepdim=True)
            targets[todo], contexts[todo] = t, c
            todo = todo[contexts[todo].sum(dim=2).min(dim=1).values < cfg.min_keep]
            if len(todo) == 0:
                break
        else:
            raise RuntimeError(
                f"mask sampler: no context with at least min_keep={cfg.min_keep} patches in "
                f"{self.max_tries} tries on a {self.height}x{self.width} grid; lower "
                "mask.min_keep or mask.pred_mask_scale"
            )
        return random_subsets(contexts, generator), random_subsets(targets, generator)

    def _sample_legacy(self, batch_size, p_size, e_size, generator):
        import torch

        cfg = self.cfg
        enc, pred = [], []
        min_pred = min_enc = self.height * self.width
        for _ in range(batch_size):
            masks_p, complements = [], []
            for _ in range(cfg.num_pred_masks):
                idx, comp = self._legacy_block(p_size, generator)
                masks_p.append(idx)
                complements.append(comp)
                min_pred = min(min_pred, len(idx))
            pred.append(masks_p)
            acceptable = None if cfg.allow_overlap else complements
            masks_e = []
            for _ in range(cfg.num_enc_masks):
                idx, _ = self._legacy_block(e_size, generator, acceptable)
                masks_e.append(idx)
                min_enc = min(min_enc, len(idx))
            enc.append(masks_e)
        enc = [torch.stack([m[j][:min_enc] for m in enc]) for j in range(cfg.num_enc_masks)]
        pred = [torch.stack([m[j][:min_pred] for m in pred]) for j in range(cfg.num_pred_masks)]
        return enc, pred


def random_subsets(masks: torch.Tensor, generator: Optional[torch.Generator]) -> list[torch.Tensor]:
    """(B, M, N) bool masks -> M index tensors (B, K), K the smallest mask, each row a random
    subset of its mask's indices in increasing order."""
    import torch

    k = int(masks.sum(dim=2).min())
    scores = torch.rand(masks.shape, generator=generator).masked_fill_(~masks, -1.0)
    keep = scores.topk(k, dim=2).indices.sort(dim=2).values
    return list(keep.unbind(dim=1))
