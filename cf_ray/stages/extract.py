"""Extract: items -> decode (Ray Data tasks) -> backbone (actor pool) -> Parquet.

One row per input: id, path, label, error ('' when fine) and one fixed-size float32 list column per
feature tap (null where the input could not be decoded). For video, ``feat_<tap>`` is the mean over the
video's clips and ``clipfeat_<tap>`` keeps every clip's feature.

Atomic and resumable: each write task commits one ``part-<hash of its ids>.parquet`` (written under a
temporary name, then renamed), so a part file either is complete or does not exist, and a retried task
rewrites the same name instead of adding a duplicate. The folder is complete only when ``_SUCCESS.json``
(written last) exists; readers refuse it before. A rerun over an incomplete folder keeps the committed
parts and extracts only the items none of them holds.
"""

from __future__ import annotations

import hashlib
import io
import time
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from cf_ray import metrics, storage
from cf_ray.config import ExtractConfig, ImageConfig, VideoConfig
from cf_ray.media.image import decode_images
from cf_ray.rundir import log
from cf_ray.runtime import step_settings, want_gpu

SUCCESS = "_SUCCESS.json"


class IncompleteOutputError(RuntimeError):
    """An output folder without its done marker: it was interrupted, or is still being written."""


class PartSink(Datasink):
    """Each write task commits its rows as one Parquet file named by a hash of its ids."""

    def __init__(self, out_uri: str):
        self.out_uri = out_uri

    def write(self, blocks: Iterable[Block], ctx) -> int:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return 0
        t = pa.concat_tables(tables)
        digest = hashlib.sha1("\n".join(t["id"].to_pylist()).encode()).hexdigest()[:16]
        buf = io.BytesIO()
        pq.write_table(t, buf)
        storage.write_bytes(storage.join(self.out_uri, f"part-{digest}.parquet"), buf.getvalue())  # tmp + rename
        return t.num_rows


def part_files(uri: str) -> list[str]:
    """Committed part files of an output folder (temporaries end in .tmp and are not listed)."""
    fs, p = storage.resolve(uri)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p))
    return sorted(
        storage.join(uri, i.base_name)
        for i in infos
        if i.base_name.startswith("part-") and i.base_name.endswith(".parquet")
    )


def require_complete(uri: str) -> None:
    if not storage.exists(storage.join(uri, SUCCESS)):
        raise IncompleteOutputError(
            f"{uri} has no {SUCCESS}: its extraction did not finish; rerun the job to resume it"
        )


def _keep_committed(out_uri: str, wanted: set[str]) -> set[str]:
    """Ids already extracted in ``out_uri``; deletes temporaries, unreadable parts, and parts that overlap
    an earlier part or hold ids not wanted (left by a retried task or an older item list)."""
    fs, p = storage.resolve(out_uri)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return set()
    for i in fs.get_file_info(pafs.FileSelector(p)):
        if i.base_name.endswith(".tmp"):
            fs.delete_file(i.path)
    done: set[str] = set()
    for f in part_files(out_uri):
        ffs, fp = storage.resolve(f)
        try:
            ids = pq.read_table(fp, filesystem=ffs, columns=["id"])["id"].to_pylist()
        except (OSError, pa.ArrowInvalid):
            ids = None
        if ids is None or len(set(ids)) != len(ids) or not done.isdisjoint(ids) or not wanted.issuperset(ids):
            ffs.delete_file(fp)
            continue
        done.update(ids)
    return done


