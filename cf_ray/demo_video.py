"""The embedded video demo: real H.264 MP4 files made here, where the class is the MOTION.

A textured shape (random outline, stripe colours, size, orientation and position) slides left, right,
up or down, or spins clockwise or counter-clockwise, over a random static background. The shape wraps
around the frame edges, so its position in any single frame is uniform whatever the class: every frame
looks statistically the same across classes and a model that ignores time cannot beat chance.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable

import av
import numpy as np
from PIL import Image, ImageDraw

MOTIONS = ("left", "right", "up", "down", "cw", "ccw")
_OUTLINES = ("square", "triangle", "bar", "cross", "ell")
_VELOCITY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), image rows grow downwards
_SUPERSAMPLE = 4  # draw large, downsample: sub-pixel motion and anti-aliased edges


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: int | Fraction = 8,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    rotation: int = 0,
) -> Path:
    """Encode (H, W, 3) uint8 RGB frames with PyAV.

    ``pts`` (in ``time_base`` units) gives each frame its own timestamp: a variable-frame-rate file.
    ``rotation`` writes a display matrix: players turn the frames that many degrees counter-clockwise.
    H.264 in yuv420p needs even width and height (use yuv444p, or codec="mpeg4", for odd sizes).
    """
    frames = list(frames)
    h, w = frames[0].shape[:2]
    if codec == "libx264" and pix_fmt == "yuv420p" and (h % 2 or w % 2):
        raise ValueError(f"H.264 yuv420p needs even width and height, got {w}x{h}")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.options = dict(options or ({"crf": "18"} if codec == "libx264" else {}))
        if pts is not None:
            stream.codec_context.time_base = stream.time_base = time_base or Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], stream.time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return Path(path)


def _background(s: int, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:1 : s * 1j, 0:1 : s * 1j]
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    bg = c0 + (c1 - c0) * (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9) + rng.normal(0, 10, (s, s, 3))
    return np.clip(bg, 0, 255)


def _sprite(s: int, rng: np.random.Generator) -> Image.Image:
    """An s x s RGBA layer with a striped shape at its centre (stripes make rotation visible)."""
    c, r = s / 2, rng.uniform(0.14, 0.22) * s
    mask = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(mask)
    outline = _OUTLINES[rng.integers(len(_OUTLINES))]
    if outline == "square":
        d.rectangle([c - r, c - r, c + r, c + r], fill=255)
    elif outline == "triangle":
        d.polygon([(c, c - r), (c - r, c + r), (c + r, c + r)], fill=255)
    elif outline == "bar":
        d.rectangle([c - r, c - r / 2.5, c + r, c + r / 2.5], fill=255)
    elif outline == "cross":
        d.rectangle([c - r, c - r / 3, c + r, c + r / 3], fill=255)
        d.rectangle([c - r / 3, c - r, c + r / 3, c + r], fill=255)
    else:  # an L: no rotational symmetry at all
        d.rectangle([c - r, c - r, c - r / 3, c + r], fill=255)
        d.rectangle([c - r, c + r / 3, c + r, c + r], fill=255)
    yy, xx = np.mgrid[0:s, 0:s]
    theta, period = rng.uniform(0, np.pi), rng.uniform(0.06, 0.12) * s
    stripes = (np.cos(theta) * xx + np.sin(theta) * yy) % period < period / 2
    rgb = np.where(stripes[..., None], rng.integers(0, 256, 3), rng.integers(0, 256, 3)).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, np.asarray(mask)]), "RGBA")


def render_clip(motion: str, size: int, frames: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(frames, size, size, 3) uint8 RGB and the shape's (frames, size, size) coverage in [0, 1]."""
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; use one of {', '.join(MOTIONS)}")
    s = _SUPERSAMPLE * size
    bg, sprite = _background(s, rng), _sprite(s, rng)
    x0, y0, angle0 = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0, 360)
    speed = rng.uniform(0.75, 1.5) * _SUPERSAMPLE  # canvas pixels per frame
    spin = rng.uniform(12, 24)  # degrees per frame
    dx, dy = _VELOCITY.get(motion, (0, 0))
    turn = {"cw": -1, "ccw": 1}.get(motion, 0)  # PIL rotates counter-clockwise for positive angles
    rgb, cover = [], []
    for t in range(frames):
        layer = np.asarray(sprite.rotate(angle0 + turn * spin * t, resample=Image.BILINEAR), dtype=np.float64)
        shift = (round(y0 + dy * speed * t - s / 2), round(x0 + dx * speed * t - s / 2))
        layer = np.roll(layer, shift, axis=(0, 1))  # wraps around the edges
        alpha = layer[..., 3:] / 255
        img = bg * (1 - alpha) + layer[..., :3] * alpha
        rgb.append(np.asarray(Image.fromarray(img.astype(np.uint8)).resize((size, size), Image.BOX)))
        cover.append(np.asarray(Image.fromarray((alpha[..., 0] * 255).astype(np.uint8)).resize((size, size), Image.BOX)) / 255)
    return np.stack(rgb), np.stack(cover)


def make_video_demo(root: str | Path, n_per_class: int = 50, size: int = 32, frames: int = 16, fps: int = 8,
                    seed: int = 0, classes=MOTIONS) -> Path:
    """Write ``root/<class>/<class>_NNNN.mp4``; returns root. Idempotent: existing complete sets are kept."""
    if size % 2:
        raise ValueError(f"size must be even for H.264 yuv420p, got {size}")
    root = Path(root)
    done = root / ".complete"
    stamp = f"{n_per_class} {size} {frames} {fps} {seed} {','.join(classes)}"
    if done.exists() and done.read_text() == stamp:
        return root
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            write_video(root / c / f"{c}_{i:04d}.mp4", render_clip(c, size, frames, rng)[0], fps)
    done.write_text(stamp)
    return root


def make_video_demo_splits(root: str | Path, n_unlabelled: int = 100, n_train: int = 30, n_test: int = 30,
                           size: int = 32, frames: int = 16, fps: int = 8, seed: int = 0):
    """The video demo's folders: unlabelled (to pre-train and cluster on) and a labelled target train/test."""
    root = Path(root)
    data = make_video_demo(root / "unlabelled", n_unlabelled, size, frames, fps, seed)
    make_video_demo(root / "target" / "train", n_train, size, frames, fps, seed + 1)
    make_video_demo(root / "target" / "test", n_test, size, frames, fps, seed + 2)
    return data, root / "target"
