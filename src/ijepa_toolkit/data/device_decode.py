"""JPEG decode + resize on the accelerator (``features.gpu_decode``), for small encoders that
would otherwise wait on the CPU decoder.

The workers only read each file's bytes (``torchvision.io.read_file``); a batch of them is a
``JpegBatch`` whose ``.to(device)`` decodes on that device (``torchvision.io.decode_jpeg``), then
applies the evaluation transform there: resize the short side to ``img_size / crop_ratio``
(antialiased, as PIL), center crop, scale to [0, 1], normalise. Files that are not JPEG (PNG, ...)
are decoded by the worker (``torchvision.io.decode_image``) and only resized on the device. The
worker checks each header (PIL, no pixels decoded): a file without a readable image header is
left out, as ``SafeImageFolder`` leaves it out; one whose header is sound but whose data is
broken fails its batch's decode on the device (extract it with ``features.gpu_decode=false``).
On the CPU the same code runs with the CPU decoder: that is how the tests compare it with the
PIL path (``eval_transform``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .folder import BAD_IMAGE_ERRORS, check_shape

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class DeviceTransform:
    """The evaluation transform on (3, H, W) uint8 images already on the device; its ``repr``
    enters the feature-cache key (other numbers than the PIL path's, by JPEG decoder and
    resize differences)."""

    img_size: int
    crop_ratio: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, 3, img_size, img_size) float32 of B (3, H, W) uint8 images."""
        resize = int(round(self.img_size / self.crop_ratio))
        mode = InterpolationMode(self.interpolation)
        out = []
        for img in images:
            img = TF.resize(img, [resize], interpolation=mode, antialias=True)
            out.append(TF.center_crop(img, [self.img_size, self.img_size]))
        batch = TF.to_dtype(torch.stack(out), torch.float32, scale=True)
        return TF.normalize(batch, list(self.mean), list(self.std))

    def __repr__(self) -> str:
        resize = round(self.img_size / self.crop_ratio)
        return (f"DeviceTransform(decode_jpeg on the device, resize {resize} {self.interpolation} "
                f"antialias, center crop {self.img_size}, mean {list(self.mean)}, "
                f"std {list(self.std)})")  # fmt: skip


class JpegBatch:
    """The encoded images of one batch: 1-D uint8 JPEG byte tensors, or (3, H, W) uint8 images
    already decoded by a worker (non-JPEG files). ``.to(device)`` gives the transformed
    (B, 3, S, S) float32 batch on ``device``."""

    def __init__(self, items: list[torch.Tensor], transform: DeviceTransform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> JpegBatch:
        return JpegBatch([t.pin_memory() for t in self.items], self.transform)

    def to(self, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
        encoded = [i for i, t in enumerate(self.items) if t.ndim == 1]
        images: list[Any] = [t.to(device, non_blocking=non_blocking) if t.ndim == 3 else None
                             for t in self.items]  # fmt: skip
        if encoded:
            decoded = decode_jpeg([self.items[i] for i in encoded], mode=ImageReadMode.RGB,
                                  device=device)  # fmt: skip
            for i, img in zip(encoded, decoded):
                images[i] = img
        return self.transform(images)


class JpegFolder:
    """Items ``(bytes or image, target)`` of an image folder's ``samples`` (the order and classes
    of a ``SafeImageFolder``), ``None`` for a file that cannot be read or decoded; ``transform``
    is the ``DeviceTransform`` its batches apply on the device."""

    def __init__(self, folder: Any, transform: DeviceTransform):
        self.samples, self.classes, self.root = folder.samples, folder.classes, folder.root
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Optional[tuple[torch.Tensor, int]]:
        path, target = self.samples[i]
        try:
            with Image.open(path) as img:  # the header only, as SafeImageFolder checks it
                check_shape(*img.size)
            data = read_file(path)
            if bytes(data[:3].tolist()) != JPEG_MAGIC:
                data = decode_image(data, mode=ImageReadMode.RGB)
        except (*BAD_IMAGE_ERRORS, RuntimeError):
            return None
        return data, target

    def collate(self, batch: list) -> Optional[tuple[JpegBatch, torch.Tensor, torch.Tensor]]:
        """``(JpegBatch, (B,) targets, (B,) indices)`` of ``(data, target, index)`` items; ``None``
        items (unreadable files) left out, ``None`` when none is left."""
        kept = [b for b in batch if b is not None]
        if not kept:
            return None
        targets, indices = torch.tensor([b[1] for b in kept]), torch.tensor([b[2] for b in kept])
        return JpegBatch([b[0] for b in kept], self.transform), targets, indices
