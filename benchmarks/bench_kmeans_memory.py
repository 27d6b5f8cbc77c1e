"""k-means memory per process: the Ray backend over several raylets vs single-process faiss.Kmeans.

A feature set larger than one machine's RAM can only be clustered if no process has to hold all of it.
This runs the Ray backend on a simulated multi-node cluster (ray.cluster_utils.Cluster: one raylet per
"node", each with its own shard actor) and records every process's peak resident memory, next to a
plain single-process faiss.Kmeans on the same Parquet files (which must load every row). It prints
the ratio of the largest cf_ray process to the faiss process, and the objective of both.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/bench_kmeans_memory.py                 # 4 GiB, 4 nodes
    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/bench_kmeans_memory.py --rows 200000 --nodes 2 --niter 2  # smoke

Files are generated once per (rows, d, files, seed) under --dir and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

GiB = 2**30


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_files(root: str, rows: int, d: int, files: int, centers: int, seed: int) -> list[str]:
    """Gaussian blobs written file by file, so the generator never holds more than one file."""
    os.makedirs(root, exist_ok=True)
    means = np.random.default_rng(seed).standard_normal((centers, d)).astype(np.float32) * 2
    paths = []
    for j, idx in enumerate(np.array_split(np.arange(rows), files)):
        path = os.path.join(root, f"part-{j:05d}.parquet")
        paths.append(path)
        if os.path.exists(path):
            continue
        rng = np.random.default_rng([seed, j])
        x = means[rng.integers(0, centers, len(idx))] + rng.standard_normal((len(idx), d), dtype=np.float32)
        feat = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)
        table = pa.table({"id": [f"r{i}" for i in idx], "error": [""] * len(idx), "feat_res5": feat})
        pq.write_table(table, path + ".tmp", compression="none")
        os.replace(path + ".tmp", path)
    return paths


FAISS_BASELINE = """
import json, resource, sys, time
import faiss, numpy as np, pyarrow.parquet as pq
files = sys.argv[1].split(",")
k, niter, seed, threads = (int(a) for a in sys.argv[2:6])
faiss.omp_set_num_threads(threads)
meta = [pq.read_metadata(f) for f in files]
n = sum(m.num_rows for m in meta)
d = pq.read_schema(files[0]).field("feat_res5").type.list_size
x = np.empty((n, d), np.float32)
pos = 0
for f in files:
    block = pq.read_table(f, columns=["feat_res5"])["feat_res5"].combine_chunks().flatten().to_numpy().reshape(-1, d)
    x[pos:pos + len(block)] = block
    pos += len(block)
km = faiss.Kmeans(d, k, niter=niter, seed=seed, max_points_per_centroid=10**9)
t = time.time()
km.train(x)
print(json.dumps({"obj": km.iteration_stats[-1]["obj"], "seconds_per_iter": (time.time() - t) / niter,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "n": n}))
"""


def run_faiss(files: list[str], k: int, niter: int, seed: int, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", FAISS_BASELINE, ",".join(files), str(k), str(niter), str(seed), str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_ray(files: list[str], k: int, niter: int, seed: int, nodes: int, mppc: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from cf_ray.config import ClusterConfig
    from cf_ray.kmeans.distributed import ShardPool, fit_distributed

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 * 2**20})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1, object_store_memory=200 * 2**20)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        t0 = time.time()
        pool = ShardPool(files, "res5", nodes, 1, l2=False)
        load_s = time.time() - t0
        cfg = ClusterConfig(
            k=k, niter=niter, seed=seed, l2_normalize=False, backend="ray", max_points_per_centroid=mppc
        )
        t0 = time.time()
        centroids, hist = fit_distributed(files, "res5", cfg, nodes, 1, pool=pool)
        fit_s = time.time() - t0
        with tempfile.TemporaryDirectory() as out:
            sizes, objective = pool.write_assignments(os.path.join(out, "assignments"), centroids, False)
        infos = pool.call("info")
        pool.shutdown()
        return {
            "actors": infos,
            "obj": hist[-1]["obj"],
            "seconds_per_iter": fit_s / niter,
            "load_s": load_s,
            "assigned": int(sizes.sum()),
            "nodes": len({i["node"] for i in infos}),
            "driver_peak_rss": peak_rss(),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--niter", type=int, default=3)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--max-points-per-centroid", type=int, default=10**9, dest="mppc")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "cf_ray_kmeans_memory"))
    ap.add_argument("--skip-faiss", action="store_true", help="when the data would not fit one process")
    a = ap.parse_args()

    root = os.path.join(a.dir, f"n{a.rows}_d{a.d}_f{a.files}_s{a.seed}")
    t0 = time.time()
    files = make_files(root, a.rows, a.d, a.files, centers=a.k, seed=a.seed)
    data_bytes = a.rows * a.d * 4
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.machine()} {os.cpu_count()} cores, "
        f"RAM {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.1f} GiB, load {os.getloadavg()[0]:.2f}"
    )
    print(
        f"# data: {a.rows} x {a.d} float32 = {data_bytes / GiB:.2f} GiB in {a.files} Parquet files under {root} "
        f"({time.time() - t0:.0f} s to make or find); k={a.k}, niter={a.niter}"
    )

    r = run_ray(files, a.k, a.niter, a.seed, a.nodes, a.mppc)
    print(
        f"cf_ray (backend=ray) on {r['nodes']} raylets, {len(r['actors'])} shard actors: "
        f"{r['seconds_per_iter']:.2f} s/iter, load {r['load_s']:.1f} s, objective {r['obj']:.6g}, "
        f"{r['assigned']} rows assigned"
    )
    for i, info in enumerate(r["actors"]):
        print(
            f"  actor {i}: {info['rows']} rows, shard {info['bytes'] / GiB:.2f} GiB, "
            f"peak RSS {info['peak_rss'] / GiB:.2f} GiB"
        )
    largest = max([i["peak_rss"] for i in r["actors"]] + [r["driver_peak_rss"]])
    print(
        f"  driver peak RSS {r['driver_peak_rss'] / GiB:.2f} GiB; largest cf_ray process {largest / GiB:.2f} GiB "
        f"= {largest / data_bytes:.2f}x the feature set"
    )
    if a.skip_faiss:
        return
    f = run_faiss(files, a.k, a.niter, a.seed, threads=1)
    print(
        f"faiss.Kmeans, 1 process: {f['seconds_per_iter']:.2f} s/iter, objective {f['obj']:.6g}, "
        f"peak RSS {f['peak_rss'] / GiB:.2f} GiB = {f['peak_rss'] / data_bytes:.2f}x the feature set"
    )
    print(f"ratio: largest cf_ray process / faiss process = {largest / f['peak_rss']:.2f}")


if __name__ == "__main__":
    main()
