"""Video extraction throughput: cf_ray's run_extract (Ray Data decode tasks + actor pool -> Parquet) vs a
plain PyTorch loop (decode_clips in a DataLoader, num_workers=0, features kept in memory).

Both decode the same videos with the same function and settings (N uniform clips of T frames, short side
resized, centre crop), run the same network (same seed) with the same batch size (videos per batch, each
contributing its N clips) and torch threads, and keep the same taps. Files are read once before either is
timed, so both see a warm page cache. Printed: videos/s and clips/s of each, and the ratio.

    python benchmarks/bench_video_extract.py --data ../shared/data/fight_video --limit 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def plain_loop(paths: list[str], args, layers: list[str]) -> tuple[float, int]:
    """(seconds, undecodable videos) for the baseline: torch DataLoader (single process) + model."""
    from cf_ray.config import ModelConfig, VideoConfig
    from cf_ray.media.decode import normalize
    from cf_ray.media.video import decode_clips
    from cf_ray.models.checkpoint import build

    torch.set_num_threads(args.threads)
    media = VideoConfig(size=args.size, clip_len=args.clip_len, stride=args.stride, num_clips=args.num_clips)
    model = build(ModelConfig(arch=args.arch, width=args.width, stem=args.stem), seed=0).eval()
    shape = (media.num_clips, media.clip_len, media.size, media.size, 3)

    class Videos(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with open(paths[i], "rb") as f:
                data = f.read()
            try:
                clips = decode_clips(
                    data,
                    media.num_clips,
                    media.clip_len,
                    media.stride,
                    media.size,
                    media.resize,
                    media.short,
                    timeout_s=media.timeout_s,
                )
                return torch.from_numpy(clips), True
            except ValueError:
                return torch.zeros(shape, dtype=torch.uint8), False

    loader = torch.utils.data.DataLoader(Videos(), batch_size=args.batch, num_workers=0)
    t0, feats, bad = time.time(), [], 0
    with torch.inference_mode():
        for clips, ok in loader:
            bad += int((~ok).sum())
            clips = clips[ok].numpy()
            if len(clips):
                x = normalize(clips.reshape(-1, *shape[1:]), media.mean, media.std)
                out = model.forward_features(x, layers)
                feats.append({k: v.numpy().reshape(len(clips), media.num_clips, -1) for k, v in out.items()})
    return time.time() - t0, bad


def cf_ray_extract(manifest: str, args, layers: list[str]) -> tuple[float, dict]:
    """(seconds of the run_extract call, its result): includes actor start-up and the Parquet write, not ray.init."""
    from cf_ray.config import ExtractConfig, ModelConfig, VideoConfig
    from cf_ray.media.items import write_items
    from cf_ray.models.checkpoint import build, save_backbone
    from cf_ray.runtime import init_ray
    from cf_ray.sources import VIDEO_EXTS, list_items
    from cf_ray.stages.extract import run_extract

    init_ray(num_cpus=os.cpu_count(), object_store_mb=1024)
    tmp = tempfile.mkdtemp(prefix="bench_video_extract_")
    items, _ = list_items(manifest, VIDEO_EXTS)
    write_items(items, f"{tmp}/items.parquet")
    mcfg = ModelConfig(arch=args.arch, width=args.width, stem=args.stem)
    save_backbone(build(mcfg, seed=0), mcfg, f"{tmp}/model")
    cfg = ExtractConfig(
        layers=layers,
        batch_size=args.batch,
        block_rows=args.block_rows,
        num_actors=1,
        cpus_per_actor=1,
        torch_threads=args.threads,
    )
    media = VideoConfig(size=args.size, clip_len=args.clip_len, stride=args.stride, num_clips=args.num_clips)
    t0 = time.time()
    res = run_extract(cfg, media, f"{tmp}/items.parquet", f"{tmp}/model", f"{tmp}/feat")
    return time.time() - t0, res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", default="../shared/data/fight_video", help="folder of videos or a manifest with a path column"
    )
    p.add_argument("--limit", type=int, default=60, help="benchmark a seeded subset of this many videos (0: all)")
    p.add_argument("--arch", default="r2plus1d_tiny")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--stem", default="imagenet")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--clip-len", type=int, default=8)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--num-clips", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="videos per batch (each gives num-clips clips)")
    p.add_argument("--block-rows", type=int, default=32, help="cf_ray: videos per Ray Data block (decode task)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides")
    p.add_argument("--layers", default="res3,res4,res5")
    args = p.parse_args()
    layers = args.layers.split(",")

    import pyarrow as pa
    import pyarrow.csv as pcsv

    from cf_ray.sources import VIDEO_EXTS, list_items

    items = list_items(args.data, VIDEO_EXTS)[0]
    if args.limit and items.num_rows > args.limit:
        items = items.take(np.sort(np.random.default_rng(0).choice(items.num_rows, args.limit, replace=False)))
    paths = items["path"].to_pylist()
    manifest = os.path.join(tempfile.mkdtemp(prefix="bench_video_manifest_"), "manifest.csv")
    pcsv.write_csv(pa.table({"path": paths}), manifest)
    size_mb = sum(len(open(q, "rb").read()) for q in paths) / 2**20  # also warms the page cache for both sides

    clips = len(paths) * args.num_clips
    print(
        f"{len(paths)} videos ({size_mb:.1f} MiB) from {args.data}; {args.num_clips} clips x {args.clip_len} frames "
        f"(stride {args.stride}) at {args.size}px per video; {args.arch} width {args.width} stem {args.stem}, "
        f"batch {args.batch} videos, {args.threads} torch thread(s), layers {layers}",
        flush=True,
    )
    plain_s, bad = plain_loop(paths, args, layers)
    print(
        f"plain PyTorch DataLoader loop : {len(paths) / plain_s:7.2f} videos/s {clips / plain_s:8.2f} clips/s "
        f"({plain_s:.1f} s, {bad} undecodable)",
        flush=True,
    )
    ours_s, res = cf_ray_extract(manifest, args, layers)
    print(
        f"cf_ray run_extract (Parquet)  : {len(paths) / ours_s:7.2f} videos/s {clips / ours_s:8.2f} clips/s "
        f"({ours_s:.1f} s incl. actor start-up and Parquet write, {res['skipped']} undecodable)"
    )
    print(f"ratio cf_ray / plain          : {plain_s / ours_s:7.2f}x")
    import av
    import ray

    print(
        json.dumps(
            {
                "videos": len(paths),
                "clips": clips,
                "plain_videos_s": round(len(paths) / plain_s, 2),
                "cf_ray_videos_s": round(len(paths) / ours_s, 2),
                "ratio": round(plain_s / ours_s, 3),
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "ray": ray.__version__,
                "av": av.__version__,
                "numpy": np.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
