"""Evaluation transform shared by every protocol: resize (bicubic unless told), center crop,
normalize."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ..errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# crop_ratio = img_size / resize: 0.875 (224/256) and 1.0 are the published ones; below 0.5 the
# resize grows past twice the crop (img_size 4096 at 0.01: a 409,600 px short side)
MIN_CROP_RATIO = 0.5

if TYPE_CHECKING:
    from torchvision import transforms


def transform_checks(img_size: int, crop_ratio: float) -> list[tuple[str, Any, bool, str]]:
    """The config checks (``config.py`` ``checks()`` tuples) of ``img_size`` / ``crop_ratio``."""
    return [
        ("img_size", img_size, img_size >= 1, ">= 1"),
        ("crop_ratio", crop_ratio, MIN_CROP_RATIO <= crop_ratio <= 1,
         f"in [{MIN_CROP_RATIO}, 1] (img_size / resized short side)"),
    ]  # fmt: skip


def eval_transform(
    img_size: int = 224,
    crop_ratio: float = 0.875,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
) -> transforms.Compose:
    """Resize the short side to ``img_size / crop_ratio`` (256 for 224) with ``interpolation``
    (``bicubic`` | ``bilinear``, torchvision's default, as MSN's and StoP's logistic_eval.py),
    center-crop ``img_size``.

    Output: a (3, img_size, img_size) float tensor, ImageNet-normalized by default. A value out
    of ``transform_checks``'s bounds is a ``UserError``.
    """
    from torchvision import transforms

    for key, value, ok, expected in transform_checks(img_size, crop_ratio):
        if not ok:
            raise UserError(f"eval transform: {key} must be {expected}, got {value!r}")
    resize = int(round(img_size / crop_ratio))
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode(interpolation)),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])  # fmt: skip
