"""Image extraction throughput: cf_ray's run_extract vs the strongest plain PyTorch DataLoader loop.

Both decode the same JPEGs with the same function (cf_ray's decode_image), run the same network (same seed)
with the same batch and torch threads in all, and keep the same taps. The plain loop runs with every DataLoader
worker count from 0 to cores-1; the best is the baseline. Rounds alternate all sides; medians are printed, and
the line ``ratio cf_ray / best plain: N.NNx``. See benchmarks/extract_compare.py and
docs/benchmarks/extract_cpu.md.

    python benchmarks/bench_extract.py --data ../shared/data/cifar10/train --rounds 3 --profile
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from benchmarks.extract_compare import compare, extract_config  # noqa: E402


class Images(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from cf_ray.media.image import decode_image

        with open(self.paths[i], "rb") as f:
            data = f.read()
        try:
            return torch.from_numpy(decode_image(data, self.size).copy()), True
        except ValueError:
            return torch.zeros((self.size, self.size, 3), dtype=torch.uint8), False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/cifar10/train", help="image folder or manifest")
    p.add_argument("--limit", type=int, default=0, help="use the first N images (0: all)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--stem", default="imagenet")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--layers", default="res4,res5")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="plain loop: torch threads")
    p.add_argument("--workers", type=int, default=None, help="plain loop: only this DataLoader worker count")
    p.add_argument("--actors", type=int, default=0, help="cf_ray actors (0: auto, as the job's default)")
    p.add_argument("--actor-threads", type=int, default=0, help="cf_ray torch threads per actor (0: its CPUs)")
    p.add_argument("--decode", default="auto", choices=["auto", "actors", "tasks"], help="cf_ray extract.decode")
    p.add_argument("--block-rows", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are printed")
    p.add_argument("--profile", action="store_true", help="print where cf_ray's time went")
    p.add_argument("--scaling", action="store_true", help="also run cf_ray on 1 and on 2 actors each round")
    args = p.parse_args()

    from cf_ray.config import ImageConfig, ModelConfig
    from cf_ray.models.checkpoint import build
    from cf_ray.sources import list_items

    items = list_items(args.data)[0]
    if args.limit:
        items = items.slice(0, args.limit)
    model_cfg = ModelConfig(arch=args.arch, width=args.width, stem=args.stem)
    model = build(model_cfg, seed=0).eval()
    media = ImageConfig(size=args.size)
    cfg = extract_config(args)
    print(
        f"{items.num_rows} images from {args.data}; {args.arch} width {args.width} stem {args.stem} at {args.size}px, "
        f"batch {args.batch}, layers {cfg.layers}; plain: {args.threads} torch threads; cf_ray: extract.num_actors="
        f"{args.actors} decode={args.decode}; {args.rounds} alternating round(s)",
        flush=True,
    )
    compare(args, "img", Images(items["path"].to_pylist(), args.size), items, model, model_cfg, media, cfg)


if __name__ == "__main__":
    main()
