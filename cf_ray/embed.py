"""Batch embedding of new images or videos with a run's model, through the extraction stage's Ray Data actor pool.

``run_embed`` lists the inputs (a folder or manifest, local or a URI) and runs ``stages.extract.run_extract``
with the run's decode and model settings at one layer into ``<out>`` (resumable like any extraction); each
extraction actor also assigns its batch's clusters (``AssignColumns``), so ``<out>/part-*.parquet`` hold:

    id, path, embedding (fixed-size float32 list), cluster (int64), distance (float32), error ('' when fine)

Undecodable inputs keep their row with a null embedding/cluster and the reason in ``error``; they are also in
``<out>/_errors.parquet`` (what listing skipped: ``_skipped.parquet``). Which centroids were used (the run's
k-means, fit on the pre-trained model's features, or a k-means of the chosen model's own features) is in
``<out>/_embed.json`` and in the part files' Parquet schema metadata (key ``cf_ray.embed``).
"""

from __future__ import annotations

import io
import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cf_ray import storage
from cf_ray.api import (
    ApiError,
    Centroids,
    build_own_centroids,
    check_run_dir,
    model_dir,
    own_centroids,
    read_run_config,
    run_centroids,
    run_cluster_config,
    run_media,
    weights_digest,
)
from cf_ray.config import ExtractConfig

log = logging.getLogger(__name__)

META = "_embed.json"
META_KEY = b"cf_ray.embed"


def choose_centroids(run_dir: str, which: str, layer: str, choice: str, cfg: dict, build: bool = True) -> Centroids:
    """The centroids to assign with: ``run`` (the run's k-means; only for the pre-trained model at the run's
    cluster layer), ``own`` (this model's own k-means, built here when missing), ``auto`` (run where it fits)."""
    if choice not in ("auto", "run", "own"):
        raise ApiError(f"unknown --centroids {choice!r}; use auto, run or own")
    cluster_layer = run_cluster_config(cfg).layer
    fits_run = which == "pretrained" and layer == cluster_layer
    if choice == "run" and not fits_run:
        raise ApiError(
            f"the run's centroids were fit on the pre-trained model's {cluster_layer} features; use --model "
            f"pretrained --layer {cluster_layer}, or --centroids own"
        )
    if choice in ("auto", "run") and fits_run:
        c = run_centroids(run_dir, cfg)
        if c is None:
            raise ApiError(f"run {run_dir} has no finished cluster stage yet; finish the job with `cf-ray all`")
        return c
    digest = weights_digest(model_dir(run_dir, which))
    c = own_centroids(run_dir, which, layer, cfg, digest)
    if c is None and build:
        log.info("embed: building a k-means of %s's own %s features of the run's source", which, layer)
        build_own_centroids(run_dir, which, layer)
        c = own_centroids(run_dir, which, layer, cfg, digest)
    if c is None:
        raise ApiError(f"no k-means of {which}'s own {layer} features in {run_dir}")
    return c


class AssignColumns:
    """The extraction actor's last step (``run_extract(post=...)``): a feature batch -> the embed columns
    (id, path, embedding, cluster, distance, error), cluster ids from ``centroids``."""

    def __init__(self, layer: str, centroids: Centroids, meta: bytes):
        self.layer, self.centroids, self.meta = layer, centroids, meta

    def __call__(self, t: pa.Table) -> pa.Table:
        col = t[f"feat_{self.layer}"].combine_chunks()
        valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        ok = valid & np.asarray(pc.equal(t["error"], "").to_numpy(zero_copy_only=False), dtype=bool)
        cluster = np.zeros(t.num_rows, np.int64)
        dist = np.zeros(t.num_rows, np.float32)
        if ok.any():
            x = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)  # the non-null rows
            cluster[ok], dist[ok] = self.centroids.assign(x[ok[valid]], backend="torch")
        out = pa.table(
            {
                "id": t["id"],
                "path": t["path"],
                "embedding": col,
                "cluster": pa.array(cluster, pa.int64(), mask=~ok),
                "distance": pa.array(dist, pa.float32(), mask=~ok),
                "error": t["error"],
            }
        )
        return out.replace_schema_metadata({META_KEY: self.meta})


