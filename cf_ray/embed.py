"""Batch embedding of new images or videos with a run's model, through the extraction stage's Ray Data actor pool.

``run_embed`` lists the inputs (a folder or manifest, local or a URI), runs ``stages.extract.run_extract`` with
the run's decode and model settings at one layer into ``<out>/_extract`` (resumable like any extraction),
then one Ray task per part file adds each row's cluster and distance and writes ``<out>/part-*.parquet``:

    id, path, embedding (fixed-size float32 list), cluster (int64), distance (float32), error ('' when fine)

Undecodable inputs keep their row with a null embedding/cluster and the reason in ``error``; they are also in
``<out>/_errors.parquet`` with what listing skipped. Which centroids were used (the run's k-means, fit on the
pre-trained model's features, or a k-means of the chosen model's own features) is in ``<out>/_embed.json``
and in every part file's Parquet schema metadata (key ``cf_ray.embed``). ``_SUCCESS.json`` is written last.
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
from pydantic import ValidationError

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


def _assign_part(src: str, dst: str, layer: str, centroids: Centroids, meta: bytes) -> int:
    """One extraction part file -> one embed part file with cluster and distance."""
    fs, p = storage.resolve(src)
    t = pq.read_table(p, filesystem=fs, columns=["id", "path", "error", f"feat_{layer}"])
    col = t[f"feat_{layer}"].combine_chunks()
    valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    ok = valid & np.asarray(pc.equal(t["error"], "").to_numpy(zero_copy_only=False), dtype=bool)
    cluster = np.zeros(t.num_rows, np.int64)
    dist = np.zeros(t.num_rows, np.float32)
    if ok.any():
        x = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)  # the non-null rows
        cluster[ok], dist[ok] = centroids.assign(x[ok[valid]])
    mask = ~ok
    out = pa.table(
        {
            "id": t["id"],
            "path": t["path"],
            "embedding": col,
            "cluster": pa.array(cluster, pa.int64(), mask=mask),
            "distance": pa.array(dist, pa.float32(), mask=mask),
            "error": t["error"],
        }
    )
    out = out.replace_schema_metadata({META_KEY: meta})
    buf = io.BytesIO()
    pq.write_table(out, buf)
    storage.write_bytes(dst, buf.getvalue())
    return out.num_rows


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
    import ray

    from cf_ray.config import ConfigError, parse_override
    from cf_ray.features import part_files
    from cf_ray.media.items import write_items
    from cf_ray.runtime import init_ray
    from cf_ray.sources import IMAGE_EXTS, VIDEO_EXTS, list_items
    from cf_ray.stages.extract import run_extract

    run_dir = check_run_dir(run_dir)
    if storage.is_complete(out):
        log.info("embed: %s is complete, nothing to do", out)
        return storage.read_marker(out)
    cfg = read_run_config(run_dir)
    model_uri = model_dir(run_dir, which)
    from cf_ray.models.checkpoint import load_backbone

    taps = load_backbone(model_uri)[0].feature_info
    if layer not in taps:
        raise ApiError(f"layer {layer!r} is not a tap of this model; use one of {', '.join(taps)}")
    extract_tree = dict(cfg.get("extract") or {})
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] != "extract" or len(keys) != 2:
            raise ConfigError(f"embed takes extract.<key>=<value> overrides only, not {item!r}")
        extract_tree[keys[1]] = value
    try:
        extract = ExtractConfig.model_validate({**extract_tree, "layers": [layer]})
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"extract.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
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
    items_uri = storage.join(out, "_items.parquet")
    write_items(items, items_uri)
    tmp = storage.join(out, "_extract")
    t0 = time.time()
    ext = run_extract(extract, media, items_uri, model_uri, tmp)
    t_extract = time.time() - t0
    assign = ray.remote(num_cpus=1)(_assign_part)
    c_ref = ray.put(c)
    parts = part_files(tmp)
    rows = ray.get([assign.remote(f, storage.join(out, f.rsplit("/", 1)[-1]), layer, c_ref, meta) for f in parts])
    fs, p = storage.resolve(storage.join(tmp, "_errors.parquet"))
    bad = pq.read_table(p, filesystem=fs).select(["id", "path", "error"])
    listed = skipped.select(["id", "path", "error"]).cast(bad.schema) if skipped.num_rows else bad.schema.empty_table()
    errors = pa.concat_tables([bad, listed])
    buf = io.BytesIO()
    pq.write_table(errors, buf)
    storage.write_bytes(storage.join(out, "_errors.parquet"), buf.getvalue())
    secs = time.time() - t0
    result = {
        **info,
        "rows": int(sum(rows)),
        "ok": int(ext["ok"]),
        "skipped": int(errors.num_rows),
        "seconds": round(secs, 2),
        "extract_seconds": round(t_extract, 2),
        "items_per_s": round(sum(rows) / secs, 1) if secs > 0 else None,
    }
    storage.write_json(storage.join(out, META), result)
    storage.delete_dir(tmp)
    storage.mark_complete(out, result)  # last: the folder is complete from here on
    log.info("embed: %d rows (%d ok) -> %s in %.1fs", result["rows"], result["ok"], out, secs)
    return result


def read_embeddings(uri: str) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, paths, embeddings float32 (n, d)) of the rows that embedded fine, from a complete embed output."""
    from cf_ray import features

    t = features.read_table(uri, ["id", "path", "embedding"])
    col = t["embedding"].combine_chunks()
    x = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size).astype(np.float32, copy=False)
    return t["id"].to_pylist(), t["path"].to_pylist(), x
