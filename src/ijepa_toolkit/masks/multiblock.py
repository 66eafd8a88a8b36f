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
from typing import Optional

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
            raise ValueError(
                f"mask.min_keep={cfg.min_keep} must be below the {n} patches per image"
            )

    def block_size(self, generator: torch.Generator, scale, aspect) -> tuple[int, int]:
        """(h, w) of a block covering ``scale`` of the grid at aspect ``h / w`` (official draw)."""
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

    def _block(self, size: tuple[int, int], generator: Optional[torch.Generator]) -> torch.Tensor:
        """(H, W) bool mask of one block at a uniformly drawn position."""
        h, w = size
        extra = 0 if self.cfg.legacy else 1  # default mode reaches the last row/column
        top = torch.randint(0, self.height - h + extra, (1,), generator=generator)
        left = torch.randint(0, self.width - w + extra, (1,), generator=generator)
        mask = torch.zeros((self.height, self.width), dtype=torch.bool)
        mask[top : top + h, left : left + w] = True
        return mask

    def _legacy_block(self, size, generator, acceptable=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The official ``_sample_block_mask``: (indices, complement) with its relaxation loop."""
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
        g = torch.Generator()
        g.manual_seed(step)
        cfg = self.cfg
        p_size = self.block_size(g, cfg.pred_mask_scale, cfg.aspect_ratio)
        e_size = self.block_size(g, cfg.enc_mask_scale, (1.0, 1.0))
        if cfg.legacy:
            return self._sample_legacy(batch_size, p_size, e_size, generator)
        enc, pred = [], []
        for _ in range(batch_size):
            for _ in range(self.max_tries):
                targets = [self._block(p_size, generator) for _ in range(cfg.num_pred_masks)]
                covered = torch.stack(targets).any(dim=0)
                contexts = [self._block(e_size, generator) for _ in range(cfg.num_enc_masks)]
                if not cfg.allow_overlap:
                    contexts = [c & ~covered for c in contexts]
                if min(int(c.sum()) for c in contexts) >= cfg.min_keep:
                    break
            else:
                raise RuntimeError(
                    f"mask sampler: no context with at least min_keep={cfg.min_keep} patches in "
                    f"{self.max_tries} tries on a {self.height}x{self.width} grid; lower "
                    "mask.min_keep or mask.pred_mask_scale"
                )
            pred.append([t.flatten().nonzero().squeeze(1) for t in targets])
            enc.append([c.flatten().nonzero().squeeze(1) for c in contexts])
        return equal_length_subsets(enc, generator), equal_length_subsets(pred, generator)

    def _sample_legacy(self, batch_size, p_size, e_size, generator):
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


def equal_length_subsets(
    per_image: list[list[torch.Tensor]], generator: Optional[torch.Generator]
) -> list[torch.Tensor]:
    """Per image lists of index tensors -> per mask (B, K), K the shortest, random subsets."""
    k = min(len(m) for masks in per_image for m in masks)
    out = []
    for j in range(len(per_image[0])):
        rows = []
        for masks in per_image:
            m = masks[j]
            keep = torch.randperm(len(m), generator=generator)[:k]
            rows.append(m[keep.sort().values])
        out.append(torch.stack(rows))
    return out
