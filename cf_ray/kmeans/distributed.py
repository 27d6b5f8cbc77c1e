"""Sharded k-means over Ray actors: every actor owns some feature files, the driver owns the centroids.

Per iteration the driver puts the centroids in the object store once; each ShardActor returns the
sums, counts and objective of its own rows; the driver adds them up in shard order (deterministic),
splits empty clusters like faiss and checkpoints. Only k x d arrays travel; rows never leave their
actor, so memory is bounded by what each actor holds (its rows, float32) plus k x d on the driver.

Rows are numbered globally in sorted-file order and files go to actors in contiguous blocks, so the
seeded initial sample, and hence the result, does not depend on the number of actors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from cf_ray import metrics, runtime, storage
from cf_ray.kmeans import _checkpoint as ckpt
from cf_ray.kmeans import core, device
from cf_ray.kmeans._blas import faiss_blas_note
from cf_ray.kmeans.device import import_faiss

logger = logging.getLogger(__name__)

KPP_SAMPLE_PER_CLUSTER = 20  # k-means++ runs on a seeded sample of this many rows per cluster


class ShardError(RuntimeError):
    """A shard actor failed for good (restarts and re-issues used up) or its files are unusable."""


# --- reading feature shards ------------------------------------------------------------------------


def partition_rows(rows: list[int], parts: int) -> list[list[int]]:
    """Split file indices into <= parts contiguous, non-empty blocks of about equal row counts."""
    parts = max(1, min(parts, len(rows)))
    cum = np.cumsum(rows)
    bounds = [0]
    for b in range(1, parts):  # block b-1 ends after the first file where b/parts of the rows are reached
        cut = int(np.searchsorted(cum, cum[-1] * b / parts)) + 1
        bounds.append(min(max(cut, bounds[-1] + 1), len(rows) - (parts - b)))
    bounds.append(len(rows))
    return [list(range(bounds[j], bounds[j + 1])) for j in range(parts)]


def read_shard(files: list[str], layer: str, l2: bool, batch_rows: int = 65536) -> tuple[pa.ChunkedArray, np.ndarray]:
    """(ids, float32 features (n, d)) of the rows with error == '' in these files, L2-normalised if asked.

    Files are read in record batches straight into one preallocated array, so the transient Arrow
    memory is one batch, not one file: an actor's footprint is its rows plus a constant.
    """
    col = f"feat_{layer}"
    located = [storage.resolve(f) for f in files]
    schema = pq.read_schema(located[0][1], filesystem=located[0][0])
    if col not in schema.names:
        feats = [n[5:] for n in schema.names if n.startswith("feat_")]
        raise ShardError(f"{files[0]} has no column {col}; layers in this file: {feats}")
    d = schema.field(col).type.list_size
    total = sum(pq.read_metadata(p, filesystem=fs).num_rows for fs, p in located)
    x = np.empty((total, d), dtype=np.float32)
    ids, pos = [], 0
    for f, (fs, p) in zip(files, located):
        with fs.open_input_file(p) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=["id", "error", col]):
                batch = batch.filter(pc.equal(batch["error"], ""))
                feat = batch[col]
                if feat.null_count:
                    raise ShardError(f"{f}: {feat.null_count} rows have error == '' but no {col} vector")
                block = feat.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
                x[pos : pos + len(block)] = core.l2_normalize(block) if l2 else block
                ids.append(batch["id"].cast(pa.string()))
                pos += len(block)
    pa.default_memory_pool().release_unused()
    return pa.chunked_array(ids, pa.string()), (x if pos == total else x[:pos].copy())


# --- the actor -----------------------------------------------------------------------------------


class ShardActor:
    """Holds some files' rows in memory; everything it computes is a function of its call arguments.

    A restarted actor re-reads its files in ``__init__``; the preprocessing transform travels with each
    call and is applied on first use, so a restart mid-fit is invisible to the driver.
    """

    def __init__(self, files: list[str], layer: str, l2: bool, threads: int, gpu: bool, shard: int):
        """``gpu``: Ray gave this actor a GPU; faiss uses it only if this node's faiss build can (decided here)."""
        faiss = import_faiss()

        faiss.omp_set_num_threads(max(1, threads))
        self.files, self.shard = files, shard
        self.device, self.device_note = device.choose(gpu)
        self.use_gpu = self.device == "cuda"
        self.ids, self.x = read_shard(files, layer, l2)
        self.token = None  # which transform self.x is in (None: only L2)
        self._train = (None, None)  # (key of the training subset, its rows) when fitting on a subsample
        self._gpu = None
        self.blas_note = None if self.use_gpu else faiss_blas_note()

    def info(self) -> dict:
        import resource

        return {
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "rows": len(self.x),
            "dim": int(self.x.shape[1]),
            "gpu": self.use_gpu,
            "device": device.describe(self.device),
            "device_note": self.device_note,
            "token": self.token,
            "blas_note": self.blas_note,
            "bytes": int(self.x.nbytes),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }

    def column_sum(self) -> np.ndarray:
        self._require_raw()
        return self.x.sum(0, dtype=np.float64)  # numpy casts in small buffers: no float64 copy of the shard

    def centred_gram(self, mean: np.ndarray) -> np.ndarray:
        self._require_raw()
        return core.centred_gram(self.x, mean)

    def rows(self, local_idx: np.ndarray, token: str | None, transform: dict | None) -> np.ndarray:
        self._ensure(token, transform)
        return self.x[local_idx]

    def step(
        self,
        centroids: np.ndarray,
        token: str | None,
        transform: dict | None,
        spherical: bool,
        subset: tuple[str, np.ndarray] | None = None,
    ):
        """(sums float32 (k,d), counts (k,), objective, seconds) of this shard's rows (or of the ``subset``
        (key, local row indices) being trained on) against the centroids."""
        self._ensure(token, transform)
        t0 = time.time()
        x = self._subset_rows(subset) if subset is not None else self.x
        sums, counts, obj = core.partial_stats(x, centroids, spherical, self._index(centroids, spherical))
        return sums.astype(np.float32), counts, obj, time.time() - t0

    def write_assignments(
        self, centroids: np.ndarray, token: str | None, transform: dict | None, spherical: bool, path: str
    ):
        """Write (id, cluster, distance = squared L2) of this shard to ``path``; return (sizes, sum of distance)."""
        self._ensure(token, transform)
        labels, score = core.nearest(self.x, centroids, spherical, self._index(centroids, spherical))
        dist = score if not spherical else self._sq_dist(labels, score, centroids)
        table = pa.table({"id": self.ids, "cluster": pa.array(labels), "distance": pa.array(dist.astype(np.float32))})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(path, sink.getvalue().to_pybytes())
        return np.bincount(labels, minlength=len(centroids)), float(dist.astype(np.float64).sum())

    def _subset_rows(self, subset: tuple[str, np.ndarray]) -> np.ndarray:
        """The training subsample, copied once (it is small next to the shard) and kept for later iterations."""
        key, idx = subset
        if self._train[0] != (key, self.token):
            self._train = ((key, self.token), np.ascontiguousarray(self.x[idx]))
        return self._train[1]

    def _sq_dist(self, labels, ip, centroids) -> np.ndarray:
        c2 = np.einsum("ij,ij->i", centroids, centroids)
        x2 = np.einsum("ij,ij->i", self.x, self.x)
        return np.maximum(x2 + c2[labels] - 2 * ip, 0)

    def _require_raw(self) -> None:
        if self.token is not None:
            raise ShardError("moments asked of an actor whose rows are already whitened; start a new ShardPool")

    def _ensure(self, token: str | None, transform: dict | None) -> None:
        if token == self.token:
            return
        if self.token is not None:
            raise ShardError(
                f"actor rows are whitened with transform {self.token}, asked for {token}; start a new ShardPool"
            )
        self.x = core.pca_whiten_apply_blocks(self.x, transform)
        self.token = token

    def _index(self, centroids: np.ndarray, spherical: bool):
        if not self.use_gpu:
            return None  # CPU: faiss.knn with this actor's omp threads
        if self._gpu is None:
            self._gpu = device.GpuFlatIndex()
        return self._gpu.of(centroids, spherical)


