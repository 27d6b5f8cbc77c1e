"""Video decoding with PyAV: a few fixed-length clips per video as (clips, T, size, size, 3) uint8.

Frame indices live on a constant-rate grid at the stream's average frame rate: grid frame k is the
frame on screen at ``first_pts + k / fps`` (found from the packet timestamps), so variable-frame-rate
and constant-rate files are sampled the same way. Only the needed span is decoded: seek to the
keyframe before the first needed frame, decode forward, stop after the last one.

``decode_video_batch`` is a Ray Data function UDF: a bad file never fails its block; it gets all-zero
clips and a non-empty ``error`` string, like ``cf_ray.media.image.decode_images``.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Literal

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from cf_ray import storage

Short = Literal["loop", "pad"]


# --------------------------------------------------------------------------- clip sampling


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng or 0)


def sample_clip_starts(
    num_frames: int,
    num_clips: int,
    clip_len: int,
    stride: int = 1,
    mode: Literal["uniform", "random"] = "uniform",
    rng: np.random.Generator | int | None = None,
    short: Short = "loop",
) -> list[int]:
    """Start frames of ``num_clips`` clips of ``clip_len`` frames taken every ``stride`` frames.

    uniform: evenly spaced from the first to the last possible start (one clip: centred), deterministic.
    random: independent uniform starts from ``rng`` (a Generator or a seed; None means seed 0), sorted.
    A video shorter than a clip's span: "pad" starts every clip at 0 (the decoder repeats the last
    frame); "loop" spreads the starts evenly round the video, from 0 (the decoder wraps to frame 0).
    """
    if num_frames < 1 or num_clips < 1 or clip_len < 1 or stride < 1:
        raise ValueError(
            f"need num_frames, num_clips, clip_len, stride >= 1, got {num_frames}, {num_clips}, {clip_len}, {stride}"
        )
    if mode not in ("uniform", "random"):
        raise ValueError(f"unknown clip sampling mode {mode!r}; use 'uniform' or 'random'")
    if short not in ("loop", "pad"):
        raise ValueError(f"unknown short-video policy {short!r}; use 'loop' or 'pad'")
    span = (clip_len - 1) * stride + 1
    if span > num_frames and short == "pad":
        return [0] * num_clips
    if span > num_frames:  # looped clips: any frame can start one; spread the starts round the loop
        if mode == "random":
            return sorted(int(s) for s in _as_rng(rng).integers(0, num_frames, num_clips))
        return [int(s) for s in np.arange(num_clips) * num_frames // num_clips]
    max_start = num_frames - span
    if mode == "random":
        return sorted(int(s) for s in _as_rng(rng).integers(0, max_start + 1, num_clips))
    if num_clips == 1:
        return [max_start // 2]
    return [int(s) for s in np.round(np.linspace(0, max_start, num_clips))]


def clip_frame_indices(
    starts: list[int], clip_len: int, stride: int, num_frames: int, short: Short = "loop"
) -> np.ndarray:
    """(len(starts), clip_len) grid-frame indices, all within [0, num_frames): looped or padded at the end."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + stride * np.arange(clip_len, dtype=np.int64)[None, :]
    return idx % num_frames if short == "loop" else np.minimum(idx, num_frames - 1)


# --------------------------------------------------------------------------- container and timeline


def _open(data: bytes) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as e:
        raise ValueError(f"not a readable video container (corrupt, truncated or not a video): {e}") from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no"]
        container.close()
        raise ValueError(f"no video stream (found {', '.join(kinds)} streams: audio-only or not a video)")
    return container, container.streams.video[0]


@dataclass(frozen=True)
class _Timeline:
    pts: np.ndarray  # presentation timestamps of every frame, sorted, in time_base units
    time_base: Fraction
    fps: Fraction
    has_pts: bool  # False: no timestamps at all (e.g. a raw H.264 stream); pts are frame ordinals

    @property
    def num_frames(self) -> int:
        """Frames on the constant-rate grid: the actual frame count for a constant-rate video."""
        span_s = float((int(self.pts[-1]) - int(self.pts[0])) * self.time_base)
        return int(round(span_s * float(self.fps))) + 1

    @property
    def duration(self) -> float:
        return self.num_frames / float(self.fps)

    def frame_pts(self, grid_idx: np.ndarray) -> np.ndarray:
        """The pts of the frame on screen at each grid time (within half a frame, for rounded timestamps)."""
        ticks_per_frame = 1 / float(self.fps * self.time_base)
        t = int(self.pts[0]) + (np.asarray(grid_idx, dtype=np.float64) + 0.5) * ticks_per_frame
        pos = np.searchsorted(self.pts, t, side="right") - 1
        return self.pts[np.clip(pos, 0, len(self.pts) - 1)]


