"""Clips/s of cf_ray.media.video.decode_clips vs decoding every frame with PyAV, then sampling the same clips.

    python benchmarks/bench_video_decode.py                                   # a generated demo set
    python benchmarks/bench_video_decode.py --data ../shared/data/fight_video --limit 40

Both sides produce (clips, T, size, size, 3) uint8 from bytes already in memory (file reading is not
timed), taking every video in turn, one after the other, in one process.
"""

from __future__ import annotations

import argparse
import io
import platform
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

from cf_ray.media.video import clip_frame_indices, decode_clips, sample_clip_starts

SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov"}


def baseline_clips(data: bytes, num_clips: int, clip_len: int, stride: int, size: int) -> np.ndarray:
    """The plain way: decode every frame to full-size RGB, pick the clip frames, resize and crop them."""
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    starts = sample_clip_starts(len(frames), num_clips, clip_len, stride)
    idx = clip_frame_indices(starts, clip_len, stride, len(frames))
    out = {}
    for i in np.unique(idx):
        img = Image.fromarray(frames[i])
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.BILINEAR)
        left, top = (w - size) // 2, (h - size) // 2
        out[i] = np.asarray(img.crop((left, top, left + size, top + size)))
    return np.stack([out[i] for i in idx.reshape(-1)]).reshape(num_clips, clip_len, size, size, 3)


def count_frames(data: bytes) -> int:
    with av.open(io.BytesIO(data)) as container:
        return sum(1 for p in container.demux(video=0) if p.size)


def find_videos(root: Path, limit: int) -> list[Path]:
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES)
    if not paths:
        raise SystemExit(f"no videos ({', '.join(sorted(SUFFIXES))}) under {root}")
    step = max(1, len(paths) // limit)  # spread over the folder (e.g. over every class)
    return paths[::step][:limit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="folder of videos (searched recursively); default: a generated demo set")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--num-clips", type=int, default=4)
    ap.add_argument("--clip-len", type=int, default=8)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--size", type=int, default=112)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            from cf_ray.demo_video import make_video_demo

            args.data = make_video_demo(Path(tmp) / "demo", n_per_class=7, size=64, frames=64, fps=25)
        paths = find_videos(args.data, args.limit)
        blobs = [p.read_bytes() for p in paths]

    clip_args = (args.num_clips, args.clip_len, args.stride, args.size)
    decode_clips(blobs[0], *clip_args), baseline_clips(blobs[0], *clip_args)  # warm-up
    t_ours = t_base = 0.0
    diffs = []
    for data in blobs:
        t0 = time.perf_counter()
        ours = decode_clips(data, *clip_args)
        t1 = time.perf_counter()
        base = baseline_clips(data, *clip_args)
        t2 = time.perf_counter()
        t_ours, t_base = t_ours + t1 - t0, t_base + t2 - t1
        diffs.append(np.abs(ours.astype(np.int16) - base).mean())

    n_clips = len(blobs) * args.num_clips
    frames = sum(count_frames(b) for b in blobs)
    print(f"data: {args.data}  videos: {len(blobs)}  frames in them: {frames}  MB: {sum(map(len, blobs)) / 1e6:.1f}")
    print(f"clips: {args.num_clips} x {args.clip_len} frames, stride {args.stride}, {args.size} px  ({n_clips} clips)")
    print(f"decode_clips (seek + decode needed span):  {t_ours:6.2f} s  {n_clips / t_ours:7.1f} clips/s")
    print(f"baseline (decode every frame, then sample): {t_base:6.2f} s  {n_clips / t_base:7.1f} clips/s")
    print(
        f"speed-up: {t_base / t_ours:.2f}x   mean |difference| of outputs: {np.mean(diffs):.2f} / 255 (resizers differ)"
    )
    print(f"python {platform.python_version()}, av {av.__version__}, numpy {np.__version__}, {platform.machine()}")


if __name__ == "__main__":
    main()
