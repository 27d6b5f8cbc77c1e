"""Cluster: extracted features -> k-means -> pseudo-labels.

Writes into ``out_uri``: centroids.npy (K x d', in the preprocessed space), assignments.parquet
(id, cluster, distance), stats.json (sizes, objective per iteration, balance) and _SUCCESS.json.
"""
from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cf_ray import storage
from cf_ray.config import ClusterConfig
from cf_ray.kmeans.core import cluster_stats, preprocess_fit
from cf_ray.rundir import log
from cf_ray.stages.extract import read_features

SUCCESS = "_SUCCESS.json"


class ClusterInputError(ValueError):
    pass


def fit_faiss(x: np.ndarray, cfg: ClusterConfig) -> tuple[np.ndarray, list[dict]]:
    """Single-process faiss k-means; returns (centroids, per-iteration stats)."""
    import faiss

    km = faiss.Kmeans(
        x.shape[1], cfg.k, niter=cfg.niter, seed=cfg.seed, verbose=False,
        max_points_per_centroid=cfg.max_points_per_centroid, min_points_per_centroid=1,
    )
    km.train(x)
    stats = km.iteration_stats
    return km.centroids, [
        {"iter": i, "obj": float(s["obj"]), "imbalance": float(s["imbalance_factor"]), "nsplit": int(s["nsplit"])}
        for i, s in enumerate(stats)
    ]


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    dist, idx = faiss.knn(x, centroids, 1)
    return idx[:, 0].astype(np.int64), dist[:, 0].astype(np.float32)


def run_cluster(cfg: ClusterConfig, features_uri: str, out_uri: str) -> dict:
    marker = storage.join(out_uri, SUCCESS)
    if storage.exists(marker):
        log(f"cluster: {out_uri} is complete, nothing to do")
        return storage.read_json(marker)
    ids, feats = read_features(features_uri, cfg.layer)
    n = len(ids)
    if n == 0:
        raise ClusterInputError(f"no usable features in {features_uri}")
    if cfg.k > n:
        raise ClusterInputError(f"cluster.k={cfg.k} is larger than the {n} items with features; set cluster.k <= {n}")
    log(f"cluster: {n} x {feats.shape[1]} features ({cfg.layer}) -> k={cfg.k}, niter={cfg.niter}")
    t0 = time.time()
    x, transform = preprocess_fit(feats, l2=cfg.l2_normalize, pca_dim=cfg.pca_dim)
    centroids, history = fit_faiss(x, cfg)
    labels, dist = assign(x, centroids)
    stats = cluster_stats(labels, dist, cfg.k)
    stats["history"] = history
    stats["seconds"] = round(time.time() - t0, 2)
    stats["n"], stats["d"], stats["k"], stats["layer"] = n, int(x.shape[1]), cfg.k, cfg.layer

    buf = io.BytesIO()
    np.save(buf, centroids)
    storage.write_bytes(storage.join(out_uri, "centroids.npy"), buf.getvalue())
    if transform is not None:
        buf = io.BytesIO()
        np.savez(buf, **transform)
        storage.write_bytes(storage.join(out_uri, "transform.npz"), buf.getvalue())
    fs, p = storage.resolve(storage.join(out_uri, "assignments.parquet"))
    pq.write_table(
        pa.table({"id": pa.array(ids, pa.string()), "cluster": pa.array(labels), "distance": pa.array(dist)}), p, filesystem=fs
    )
    storage.write_json(storage.join(out_uri, "stats.json"), stats)
    summary = {k: stats[k] for k in ("n", "d", "k", "objective", "imbalance", "empty", "min_size", "max_size", "seconds")}
    storage.write_json(marker, summary)
    log(f"cluster: objective {stats['objective']:.4g}, imbalance {stats['imbalance']:.3f}, empty {stats['empty']}")
    return summary


def read_assignments(out_uri: str) -> pa.Table:
    fs, p = storage.resolve(storage.join(out_uri, "assignments.parquet"))
    return pq.read_table(p, filesystem=fs)