# --- the driver's handle on the actors -------------------------------------------------------------


def _add(acc, r):
    return r if acc is None else acc + r


def _add_step(acc, r):
    """Fold of step results: float64 sums, int64 counts, summed objective, slowest shard's time."""
    sums, counts, obj, secs = r
    if acc is None:
        return sums.astype(np.float64), counts.astype(np.int64), obj, secs
    acc_sums, acc_counts, acc_obj, acc_secs = acc
    acc_sums += sums
    acc_counts += counts
    return acc_sums, acc_counts, acc_obj + obj, max(acc_secs, secs)


def _gpu_wanted(use_gpu: bool | None) -> bool:
    """Whether each actor asks Ray for a GPU: None = where the cluster has one. The driver's faiss build plays no
    part: each actor checks its own (ShardActor.__init__)."""
    if use_gpu is None:
        return runtime.cluster_gpus() > 0
    if use_gpu and runtime.cluster_gpus() == 0 and not os.environ.get("RAY_ADDRESS"):
        raise ShardError("use_gpu=True but the Ray cluster has no GPU; use use_gpu=None (auto) or False")
    return bool(use_gpu)


class ShardPool:
    """Ray actors that together hold all rows of ``files``; calls fan out and come back in shard order.

    An actor that dies is restarted by Ray (``max_restarts``) and its calls retried (``max_task_retries``);
    if it is still lost the driver replaces it and re-issues the call (``max_reissues`` per actor).
    """

    def __init__(
        self,
        files: list[str],
        layer: str,
        num_actors: int,
        cpus_per_actor: float = 1,
        l2: bool = True,
        use_gpu: bool | None = None,
        max_restarts: int = 3,
        max_reissues: int = 2,
        start_timeout_s: float = 300,
    ):
        if not ray.is_initialized():
            raise RuntimeError("ShardPool needs Ray: call cf_ray.runtime.init_ray() first")
        if not files:
            raise ValueError("ShardPool needs at least one feature file")
        self.files = sorted(storage.absolute(f) for f in files)
        rows = [pq.read_metadata(p, filesystem=fs).num_rows for fs, p in map(storage.resolve, self.files)]
        self.parts = [[self.files[i] for i in block] for block in partition_rows(rows, num_actors)]
        self.gpu = _gpu_wanted(use_gpu)
        self.layer, self.l2, self.max_reissues = layer, l2, max_reissues
        self._cls = ray.remote(ShardActor).options(
            num_cpus=cpus_per_actor,
            num_gpus=1 if self.gpu else 0,
            max_restarts=max_restarts,
            max_task_retries=max_restarts,
        )
        self._threads = max(1, int(round(cpus_per_actor)))
        self.actors = [self._new_actor(i) for i in range(len(self.parts))]
        self.reissues = [0] * len(self.actors)
        self._wait_started(cpus_per_actor, start_timeout_s)
        infos = self.call("info")
        self.sizes = np.array([i["rows"] for i in infos], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.n, self.d = int(self.offsets[-1]), int(infos[0]["dim"])
        self.token, self._transform_ref, self.transform = None, None, None
        self._subset_refs = None  # per-shard (key, local indices) while training on a subsample
        logger.info(
            f"kmeans[ray]: {self.n} rows x {self.d} ({layer}) in {len(self.files)} files on {len(self.actors)} "
            f"actor(s), "
            f"{cpus_per_actor} CPU{' + 1 GPU' if self.gpu else ''} each"
        )
        for note in sorted(
            {i["blas_note"] for i in infos if i["blas_note"]} | {i["device_note"] for i in infos if i["device_note"]}
        ):
            logger.info(f"kmeans[ray]: note: {note}")
        self._devices = [{"device": i["device"], "note": i["device_note"]} for i in infos]

    def devices(self) -> list[dict]:
        """Per actor: the device its faiss ran on ('cpu' or 'cuda (name)') and why not the GPU, if one was asked."""
        return list(self._devices)

    def _wait_started(self, cpus: float, timeout_s: float) -> None:
        """Fail with the resource picture instead of waiting forever for actors that cannot be placed."""
        refs = [a.info.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if len(ready) < len(refs):
            free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            self.shutdown()
            raise ShardError(
                f"{len(refs) - len(ready)} of {len(refs)} k-means shard actors did not start within {timeout_s:.0f} "
                f"s; each needs "
                f"{cpus} CPU{' and 1 GPU' if self.gpu else ''}, the cluster has {free} free: lower num_actors or "
                f"cpus_per_actor"
            )

    def _new_actor(self, i: int):
        return self._cls.remote(self.parts[i], self.layer, self.l2, self._threads, self.gpu, i)

    def _replace(self, i: int, err: Exception) -> None:
        if self.reissues[i] >= self.max_reissues:
            raise ShardError(
                f"shard {i} ({len(self.parts[i])} files from {self.parts[i][0]}) failed {self.reissues[i] + 1} "
                f"times: {err}"
            ) from err
        self.reissues[i] += 1
        logger.info(f"kmeans[ray]: shard {i} lost ({type(err).__name__}); starting a new actor and re-issuing the call")
        ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self._new_actor(i)

    def call(
        self, method: str, *args, per_shard: Callable[[int], tuple] | None = None, combine: Callable | None = None
    ):
        """Call ``method`` on every actor; results in shard order (list), or folded by ``combine(acc, r)``.

        The fold starts from acc=None and runs in shard order (results arriving early wait in a buffer),
        so it is deterministic. ``per_shard(i)`` gives actor-specific extra arguments.
        """

        def submit(i):
            return getattr(self.actors[i], method).remote(*args, *(per_shard(i) if per_shard else ()))

        pending = {submit(i): i for i in range(len(self.actors))}
        done, acc, nxt, out = {}, None, 0, []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                done[i] = ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                self._replace(i, e)
                pending[submit(i)] = i
                continue
            while nxt in done:
                r = done.pop(nxt)
                if combine is None:
                    out.append(r)
                else:
                    acc = combine(acc, r)
                nxt += 1
        return out if combine is None else acc

    def set_transform(self, transform: dict | None) -> None:
        self.transform = transform
        if transform is None:
            self.token, self._transform_ref = None, None
            return
        h = hashlib.sha1(transform["mean"].tobytes() + transform["proj"].tobytes())
        self.token, self._transform_ref = h.hexdigest()[:16], ray.put(transform)
        self.d = int(transform["proj"].shape[1])

    def rows(self, global_idx: np.ndarray) -> np.ndarray:
        """Rows by global index (sorted-file order), preprocessed, in the order asked."""
        global_idx = np.asarray(global_idx, dtype=np.int64)
        shard = np.searchsorted(self.offsets, global_idx, side="right") - 1
        wanted = {i: global_idx[shard == i] - self.offsets[i] for i in range(len(self.actors))}
        parts = self.call("rows", per_shard=lambda i: (wanted[i], self.token, self._transform_ref))
        out = np.empty((len(global_idx), self.d), dtype=np.float32)
        for i, p in enumerate(parts):
            out[shard == i] = p
        return out

    def set_subset(self, global_idx: np.ndarray | None) -> None:
        """Train on these rows only (global indices, as faiss's max_points_per_centroid sample); None: all rows."""
        if global_idx is None:
            self._subset_refs = None
            return
        global_idx = np.sort(np.asarray(global_idx, dtype=np.int64))
        key = hashlib.sha1(global_idx.tobytes()).hexdigest()[:16]
        shard = np.searchsorted(self.offsets, global_idx, side="right") - 1
        self._subset_refs = [ray.put((key, global_idx[shard == i] - self.offsets[i])) for i in range(len(self.parts))]

    def step(self, centroids: np.ndarray, spherical: bool) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Combined (sums float64, counts, objective, slowest shard's seconds) of one Lloyd iteration."""
        ref = ray.put(np.ascontiguousarray(centroids, dtype=np.float32))
        subsets = self._subset_refs
        return self.call(
            "step",
            ref,
            self.token,
            self._transform_ref,
            spherical,
            per_shard=(lambda i: (subsets[i],)) if subsets else None,
            combine=_add_step,
        )

    def write_assignments(self, out_dir: str, centroids: np.ndarray, spherical: bool) -> tuple[np.ndarray, float]:
        """Every actor writes ``out_dir/part-NNNNN.parquet``; returns (cluster sizes, summed squared distance)."""
        ref = ray.put(np.ascontiguousarray(centroids, dtype=np.float32))
        return self.call(
            "write_assignments",
            ref,
            self.token,
            self._transform_ref,
            spherical,
            per_shard=lambda i: (storage.join(out_dir, f"part-{i:05d}.parquet"),),
            combine=lambda acc, r: r if acc is None else (acc[0] + r[0], acc[1] + r[1]),
        )

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


# --- the fit --------------------------------------------------------------------------------------


def fit_transform(pool: ShardPool, pca_dim: int) -> dict:
    """PCA-whitening from shard moments: sum, then the centred X^T X (two passes, numerically safe)."""
    mean = pool.call("column_sum", combine=_add) / max(1, pool.n)
    gram = pool.call("centred_gram", mean, combine=_add)
    return core.pca_whiten_from_cov(mean.astype(np.float32), gram / max(1, pool.n - 1), pca_dim)


def _seed(seed: int) -> int:
    return seed & 0xFFFFFFFF


def training_rows(n: int, k: int, max_points_per_centroid: int, seed: int) -> np.ndarray | None:
    """faiss's subsampling: above k * max_points_per_centroid rows, train on a seeded sample of that many."""
    m = k * max_points_per_centroid
    return None if n <= m else np.sort(core.sample_indices(n, m, _seed(seed)))


def initial_centroids(pool: ShardPool, k: int, init: str, seed: int, among: np.ndarray | None = None) -> np.ndarray:
    """'random': k distinct seeded rows (== core.init_random on all rows); 'kmeans++': on a seeded sample.

    With ``among`` (global indices of the training subsample) the rows are drawn from those only.
    """
    n = pool.n if among is None else len(among)
    pick = (lambda idx: idx) if among is None else (lambda idx: among[idx])
    if init == "random":
        return pool.rows(pick(core.sample_indices(n, k, _seed(seed))))
    if init == "kmeans++":
        m = min(n, max(KPP_SAMPLE_PER_CLUSTER * k, 10_000))
        return core.init_kmeanspp(pool.rows(pick(core.sample_indices(n, m, _seed(seed)))), k, _seed(seed))
    raise ValueError(f"unknown init {init!r}; use 'random' or 'kmeans++'")


def _transform_for(pool: ShardPool, pca_dim: int | None) -> dict | None:
    """The pool's whitening if it already has one of this size (it depends only on the rows), else a new fit."""
    if pool.transform is not None and (not pca_dim or pool.transform["proj"].shape[1] != pca_dim):
        raise ValueError(
            f"this ShardPool's rows are whitened to {pool.d} dims, the fit asks for pca_dim={pca_dim}; use a new "
            f"ShardPool"
        )
    if not pca_dim:
        return None
    return pool.transform if pool.transform is not None else fit_transform(pool, pca_dim)


def _fingerprint(pool: ShardPool, cfg, init_centroids: np.ndarray | None) -> dict:
    given = (
        hashlib.sha1(np.ascontiguousarray(init_centroids, dtype=np.float32).tobytes()).hexdigest()
        if init_centroids is not None
        else None
    )
    return {
        "files": [os.path.basename(f) for f in pool.files],
        "n": pool.n,
        "layer": pool.layer,
        "k": cfg.k,
        "seed": cfg.seed,
        "init": cfg.init,
        "init_centroids": given,
        "spherical": cfg.spherical,
        "l2_normalize": cfg.l2_normalize,
        "pca_dim": cfg.pca_dim,
        "max_points_per_centroid": cfg.max_points_per_centroid,
    }


def _start(
    pool: ShardPool, cfg, checkpoint_uri: str | None, init_centroids: np.ndarray | None, fingerprint: dict
) -> ckpt.FitState:
    subset = training_rows(pool.n, cfg.k, cfg.max_points_per_centroid, cfg.seed)
    pool.set_subset(subset)
    if subset is not None:
        logger.info(
            f"kmeans[ray]: training on a seeded sample of {len(subset)} of {pool.n} rows (max_points_per_centroid="
            f"{cfg.max_points_per_centroid}); every row is assigned at the end"
        )
    state = ckpt.load_state(checkpoint_uri, fingerprint) if checkpoint_uri else None
    if state is not None:
        pool.set_transform(state.transform)
        logger.info(f"kmeans[ray]: resuming from {checkpoint_uri} after iteration {state.iteration}")
        return state
    pool.set_transform(_transform_for(pool, cfg.pca_dim))
    if init_centroids is not None:
        c = np.ascontiguousarray(init_centroids, dtype=np.float32)
        if c.shape != (cfg.k, pool.d):
            raise ValueError(f"init_centroids has shape {c.shape}, expected ({cfg.k}, {pool.d})")
    else:
        c = initial_centroids(pool, cfg.k, cfg.init, cfg.seed, among=subset)
    state = ckpt.FitState(0, c, [], False, pool.transform)
    if checkpoint_uri:
        if pool.transform is not None:
            ckpt.save_transform(checkpoint_uri, pool.transform)
        ckpt.save_state(checkpoint_uri, state, fingerprint)
    return state


def _converged(history: list[dict], tol: float) -> bool:
    if tol <= 0 or len(history) < 2:
        return False
    prev, cur = history[-2]["obj"], history[-1]["obj"]
    return abs(prev - cur) <= tol * max(abs(prev), 1e-30)


def lloyd_iteration(
    pool: ShardPool, centroids: np.ndarray, it: int, seed: int, spherical: bool
) -> tuple[np.ndarray, dict]:
    """One assignment + update; the split RNG is seeded by (seed, it) so a resumed fit draws the same."""
    t0 = time.time()
    sums, counts, obj, t_search = pool.step(centroids, spherical)
    rng = np.random.default_rng([_seed(seed), it])
    new, nsplit = core.update_centroids(sums, counts, centroids, rng, spherical)
    rec = {
        "iter": it,
        "obj": obj,
        "imbalance": core.imbalance_factor(counts),
        "nsplit": nsplit,
        "empty": int((counts == 0).sum()),
        "time": round(time.time() - t0, 4),
        "time_search": round(t_search, 4),
    }
    return new, rec


def fit_distributed(
    files: list[str],
    layer: str,
    cfg,
    num_actors: int,
    cpus_per_actor: float,
    checkpoint_uri: str | None = None,
    *,
    pool: ShardPool | None = None,
    init_centroids: np.ndarray | None = None,
    callback: Callable[[dict], None] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Lloyd's k-means over Ray actors; returns (centroids float32 (k, d'), per-iteration history).

    ``cfg`` is a ClusterConfig (k, niter, seed, tol, init, spherical, l2_normalize, pca_dim and
    max_points_per_centroid are used: above k * max_points_per_centroid rows the iterations run on a
    seeded sample of that many rows, as faiss does; PCA is fitted on all rows).
    History records (as faiss's iteration_stats): obj (before the update), imbalance, nsplit, empty,
    time, time_search. With ``checkpoint_uri`` every iteration is saved and a rerun resumes from it.
    Pass ``pool`` to reuse loaded actors (then files, layer, num_actors and cpus_per_actor come from it,
    and its ``transform`` holds the fitted PCA-whitening afterwards); ``init_centroids`` (k, d') replaces
    cfg.init; ``callback(record)`` is called after each iteration is checkpointed.
    """
    own = pool is None
    pool = pool or ShardPool(files, layer, num_actors, cpus_per_actor, l2=cfg.l2_normalize)
    if pool.l2 != cfg.l2_normalize:
        raise ValueError(f"the ShardPool was built with l2={pool.l2} but cfg.l2_normalize={cfg.l2_normalize}")
    try:
        if cfg.k > pool.n:
            raise ValueError(f"k={cfg.k} is larger than the {pool.n} rows with features")
        fingerprint = _fingerprint(pool, cfg, init_centroids)
        state = _start(pool, cfg, checkpoint_uri, init_centroids, fingerprint)
        for it in range(state.iteration, cfg.niter):
            if state.converged:
                break
            state.centroids, rec = lloyd_iteration(pool, state.centroids, it, cfg.seed, cfg.spherical)
            state.history.append(rec)
            state.iteration, state.converged = it + 1, _converged(state.history, cfg.tol)
            if checkpoint_uri:
                ckpt.save_state(checkpoint_uri, state, fingerprint)
            metrics.kmeans_iteration(rec["obj"], layer)
            logger.info(
                f"kmeans[ray] it {it}: obj {rec['obj']:.6g} imbalance {rec['imbalance']:.3f} nsplit {rec['nsplit']} "
                f"{rec['time']:.2f}s"
            )
            if callback:
                callback(rec)
        return state.centroids, state.history
    finally:
        pool.set_subset(None)
        if own:
            pool.shutdown()
