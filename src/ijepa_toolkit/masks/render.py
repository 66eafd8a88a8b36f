"""Pictures of sampled masks over images, for checking a sampler by eye."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

CONTEXT_RGB = (40, 110, 255)
TARGET_RGB = ((255, 60, 60), (255, 170, 0), (60, 200, 60), (200, 60, 255), (0, 200, 200))
DIMMED_RGB = (40, 40, 40)  # what a patch in no mask looks like (the image at 35 %)
CAPTION = ("Each panel: one image with the patches the context encoder sees tinted blue and each "
           "target block the predictor must predict tinted in its own colour (a patch in several "
           "targets shows the last); patches in neither are dimmed.")  # fmt: skip


def legend(num_targets: int) -> list[tuple[str, tuple[int, int, int]]]:
    """``(label, rgb)`` legend entries for ``render_masks`` with ``num_targets`` target blocks."""
    targets = [(f"target {j + 1}", TARGET_RGB[j % len(TARGET_RGB)]) for j in range(num_targets)]
    return [("context", CONTEXT_RGB), *targets, ("neither (dimmed)", DIMMED_RGB)]


def render_masks(
    images: torch.Tensor, masks_enc: Sequence[torch.Tensor], masks_pred: Sequence[torch.Tensor],
    patch_size: int, scale: int = 1,
) -> Image.Image:  # fmt: skip
    """One row of panels: each (normalised) image with its context patches tinted blue and each
    target block in its own colour (a patch in several targets shows the last one).

    ``images`` (B, 3, H, W) ImageNet-normalised; masks are lists of (B, K) patch indices. Patches
    in neither are dimmed. ``scale`` enlarges the panels (nearest neighbour).
    """
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    b, _, h, w = images.shape
    gw = w // patch_size
    panels = []
    for i in range(b):
        rgb = ((images[i].cpu() * std + mean).clamp(0, 1) * 255).permute(1, 2, 0).numpy()
        out = rgb * 0.35  # patches in no mask are dimmed
        for idx_list, colour in [(m[i], CONTEXT_RGB) for m in masks_enc] + [
            (m[i], TARGET_RGB[j % len(TARGET_RGB)]) for j, m in enumerate(masks_pred)
        ]:
            for idx in idx_list.tolist():
                r, c = divmod(idx, gw)
                ys, xs = (
                    slice(r * patch_size, (r + 1) * patch_size),
                    slice(c * patch_size, (c + 1) * patch_size),
                )
                out[ys, xs] = 0.5 * rgb[ys, xs] + 0.5 * np.array(colour)
        panels.append(out)
    strip = np.concatenate(
        [np.pad(p, ((2, 2), (2, 2), (0, 0)), constant_values=255) for p in panels], axis=1
    )
    img = Image.fromarray(strip.astype(np.uint8))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
