"""Extract: items -> decode (Ray Data tasks) -> backbone (actor pool) -> a feature folder (cf_ray.features).

Atomic and resumable: each write task commits one part file named by a hash of its ids, and the folder is
complete only with its done marker; a rerun over an incomplete folder keeps the committed parts and extracts
only the items none of them holds.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from cf_ray import features, metrics, storage
from cf_ray.config import ExtractConfig, ImageConfig, VideoConfig
from cf_ray.media.decode import decoder, normalize
from cf_ray.media.items import items_dataset, read_items
from cf_ray.runtime import step_settings, want_gpu

logger = logging.getLogger(__name__)


class PartSink(Datasink):
    """Each write task commits its rows as one part file of the feature folder."""

    def __init__(self, out_uri: str):
        self.out_uri = out_uri

    def write(self, blocks: Iterable[Block], ctx) -> int:
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        if not tables:
            return 0
        t = pa.concat_tables(tables)
        features.write_part(self.out_uri, t)
        return t.num_rows


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
        clip_features: bool = False,
        post=None,
    ):
        from cf_ray import log
        from cf_ray.models import backbone_modality
        from cf_ray.models.checkpoint import load_backbone

        log.setup()
        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if use_gpu else "cpu"
        self.model, model_cfg = load_backbone(model_uri)
        video = backbone_modality(model_cfg.arch) == "video"
        self.format, self.autocast = step_settings(precision, channels_last, self.device, video=video)
        self.model.eval().to(self.device)
        if self.format is not None:
            self.model.to(memory_format=self.format)
        self.layers, self.mean, self.std, self.clip_features = layers, mean, std, clip_features
        self.post = post  # optional table -> table step on the actor (cf-ray embed adds cluster ids)

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
        columns = {l: feats[l].mean(1) for l in self.layers}  # a video's feature: the mean over its clips
        if video and self.clip_features:
            columns.update({f"clip:{l}": feats[l] for l in self.layers})
        table = features.feature_table(
            batch["id"].tolist(), batch["path"].tolist(), batch["label"].tolist(), batch["error"].tolist(), columns, ok
        )
        return table if self.post is None else self.post(table)


def run_extract(
    cfg: ExtractConfig, media: ImageConfig | VideoConfig, items_uri: str, model_uri: str, out_uri: str, post=None
) -> dict:
    """Features of every item (image or video) in ``items_uri`` with the backbone at ``model_uri`` into ``out_uri``.

    ``post``: an optional picklable table -> table callable each actor applies to its output batches."""
    if storage.is_complete(out_uri):
        logger.info(f"extract: {out_uri} is complete, nothing to do")
        return storage.read_marker(out_uri)
    items = read_items(items_uri)
    wanted = set(items["id"].to_pylist())
    done = features.committed_ids(out_uri, wanted)
    todo = items.filter(pc.invert(pc.is_in(items["id"], pa.array(sorted(done), pa.string())))) if done else items
    gpu = want_gpu(cfg.use_gpu)
    resumed = f" (resuming: {len(done)} already in committed parts)" if done else ""
    logger.info(
        f"extract: {todo.num_rows} items{resumed}, layers {cfg.layers}, "
        f"{cfg.num_actors} actor(s) on {'GPU' if gpu else 'CPU'} -> {out_uri}"
    )
    t0 = time.time()
    if todo.num_rows:
        _extract(cfg, media, todo, model_uri, out_uri, gpu, post)
    secs = time.time() - t0
    if features.committed_ids(out_uri, wanted) != wanted:
        raise RuntimeError(
            f"extract: {out_uri} does not hold every one of the {len(wanted)} items; refusing to mark it "
            "complete (rerun to extract the missing ones)"
        )
    result = features.finish(
        out_uri,
        {
            "resumed": len(done),
            "seconds": round(secs, 2),
            "items_per_s": round(todo.num_rows / secs, 1) if secs > 0 else None,
            "layers": cfg.layers,
        },
    )
    logger.info(f"extract: {result['ok']} ok, {result['skipped']} skipped, {result['items_per_s']} items/s")
    return result


def _extract(
    cfg: ExtractConfig,
    media: ImageConfig | VideoConfig,
    items: pa.Table,
    model_uri: str,
    out_uri: str,
    gpu: bool,
    post=None,
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
            "clip_features": cfg.clip_features,
            "post": post,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_gpus=1 if gpu else 0,
        num_cpus=cfg.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
    )
    ds.set_name("extract_" + "_".join(out_uri.rstrip("/").split("/")[-2:]))  # e.g. extract_pretrained_source
    ds.write_datasink(PartSink(storage.absolute(out_uri)))
