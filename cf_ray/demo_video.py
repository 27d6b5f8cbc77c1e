"""The embedded video demo: real H.264 MP4 files made here, where the class is the MOTION.

Three textured shapes (random outline, stripe colours, size, orientation and position) over a random
static background all make the clip's motion: slide ``up``, ``down`` or ``sideways`` (left or right),
``spin`` (clockwise or counter-clockwise), ``shake`` (a horizontal oscillation) or ``orbit`` (circle, either
way). Shapes wrap around the frame edges and start at uniformly random positions and angles, so every
single frame looks statistically the same whatever the class: a model that ignores time cannot beat chance.

Two design points, both about what the training sees:

- The motion has an arrow of time. Each shape is launched at t=0 and slows under constant friction to
  rest near the end of the video (a shake's amplitude decays). Played backwards a clip shows shapes
  that start from rest and speed up, which never happens here, so ``pretrain.proxy=arrow_of_time`` is
  learnable, and only from how the motion evolves. (With constant speed a reversed 'left' clip is just a
  'right' clip and the proxy is impossible.)
- The class set is closed under horizontal mirroring (left/right and cw/ccw share a class), because
  the training augmentation flips clips horizontally: a flipped clip keeps its class, as in real action
  data. Classes that mirror into each other (the earlier left/right/cw/ccw) would be made indistinguishable
  by the retraining's own augmentation.
"""

from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import av
import numpy as np
from PIL import Image, ImageDraw

MOTIONS = ("up", "down", "sideways", "spin", "shake", "orbit")
_OUTLINES = ("square", "triangle", "bar", "cross", "ell")
_SLIDE = {
    "up": (0, -1),
    "down": (0, 1),
    "sideways": (1, 0),
}  # (dx, dy), image rows grow downwards; sideways: x sign random
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
    yy, xx = np.mgrid[0 : 1 : s * 1j, 0 : 1 : s * 1j]
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    bg = c0 + (c1 - c0) * (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9) + rng.normal(0, 10, (s, s, 3))
    return np.clip(bg, 0, 255)


def _sprite(s: int, rng: np.random.Generator) -> Image.Image:
    """An s x s RGBA layer with a striped shape at its centre (stripes make rotation visible)."""
    c, r = s / 2, rng.uniform(0.16, 0.24) * s
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
    theta, period = rng.uniform(0, np.pi), rng.uniform(0.15, 0.25) * s
    stripes = (np.cos(theta) * xx + np.sin(theta) * yy) % period < period / 2
    rgb = np.where(stripes[..., None], rng.integers(0, 256, 3), rng.integers(0, 256, 3)).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, np.asarray(mask)]), "RGBA")


def glide(frames: int, rng: np.random.Generator) -> np.ndarray:
    """(frames,) progress from 0 to 1 under constant friction: launched at t=0 at full speed, the speed
    falls linearly to rest at a random t_stop in the last fifth of the video (then stays at rest)."""
    t_stop = rng.uniform(0.8, 1.0) * max(1, frames - 1)
    u = np.minimum(np.arange(frames) / t_stop, 1.0)
    return u * (2 - u)


