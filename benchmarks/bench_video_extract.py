"""Video extraction throughput: cf_ray's run_extract vs the strongest plain PyTorch DataLoader loop.

Both decode the same videos with the same function and settings (cf_ray's decode_clips: N uniform clips of T
frames, short side resized, centre crop), run the same network (same seed) with the same batch (videos per
batch, each contributing its N clips) and torch threads in all, and keep the same taps (a video's feature is the
mean over its clips). The plain loop runs with every DataLoader worker count from 0 to cores-1; the best is the
baseline. Files are read once before anything is timed (a warm page cache for all). Rounds alternate all sides;
medians are printed, and the line ``ratio cf_ray / best plain: N.NNx``. See benchmarks/extract_compare.py and
docs/benchmarks/video_extract_cpu.md.

    python benchmarks/bench_video_extract.py --data ../shared/data/fight_video --limit 0 --rounds 3 --profile
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.extract_compare import compare, extract_config  # noqa: E402


class Videos(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], media):
        self.paths, self.media = paths, media

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from cf_ray.media.video import decode_clips

        m = self.media
        with open(self.paths[i], "rb") as f:
            data = f.read()
        try:
            clips = decode_clips(
                data, m.num_clips, m.clip_len, m.stride, m.size, m.resize, m.short, timeout_s=m.timeout_s
            )
            return torch.from_numpy(clips), True
        except ValueError:
            return torch.zeros((m.num_clips, m.clip_len, m.size, m.size, 3), dtype=torch.uint8), False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/fight_video", help="video folder or manifest")
    p.add_argument("--limit", type=int, default=0, help="a seeded subset of this many videos (0: all)")
    p.add_argument("--arch", default="r2plus1d_tiny")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--stem", default="imagenet")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--clip-len", type=int, default=8)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--num-clips", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="videos per batch (each gives num-clips clips)")
    p.add_argument("--layers", default="res3,res4,res5")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="plain loop: torch threads")
    p.add_argument("--workers", type=int, default=None, help="plain loop: only this DataLoader worker count")
    p.add_argument("--actors", type=int, default=0, help="cf_ray actors (0: auto, as the job's default)")
    p.add_argument("--actor-threads", type=int, default=0, help="cf_ray torch threads per actor (0: its CPUs)")
    p.add_argument("--decode", default="auto", choices=["auto", "actors", "tasks"], help="cf_ray extract.decode")
    p.add_argument("--block-rows", type=int, default=32, help="cf_ray: videos per part file (and per chunk)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are printed")
    p.add_argument("--profile", action="store_true", help="print where cf_ray's time went")
    p.add_argument("--scaling", action="store_true", help="also run cf_ray on 1 and on 2 actors each round")
    args = p.parse_args()

    from cf_ray.config import ModelConfig, VideoConfig
    from cf_ray.models.checkpoint import build
    from cf_ray.sources import VIDEO_EXTS, list_items

    items = list_items(args.data, VIDEO_EXTS)[0]
    if args.limit and items.num_rows > args.limit:
        items = items.take(np.sort(np.random.default_rng(0).choice(items.num_rows, args.limit, replace=False)))
    paths = items["path"].to_pylist()
    size_mb = sum(len(open(q, "rb").read()) for q in paths) / 2**20  # warms the page cache for every side
    model_cfg = ModelConfig(arch=args.arch, width=args.width, stem=args.stem)
    model = build(model_cfg, seed=0).eval()
    media = VideoConfig(size=args.size, clip_len=args.clip_len, stride=args.stride, num_clips=args.num_clips)
    cfg = extract_config(args)
    print(
        f"{len(paths)} videos ({size_mb:.1f} MiB) from {args.data}; {args.num_clips} clips x {args.clip_len} frames "
        f"(stride {args.stride}) at {args.size}px; {args.arch} width {args.width} stem {args.stem}, batch "
        f"{args.batch} videos, layers {cfg.layers}; plain: {args.threads} torch threads; cf_ray: extract.num_actors="
        f"{args.actors} decode={args.decode}; {args.rounds} alternating round(s)",
        flush=True,
    )
    compare(args, "videos", Videos(paths, media), items, model, model_cfg, media, cfg)


if __name__ == "__main__":
    main()
