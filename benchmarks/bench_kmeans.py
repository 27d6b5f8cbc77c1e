"""k-means per-iteration time: Ray backend vs single-process faiss.Kmeans vs scikit-learn, on one box.

Same data (Gaussian blobs written as extract-shaped Parquet parts), same initial centroids, same
total threads. Prints per-iteration times, the 2*n*k*d FLOP rate against a measured numpy float32
matmul peak, and scaling over 1, 2, 4 actors (threads split evenly between them).

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/bench_kmeans.py            # ~3-5 min on 2 cores
    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/bench_kmeans.py --n 20000 --k 100 --niter 3   # smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def make_shards(root: str, n: int, d: int, k: int, files: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d)).astype(np.float32) * 2
    x = means[rng.integers(0, k, n)] + rng.standard_normal((n, d), dtype=np.float32)
    paths = []
    for j, idx in enumerate(np.array_split(np.arange(n), files)):
        feat = pa.FixedSizeListArray.from_arrays(pa.array(x[idx].reshape(-1)), d)
        t = pa.table({"id": [f"r{i}" for i in idx], "error": [""] * len(idx), "feat_res5": feat})
        paths.append(os.path.join(root, f"part-{j:05d}.parquet"))
        pq.write_table(t, paths[-1])
    return x, paths


def sgemm_peak(threads: int, size: int = 2048, reps: int = 5) -> float:
    """Best-of float32 matmul rate (FLOP/s) with this many BLAS threads."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    best = float("inf")
    with threadpool_limits(threads):
        a @ a
        for _ in range(reps):
            t = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def sse(x: np.ndarray, c: np.ndarray) -> float:
    import faiss

    return float(faiss.knn(x, c, 1)[0].astype(np.float64).sum())


def bench_faiss(x, c0, niter, threads):
    import faiss

    faiss.omp_set_num_threads(threads)
    km = faiss.Kmeans(
        x.shape[1], len(c0), niter=niter, max_points_per_centroid=10**7, min_points_per_centroid=1, verbose=False
    )
    km.train(x, init_centroids=c0)
    cumulative = [s["time"] for s in km.iteration_stats]  # faiss reports cumulative seconds
    nsplit = sum(s["nsplit"] for s in km.iteration_stats)
    return np.diff([0.0, *cumulative]).tolist(), sse(x, km.centroids), nsplit


def bench_sklearn(x, c0, niter, threads):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads):
        t = time.perf_counter()
        km = KMeans(len(c0), init=c0, n_init=1, max_iter=niter, tol=0, algorithm="lloyd").fit(x)
        secs = time.perf_counter() - t
    return secs / km.n_iter_, km.n_iter_


def bench_ray(files, c0, niter, actors, threads):
    from cf_ray.config import ClusterConfig
    from cf_ray.kmeans.distributed import ShardPool, fit_distributed

    cfg = ClusterConfig(k=len(c0), niter=niter, l2_normalize=False, backend="ray")
    t = time.perf_counter()
    pool = ShardPool(files, "res5", actors, threads / actors, l2=False)
    load = time.perf_counter() - t
    try:
        c, hist = fit_distributed(files, "res5", cfg, actors, threads / actors, pool=pool, init_centroids=c0)
    finally:
        pool.shutdown()
    return [h["time"] for h in hist], [h["time_search"] for h in hist], load, c, sum(h["nsplit"] for h in hist)


def fmt(times):
    return f"median {statistics.median(times):.3f} s, min {min(times):.3f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--niter", type=int, default=10)
    ap.add_argument("--sklearn-iter", type=int, default=3, help="0: skip scikit-learn")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="total threads for every contender")
    ap.add_argument("--actors", default="1,2,4")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import faiss
    import ray
    import sklearn

    n, d, k, th = args.n, args.d, args.k, args.threads
    flop = 2.0 * n * k * d
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.machine()} {os.cpu_count()} cores, python "
        f"{sys.version.split()[0]}, "
        f"numpy {np.__version__}, faiss {faiss.__version__}, ray {ray.__version__}, sklearn {sklearn.__version__}"
    )
    print(
        f"# n={n} d={d} k={k} niter={args.niter} threads={th}; one iteration = 2nkd = {flop / 1e9:.1f} GFLOP; "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    one, many = sgemm_peak(1), sgemm_peak(th)
    peak = max(many, th * one)  # contention on a shared box can make the multi-thread figure meaningless
    print(
        f"sgemm (numpy float32 2048^3, best of 5): 1 thread {one / 1e9:.1f}, {th} threads {many / 1e9:.1f} GFLOP/s; "
        f"peak used below = {peak / 1e9:.1f} GFLOP/s"
    )

    with tempfile.TemporaryDirectory() as root:
        x, files = make_shards(root, n, d, k, args.files, args.seed)
        c0 = x[np.random.RandomState(args.seed).choice(n, k, replace=False)].copy()

        f_times, f_sse, f_split = bench_faiss(x, c0, args.niter, th)
        f_med, f_min = statistics.median(f_times), min(f_times)
        print(
            f"faiss.Kmeans 1 process: {fmt(f_times)}/iter, {flop / f_med / 1e9:.1f} GFLOP/s "
            f"({flop / f_med / peak:.0%} of sgemm peak), final SSE {f_sse:.6g}, {f_split} splits"
        )

        if args.sklearn_iter:
            s_time, s_iter = bench_sklearn(x, c0, args.sklearn_iter, th)
            print(
                f"sklearn KMeans lloyd ({s_iter} iters): {s_time:.3f} s/iter, {flop / s_time / 1e9:.1f} GFLOP/s, "
                f"{s_time / f_med:.2f}x faiss"
            )

        ray.init(
            address="local", num_cpus=th, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False
        )
        try:
            for a in [int(v) for v in args.actors.split(",")]:
                times, search, load, c, nsplit = bench_ray(files, c0, args.niter, a, th)
                med = statistics.median(times)
                print(
                    f"ray backend {a} actor(s) x {th / a:g} CPU: {fmt(times)}/iter (slowest shard step median "
                    f"{statistics.median(search):.3f} s), {flop / med / 1e9:.1f} GFLOP/s ({flop / med / peak:.0%} of "
                    f"peak), "
                    f"{med / f_med:.2f}x faiss (min/min {min(times) / f_min:.2f}x); load {load:.1f} s; "
                    f"final SSE {sse(x, c):.6g} ({sse(x, c) / f_sse - 1:+.1e} vs faiss), "
                    f"{nsplit} splits"
                )
        finally:
            ray.shutdown()
    print(f"# load average at end {os.getloadavg()[0]:.2f} (other work shares this machine when > 0)")


if __name__ == "__main__":
    main()