def _path(
    motion: str, frames: int, s: int, sign: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One shape's (dx, dy, degrees counter-clockwise) per frame, in canvas pixels, for ``motion``."""
    zero = np.zeros(frames)
    g = glide(frames, rng)
    if motion in _SLIDE:
        ux, uy = _SLIDE[motion]
        d = rng.uniform(0.3, 0.5) * s  # the whole slide, launch to rest
        return (sign if motion == "sideways" else ux) * d * g, uy * d * g, zero
    if motion == "spin":
        return zero, zero, sign * rng.uniform(60, 120) * g
    if motion == "orbit":
        r, phase = rng.uniform(0.12, 0.2) * s, rng.uniform(0, 2 * np.pi)
        theta = phase + sign * np.deg2rad(rng.uniform(180, 300)) * g
        return r * (np.cos(theta) - np.cos(phase)), r * (np.sin(theta) - np.sin(phase)), zero
    if motion == "shake":  # damped oscillation: the amplitude decays, so it too has an arrow of time
        t = np.arange(frames)
        amp, period, tau = rng.uniform(0.1, 0.18) * s, rng.uniform(5, 8), rng.uniform(0.25, 0.42) * frames
        return amp * np.exp(-t / tau) * np.sin(2 * np.pi * t / period), zero, zero
    raise ValueError(f"unknown motion {motion!r}; use one of {', '.join(MOTIONS)}")


def render_clip(
    motion: str, size: int, frames: int, rng: np.random.Generator, objects: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """(frames, size, size, 3) uint8 RGB and the shapes' (frames, size, size) coverage in [0, 1].

    ``objects`` shapes share the motion and its direction (sideways, spin and orbit pick theirs at random);
    each has its own speed, start position and angle.
    """
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; use one of {', '.join(MOTIONS)}")
    s = _SUPERSAMPLE * size
    bg = _background(s, rng)
    sign = int(rng.choice([-1, 1]))
    shapes = [
        (
            _sprite(s, rng),
            rng.uniform(0, s),
            rng.uniform(0, s),
            rng.uniform(0, 360),
            _path(motion, frames, s, sign, rng),
        )
        for _ in range(objects)
    ]
    rgb, cover = [], []
    for t in range(frames):
        img, covered = bg, np.zeros((s, s))
        for sprite, x0, y0, angle0, (dx, dy, turn) in shapes:
            layer = np.asarray(sprite.rotate(angle0 + turn[t], resample=Image.BILINEAR), dtype=np.float64)
            shift = (round(y0 + dy[t] - s / 2), round(x0 + dx[t] - s / 2))
            layer = np.roll(layer, shift, axis=(0, 1))  # wraps around the edges
            alpha = layer[..., 3:] / 255
            img = img * (1 - alpha) + layer[..., :3] * alpha
            covered = np.maximum(covered, alpha[..., 0])
        rgb.append(np.asarray(Image.fromarray(img.astype(np.uint8)).resize((size, size), Image.BOX)))
        cover.append(
            np.asarray(Image.fromarray((covered * 255).astype(np.uint8)).resize((size, size), Image.BOX)) / 255
        )
    return np.stack(rgb), np.stack(cover)


def make_video_demo(
    root: str | Path,
    n_per_class: int = 50,
    size: int = 16,
    frames: int = 12,
    fps: int = 8,
    seed: int = 0,
    classes=MOTIONS,
) -> Path:
    """Write ``root/<class>/<class>_NNNN.mp4``; returns root. Idempotent: existing complete sets are kept.

    H.264 in yuv444p (High 4:4:4): at 16 px, 4:2:0 chroma would blur the stripes that make motion visible
    (mean error ~11 grey levels against ~4 here).
    """
    root = Path(root)
    done = root / ".complete"
    stamp = f"{n_per_class} {size} {frames} {fps} {seed} {','.join(classes)}"
    if done.exists() and done.read_text() == stamp:
        return root
    # A set made with other settings (or interrupted) is replaced whole: no stale files or class folders.
    stale = set(classes) | (set(done.read_text().split()[-1].split(",")) if done.exists() else set())
    done.unlink(missing_ok=True)
    for c in stale:
        shutil.rmtree(root / c, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            write_video(root / c / f"{c}_{i:04d}.mp4", render_clip(c, size, frames, rng)[0], fps, pix_fmt="yuv444p")
    done.write_text(stamp)
    return root


def make_video_demo_splits(
    root: str | Path,
    n_unlabelled: int = 150,
    n_train: int = 20,
    n_test: int = 20,
    size: int = 16,
    frames: int = 12,
    fps: int = 8,
    seed: int = 0,
):
    """The video demo's folders: unlabelled (to pre-train and cluster on) and a labelled target train/test."""
    root = Path(root)
    data = make_video_demo(root / "unlabelled", n_unlabelled, size, frames, fps, seed)
    make_video_demo(root / "target" / "train", n_train, size, frames, fps, seed + 1)
    make_video_demo(root / "target" / "test", n_test, size, frames, fps, seed + 2)
    return data, root / "target"
