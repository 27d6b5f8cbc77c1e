"""Extraction throughput: cf_ray (Ray Data decode + actor pool -> Parquet) vs a plain PyTorch loop.

Both decode the same JPEGs with the same function, run the same network with the same batch size and
torch threads, and keep the same features; the ratio is printed at the end.

    python benchmarks/bench_extract.py --data ../shared/data/cifar10/test --arch resnet18 --stem imagenet
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def plain_loop(
    paths: list[str], arch: str, width: int, stem: str, size: int, batch: int, threads: int, layers
) -> float:
    """The baseline: torch DataLoader (single process) + model, features kept in memory."""
    from cf_ray.config import ImageConfig, ModelConfig
    from cf_ray.media.decode import normalize
    from cf_ray.media.image import decode_image
    from cf_ray.models.checkpoint import build

    torch.set_num_threads(threads)
    img = ImageConfig(size=size)
    model = build(ModelConfig(arch=arch, width=width, stem=stem), seed=0).eval()

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with open(paths[i], "rb") as f:
                return torch.from_numpy(decode_image(f.read(), size).copy())

    loader = torch.utils.data.DataLoader(Files(), batch_size=batch, num_workers=0)
    t0, feats = time.time(), []
    with torch.inference_mode():
        for x in loader:
            out = model.forward_features(normalize(x.numpy(), img.mean, img.std), layers)
            feats.append({k: v.numpy() for k, v in out.items()})
    return len(paths) / (time.time() - t0)


def cf_ray_extract(
    items, arch: str, width: int, stem: str, size: int, batch: int, threads: int, layers, actors: int, actor_cpus: float
) -> tuple[float, dict]:
    """(items/s over the whole stage call, the stage's result) with ``actors`` actors of ``threads`` threads."""
    from cf_ray.config import ExtractConfig, ImageConfig, ModelConfig
    from cf_ray.media.items import write_items
    from cf_ray.models.checkpoint import build, save_backbone
    from cf_ray.runtime import init_ray
    from cf_ray.stages.extract import run_extract

    init_ray(num_cpus=os.cpu_count(), object_store_mb=1024)
    tmp = tempfile.mkdtemp(prefix="bench_extract_")
    write_items(items, f"{tmp}/items.parquet")
    mcfg = ModelConfig(arch=arch, width=width, stem=stem)
    save_backbone(build(mcfg, seed=0), mcfg, f"{tmp}/model")
    cfg = ExtractConfig(
        layers=layers,
        batch_size=batch,
        block_rows=1024,
        num_actors=actors,
        cpus_per_actor=actor_cpus,
        torch_threads=threads,
    )
    t0 = time.time()
    res = run_extract(cfg, ImageConfig(size=size), f"{tmp}/items.parquet", f"{tmp}/model", f"{tmp}/feat")
    return items.num_rows / (time.time() - t0), res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data/cifar10/test")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--stem", default="imagenet")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", default="res4,res5")
    p.add_argument("--actors", type=int, default=2, help="cf_ray actor pool size")
    p.add_argument("--actor-threads", type=int, default=1, help="torch threads per actor (actors x this = --threads)")
    p.add_argument("--actor-cpus", type=float, default=0.5, help="Ray CPUs reserved per actor (leave some for writes)")
    p.add_argument("--limit", type=int, default=0, help="use the first N images (0: all)")
    p.add_argument(
        "--rounds", type=int, default=1, help="alternate plain / cf_ray this many times; medians are printed"
    )
    args = p.parse_args()
    layers = args.layers.split(",")
    from cf_ray.sources import list_items

    items = list_items(args.data)[0]
    if args.limit:
        items = items.slice(0, args.limit)
    paths = items["path"].to_pylist()
    print(
        f"{len(paths)} images from {args.data}; {args.arch} width {args.width} stem {args.stem} at {args.size}px, "
        f"batch {args.batch}, layers {layers}; plain loop: {args.threads} torch threads; cf_ray: "
        f"{args.actors} actor(s) x "
        f"{args.actor_threads} thread(s); {args.rounds} alternating round(s)",
        flush=True,
    )
    plain, ours = [], []
    for r in range(args.rounds):
        plain.append(plain_loop(paths, args.arch, args.width, args.stem, args.size, args.batch, args.threads, layers))
        ours.append(
            cf_ray_extract(
                items,
                args.arch,
                args.width,
                args.stem,
                args.size,
                args.batch,
                args.actor_threads,
                layers,
                args.actors,
                args.actor_cpus,
            )[0]
        )
        print(
            f"round {r + 1}: plain {plain[-1]:7.1f} img/s   cf_ray {ours[-1]:7.1f} img/s   "
            f"ratio {ours[-1] / plain[-1]:.2f}x",
            flush=True,
        )
    p_med, o_med = float(np.median(plain)), float(np.median(ours))
    print(f"plain PyTorch DataLoader loop : {p_med:8.1f} img/s (median)")
    print(
        f"cf_ray extract (to Parquet)   : {o_med:8.1f} img/s (median; wall time incl. actor start-up and Parquet write)"
    )
    print(
        f"ratio cf_ray / plain          : {o_med / p_med:8.2f}x (median of per-round ratios "
        f"{float(np.median(np.array(ours) / np.array(plain))):.2f}x)"
    )
    print(
        json.dumps(
            {
                "plain_img_s": [round(x, 1) for x in plain],
                "cf_ray_img_s": [round(x, 1) for x in ours],
                "n": len(paths),
                "torch": torch.__version__,
                "numpy": np.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