def _timeline(container, stream, cancel: threading.Event | None = None) -> _Timeline:
    """Read every packet's timestamp (demux only, no decoding): exact frame count and times."""
    pts, no_pts, skipped = [], 0, 0
    try:
        for packet in container.demux(stream):
            if cancel is not None and cancel.is_set():
                raise TimeoutError
            if packet.size == 0 or packet.is_discard:  # end-of-stream flush, dropped-frame placeholder, or
                skipped += packet.pts is not None or packet.dts is not None  # before an edit list's start
                continue
            p = packet.pts if packet.pts is not None else packet.dts
            no_pts += p is None
            pts.append(p if p is not None else 0)
    except av.FFmpegError as e:
        raise ValueError(f"corrupt or truncated video (after {len(pts)} packets): {e}") from None
    if not pts:
        raise ValueError("video stream has no frames")
    if stream.frames and len(pts) + skipped < stream.frames:
        raise ValueError(f"truncated video: the header lists {stream.frames} frames, only {len(pts)} are present")
    fps = stream.average_rate or stream.guessed_rate or stream.base_rate
    has_pts = no_pts == 0
    if not has_pts:
        return _Timeline(np.arange(len(pts), dtype=np.int64), Fraction(1, 1) / (fps or 25), fps or Fraction(25), False)
    tb = stream.time_base or Fraction(1, 1000)
    arr = np.unique(np.asarray(pts, dtype=np.int64))  # sorted; B-frames arrive out of order
    if not fps:
        span = (arr[-1] - arr[0]) * tb
        fps = Fraction(len(arr) - 1) / span if len(arr) > 1 and span > 0 else Fraction(25)
    return _Timeline(arr, tb, Fraction(fps), True)


def _rotation(frame: av.VideoFrame, stream) -> int:
    """Counter-clockwise degrees (a multiple of 90) to turn the frame upright for display."""
    deg = frame.rotation  # from the display matrix (container side data)
    if not deg and "rotate" in stream.metadata:  # legacy tag, clockwise degrees
        try:
            deg = -float(stream.metadata["rotate"])
        except ValueError:
            deg = 0
    return int(round(deg / 90)) * 90 % 360


# --------------------------------------------------------------------------- decoding


