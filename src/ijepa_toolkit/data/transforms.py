"""Evaluation transform shared by every protocol: resize (bicubic), center crop, normalize."""

from __future__ import annotations

from typing import Sequence

from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(
    img_size: int = 224,
    crop_ratio: float = 0.875,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> transforms.Compose:
    """Resize the short side to ``img_size / crop_ratio`` (256 for 224), center-crop ``img_size``.

    Output: a (3, img_size, img_size) float tensor, ImageNet-normalized by default.
    """
    resize = int(round(img_size / crop_ratio))
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])  # fmt: skip