def model_taps(model_uri: str) -> dict[str, int]:
    """A saved model's taps without loading its weights (built on the meta device: no memory, no time)."""
    import torch

    from cf_ray.config import ModelConfig
    from cf_ray.models.checkpoint import build

    cfg = ModelConfig.model_validate(storage.read_json(storage.join(model_uri, "model.json")))
    with torch.device("meta"):
        return dict(build(cfg).feature_info)


def run_embed(
    run_dir: str,
    data: str,
    out: str,
    which: str = "clusterfit",
    layer: str = "res5",
    centroids: str = "auto",
    overrides: list[str] = (),
) -> dict:
    """Embed every image or video of ``data`` with the run's ``which`` model into Parquet at ``out``.
    ``overrides`` (``extract.num_actors=4``...) change the run's extraction settings for this job only."""
    from cf_ray.config import load_section
    from cf_ray.media.items import write_items
    from cf_ray.runtime import init_ray
    from cf_ray.sources import IMAGE_EXTS, VIDEO_EXTS, list_items
    from cf_ray.stages.extract import run_extract

    run_dir = check_run_dir(run_dir)
    meta_uri = storage.join(out, META)
    if storage.is_complete(out) and storage.exists(meta_uri) and "rows" in storage.read_json(meta_uri):
        log.info("embed: %s is complete, nothing to do", out)
        return storage.read_json(meta_uri)
    cfg = read_run_config(run_dir)
    model_uri = model_dir(run_dir, which)
    taps = model_taps(model_uri)
    if layer not in taps:
        raise ApiError(f"layer {layer!r} is not a tap of this model; use one of {', '.join(taps)}")
    extract = load_section(ExtractConfig, "extract", cfg.get("extract"), overrides, fixed={"layers": [layer]})
    media = run_media(cfg)
    video = cfg.get("modality") == "video"
    items, skipped = list_items(data, VIDEO_EXTS if video else IMAGE_EXTS)
    init_ray((cfg.get("ray") or {}).get("num_cpus"), (cfg.get("ray") or {}).get("object_store_mb", 1024))
    c = choose_centroids(run_dir, which, layer, centroids, cfg)
    info = {
        "run_dir": run_dir,
        "model": which,
        "layer": layer,
        "weights_sha1": weights_digest(model_uri),
        "modality": "video" if video else "image",
        "data": data,
        "centroids": c.info,
    }
    meta = json.dumps(info).encode()
    storage.write_json(storage.join(out, META), info)  # what the parts hold; completed with counts below
    items_uri = storage.join(out, "_items.parquet")
    write_items(items, items_uri)
    buf = io.BytesIO()
    pq.write_table(skipped, buf)
    storage.write_bytes(storage.join(out, "_skipped.parquet"), buf.getvalue())  # what listing left out
    t0 = time.time()
    ext = run_extract(extract, media, items_uri, model_uri, out, post=AssignColumns(layer, c, meta))
    secs = time.time() - t0
    result = {
        **info,
        "rows": int(ext["rows"]),
        "ok": int(ext["ok"]),
        "skipped": int(ext["skipped"]),
        "not_listed": int(skipped.num_rows),
        "seconds": round(secs, 2),
        "items_per_s": round(ext["rows"] / secs, 1) if secs > 0 else None,
    }
    storage.write_json(storage.join(out, META), result)
    log.info("embed: %d rows (%d ok) -> %s in %.1fs", result["rows"], result["ok"], out, secs)
    return result


def read_embeddings(uri: str) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, paths, embeddings float32 (n, d)) of the rows that embedded fine, from a complete embed output."""
    from cf_ray import features

    t = features.read_table(uri, ["id", "path", "embedding"])
    col = t["embedding"].combine_chunks()
    x = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size).astype(np.float32, copy=False)
    return t["id"].to_pylist(), t["path"].to_pylist(), x
