"""Cluster: extracted features -> k-means -> pseudo-labels.

Writes into ``out_uri``: centroids.npy (K x d', in the preprocessed space), transform.npz (when
PCA-whitening), assignments.parquet (id, cluster, distance), stats.json (sizes, objective per
iteration, balance) and, last, _SUCCESS.json: the folder counts as done only with it (a rerun redoes or
resumes an incomplete one, and ``read_assignments`` refuses it).

backend=faiss runs faiss.Kmeans on all features in one Ray task (never in the driver, which may sit on a 0-CPU
head node); backend=ray shards the rows over Ray actors (cf_ray.kmeans.distributed), checkpoints every
iteration in ``out_uri/_checkpoint`` (a rerun resumes) and writes assignments.parquet as a folder of part
files, one per actor. Where the features keep every clip of a video (extract.clip_features), each clip is also
assigned to the same centroids: clip_assignments.parquet (id, clusters: one id per clip, in extraction order),
and stats.json's ``clip_agreement`` says how often a clip's cluster is its video's.
``cluster.use_gpu`` asks Ray for a GPU per task/actor; whether faiss then runs on it is
decided inside that process by its own faiss build (cf_ray.kmeans.device), and stats.json records the device.
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
from cf_ray.kmeans.core import cluster_stats, nearest, preprocess_fit, sizes_stats
from cf_ray.kmeans.device import GpuFlatIndex, choose, describe, import_faiss
from cf_ray.runtime import want_gpu
from cf_ray.storage import SUCCESS, require_complete

logger = logging.getLogger(__name__)
CLIP_ASSIGNMENTS = "clip_assignments.parquet"


class ClusterInputError(ValueError):
    pass


def fit_faiss(x: np.ndarray, cfg: ClusterConfig, gpu: bool = False) -> tuple[np.ndarray, list[dict]]:
    """Single-process faiss k-means (on this process's GPU with ``gpu``); returns (centroids, per-iteration stats)."""
    faiss = import_faiss()

    km = faiss.Kmeans(
        x.shape[1],
        cfg.k,
        niter=cfg.niter,
        seed=cfg.seed,
        verbose=False,
        max_points_per_centroid=cfg.max_points_per_centroid,
        min_points_per_centroid=1,
        gpu=gpu,
    )
    km.train(x)
    stats = km.iteration_stats
    return km.centroids, [
        {"iter": i, "obj": float(s["obj"]), "imbalance": float(s["imbalance_factor"]), "nsplit": int(s["nsplit"])}
        for i, s in enumerate(stats)
    ]


def assign(x: np.ndarray, centroids: np.ndarray, gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid, squared L2 distance) of every row; exact, on this process's GPU with ``gpu``."""
    import_faiss()
    index = GpuFlatIndex().of(centroids) if gpu else None
    idx, dist = nearest(x, centroids, index=index)
    return idx, dist.astype(np.float32)


def run_cluster(cfg: ClusterConfig, features_uri: str, out_uri: str) -> dict:
    marker = storage.join(out_uri, SUCCESS)
    if storage.exists(marker):
        logger.info(f"cluster: {out_uri} is complete, nothing to do")
        return storage.read_json(marker)
    require_complete(features_uri)
    import ray

    from cf_ray.runtime import init_ray

    if not ray.is_initialized():
        init_ray()
    t0 = time.time()
    stats = (
        _cluster_ray(cfg, features_uri, out_uri) if cfg.backend == "ray" else _cluster_faiss(cfg, features_uri, out_uri)
    )
    _remove(storage.join(out_uri, CLIP_ASSIGNMENTS))
    if features_uri_has_clips(features_uri, cfg.layer):
        stats.update(
            ray.get(ray.remote(_clip_task).options(num_cpus=cfg.cpus_per_actor).remote(cfg, features_uri, out_uri))
        )
    stats["seconds"] = round(time.time() - t0, 2)
    stats["backend"] = cfg.backend
    storage.write_json(storage.join(out_uri, "stats.json"), stats)
    keys = ("n", "d", "k", "objective", "imbalance", "empty", "min_size", "max_size", "seconds", "device")
    summary = {k: stats[k] for k in keys + ("clip_agreement",) if k in stats}
    storage.write_json(marker, summary)
    logger.info(
        f"cluster: objective {stats['objective']:.4g}, imbalance {stats['imbalance']:.3f}, empty {stats['empty']}, "
        f"on {stats['device']}"
    )
    return summary


def _check_size(n: int, k: int, features_uri: str) -> None:
    if n == 0:
        raise ClusterInputError(f"no usable features in {features_uri}")
    if k > n:
        raise ClusterInputError(f"cluster.k={k} is larger than the {n} items with features; set cluster.k <= {n}")


def _cluster_faiss(cfg: ClusterConfig, features_uri: str, out_uri: str) -> dict:
    """Run the whole faiss fit in one Ray task with cfg.cpus_per_actor CPUs (its faiss threads) and a GPU if asked."""
    import ray

    gpu = want_gpu(cfg.use_gpu)
    task = ray.remote(_faiss_task).options(
        num_cpus=cfg.cpus_per_actor, num_gpus=1 if gpu else 0, max_retries=2, retry_exceptions=False
    )
    logger.info(f"cluster: faiss k-means in a Ray task ({cfg.cpus_per_actor} CPU{' + 1 GPU' if gpu else ''})")
    return ray.get(task.remote(cfg, features_uri, out_uri, gpu))


def _faiss_task(cfg: ClusterConfig, features_uri: str, out_uri: str, gpu: bool) -> dict:
    faiss = import_faiss()
    faiss.omp_set_num_threads(max(1, int(round(cfg.cpus_per_actor))))
    device, device_note = choose(gpu)
    ids, feats = read_features(features_uri, cfg.layer)
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")  # faiss's seeded init picks rows by position
    ids, feats = [ids[i] for i in order], feats[order]
    n = len(ids)
    _check_size(n, cfg.k, features_uri)
    logger.info(f"cluster: {n} x {feats.shape[1]} features ({cfg.layer}) -> k={cfg.k}, niter={cfg.niter}")
    note = faiss_blas_note() if device == "cpu" else None
    if note:
        logger.info(f"cluster: note: {note}")
    x, transform = preprocess_fit(feats, l2=cfg.l2_normalize, pca_dim=cfg.pca_dim)
    centroids, history = fit_faiss(x, cfg, gpu=device == "cuda")
    for h in history:
        metrics.kmeans_iteration(h["obj"], cfg.layer)
    labels, dist = assign(x, centroids, gpu=device == "cuda")
    stats = cluster_stats(labels, dist, cfg.k)
    stats["history"] = history
    stats["device"] = describe(device)
    if device_note:
        stats["device_note"] = device_note
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
    pool = ShardPool(
        files, cfg.layer, cfg.num_actors, cfg.cpus_per_actor, l2=cfg.l2_normalize, use_gpu=want_gpu(cfg.use_gpu)
    )
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
        devices = pool.devices()
    finally:
        pool.shutdown()
    _write_model(out_uri, centroids, transform)
    stats = sizes_stats(sizes, objective)
    stats["history"] = history
    stats["n"], stats["d"], stats["k"], stats["layer"] = pool.n, int(centroids.shape[1]), cfg.k, cfg.layer
    stats["num_actors"] = len(pool.parts)
    stats["device"] = ", ".join(sorted(set(d["device"] for d in devices)))
    notes = sorted({d["note"] for d in devices if d["note"]})
    if notes:
        stats["device_note"] = "; ".join(notes)
    storage.delete_dir(checkpoint)
    return stats


def features_uri_has_clips(features_uri: str, layer: str) -> bool:
    from cf_ray.features import clip_column, dataset

    return clip_column(layer) in dataset(features_uri).schema.names


def _clip_task(cfg: ClusterConfig, features_uri: str, out_uri: str) -> dict:
    """Assign every clip of every video to the video-level centroids; write clip_assignments.parquet."""
    from cf_ray.features import clip_column, read_table
    from cf_ray.kmeans.core import l2_normalize, pca_whiten_apply

    t = read_table(features_uri, ["id", clip_column(cfg.layer)])
    col = t[clip_column(cfg.layer)].combine_chunks()
    clips, d = col.type.list_size, col.type.value_type.list_size
    x = col.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32)
    if cfg.l2_normalize:
        x = l2_normalize(x)
    transform_path = storage.join(out_uri, "transform.npz")
    if storage.exists(transform_path):
        x = pca_whiten_apply(x, dict(np.load(io.BytesIO(storage.read_bytes(transform_path)))))
    centroids = np.load(io.BytesIO(storage.read_bytes(storage.join(out_uri, "centroids.npy"))))
    labels = nearest(np.ascontiguousarray(x), centroids, cfg.backend == "ray" and cfg.spherical)[0]
    labels = labels.astype(np.int32).reshape(-1, clips)
    path = storage.join(out_uri, CLIP_ASSIGNMENTS)
    fs, p = storage.resolve(path)
    ids = t["id"]
    pq.write_table(
        pa.table({"id": ids, "clusters": pa.FixedSizeListArray.from_arrays(labels.reshape(-1), clips)}),
        p,
        filesystem=fs,
    )
    video = read_assignments_file(out_uri).select(["id", "cluster"])
    joined = pa.table({"id": ids, "i": np.arange(len(ids))}).join(video, "id").sort_by("i")
    same = labels[joined["i"].to_numpy()] == joined["cluster"].to_numpy()[:, None]
    logger.info(f"cluster: {labels.size} clips assigned; {100 * same.mean():.1f}% share their video's cluster")
    return {"clips_per_video": clips, "clip_agreement": float(same.mean())}


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
    return read_assignments_file(out_uri)


def read_clip_assignments(out_uri: str) -> pa.Table | None:
    """(id, clusters: one id per clip) where the clustering assigned clips, else None."""
    require_complete(out_uri, "clustering")
    path = storage.join(out_uri, CLIP_ASSIGNMENTS)
    if not storage.exists(path):
        return None
    fs, p = storage.resolve(path)
    return pq.read_table(p, filesystem=fs)


def read_assignments_file(out_uri: str) -> pa.Table:
    fs, p = storage.resolve(storage.join(out_uri, "assignments.parquet"))
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return pq.read_table(p, filesystem=fs)
    infos = fs.get_file_info(pafs.FileSelector(p))
    parts = sorted(i.path for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in parts])
