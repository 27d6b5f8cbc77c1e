"""The embedded demo dataset: real JPEG files made here, so the job runs with nothing downloaded.

Six upright shape classes (triangle, arrow, tee, house, tree, person) with a random colour, size and
position over a random gradient. Only the shape tells which way is up, so rotation prediction (RotNet)
must learn shape features, and the shape class is what a good representation should separate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("triangle", "arrow", "tee", "house", "tree", "person")


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    """Every class has a canonical 'up', as photographed objects do, so rotation is predictable only from the shape."""
    w = r / 3
    if shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "arrow":
        d.polygon(
            [(cx, cy - r), (cx - r, cy), (cx - w, cy), (cx - w, cy + r), (cx + w, cy + r), (cx + w, cy), (cx + r, cy)],
            fill=colour,
        )
    elif shape == "tee":
        d.rectangle([cx - r, cy - r, cx + r, cy - r + 2 * w], fill=colour)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    elif shape == "house":
        d.polygon([(cx, cy - r), (cx - r, cy - r / 5), (cx + r, cy - r / 5)], fill=colour)
        d.rectangle([cx - 0.7 * r, cy - r / 5, cx + 0.7 * r, cy + r], fill=colour)
    elif shape == "tree":
        d.polygon([(cx, cy - r), (cx - 0.8 * r, cy + r / 3), (cx + 0.8 * r, cy + r / 3)], fill=colour)
        d.rectangle([cx - w / 1.5, cy + r / 3, cx + w / 1.5, cy + r], fill=colour)
    elif shape == "person":
        d.ellipse([cx - w * 1.2, cy - r, cx + w * 1.2, cy - r + 2.4 * w], fill=colour)
        d.rectangle([cx - 0.6 * r, cy - r + 2.6 * w, cx + 0.6 * r, cy + r], fill=colour)
    else:
        raise ValueError(shape)


def make_image(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    s = 4 * size  # draw large, downsample: anti-aliased edges like a photo
    # A linear gradient in a random direction: texture without a global 'up' cue.
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0 : 1 : s * 1j, 0 : 1 : s * 1j]
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    bg = c0 + (c1 - c0) * (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9) + rng.normal(0, 10, (s, s, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.36) * s
    cx, cy = rng.uniform(r + 2, s - r - 2, 2)
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


def make_demo_splits(
    root: str | Path, n_unlabelled: int = 300, n_train: int = 100, n_test: int = 100, size: int = 32, seed: int = 0
):
    """The demo's three folders: unlabelled (to pre-train and cluster on) and a labelled target train/test."""
    root = Path(root)
    data = make_image_demo(root / "unlabelled", n_unlabelled, size, seed)
    make_image_demo(root / "target" / "train", n_train, size, seed + 1)
    make_image_demo(root / "target" / "test", n_test, size, seed + 2)
    return data, root / "target"