def _decode_wanted(
    data: bytes, wanted: np.ndarray, tl: _Timeline, convert: Callable, cancel: threading.Event, seek: bool = True
) -> dict[int, np.ndarray]:
    """Decode forward (after a keyframe seek) until every wanted pts has its frame: {pts: convert(frame, stream)}."""
    container, stream = _open(data)
    got: dict[int, np.ndarray] = {}
    j, ordinal = 0, -1
    try:
        if seek and tl.has_pts and wanted[0] > tl.pts[0]:
            container.seek(int(wanted[0]), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if cancel.is_set():
                raise TimeoutError
            ordinal += 1
            p = frame.pts if tl.has_pts else ordinal
            if p is None or p < wanted[j]:
                continue
            if seek and j == 0 and p > wanted[0] and wanted[0] > tl.pts[0]:
                # The seek landed past the first wanted frame (no usable index): decode from the start.
                return _decode_wanted(data, wanted, tl, convert, cancel, seek=False)
            img = convert(frame, stream)
            while j < len(wanted) and wanted[j] <= p:
                got[int(wanted[j])] = img
                j += 1
            if j == len(wanted):
                break
    except av.FFmpegError as e:
        raise ValueError(f"corrupt video data: {e}") from None
    finally:
        container.close()
    if j < len(wanted):
        if not got:
            raise ValueError("no frame could be decoded")
        raise ValueError(f"truncated video: no frames after t={float(max(got) * tl.time_base):.2f}s")
    return got


def _display_size(frame: av.VideoFrame, rotation: int, sar: Fraction | None) -> tuple[int, int]:
    w = round(frame.width * sar) if sar else frame.width  # non-square pixels
    return (frame.height, w) if rotation in (90, 270) else (w, frame.height)


def _to_rgb(frame: av.VideoFrame, stream, size: int, resize: int, scaler: VideoReformatter) -> np.ndarray:
    """Frame -> upright (size, size, 3): swscale resizes the short side to ``resize``, then rotate and centre crop."""
    rot = _rotation(frame, stream)
    dw, dh = _display_size(frame, rot, stream.sample_aspect_ratio)
    scale = resize / min(dw, dh)
    nw, nh = max(size, round(dw * scale)), max(size, round(dh * scale))
    sw, sh = (nh, nw) if rot in (90, 270) else (nw, nh)
    # One reformatter per video keeps its swscale context (a new one per frame costs more than the scaling);
    # one thread, as a Ray task has one CPU.
    img = scaler.reformat(
        frame, width=sw, height=sh, format="rgb24", interpolation="AREA" if scale < 1 else "BILINEAR", threads=1
    ).to_ndarray()
    if rot:
        img = np.rot90(img, k=rot // 90)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(img[top : top + size, left : left + size])


def _with_timeout(fn: Callable[[threading.Event], object], timeout_s: float | None):
    """Run ``fn(cancel)`` in a worker thread; give up after ``timeout_s`` (the worker stops at its next check)."""
    if timeout_s is None:
        return fn(threading.Event())
    cancel, box = threading.Event(), {}

    def target():
        try:
            box["value"] = fn(cancel)
        except BaseException as e:  # re-raised in the caller below
            box["error"] = e

    worker = threading.Thread(target=target, name="decode_clips", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive() or isinstance(box.get("error"), TimeoutError):
        cancel.set()
        raise ValueError(f"decode timed out after {timeout_s}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _read_timeline(data: bytes, cancel: threading.Event) -> _Timeline:
    container, stream = _open(data)
    try:
        return _timeline(container, stream, cancel)
    finally:
        container.close()


def decode_clips(
    data: bytes,
    num_clips: int,
    clip_len: int,
    stride: int,
    size: int,
    resize: int | None = None,
    short: Short = "loop",
    mode: Literal["uniform", "random"] = "uniform",
    seed: int = 0,
    timeout_s: float | None = 30,
) -> np.ndarray:
    """Video bytes -> (num_clips, clip_len, size, size, 3) uint8 RGB clips, upright, short side resized to
    ``resize`` (default ``size``), centre-cropped. Raises ValueError with a reason for any bad input.

    Clips start where ``sample_clip_starts`` says (``seed`` seeds mode="random"); frames are taken
    every ``stride`` grid frames. ``timeout_s=None`` decodes in the calling thread with no limit.
    """
    resize = resize or size
    if resize < size:
        raise ValueError(f"resize ({resize}) must be >= size ({size})")

    def run(cancel: threading.Event) -> np.ndarray:
        tl = _read_timeline(data, cancel)
        starts = sample_clip_starts(tl.num_frames, num_clips, clip_len, stride, mode, seed, short)
        want = tl.frame_pts(clip_frame_indices(starts, clip_len, stride, tl.num_frames, short))
        scaler = VideoReformatter()
        frames = _decode_wanted(data, np.unique(want), tl, lambda f, s: _to_rgb(f, s, size, resize, scaler), cancel)
        return np.stack([frames[int(p)] for p in want.reshape(-1)]).reshape(num_clips, clip_len, size, size, 3)

    return _with_timeout(run, timeout_s)


def probe_video(data: bytes) -> dict:
    """frames (on the constant-rate grid), fps, duration (s), width, height (as stored) and rotation
    (counter-clockwise degrees to display upright). Raises ValueError like ``decode_clips``."""
    tl = _read_timeline(data, threading.Event())
    container, stream = _open(data)
    try:
        frame = next(container.decode(stream), None)
        if frame is None:
            raise ValueError("no frame could be decoded")
        rotation = _rotation(frame, stream)
    except av.FFmpegError as e:
        raise ValueError(f"corrupt video data: {e}") from None
    finally:
        container.close()
    return {
        "frames": tl.num_frames,
        "fps": float(tl.fps),
        "duration": tl.duration,
        "width": frame.width,
        "height": frame.height,
        "rotation": rotation,
    }


# --------------------------------------------------------------------------- Ray Data UDF


def decode_video_batch(
    batch: dict[str, np.ndarray],
    num_clips: int,
    clip_len: int,
    stride: int,
    size: int,
    resize: int | None = None,
    short: Short = "loop",
    timeout_s: float | None = 30,
    mode: Literal["uniform", "random"] = "uniform",
    seed: int | None = 0,
) -> dict[str, np.ndarray]:
    """Ray Data UDF over rows with a ``path`` column: adds ``clips`` (n, num_clips, T, H, W, 3) uint8,
    all zero where decoding failed, and ``error`` ('' when fine). Never raises for a bad file.

    mode="random" with seed=None draws fresh clip positions on every call (training: new clips each epoch).
    """
    n = len(batch["path"])
    rng = np.random.default_rng(seed)
    clips = np.zeros((n, num_clips, clip_len, size, size, 3), dtype=np.uint8)
    errors = [""] * n
    for i, path in enumerate(batch["path"]):
        try:
            clips[i] = decode_clips(
                storage.read_bytes(str(path)),
                num_clips,
                clip_len,
                stride,
                size,
                resize,
                short,
                mode=mode,
                seed=int(rng.integers(2**31)),
                timeout_s=timeout_s,
            )
        except ValueError as e:
            errors[i] = str(e)
        except OSError as e:
            errors[i] = f"cannot read file: {e}"
        except Exception as e:  # an unforeseen decoder failure must not fail the whole block
            errors[i] = f"unexpected {type(e).__name__}: {e}"
    out = dict(batch)
    out["clips"] = clips
    out["error"] = np.array(errors, dtype=object)
    return out
