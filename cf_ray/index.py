"""Nearest-neighbour search over embeddings: a faiss index built as a Ray task, stored beside the features.

``build_index`` takes a features folder (a run's ``features/<model>/<dataset>``, a model's own source features
under ``own_clusters/``, or a ``cf-ray embed`` output) and writes ``<features>/_index/``:
``index.faiss`` (a CPU index), ``ids.parquet`` (row -> id, path) and ``index.json`` (kind, metric, sizes, and the
run, model and layer whose embeddings it holds, so a query is embedded the same way). ``search`` embeds a query
file with that model and returns its k nearest rows.

Which index (``IndexConfig.kind=auto``): exact (``IndexFlat``) up to ``flat_max`` rows, IVF-Flat up to ``pq_min``,
IVF-PQ above. ``metric=cosine`` L2-normalises (stored and query vectors) and searches by inner product.
"""

from __future__ import annotations

import io
import logging
import math
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cf_ray import storage
from cf_ray.api import ApiError
from cf_ray.config import IndexConfig

log = logging.getLogger(__name__)

INDEX_DIR = "_index"


# --------------------------------------------------------------------------- the index itself (pure faiss)


def choose_kind(n: int, cfg: IndexConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    if n <= cfg.flat_max:
        return "flat"
    return "ivf" if n < cfg.pq_min else "ivfpq"


def default_nlist(n: int, cfg: IndexConfig) -> int:
    if cfg.nlist:
        return max(1, min(cfg.nlist, n))
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def make_index(x: np.ndarray, cfg: IndexConfig, gpu: bool = False):
    """A trained faiss index holding ``x`` (float32, already normalised for cosine) -> (index, params)."""
    import faiss

    n, d = x.shape
    kind = choose_kind(n, cfg)
    metric = faiss.METRIC_INNER_PRODUCT if cfg.metric == "cosine" else faiss.METRIC_L2
    params = {"kind": kind, "n": int(n), "d": int(d), "metric": cfg.metric}
    if kind == "flat":
        index = faiss.IndexFlatIP(d) if metric == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(d)
    else:
        nlist = default_nlist(n, cfg)
        quantizer = faiss.IndexFlatIP(d) if metric == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(d)
        if kind == "ivfpq":
            if d % cfg.pq_m:
                raise ApiError(f"index.pq_m={cfg.pq_m} does not divide the dimension {d}; pick a divisor of {d}")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, cfg.pq_m, cfg.pq_nbits, metric)
            params.update(pq_m=cfg.pq_m, pq_nbits=cfg.pq_nbits)
        else:
            index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
        index.cp.seed = cfg.seed
        params.update(nlist=nlist, nprobe=cfg.nprobe)
        if gpu:
            res = faiss.StandardGpuResources()
            gindex = faiss.index_cpu_to_gpu(res, 0, index)
            gindex.train(_sample(x, cfg))
            gindex.add(x)
            index = faiss.index_gpu_to_cpu(gindex)
        else:
            index.train(_sample(x, cfg))
        index.nprobe = cfg.nprobe
    if not gpu or kind == "flat":
        index.add(x)
    params["gpu"] = bool(gpu and kind != "flat")
    return index, params


def _sample(x: np.ndarray, cfg: IndexConfig) -> np.ndarray:
    if len(x) <= cfg.train_size:
        return x
    keep = np.sort(np.random.default_rng(cfg.seed).choice(len(x), cfg.train_size, replace=False))
    return np.ascontiguousarray(x[keep])


def prepare(x: np.ndarray, metric: str) -> np.ndarray:
    from cf_ray.kmeans.core import l2_normalize

    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.ascontiguousarray(l2_normalize(x), dtype=np.float32) if metric == "cosine" else x


# --------------------------------------------------------------------------- features folders


