"""Extract: items -> decode -> backbone -> a feature folder (cf_ray.features), on a pool of extraction actors.

Ray Data streams the items to the actors (``streaming_split``). Where the actors run on CPUs they decode their
own batches (a thread decodes the next batch while the network runs on this one): nothing but item rows crosses
the object store. Where they run on GPUs, Ray Data decode tasks on the nodes' CPUs feed them decoded pixels.
Each actor commits its rows as part files itself. One pool serves every extraction of a job (``ExtractPool``):
the actors, their imports and the CUDA context start once.

Atomic and resumable: a part file is named by a hash of its ids, and the folder is complete only with its done
marker; a rerun over an incomplete folder keeps the committed parts and extracts only the items none holds.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from cf_ray import features, metrics, storage
from cf_ray.config import ExtractConfig, ImageConfig, VideoConfig
from cf_ray.media.decode import decoder, normalize
from cf_ray.media.items import items_dataset, read_items
from cf_ray.runtime import step_settings, want_gpu

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 15.0


@dataclass(frozen=True)
class ExtractSpec:
    """What one extraction asks of every actor of the pool."""

    model_uri: str
    out_uri: str
    layers: list[str]
    mean: tuple
    std: tuple
    decode: Callable | None  # decode UDF the actor applies itself; None when batches arrive decoded
    decode_kwargs: dict
    batch_size: int
    block_rows: int  # rows per committed part file
    precision: str = "auto"
    channels_last: str = "auto"
    clip_features: bool = False
    post: Callable | None = None  # optional table -> table step (cf-ray embed adds cluster ids)


class ExtractWorker:
    """One extraction actor: the backbone (cached by URI), decode, forward passes, part files."""

    def __init__(self, threads: int, use_gpu: bool):
        import torch

        from cf_ray import log
        from cf_ray.models import checkpoint  # noqa: F401  (the model code's imports: once per actor, not per model)

        log.setup()
        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if use_gpu else "cpu"
        self._model: tuple | None = None  # (uri, model, memory format, autocast)

    def ready(self) -> int:
        return os.getpid()

    def _load(self, spec: ExtractSpec):
        if self._model is None or self._model[0] != spec.model_uri:
            from cf_ray.models import backbone_modality
            from cf_ray.models.checkpoint import load_backbone

            self._model = None  # free the previous backbone first
            model, model_cfg = load_backbone(spec.model_uri)
            video = backbone_modality(model_cfg.arch) == "video"
            fmt, autocast = step_settings(spec.precision, spec.channels_last, self.device, video=video)
            model.eval().to(self.device)
            if fmt is not None:
                model.to(memory_format=fmt)
            self._model = (spec.model_uri, model, fmt, autocast)
        return self._model[1:]

    def extract_rows(self, rows: pa.Table, spec: ExtractSpec) -> dict:
        """Decode, extract and commit one chunk of item rows as one part file (decode=actors)."""
        return self._run(_row_batches(rows, spec.batch_size), spec)

    def extract_shard(self, shard, spec: ExtractSpec) -> dict:
        """Consume this actor's share of a Ray Data stream of decoded batches (decode=tasks); commit a part file
        per ``block_rows`` rows."""
        return self._run(shard.iter_batches(batch_size=spec.batch_size, batch_format="numpy", prefetch_batches=1), spec)

    def _run(self, batches, spec: ExtractSpec) -> dict:
        """Rows done, seconds per phase (the profile), and when the model was loaded (epoch seconds)."""
        t0 = time.perf_counter()
        prof: dict[str, float] = collections.Counter()
        model, fmt, autocast = self._load(spec)
        prof["model_load"] += time.perf_counter() - t0
        rows, pending, ready_at = 0, [], time.time()  # ready_at: model loaded, input in hand
        for batch in _decoded(batches, spec, prof):
            pending.append(self._features(model, fmt, autocast, batch, spec, prof))
            rows += pending[-1].num_rows
            if sum(t.num_rows for t in pending) >= spec.block_rows:
                _commit(pending, spec.out_uri, prof)
                pending = []
        if pending:
            _commit(pending, spec.out_uri, prof)
        return {"rows": rows, "profile": dict(prof), "ready_at": ready_at}

    def _features(self, model, fmt, autocast, batch: dict, spec: ExtractSpec, prof) -> pa.Table:
        import torch

        t0 = time.perf_counter()
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        metrics.items("extract", int(ok.sum()), int((~ok).sum()))
        video = "clips" in batch
        pixels = batch["clips" if video else "image"][ok]
        per_item = pixels.shape[1] if video else 1  # clips per video
        feats = {l: np.zeros((0, per_item, model.feature_info[l]), np.float32) for l in spec.layers}
        if ok.any():
            if video:
                pixels = pixels.reshape(-1, *pixels.shape[2:])  # every clip of every video is one input
            x = normalize(pixels, spec.mean, spec.std, self.device)
            if fmt is not None:
                x = x.contiguous(memory_format=fmt)
            t1 = time.perf_counter()
            prof["to_tensor"] += t1 - t0
            with torch.inference_mode(), autocast():
                out = model.forward_features(x, spec.layers)
            feats = {l: out[l].float().cpu().numpy().reshape(int(ok.sum()), per_item, -1) for l in spec.layers}
            t0 = time.perf_counter()
            prof["model"] += t0 - t1
        columns = {l: feats[l].mean(1) for l in spec.layers}  # a video's feature: the mean over its clips
        if video and spec.clip_features:
            columns.update({f"clip:{l}": feats[l] for l in spec.layers})
        table = features.feature_table(
            batch["id"].tolist(), batch["path"].tolist(), batch["label"].tolist(), batch["error"].tolist(), columns, ok
        )
        if spec.post is not None:
            table = spec.post(table)
        prof["to_arrow"] += time.perf_counter() - t0
        return table


def _row_batches(rows: pa.Table, batch_size: int):
    for i in range(0, rows.num_rows, batch_size):
        t = rows.slice(i, batch_size)
        yield {name: t[name].to_numpy(zero_copy_only=False) for name in t.column_names}


def _decoded(batches, spec: ExtractSpec, prof):
    """The shard's batches, decoded: by the actor (the next batch in a thread while the caller runs the network on
    this one) when ``spec.decode`` is set, else as they arrive. Times the wait for input and the decode."""
    it = iter(batches)

    def fetch():
        t0 = time.perf_counter()
        batch = next(it, None)
        t1 = time.perf_counter()
        prof["wait_input"] += t1 - t0
        if batch is not None and spec.decode is not None:
            batch = spec.decode(batch, **spec.decode_kwargs)
            prof["decode"] += time.perf_counter() - t1
        return batch

    if spec.decode is None:
        while (batch := fetch()) is not None:
            yield batch
        return
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        nxt = pool.submit(fetch)
        while True:
            t0 = time.perf_counter()
            batch = nxt.result()
            prof["wait_decode"] += time.perf_counter() - t0
            if batch is None:
                return
            nxt = pool.submit(fetch)
            yield batch


def _commit(tables: list[pa.Table], out_uri: str, prof) -> None:
    t0 = time.perf_counter()
    features.write_part(out_uri, pa.concat_tables(tables))
    prof["write"] += time.perf_counter() - t0


class ExtractPool:
    """Extraction actors kept for every extraction of a job: start once, load each backbone on demand.

    The actors start on first use; ``close()`` frees their CPUs/GPUs (a job closes the pool before stages that
    need them, e.g. training) and a later use starts them again."""

    def __init__(self, cfg: ExtractConfig):
        self.cfg = cfg
        self.actors: list = []
        self.start_s = 0.0

    def start(self) -> float:
        """Start the actors unless they run: the seconds it took (0 when they were running)."""
        if self.actors:
            return 0.0
        cfg = self.cfg
        self.gpu = want_gpu(cfg.use_gpu)
        self.decode_in_actors = cfg.decode == "actors" or (cfg.decode == "auto" and not self.gpu)
        self.size = pool_size(cfg, self.gpu, self.decode_in_actors)
        threads = cfg.torch_threads or max(1, int(cfg.cpus_per_actor))
        t0 = time.perf_counter()
        cls = ray.remote(ExtractWorker).options(
            num_cpus=cfg.cpus_per_actor,
            num_gpus=1 if self.gpu else 0,
            max_restarts=3,  # a lost actor is restarted and its chunk retried (parts are idempotent)
            max_task_retries=3,
        )
        self.actors = [cls.remote(threads, self.gpu) for _ in range(self.size)]
        ray.get([a.ready.remote() for a in self.actors])
        self.start_s = time.perf_counter() - t0
        logger.info(
            f"extract: {self.size} actor(s) x {threads} thread(s) on {'GPU' if self.gpu else 'CPU'}, decoding in "
            f"{'the actors' if self.decode_in_actors else 'Ray Data tasks'}; started in {self.start_s:.1f}s"
        )
        return self.start_s

    def run_chunks(self, chunks: list[pa.Table], spec: ExtractSpec) -> dict:
        """decode=actors: hand each actor a chunk of item rows as it finishes one, keeping two queued per actor
        (the next call's arguments arrive while it works)."""
        todo, total, results, done = list(reversed(chunks)), sum(c.num_rows for c in chunks), [], 0
        running: dict = {}
        progress = _Progress(total)
        for a in self.actors * 2:
            if todo:
                running[a.extract_rows.remote(todo.pop(), spec)] = a
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            a = running.pop(ref)
            results.append(ray.get(ref))
            done += results[-1]["rows"]
            progress.update(done)
            if todo:
                running[a.extract_rows.remote(todo.pop(), spec)] = a
        return _merge(results)

    def run_stream(self, ds: ray.data.Dataset, spec: ExtractSpec, total: int) -> dict:
        """decode=tasks: Ray Data decode tasks stream decoded batches to the actors (one split each)."""
        shards = ds.streaming_split(self.size, equal=False) if self.size > 1 else [ds.iterator()]
        refs = [a.extract_shard.remote(s, spec) for a, s in zip(self.actors, shards)]
        while ray.wait(refs, num_returns=len(refs), timeout=PROGRESS_EVERY_S)[1]:
            logger.info(f"extract: {total:,} items streaming through {self.size} actor(s)")
        return _merge(ray.get(refs))

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []


class _Progress:
    """Logs items done and the rate every PROGRESS_EVERY_S seconds."""

    def __init__(self, total: int):
        self.total, self.t0, self.last = total, time.time(), time.time()

    def update(self, done: int) -> None:
        now = time.time()
        if now - self.last >= PROGRESS_EVERY_S and done < self.total:
            logger.info(f"extract: {done:,}/{self.total:,} items ({done / (now - self.t0):,.1f} items/s)")
            self.last = now


def pool_size(cfg: ExtractConfig, gpu: bool, decode_in_actors: bool) -> int:
    """num_actors, or where it is 0 (auto): one actor per GPU, or as many as the CPUs take (leaving one CPU for
    the decode tasks when the actors do not decode)."""
    if cfg.num_actors:
        return cfg.num_actors
    resources = ray.cluster_resources()
    if gpu:
        return max(1, int(resources.get("GPU", 1)))
    cpus = resources.get("CPU", 1) - (0 if decode_in_actors else 1)
    return max(1, int(cpus // cfg.cpus_per_actor))


def _merge(results: list[dict]) -> dict:
    prof: dict[str, float] = collections.Counter()
    for r in results:
        prof.update(r["profile"])
    return {
        "rows": sum(r["rows"] for r in results),
        "profile": {k: round(v, 3) for k, v in prof.items()},  # seconds summed over actors
        "ready_at": min(r["ready_at"] for r in results),
    }


def run_extract(
    cfg: ExtractConfig,
    media: ImageConfig | VideoConfig,
    items_uri: str,
    model_uri: str,
    out_uri: str,
    post=None,
    pool: ExtractPool | None = None,
) -> dict:
    """Features of every item (image or video) in ``items_uri`` with the backbone at ``model_uri`` into ``out_uri``.

    ``post``: an optional picklable table -> table callable each actor applies to its output batches.
    ``pool``: the job's actor pool (started here if it is not running); without one, a pool is started for this
    call and closed after it."""
    if storage.is_complete(out_uri):
        logger.info(f"extract: {out_uri} is complete, nothing to do")
        return storage.read_marker(out_uri)
    t0 = time.time()
    items = read_items(items_uri)
    wanted = set(items["id"].to_pylist())
    done = features.committed_ids(out_uri, wanted)
    todo = items.filter(pc.invert(pc.is_in(items["id"], pa.array(sorted(done), pa.string())))) if done else items
    resumed = f" (resuming: {len(done)} already in committed parts)" if done else ""
    logger.info(f"extract: {todo.num_rows} items{resumed}, layers {cfg.layers} -> {out_uri}")
    info = {}
    if todo.num_rows:
        own = pool is None
        pool = pool or ExtractPool(cfg)
        try:
            started = pool.start()
            info = _extract(cfg, media, todo, model_uri, out_uri, pool, post)
        finally:
            if own:
                pool.close()
        info["pool_start_s"] = round(started, 2)
    secs = time.time() - t0
    if features.committed_ids(out_uri, wanted) != wanted:
        raise RuntimeError(
            f"extract: {out_uri} does not hold every one of the {len(wanted)} items; refusing to mark it "
            "complete (rerun to extract the missing ones)"
        )
    ready = info.pop("ready_at", None)
    result = features.finish(
        out_uri,
        {
            "resumed": len(done),
            "seconds": round(secs, 2),
            "items_per_s": round(todo.num_rows / secs, 1) if secs > 0 else None,
            "layers": cfg.layers,
            # the fixed cost, from the call until an actor has its model loaded and its first input in hand: pool
            # start (where this call started it), listing what is done, planning, model load
            "startup_s": round(ready - t0, 2) if ready else None,
            **info,
        },
    )
    logger.info(f"extract: {result['ok']} ok, {result['skipped']} skipped, {result['items_per_s']} items/s")
    return result


def _extract(cfg, media, items: pa.Table, model_uri: str, out_uri: str, pool: ExtractPool, post) -> dict:
    decode, decode_kwargs, _ = decoder(media)
    in_actors = pool.decode_in_actors
    spec = ExtractSpec(
        model_uri=storage.absolute(model_uri),
        out_uri=storage.absolute(out_uri),
        layers=list(cfg.layers),
        mean=tuple(media.mean),
        std=tuple(media.std),
        decode=decode if in_actors else None,
        decode_kwargs=decode_kwargs if in_actors else {},
        batch_size=cfg.batch_size,
        block_rows=cfg.block_rows,
        precision=cfg.precision,
        channels_last=cfg.channels_last,
        clip_features=cfg.clip_features,
        post=post,
    )
    if in_actors:
        n = min(cfg.block_rows, -(-items.num_rows // (2 * pool.size)))  # at least two chunks per actor
        res = pool.run_chunks([items.slice(i, n) for i in range(0, items.num_rows, n)], spec)
    else:
        ds = items_dataset(items, cfg.block_rows).map_batches(
            decode, fn_kwargs=decode_kwargs, batch_size=cfg.batch_size, batch_format="numpy"
        )
        ds.set_name("extract_" + "_".join(out_uri.rstrip("/").split("/")[-2:]))  # e.g. extract_pretrained_source
        res = pool.run_stream(ds, spec, items.num_rows)
    res["decode"] = "actors" if in_actors else "tasks"
    res["actors"] = pool.size
    return res
