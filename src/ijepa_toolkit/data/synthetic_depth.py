"""Procedurally rendered indoor scenes with exact metric depth, for tests and the demo.

A pinhole camera in a box-shaped room (floor, ceiling, back and side walls) with a few boxes
standing on the floor. Each surface has its own colour and a checker/stripe texture fixed in
world coordinates (so texture density shrinks with distance), light falls off with distance.
Depth is the z-distance along the optical axis, as in NYU-Depth v2. No download, no randomness
outside the given seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image


def render_scene(
    rng: np.random.Generator, height: int = 48, width: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """One random scene: (H, W, 3) uint8 RGB and (H, W) float32 depth in metres (about 0.5-9)."""
    f = 0.8 * width  # NYU's focal length is ~0.81 of the frame width
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    dx, dy = (u - width / 2) / f, (v - height / 2) / f  # ray (dx, dy, 1), y points down
    cam_h = rng.uniform(1.0, 1.6)
    ceil_h = rng.uniform(2.5, 3.0)
    back = rng.uniform(4.0, 9.0)
    half_w = rng.uniform(1.5, 3.0)
    inf = np.full(dx.shape, np.inf)
    with np.errstate(divide="ignore"):
        surfaces = [
            np.where(dy > 0, cam_h / dy, inf),  # floor, y = cam_h
            np.where(dy < 0, (cam_h - ceil_h) / dy, inf),  # ceiling
            np.full(dx.shape, back),  # back wall, z = back
            np.where(dx < 0, -half_w / dx, inf),  # left wall
            np.where(dx > 0, half_w / dx, inf),  # right wall
        ]
    for _ in range(rng.integers(1, 4)):
        size = rng.uniform(0.4, 1.2, 3)
        x0 = rng.uniform(-half_w + 0.2, half_w - 0.2 - size[0])
        z0 = rng.uniform(1.0, back - size[2] - 0.1)
        lo = np.array([x0, cam_h - size[1], z0])
        surfaces.append(_ray_box(dx, dy, lo, lo + size))
    t = np.stack(surfaces)  # (S, H, W) hit distance along the ray = depth (ray z is 1)
    which = t.argmin(axis=0)
    depth = t.min(axis=0)
    x, y, z = dx * depth, dy * depth, depth
    # world-space texture coordinates per surface: floor/ceiling (x, z), walls and boxes (x+z, y)
    a = np.where(which <= 1, x, x + z)
    b = np.where(which <= 1, z, y)
    period = rng.uniform(0.3, 0.7, len(surfaces))[which]
    checker = (np.floor(a / period) + np.floor(b / period)) % 2
    colours = rng.uniform(0.25, 1.0, (len(surfaces), 3))
    light = 1.0 / (1.0 + 0.08 * depth**2)
    rgb = colours[which] * (0.65 + 0.35 * checker[..., None]) * light[..., None]
    rgb += rng.normal(0, 0.01, rgb.shape)
    image = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    return image, depth.astype(np.float32)


def _ray_box(dx: np.ndarray, dy: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Entry distance of rays (dx, dy, 1) from the origin into the box [lo, hi]; inf on a miss."""
    dirs = np.stack([dx, dy, np.ones_like(dx)])  # (3, H, W)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = lo[:, None, None] / dirs
        t2 = hi[:, None, None] / dirs
    t_near = np.minimum(t1, t2).max(axis=0)
    t_far = np.maximum(t1, t2).min(axis=0)
    hit = (t_near <= t_far) & (t_near > 0)
    return np.where(hit, t_near, np.inf)


def write_synthetic_nyu(
    root: Union[str, Path],
    n_train: int = 160,
    n_test: int = 40,
    height: int = 48,
    width: int = 64,
    seed: int = 0,
) -> Path:
    """Write scenes in the BTS folder layout NYU is shipped in; returns ``root``.

    ``root/<split>/scene_XXXX/rgb_XXXX.jpg``, 16-bit ``sync_depth_XXXX.png`` in millimetres, and
    ``root/nyu_train.txt`` / ``root/nyu_test.txt`` with ``rgb depth focal`` lines. Cached: an
    existing ``nyu_test.txt`` means the set is already there.
    """
    root = Path(root)
    if (root / "nyu_test.txt").is_file():
        return root
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for i in range(n):
            image, depth = render_scene(rng, height, width)
            folder = root / split / f"scene_{i // 20:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            rgb, dep = folder / f"rgb_{i:05d}.jpg", folder / f"sync_depth_{i:05d}.png"
            Image.fromarray(image).save(rgb, quality=95)
            Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(dep)
            lines.append(f"{rgb.relative_to(root)} {dep.relative_to(root)} {0.8 * width:.4f}")
        (root / f"nyu_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ijepa_toolkit.data.synthetic_depth ROOT``: write the scenes."""
    import argparse

    parser = argparse.ArgumentParser(description="Write rendered depth scenes (BTS folder layout)")
    parser.add_argument("root")
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_synthetic_nyu(args.root, args.train, args.test, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