def read_vectors(uri: str, layer: str) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, paths, float32 (n, d)) of the usable rows of a features folder or an embed output."""
    from cf_ray import features

    col = vector_column(uri, layer)
    t = features.read_table(uri, ["id", "path", col])
    c = t[col].combine_chunks()
    if t.num_rows == 0:
        return [], [], np.zeros((0, c.type.list_size), np.float32)
    x = c.flatten().to_numpy(zero_copy_only=False).reshape(-1, c.type.list_size).astype(np.float32, copy=False)
    return t["id"].to_pylist(), t["path"].to_pylist(), x


def vector_column(uri: str, layer: str) -> str:
    """The column holding the vectors (``embedding`` in an embed output, else ``feat_<layer>``), after the
    cheap checks: one-line errors before any Ray work."""
    from cf_ray import features

    if not storage.exists(uri):
        raise ApiError(
            f"features folder {uri} does not exist; pass a run's features/<model>/<dataset> or an embed --out"
        )
    try:
        names = features.dataset(uri).schema.names
    except storage.IncompleteOutputError as e:
        raise ApiError(str(e)) from None
    except FileNotFoundError:
        raise ApiError(f"{uri} holds no part-*.parquet files; pass a features folder or an embed output") from None
    if "embedding" in names:
        return "embedding"
    if features.column(layer) not in names:
        have = [n.removeprefix("feat_") for n in names if n.startswith("feat_")]
        raise ApiError(f"{uri} has no {layer} features; use --layer with one of {', '.join(have)}")
    return features.column(layer)


def describe_source(uri: str, layer: str) -> dict:
    """Whose embeddings a features folder holds: {run_dir, model, layer} (values None where unknown)."""
    meta = storage.join(uri, "_embed.json")
    if storage.exists(meta):
        m = storage.read_json(meta)
        return {"run_dir": m["run_dir"], "model": m["model"], "layer": m["layer"], "from": "embed"}
    parent = posixpath.dirname(uri.rstrip("/"))
    own = storage.join(parent, "own.json")
    if uri.rstrip("/").endswith("/features") and storage.exists(own):
        m = storage.read_json(own)
        run = posixpath.dirname(posixpath.dirname(parent))
        return {"run_dir": run, "model": m["model"], "layer": m["layer"], "from": "own_clusters"}
    parts = uri.rstrip("/").split("/")
    if len(parts) >= 4 and parts[-3] == "features":
        run = "/".join(parts[:-3])
        if storage.exists(storage.join(run, "config.yaml")):
            return {"run_dir": run, "model": parts[-2], "layer": layer, "from": f"features/{parts[-2]}/{parts[-1]}"}
    return {"run_dir": None, "model": None, "layer": layer, "from": uri}


def _build_task(uri: str, layer: str, cfg: IndexConfig, gpu: bool) -> dict:
    """Runs in a Ray task: read the vectors, build, write ``<uri>/_index``."""
    import faiss

    faiss.omp_set_num_threads(max(1, int(cfg.num_cpus)))
    t0 = time.time()
    ids, paths, x = read_vectors(uri, layer)
    if len(ids) == 0:
        raise ApiError(f"{uri} has no usable rows to index")
    x = prepare(x, cfg.metric)
    t_read = time.time() - t0
    index, params = make_index(x, cfg, gpu)
    out = storage.join(uri, INDEX_DIR)
    storage.write_bytes(storage.join(out, "index.faiss"), faiss.serialize_index(index).tobytes())
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "path": pa.array(paths, pa.string())}), buf)
    storage.write_bytes(storage.join(out, "ids.parquet"), buf.getvalue())
    info = {
        **params,
        **describe_source(uri, layer),
        "layer": layer,
        "features": uri,
        "read_seconds": round(t_read, 2),
        "build_seconds": round(time.time() - t0 - t_read, 2),
    }
    storage.write_json(storage.join(out, "index.json"), info)
    return {**info, "index": out}


def build_index(uri: str, layer: str = "res5", cfg: IndexConfig | None = None) -> dict:
    """Build the index of ``uri`` (a features folder or an embed output) as one Ray task; returns index.json."""
    import ray

    from cf_ray.runtime import init_ray, want_gpu

    cfg = cfg or IndexConfig()
    uri = storage.absolute(uri)
    vector_column(uri, layer)
    init_ray()
    gpu = want_gpu(cfg.use_gpu) and _faiss_gpu()
    task = ray.remote(num_cpus=cfg.num_cpus, num_gpus=1 if gpu else 0)(_build_task)
    return ray.get(task.remote(uri, layer, cfg, gpu))


def _faiss_gpu() -> bool:
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except ImportError:
        return False


# --------------------------------------------------------------------------- search


class Searcher:
    """A stored index, ready for queries: ``search(vectors, k)`` or ``search_files(files, k)``."""

    def __init__(self, index_uri: str, nprobe: int | None = None):
        import faiss

        uri = index_uri.rstrip("/")
        if not storage.exists(storage.join(uri, "index.json")) and storage.exists(
            storage.join(uri, INDEX_DIR, "index.json")
        ):
            uri = storage.join(uri, INDEX_DIR)  # the features folder was given
        if not storage.exists(storage.join(uri, "index.json")):
            raise ApiError(f"no index at {index_uri}; build one with `cf-ray index --features <folder>`")
        self.uri, self.info = uri, storage.read_json(storage.join(uri, "index.json"))
        self.index = faiss.deserialize_index(
            np.frombuffer(storage.read_bytes(storage.join(uri, "index.faiss")), np.uint8)
        )
        if nprobe is not None and hasattr(self.index, "nprobe"):
            self.index.nprobe = nprobe
        fs, p = storage.resolve(storage.join(uri, "ids.parquet"))
        t = pq.read_table(p, filesystem=fs)
        self.ids, self.paths = t["id"].to_pylist(), t["path"].to_pylist()
        self._model = None

    def search(self, vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) (n, k): squared L2 distance (l2) or cosine similarity (cosine); rows -1 where fewer."""
        x = prepare(np.atleast_2d(vectors), self.info["metric"])
        if x.shape[1] != self.info["d"]:
            raise ApiError(
                f"query vectors of dimension {x.shape[1]} do not fit this index (dimension {self.info['d']})"
            )
        return self.index.search(x, k)

    def model(self, run_dir: str | None = None, which: str | None = None):
        from cf_ray.api import load_model

        run_dir = run_dir or self.info.get("run_dir")
        which = which or self.info.get("model")
        if not run_dir or not which:
            raise ApiError(f"index {self.uri} does not say which model made its embeddings; pass --run-dir and --model")
        if self._model is None:
            self._model = load_model(run_dir, which=which, centroids="none")
        return self._model

    def search_files(
        self, queries, k: int = 10, run_dir: str | None = None, which: str | None = None
    ) -> list[list[dict]]:
        """Embed query files (paths or bytes) with the index's model and return their k nearest rows each."""
        model = self.model(run_dir, which)
        emb = model.embed(queries, layer=self.info["layer"])
        scores, rows = self.search(emb, k)
        if self.info["metric"] == "cosine":
            scores = 1.0 - scores  # cosine distance: smaller is closer, as for l2
        return [
            [{"id": self.ids[r], "path": self.paths[r], "distance": float(s)} for s, r in zip(srow, rrow) if r >= 0]
            for srow, rrow in zip(scores, rows)
        ]
