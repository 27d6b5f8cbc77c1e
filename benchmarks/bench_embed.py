"""Embedding and search throughput.

1. ``cf-ray embed`` vs the extraction stage on the same images, same model, same actor pool settings:
   embed = list the folder + the extraction stage (run_extract), its actors also assigning cluster ids;
   extract = run_extract alone on the already-listed items. Rounds alternate, and so does which of the two
   goes first in a round; medians and the ratio are printed.
2. faiss search on clustered Gaussian vectors (``--n`` x ``--d``): queries/s of the exact index (IndexFlat) and
   of IVF-Flat (cf_ray.index.make_index, the index `cf-ray index` builds), and IVF's recall@10 against exact.

    python benchmarks/bench_embed.py --data ../shared/data/cifar10/test --limit 2000 --n 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402


def make_run(root: str, data: str, limit: int, args) -> tuple[str, str]:
    """A run directory with a pre-trained model, its source features and the run's k-means (setup, not timed),
    and a folder of the same ``limit`` images for embed to list."""
    from cf_ray import storage
    from cf_ray.config import JobConfig, dump_config, load_config
    from cf_ray.media.items import write_items
    from cf_ray.models.checkpoint import build, save_backbone
    from cf_ray.sources import list_items
    from cf_ray.stages.cluster import run_cluster
    from cf_ray.stages.extract import run_extract

    items = list_items(data)[0]
    if limit:
        items = items.slice(0, limit)
    src = os.path.join(root, "images")
    for p, i in zip(items["path"].to_pylist(), items["id"].to_pylist()):
        os.makedirs(os.path.dirname(os.path.join(src, i)), exist_ok=True)
        os.symlink(p, os.path.join(src, i))
    items = list_items(src)[0]
    run = os.path.join(root, "run")
    cfg = load_config(
        JobConfig,
        None,
        [
            f"data={src}",
            f"run_dir={run}",
            f"image.size={args.size}",
            f"pretrain.train.model.arch={args.arch}",
            f"pretrain.train.model.width={args.width}",
            f"pretrain.train.model.stem={args.stem}",
            f"retrain.model.arch={args.arch}",
            f"extract.batch_size={args.batch}",
            "extract.block_rows=512",
            f"extract.num_actors={args.actors}",
            f"extract.cpus_per_actor={args.actor_cpus}",
            f"extract.torch_threads={args.actor_threads}",
            "extract.layers=[res5]",
            "cluster.k=10",
            "probe.layers=[res5]",
        ],
    )
    storage.write_bytes(os.path.join(run, "config.yaml"), dump_config(cfg).encode())
    write_items(items, os.path.join(run, "items", "source.parquet"))
    m = cfg.pretrain.train.model
    save_backbone(build(m, seed=0), m, os.path.join(run, "models", "pretrained"))
    feats = os.path.join(run, "features", "pretrained", "source")
    run_extract(
        cfg.extract,
        cfg.media,
        os.path.join(run, "items", "source.parquet"),
        os.path.join(run, "models", "pretrained"),
        feats,
    )
    run_cluster(cfg.cluster, feats, os.path.join(run, "cluster"))
    return run, src


def bench_embed(args) -> dict:
    from cf_ray.api import read_run_config, run_media
    from cf_ray.config import ExtractConfig
    from cf_ray.embed import run_embed
    from cf_ray.runtime import init_ray
    from cf_ray.stages.extract import run_extract

    init_ray(num_cpus=os.cpu_count(), object_store_mb=1024)
    root = tempfile.mkdtemp(prefix="bench_embed_")
    try:
        run, src = make_run(root, args.data, args.limit, args)
        cfg = read_run_config(run)
        extract = ExtractConfig.model_validate(cfg["extract"])
        items = os.path.join(run, "items", "source.parquet")
        rows = None
        ext, emb = [], []
        for r in range(args.rounds):

            def one_extract(r=r):
                t0 = time.time()
                res = run_extract(
                    extract, run_media(cfg), items, os.path.join(run, "models", "pretrained"), f"{root}/extract_{r}"
                )
                ext.append(res["rows"] / (time.time() - t0))

            def one_embed(r=r):
                t0 = time.time()
                res = run_embed(run, src, f"{root}/embed_{r}", which="pretrained", layer="res5")
                emb.append(res["rows"] / (time.time() - t0))
                return res["rows"]

            if r % 2 == 0:  # which goes first alternates too: no order effect in the medians
                one_extract()
                rows = one_embed()
            else:
                rows = one_embed()
                one_extract()
            print(
                f"round {r + 1}: extract {ext[-1]:7.1f} img/s   embed {emb[-1]:7.1f} img/s   "
                f"ratio {emb[-1] / ext[-1]:.3f}",
                flush=True,
            )
        e, m = float(np.median(ext)), float(np.median(emb))
        print(f"extract stage (run_extract)       : {e:8.1f} img/s (median)")
        print(f"cf-ray embed (list+extract+assign): {m:8.1f} img/s (median)")
        print(
            f"ratio embed / extract             : {m / e:8.3f} (median of per-round ratios "
            f"{float(np.median(np.array(emb) / np.array(ext))):.3f})"
        )
        return {"rows": rows, "extract_img_s": [round(x, 1) for x in ext], "embed_img_s": [round(x, 1) for x in emb]}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def clustered(n: int, d: int, centres: int, seed: int, point_seed: int, spread=(0.5, 1.0)) -> np.ndarray:
    """Gaussian blobs around ``centres`` random centres (unequal spreads; the blobs from ``seed``, the points
    from ``point_seed``): "random-ish" like real embeddings."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)).astype(np.float32)
    spread = rng.uniform(*spread, centres).astype(np.float32)  # per-dimension std of each blob
    rng = np.random.default_rng(point_seed)
    out = np.empty((n, d), np.float32)
    step = 1 << 18
    for s in range(0, n, step):
        lab = rng.integers(0, centres, min(step, n - s))
        out[s : s + len(lab)] = c[lab] + spread[lab, None] * rng.standard_normal((len(lab), d), dtype=np.float32)
    return out


