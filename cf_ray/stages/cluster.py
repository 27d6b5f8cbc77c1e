"""Cluster: extracted features -> k-means -> pseudo-labels.

Writes into ``out_uri``: centroids.npy (K x d', in the preprocessed space), transform.npz (when
PCA-whitening), assignments.parquet (id, cluster, distance), stats.json (sizes, objective per
iteration, balance) and, last, _SUCCESS.json: the folder counts as done only with it (a rerun redoes or
resumes an incomplete one, and ``read_assignments`` refuses it).

backend=faiss runs faiss.Kmeans in this process on all features; backend=ray shards the rows over
Ray actors (cf_ray.kmeans.distributed), checkpoints every iteration in ``out_uri/_checkpoint`` (a
rerun resumes) and writes assignments.parquet as a folder of part files, one per actor.
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cf_ray import metrics, storage
from cf_ray.config import ClusterConfig
from cf_ray.features import read_features
from cf_ray.kmeans._blas import faiss_blas_note
from cf_ray.kmeans.core import cluster_stats, preprocess_fit, sizes_stats
from cf_ray.storage import SUCCESS, require_complete

logger = logging.getLogger(__name__)


class ClusterInputError(ValueError):
    pass


def fit_faiss(x: np.ndarray, cfg: ClusterConfig) -> tuple[np.ndarray, list[dict]]:
    """Single-process faiss k-means; returns (centroids, per-iteration stats)."""
    import faiss

    km = faiss.Kmeans(
        x.shape[1],
        cfg.k,
        niter=cfg.niter,
        seed=cfg.seed,
        verbose=False,
        max_points_per_centroid=cfg.max_points_per_centroid,
        min_points_per_centroid=1,
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
        logger.info(f"cluster: {out_uri} is complete, nothing to do")
        return storage.read_json(marker)
    require_complete(features_uri)
    t0 = time.time()
    stats = (
        _cluster_ray(cfg, features_uri, out_uri) if cfg.backend == "ray" else _cluster_faiss(cfg, features_uri, out_uri)
    )
    stats["seconds"] = round(time.time() - t0, 2)
    stats["backend"] = cfg.backend
    storage.write_json(storage.join(out_uri, "stats.json"), stats)
    summary = {
        k: stats[k] for k in ("n", "d", "k", "objective", "imbalance", "empty", "min_size", "max_size", "seconds")
    }
    storage.write_json(marker, summary)
    logger.info(
        f"cluster: objective {stats['objective']:.4g}, imbalance {stats['imbalance']:.3f}, empty {stats['empty']}"
    )
    return summary


def _check_size(n: int, k: int, features_uri: str) -> None:
    if n == 0:
        raise ClusterInputError(f"no usable features in {features_uri}")
    if k > n:
        raise ClusterInputError(f"cluster.k={k} is larger than the {n} items with features; set cluster.k <= {n}")


def _cluster_faiss(cfg: ClusterConfig, features_uri: str, out_uri: str) -> dict:
    ids, feats = read_features(features_uri, cfg.layer)
    n = len(ids)
    _check_size(n, cfg.k, features_uri)
    logger.info(f"cluster: {n} x {feats.shape[1]} features ({cfg.layer}) -> k={cfg.k}, niter={cfg.niter}")
    note = faiss_blas_note()
    if note:
        logger.info(f"cluster: note: {note}")
    x, transform = preprocess_fit(feats, l2=cfg.l2_normalize, pca_dim=cfg.pca_dim)
    centroids, history = fit_faiss(x, cfg)
    for h in history:
        metrics.kmeans_iteration(h["obj"], cfg.layer)
    labels, dist = assign(x, centroids)
    stats = cluster_stats(labels, dist, cfg.k)
    stats["history"] = history
    stats["n"], stats["d"], stats["k"], stats["layer"] = n, int(x.shape[1]), cfg.k, cfg.layer
    _write_model(out_uri, centroids, transform)
    path = storage.join(out_uri, "assignments.parquet")
    _remove(path)
    fs, p = storage.resolve(path)
    pq.write_table(
        pa.table({"id": pa.array(ids, pa.string()), "cluster": pa.array(labels), "distance": pa.array(dist)}),
        p,
        filesystem=fs,
    )
    return stats


def _cluster_ray(cfg: ClusterConfig, features_uri: str, out_uri: str) -> dict:
    """Sharded fit and assignment; the rows stay in the actors, only k x d arrays reach this process."""
    import ray

    from cf_ray.features import part_files
    from cf_ray.kmeans.distributed import ShardPool, fit_distributed
    from cf_ray.runtime import init_ray

    if not ray.is_initialized():
        init_ray()
    files = part_files(features_uri)
    if not files:
        raise FileNotFoundError(f"no feature Parquet files in {features_uri}")
    pool = ShardPool(files, cfg.layer, cfg.num_actors, cfg.cpus_per_actor, l2=cfg.l2_normalize)
    try:
        _check_size(pool.n, cfg.k, features_uri)
        logger.info(
            f"cluster: {pool.n} x {pool.d} features ({cfg.layer}) -> k={cfg.k}, niter={cfg.niter} on "
            f"{len(pool.actors)} Ray actor(s)"
        )
        checkpoint = storage.join(out_uri, "_checkpoint")
        centroids, history = fit_distributed(
            files, cfg.layer, cfg, cfg.num_actors, cfg.cpus_per_actor, checkpoint, pool=pool
        )
        path = storage.join(out_uri, "assignments.parquet")
        _remove(path)  # parts of an earlier, interrupted run (maybe with more actors) must not survive
        sizes, objective = pool.write_assignments(path, centroids, cfg.spherical)
        transform = pool.transform
    finally:
        pool.shutdown()
    _write_model(out_uri, centroids, transform)
    stats = sizes_stats(sizes, objective)
    stats["history"] = history
    stats["n"], stats["d"], stats["k"], stats["layer"] = pool.n, int(centroids.shape[1]), cfg.k, cfg.layer
    stats["num_actors"] = len(pool.parts)
    storage.delete_dir(checkpoint)
    return stats


def _write_model(out_uri: str, centroids: np.ndarray, transform: dict | None) -> None:
    buf = io.BytesIO()
    np.save(buf, centroids)
    storage.write_bytes(storage.join(out_uri, "centroids.npy"), buf.getvalue())
    if transform is not None:
        buf = io.BytesIO()
        np.savez(buf, **transform)
        storage.write_bytes(storage.join(out_uri, "transform.npz"), buf.getvalue())


def _remove(path: str) -> None:
    fs, p = storage.resolve(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind == pafs.FileType.File:
        fs.delete_file(p)


def read_assignments(out_uri: str) -> pa.Table:
    """(id, cluster, distance) of every item: one file (faiss backend) or a folder of parts (ray)."""
    require_complete(out_uri, "clustering")
    fs, p = storage.resolve(storage.join(out_uri, "assignments.parquet"))
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return pq.read_table(p, filesystem=fs)
    infos = fs.get_file_info(pafs.FileSelector(p))
    parts = sorted(i.path for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in parts])