def normalize(pixels: np.ndarray, mean, std, device: str = "cpu") -> torch.Tensor:
    """Channels-last uint8 -> channels-first float32, normalised: images (N,H,W,3) -> (N,3,H,W),
    clips (N,T,H,W,3) -> (N,3,T,H,W)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)
    shape = (1, 3) + (1,) * (x.ndim - 2)
    m = torch.tensor(mean, device=device).view(shape)
    s = torch.tensor(std, device=device).view(shape)
    return (x.float().div_(255) - m) / s


def decoder(media: ImageConfig | VideoConfig) -> tuple:
    """(Ray Data decode UDF, its kwargs, the column it fills) for images or videos."""
    if isinstance(media, VideoConfig):
        from cf_ray.media.video import decode_video_batch

        return (
            decode_video_batch,
            {
                "num_clips": media.num_clips,
                "clip_len": media.clip_len,
                "stride": media.stride,
                "size": media.size,
                "resize": media.resize,
                "short": media.short,
                "timeout_s": media.timeout_s,
            },
            "clips",
        )
    return decode_images, {"size": media.size, "resize": media.resize}, "image"


def feature_column(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    """(n_ok, d) features for the rows where ok -> a length-n fixed-size-list column, null elsewhere."""
    n, d = len(ok), values.shape[1]
    full = np.zeros((n, d), dtype=np.float32)
    full[ok] = values
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), d, mask=pa.array(~ok))


def clip_feature_column(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    """(n_ok, clips, d) per-clip features -> a column of fixed-size lists of per-clip feature lists."""
    n, c, d = len(ok), values.shape[1], values.shape[2]
    full = np.zeros((n, c, d), dtype=np.float32)
    full[ok] = values
    inner = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), d)
    return pa.FixedSizeListArray.from_arrays(inner, c, mask=pa.array(~ok))


class Extractor:
    """Ray Data callable class: loads the backbone once per actor."""

    def __init__(
        self,
        model_uri: str,
        layers: list[str],
        mean,
        std,
        use_gpu: bool,
        threads: int,
        precision: str = "auto",
        channels_last: str = "auto",
    ):
        from cf_ray.models import backbone_modality
        from cf_ray.models.checkpoint import load_backbone

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if use_gpu else "cpu"
        self.model, model_cfg = load_backbone(model_uri)
        self.format, self.autocast = step_settings(
            precision, channels_last, self.device, video=backbone_modality(model_cfg.arch) == "video"
        )
        self.model.eval().to(self.device)
        if self.format is not None:
            self.model.to(memory_format=self.format)
        self.layers, self.mean, self.std = layers, mean, std

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        metrics.items("extract", int(ok.sum()), int((~ok).sum()))
        video = "clips" in batch
        pixels = batch["clips" if video else "image"][ok]
        per_item = pixels.shape[1] if video else 1  # clips per video
        feats = {l: np.zeros((0, per_item, self.model.feature_info[l]), np.float32) for l in self.layers}
        if ok.any():
            if video:
                pixels = pixels.reshape(-1, *pixels.shape[2:])  # every clip of every video is one input
            x = normalize(pixels, self.mean, self.std, self.device)
            if self.format is not None:
                x = x.contiguous(memory_format=self.format)
            with torch.inference_mode(), self.autocast():
                out = self.model.forward_features(x, self.layers)
            feats = {l: out[l].float().cpu().numpy().reshape(int(ok.sum()), per_item, -1) for l in self.layers}
        cols = {
            "id": pa.array(batch["id"].tolist(), pa.string()),
            "path": pa.array(batch["path"].tolist(), pa.string()),
            "label": pa.array([None if v is None else str(v) for v in batch["label"].tolist()], pa.string()),
            "error": pa.array(batch["error"].tolist(), pa.string()),
        }
        for l in self.layers:
            cols[f"feat_{l}"] = feature_column(feats[l].mean(1), ok)  # a video's feature: mean over its clips
            if video:
                cols[f"clipfeat_{l}"] = clip_feature_column(feats[l], ok)
        return pa.table(cols)


def read_items(uri: str) -> pa.Table:
    fs, p = storage.resolve(uri)
    return pq.read_table(p, filesystem=fs)


def write_items(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())  # whole or not at all


def items_dataset(items: pa.Table, block_rows: int) -> ray.data.Dataset:
    """One block per ``block_rows`` items, so decode and inference parallelise over blocks."""
    chunks = [items.slice(i, block_rows) for i in range(0, items.num_rows, block_rows)] or [items]
    return ray.data.from_arrow(chunks)


def run_extract(
    cfg: ExtractConfig, media: ImageConfig | VideoConfig, items_uri: str, model_uri: str, out_uri: str
) -> dict:
    """Features of every item (image or video) in ``items_uri`` with the backbone at ``model_uri`` into ``out_uri``."""
    marker = storage.join(out_uri, SUCCESS)
    if storage.exists(marker):
        log(f"extract: {out_uri} is complete, nothing to do")
        return storage.read_json(marker)
    items = read_items(items_uri)
    wanted = set(items["id"].to_pylist())
    done = _keep_committed(out_uri, wanted)
    todo = items.filter(pc.invert(pc.is_in(items["id"], pa.array(sorted(done), pa.string())))) if done else items
    gpu = want_gpu(cfg.use_gpu)
    resumed = f" (resuming: {len(done)} already in committed parts)" if done else ""
    log(
        f"extract: {todo.num_rows} items{resumed}, layers {cfg.layers}, "
        f"{cfg.num_actors} actor(s) on {'GPU' if gpu else 'CPU'} -> {out_uri}"
    )
    t0 = time.time()
    if todo.num_rows:
        _extract(cfg, media, todo, model_uri, out_uri, gpu)
    secs = time.time() - t0
    if _keep_committed(out_uri, wanted) != wanted:
        raise RuntimeError(
            f"extract: {out_uri} does not hold every one of the {len(wanted)} items; refusing to mark it "
            "complete (rerun to extract the missing ones)"
        )
    fs, p = storage.resolve(out_uri)
    meta = pa.concat_tables(
        [
            pq.read_table(storage.resolve(f)[1], filesystem=fs, columns=["id", "path", "error"])
            for f in part_files(out_uri)
        ]
    )
    bad = meta.filter(pc.not_equal(meta["error"], ""))
    buf = io.BytesIO()
    pq.write_table(bad, buf)
    storage.write_bytes(storage.join(out_uri, "_errors.parquet"), buf.getvalue())
    result = {
        "rows": meta.num_rows,
        "ok": meta.num_rows - bad.num_rows,
        "skipped": bad.num_rows,
        "resumed": len(done),
        "seconds": round(secs, 2),
        "items_per_s": round(todo.num_rows / secs, 1) if secs > 0 else None,
        "layers": cfg.layers,
    }
    storage.write_json(marker, result)  # last: the folder is complete from here on
    log(f"extract: {result['ok']} ok, {result['skipped']} skipped, {result['items_per_s']} items/s")
    return result


def _extract(
    cfg: ExtractConfig, media: ImageConfig | VideoConfig, items: pa.Table, model_uri: str, out_uri: str, gpu: bool
):
    decode, decode_kwargs, _ = decoder(media)
    ds = items_dataset(items, cfg.block_rows).map_batches(
        decode, fn_kwargs=decode_kwargs, batch_size=cfg.batch_size, batch_format="numpy"
    )
    ds = ds.map_batches(
        Extractor,
        fn_constructor_kwargs={
            "model_uri": storage.absolute(model_uri),
            "layers": cfg.layers,
            "mean": media.mean,
            "std": media.std,
            "use_gpu": gpu,
            "threads": cfg.torch_threads or int(cfg.cpus_per_actor),
            "precision": cfg.precision,
            "channels_last": cfg.channels_last,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_gpus=1 if gpu else 0,
        num_cpus=cfg.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
    )
    ds.set_name(
        "extract_" + "_".join(out_uri.rstrip("/").split("/")[-2:])
    )  # e.g. extract_pretrained_source in the dashboard
    ds.write_datasink(PartSink(storage.absolute(out_uri)))


def read_features(uri: str, layer: str, with_labels: bool = False):
    """(ids, features float32 (n,d)[, labels]) of the rows that decoded fine, from a complete output."""
    require_complete(uri)
    cols = ["id", "error", f"feat_{layer}"] + (["label"] if with_labels else [])
    fs, _ = storage.resolve(uri)
    t = pa.concat_tables([pq.read_table(storage.resolve(f)[1], filesystem=fs, columns=cols) for f in part_files(uri)])
    t = t.filter(pc.equal(t["error"], ""))
    col = t[f"feat_{layer}"].combine_chunks()
    d = col.type.list_size
    feats = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32, copy=False)
    ids = t["id"].to_pylist()
    if with_labels:
        return ids, feats, t["label"].to_pylist()
    return ids, feats