def bench_search(args) -> dict:
    import faiss

    from cf_ray.config import IndexConfig
    from cf_ray.index import make_index, prepare

    faiss.omp_set_num_threads(args.faiss_threads)
    spread = (args.spread_min, args.spread_max)
    x = prepare(clustered(args.n, args.d, args.centres, 0, 1, spread), "cosine")
    q = prepare(clustered(args.queries, args.d, args.centres, 0, 2, spread), "cosine")  # new points, same blobs
    t0 = time.time()
    flat, _ = make_index(x, IndexConfig(kind="flat"))
    build_flat = time.time() - t0
    t0 = time.time()
    cfg = IndexConfig(kind="ivf", nlist=args.nlist, nprobe=args.nprobe, train_size=args.train_size)
    ivf, params = make_index(x, cfg)
    build_ivf = time.time() - t0
    t0 = time.time()
    _, exact = flat.search(q, 10)
    t_exact = time.time() - t0
    t0 = time.time()
    _, approx = ivf.search(q, 10)
    t_ivf = time.time() - t0
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)]))
    results = {
        "n": args.n,
        "d": args.d,
        "queries": args.queries,
        "faiss_threads": args.faiss_threads,
        "ivf": params,
        "build_s": {"flat": round(build_flat, 1), "ivf": round(build_ivf, 1)},
        "qps": {"exact": round(args.queries / t_exact, 1), "ivf": round(args.queries / t_ivf, 1)},
        "recall_at_10": round(recall, 4),
    }
    print(
        f"search on {args.n:,} x {args.d} clustered vectors ({args.centres} blobs, per-dimension std "
        f"{args.spread_min}-{args.spread_max} around N(0, 1) centres), {args.queries} queries, "
        f"{args.faiss_threads} faiss thread(s):"
    )
    print(f"exact (IndexFlat)                 : {results['qps']['exact']:10.1f} queries/s (build {build_flat:.1f} s)")
    print(
        f"IVF-Flat nlist {params['nlist']}, nprobe {params['nprobe']} : {results['qps']['ivf']:10.1f} queries/s "
        f"(build {build_ivf:.1f} s: train on {min(args.train_size, args.n):,} rows + add)"
    )
    print(f"ratio IVF / exact                 : {t_exact / t_ivf:10.1f}x   IVF recall@10: {recall:.4f}")
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data/cifar10/test")
    p.add_argument("--limit", type=int, default=2000, help="images embedded (0: all)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--stem", default="imagenet")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--actor-threads", type=int, default=1)
    p.add_argument("--actor-cpus", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=1_000_000, help="search: stored vectors")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--centres", type=int, default=1000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--spread-min", type=float, default=0.5, help="blob std per dimension (centres are N(0, 1))")
    p.add_argument("--spread-max", type=float, default=1.0)
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: cf_ray's, 4*sqrt(n))")
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--train-size", type=int, default=256_000)
    p.add_argument("--faiss-threads", type=int, default=os.cpu_count())
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    args = p.parse_args()
    import torch

    out = {"torch": torch.__version__, "numpy": np.__version__, "cpus": os.cpu_count()}
    if not args.skip_embed:
        print(
            f"embed vs extract: {args.limit or 'all'} images of {args.data}, {args.arch} width {args.width} at "
            f"{args.size}px, batch {args.batch}, {args.actors} actor(s) x {args.actor_threads} thread(s), "
            f"{args.rounds} alternating round(s)",
            flush=True,
        )
        out["embed"] = bench_embed(args)
    if not args.skip_search:
        out["search"] = bench_search(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
