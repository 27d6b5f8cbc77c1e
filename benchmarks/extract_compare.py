"""What bench_extract.py (images) and bench_video_extract.py (videos) share: the strongest plain PyTorch loop,
cf_ray's run_extract on a reused actor pool, alternating rounds, and the printed ratio.

The baseline is what a PyTorch user writes: a DataLoader (one per worker count from 0 to cores-1, persistent
workers) feeding the same network, batch and torch threads; the best worker count is the baseline. cf_ray is
timed around the whole run_extract call (actor start-up, model load, decode, network, Parquet write), then a
second extraction (of the first 1,024 items) on the same pool shows the start-up an extraction pays after the
first one of a job.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Side:
    """One plain-loop configuration's or cf_ray's items/s over the rounds."""

    name: str
    rates: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def extract_config(args):
    """cf_ray's extraction settings from the benchmarks' shared flags."""
    from cf_ray.config import ExtractConfig

    return ExtractConfig(
        layers=args.layers.split(","),
        batch_size=args.batch,
        block_rows=args.block_rows,
        num_actors=args.actors,
        torch_threads=args.actor_threads,
        decode=args.decode,
    )


def plain_loop(dataset, model, mean, std, layers, batch: int, workers: int, threads: int, video: bool) -> float:
    """items/s of one pass: DataLoader(workers) -> normalize -> forward_features, features kept in memory.
    ``dataset[i]`` is (uint8 pixels, ok); pixels (H,W,3) for images, (clips,T,H,W,3) for videos."""
    from cf_ray.media.decode import normalize

    torch.set_num_threads(threads)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=workers > 0)
    t0, feats = time.perf_counter(), []
    with torch.inference_mode():
        for pixels, ok in loader:
            x = pixels[ok].numpy()
            if not len(x):
                continue
            clips = x.shape[1] if video else 1
            out = model.forward_features(normalize(x.reshape(-1, *x.shape[2:]) if video else x, mean, std), layers)
            feats.append({k: v.numpy().reshape(len(x), clips, -1).mean(1) for k, v in out.items()})
    rate = len(dataset) / (time.perf_counter() - t0)
    del loader  # stops its workers
    return rate


class CfRay:
    """run_extract over one items file with one saved backbone; a pool per round (its start-up is timed)."""

    def __init__(self, items, model, model_cfg, media, cfg):
        from cf_ray.media.items import write_items
        from cf_ray.models.checkpoint import save_backbone

        self.tmp = tempfile.mkdtemp(prefix="bench_extract_")
        write_items(items, f"{self.tmp}/items.parquet")
        write_items(items.slice(0, 1024), f"{self.tmp}/items_again.parquet")  # enough to time a start-up
        save_backbone(model, model_cfg, f"{self.tmp}/model")
        self.n, self.media, self.cfg, self.round = items.num_rows, media, cfg, 0

    def run(self) -> tuple[float, dict, dict]:
        """(items/s of a first extraction, its result, the result of a second extraction on the same pool)."""
        from cf_ray.stages.extract import ExtractPool, run_extract

        self.round += 1
        pool = ExtractPool(self.cfg)
        out = f"{self.tmp}/feat_{self.round}"
        try:
            t0 = time.perf_counter()
            first = run_extract(self.cfg, self.media, f"{self.tmp}/items.parquet", f"{self.tmp}/model", out, pool=pool)
            rate = self.n / (time.perf_counter() - t0)
            again = run_extract(
                self.cfg, self.media, f"{self.tmp}/items_again.parquet", f"{self.tmp}/model", out + "_again", pool=pool
            )
        finally:
            pool.close()
        if first["ok"] + first["skipped"] != self.n:
            raise RuntimeError(f"run_extract wrote {first['rows']} of {self.n} items")
        return rate, first, again


def compare(args, unit: str, dataset, items, model, model_cfg, media, cfg) -> None:
    """Alternating rounds of every plain worker count and cf_ray; prints the table, the ratio line, the start-up
    and (with --profile) where cf_ray's time went."""
    from cf_ray.runtime import init_ray

    layers = list(cfg.layers)
    init_ray(num_cpus=os.cpu_count(), object_store_mb=1024)
    cf = CfRay(items, model, model_cfg, media, cfg)
    worker_counts = range(0, max(1, os.cpu_count() - 1) + 1) if args.workers is None else [args.workers]
    plain = {w: Side(f"plain DataLoader, {w} worker(s)", []) for w in worker_counts}
    ours, again_start, firsts = Side(f"cf_ray run_extract ({cfg.num_actors or 'auto'} actors)", []), [], []
    counts = [1, 2] if args.scaling else []  # the scaling line: the same extraction on 1 and on 2 actors
    scaling = {n: Side(f"cf_ray run_extract, {n} actor(s)", []) for n in counts}
    scalers = {n: CfRay(items, model, model_cfg, media, cfg.model_copy(update={"num_actors": n})) for n in counts}
    video = unit == "videos"
    for r in range(args.rounds):
        for w in worker_counts:
            plain[w].rates.append(
                plain_loop(dataset, model, media.mean, media.std, layers, args.batch, w, args.threads, video)
            )
        rate, first, again = cf.run()
        for n in counts:
            scaling[n].rates.append(scalers[n].run()[0])
        ours.rates.append(rate)
        firsts.append(first)
        again_start.append(again["startup_s"])
        best = max(plain.values(), key=lambda s: s.rates[-1])
        print(
            f"round {r + 1}: "
            + "  ".join(f"{s.name.split(', ')[1]} {s.rates[-1]:,.1f}" for s in plain.values())
            + f"  cf_ray {rate:,.1f} {unit}/s ({first['actors']} actors, start-up {first['startup_s']}s)"
            + "".join(f"  [{n} actor(s) {s.rates[-1]:,.1f}]" for n, s in scaling.items())
            + f"  ratio to best {rate / best.rates[-1]:.2f}x",
            flush=True,
        )
    best = max(plain.values(), key=lambda s: s.median)
    print(f"\n{'side':<44} {unit + '/s (median)':>16}")
    for s in [*plain.values(), ours, *scaling.values()]:
        print(f"{s.name:<44} {s.median:>16,.1f}")
    per_round = [o / max(p.rates[i] for p in plain.values()) for i, o in enumerate(ours.rates)]
    print(f"ratio cf_ray / best plain: {ours.median / best.median:.2f}x")
    print(
        f"(best plain: {best.name}; median of per-round ratios {statistics.median(per_round):.2f}x over "
        f"{args.rounds} round(s))"
    )
    print(
        f"cf_ray fixed start-up (call to model loaded and first input in hand), first extraction: "
        f"{statistics.median(f['startup_s'] for f in firsts):.2f}s; "
        f"next extraction on the same pool: {statistics.median(again_start):.2f}s"
    )
    if scaling:
        print(f"scaling: 2 actors / 1 actor = {scaling[2].median / scaling[1].median:.2f}x")
    if args.profile:
        print_profile(firsts[-1])
    import ray

    print(
        json.dumps(
            {
                "n": items.num_rows,
                "plain": {str(w): [round(x, 1) for x in s.rates] for w, s in plain.items()},
                "cf_ray": [round(x, 1) for x in ours.rates],
                "cf_ray_by_actors": {str(n): [round(x, 1) for x in s.rates] for n, s in scaling.items()},
                "startup_s": [f["startup_s"] for f in firsts],
                "startup_again_s": again_start,
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "ray": ray.__version__,
                "numpy": np.__version__,
            }
        )
    )


def print_profile(res: dict) -> None:
    """Where the last cf_ray extraction's time went: wall seconds of the call and the actors' summed phases."""
    prof = res["profile"]
    busy = sum(prof.values())
    print(f"\nprofile of the last cf_ray extraction ({res['actors']} actors, decode in {res['decode']}):")
    print(f"  wall time of the run_extract call   {res['seconds']:8.2f} s")
    print(f"  actor pool start                    {res['pool_start_s']:8.2f} s (driver)")
    print(f"  first actor ready to work at        {res['startup_s']:8.2f} s (pool start, planning, model load)")
    print("  actor phases, summed over actors (s, share of their time):")
    for k, v in sorted(prof.items(), key=lambda kv: -kv[1]):
        print(f"    {k:<14} {v:8.2f}  {v / busy:6.1%}")
