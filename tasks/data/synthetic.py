"""Generated image datasets: for the demo, the tests and the benchmarks (nothing downloaded).

Each class is a texture family (stripes, checks, rings, blobs, ...) drawn with
random colours, frequencies, phases and noise, so a classifier has something
real to learn and a CNN's codes separate the classes even with random weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

CLASSES = ("stripes", "checks", "rings", "blobs", "diagonals", "noise")


def _texture(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.08, 0.25)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        t = np.sin(y * f + phase)
    elif kind == "checks":
        t = np.sign(np.sin(x * f + phase) * np.sin(y * f + phase))
    elif kind == "rings":
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        t = np.sin(np.hypot(y - cy, x - cx) * f + phase)
    elif kind == "blobs":
        t = np.zeros((h, w), np.float32)
        for _ in range(rng.integers(3, 7)):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.2) * min(h, w)
            t += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
        t = t / max(t.max(), 1e-6) * 2 - 1
    elif kind == "diagonals":
        t = np.sin((x + y) * f / 1.4 + phase)
    else:
        t = rng.standard_normal((h, w)).astype(np.float32)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    a = (t[..., None] + 1) / 2
    img = a * c1 + (1 - a) * c2 + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image(kind: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    h, w = size
    return Image.fromarray(_texture(kind, h, w, rng), "RGB")


def make_dataset(root: str | Path, classes: Sequence[str] = CLASSES[:3], per_class: int = 20,
                 size: tuple[int, int] | int = (64, 80), seed: int = 0, fmt: str = "jpg",
                 splits: dict[str, int] | None = None) -> Path:
    """Write ``root/<class>/<i>.<fmt>`` (or ``root/<split>/<class>/...`` when ``splits`` maps
    split -> images per class). Image sizes vary by up to 25% around ``size``. Returns ``root``."""
    root = Path(root)
    base_h, base_w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    layout = splits or {"": per_class}
    for split, n in layout.items():
        for ci, cls in enumerate(classes):
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            kind = CLASSES[ci % len(CLASSES)] if cls not in CLASSES else cls
            for i in range(n):
                h = int(base_h * rng.uniform(0.8, 1.25))
                w = int(base_w * rng.uniform(0.8, 1.25))
                img = make_image(kind, (h, w), int(rng.integers(0, 2**31)))
                img.save(folder / f"{cls}_{split or 'all'}_{i:05d}.{fmt}", quality=90) if fmt == "jpg" else \
                    img.save(folder / f"{cls}_{split or 'all'}_{i:05d}.{fmt}")
    return root


# --------------------------------------------------------------------------- learnable by a tiny CNN
ORIENTATIONS = {"horizontal": 0.0, "vertical": 90.0, "diagonal": 45.0, "antidiagonal": 135.0}


def make_oriented_image(orientation: float, size: int, seed: int) -> Image.Image:
    """A square image of stripes at ``orientation`` degrees (0: horizontal), with random colours, period,
    phase and pixel noise: only the orientation tells the classes apart, so a classifier must look at
    spatial structure, not at colour or brightness."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = np.deg2rad(orientation + rng.uniform(-10, 10))
    period = rng.uniform(4.0, 8.0)
    t = np.sin(2 * np.pi * (y * np.cos(theta) + x * np.sin(theta)) / period + rng.uniform(0, 2 * np.pi))
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    a = (t[..., None] + 1) / 2
    img = a * c1 + (1 - a) * c2 + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_oriented_dataset(root: str | Path, classes: Sequence[str] = ("horizontal", "vertical", "diagonal"),
                          splits: dict[str, int] | None = None, size: int = 32, seed: int = 0) -> Path:
    """Write ``root/<split>/<class>/<i>.png``: stripes whose orientation is the class (see
    :func:`make_oriented_image`), ``splits`` mapping split -> images per class (default 30 train, 10 val,
    10 test), every image ``size`` x ``size`` (no resizing needed at a network's input of that size), PNG
    (no compression artefacts). Data that a small CNN learns in a few epochs on a CPU, for tests that
    training actually learns. Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (splits or {"train": 30, "val": 10, "test": 10}).items():
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                make_oriented_image(ORIENTATIONS[cls], size, int(rng.integers(0, 2**31))).save(
                    folder / f"{cls}_{split}_{i:05d}.png")
    return root
