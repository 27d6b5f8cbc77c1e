"""The embedded demo dataset: real JPEG files made here, so the job runs with nothing downloaded.

Six shape classes drawn over a sky/ground background with a random colour, size and position. The
background has an up and a down, so rotation prediction (RotNet) is learnable, and the shape class is
what a good representation should separate.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "arrow")


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r / 3)))
    elif shape == "arrow":  # points up
        w = r / 2.5
        d.polygon([(cx, cy - r), (cx - r, cy), (cx - w, cy), (cx - w, cy + r), (cx + w, cy + r), (cx + w, cy), (cx + r, cy)], fill=colour)
    else:
        raise ValueError(shape)


def make_image(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    s = 4 * size  # draw large, downsample: anti-aliased edges like a photo
    yy = np.linspace(0, 1, s)[:, None, None]
    sky = rng.uniform(150, 255, 3)
    ground = rng.uniform(20, 110, 3)
    horizon = rng.uniform(0.55, 0.8)
    bg = np.where(yy < horizon, sky * (0.8 + 0.2 * yy), ground) * np.ones((1, s, 1))
    bg += rng.normal(0, 8, (s, s, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.32) * s
    cx = rng.uniform(r + 2, s - r - 2)
    cy = rng.uniform(r + 2, s * horizon)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    _draw_shape(d, shape, cx, cy, r, colour)
    return img.resize((size, size), Image.LANCZOS)


def make_image_demo(root: str | Path, n_per_class: int = 200, size: int = 32, seed: int = 0, classes=SHAPES) -> Path:
    """Write ``root/<class>/<class>_NNNN.jpg``; returns root. Idempotent: existing complete sets are kept."""
    root = Path(root)
    done = root / ".complete"
    stamp = f"{n_per_class} {size} {seed} {','.join(classes)}"
    if done.exists() and done.read_text() == stamp:
        return root
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            make_image(c, size, rng).save(root / c / f"{c}_{i:04d}.jpg", quality=90)
    done.write_text(stamp)
    return root


def make_demo_splits(root: str | Path, n_unlabelled: int = 300, n_train: int = 100, n_test: int = 100, size: int = 32, seed: int = 0):
    """The demo's three folders: unlabelled (to pre-train and cluster on) and a labelled target train/test."""
    root = Path(root)
    data = make_image_demo(root / "unlabelled", n_unlabelled, size, seed)
    make_image_demo(root / "target" / "train", n_train, size, seed + 1)
    make_image_demo(root / "target" / "test", n_test, size, seed + 2)
    return data, root / "target"

