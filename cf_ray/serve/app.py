"""The Serve deployments: an HTTP ingress, a CPU decoder and one batched model per modality.

::

    HTTP ─▶ Ingress (FastAPI: routes, limits, timeouts, errors, metrics)
              ├─▶ Decoder (CPU: bytes or an allowed URI -> uint8 pixels; video length checked first)
              └─▶ ImageModel / VideoModel (@serve.batch: one forward pass per batch; embed, assign, search)

Every call between them carries plain data (bytes, numpy arrays, dicts of numbers and strings) that this code
made itself; what a client sends is only ever decoded as an image, a video or JSON, never unpickled.
"""

# No `from __future__ import annotations` here: serve.ingress pickles the ingress class by value when it is
# decorated, and FastAPI must see real annotation objects (Request, Query) in its routes' signatures.
import asyncio
import logging
import time
from collections import Counter

import numpy as np
from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from cf_ray import metrics, storage
from cf_ray.config import ImageConfig, ServeConfig, VideoConfig
from cf_ray.serve.inputs import HttpError, read_payload

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-cf-ray-timeout-s"  # a client may ask for a shorter deadline than serve.request_timeout_s
BATCH_HEADER = "x-cf-ray-batch-size"  # how many inputs shared this request's forward pass


def _error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": reason, "status": status}, status_code=status, headers=headers)


# --------------------------------------------------------------------------- decoding (CPU)


@serve.deployment
class Decoder:
    """Bytes (or an allowed URI) -> the uint8 array the model takes, with the run's own decoding settings."""

    def __init__(self, media: dict[str, dict], max_bytes: int, max_video_s: float):
        self.media = {
            kind: (VideoConfig if kind == "video" else ImageConfig).model_validate(m) for kind, m in media.items()
        }
        self.max_bytes, self.max_video_s = max_bytes, max_video_s

    async def decode(self, kind: str, data: bytes | None, uri: str | None, timeout_s: float) -> dict:
        return await asyncio.to_thread(self._decode, kind, data, uri, timeout_s)

    def ping(self) -> bool:
        return True

    def _read_uri(self, uri: str) -> bytes:
        fs, p = storage.resolve(uri)
        info = fs.get_file_info(p)
        if info.size is None:
            raise HttpError(404, f"URI {uri!r} does not exist or is not a file")
        if info.size > self.max_bytes:
            raise HttpError(413, f"{uri} is {info.size} bytes, above the {self.max_bytes} byte limit (max_body_mb)")
        return storage.read_bytes(uri)

    def _decode(self, kind: str, data: bytes | None, uri: str | None, timeout_s: float) -> dict:
        from cf_ray.media.image import decode_image
        from cf_ray.media.video import decode_clips, probe_video

        m = self.media[kind]
        try:
            if uri is not None:
                data = self._read_uri(uri)
            if isinstance(m, VideoConfig):
                seconds = probe_video(data)["duration"]
                if seconds > self.max_video_s:
                    raise HttpError(
                        422, f"video is {seconds:.1f} s long, above the {self.max_video_s:g} s limit (max_video_s)"
                    )
                pixels = decode_clips(
                    data,
                    m.num_clips,
                    m.clip_len,
                    m.stride,
                    m.size,
                    m.resize,
                    m.short,
                    timeout_s=max(0.1, min(m.timeout_s, timeout_s)),
                )
            else:
                pixels = decode_image(data, m.size, m.resize)
        except HttpError as e:
            return {"status": e.status, "error": e.reason}
        except ValueError as e:  # the decoders' reasons: corrupt, truncated, not a video, too large, timed out
            return {"status": 422, "error": f"cannot decode the {kind}: {e}"}
        except OSError as e:
            return {"status": 404, "error": f"cannot read {uri}: {e}"}
        return {"pixels": pixels}


# --------------------------------------------------------------------------- the model (GPU where there is one)


@serve.deployment
class ModelServer:
    """One run's network: batched forward passes, then assignment to its centroids and nearest-neighbour search."""

    def __init__(self, run_dir: str, cfg: dict, use_gpu: bool):
        import torch

        from cf_ray.api import load_model

        self.cfg = ServeConfig.model_validate(cfg)
        ctx = serve.get_replica_context()
        torch.set_num_threads(max(1, int(self.cfg.model.num_cpus)))
        self.model = load_model(
            run_dir,
            self.cfg.which,
            device="cuda" if use_gpu else "cpu",
            centroids=self.cfg.centroids,
            precision=self.cfg.precision,
        )
        info = self.model.centroid_info
        self.layer = self.model.check_layer(self.cfg.layer or (info or {}).get("layer") or _run_cluster_layer(run_dir))
        self.assign_layer = info["layer"] if info else None
        self.searcher, self.index_note = self._searcher(run_dir)
        self.infer.set_max_batch_size(self.cfg.max_batch_size)
        self.infer.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.batches: Counter = Counter()  # batch size -> count, since this replica started
        log.info("model replica %s: %s %s from %s", ctx.replica_tag, self.model.modality, self.cfg.which, run_dir)

    def _searcher(self, run_dir: str):
        """The stored index (cf-ray index) of this network's embeddings at the default layer, or (None, why not)."""
        from cf_ray.api import own_features_dir
        from cf_ray.index import Searcher

        uri = self.cfg.index or own_features_dir(run_dir, self.cfg.which, self.layer)
        build = f"cf-ray index --run-dir {run_dir} --model {self.cfg.which} --layer {self.layer}"
        try:
            s = Searcher(uri)
        except (OSError, ValueError) as e:  # no index yet: search answers 409 with the reason
            return None, f"{e} (e.g. `{build}`)"
        made_by = (s.info.get("model"), s.info.get("layer"), s.info.get("d"))
        if made_by != (self.cfg.which, self.layer, self.model.taps[self.layer]):
            return None, f"index {s.uri} holds {made_by[0]} {made_by[1]} embeddings, not {self.cfg.which} {self.layer}"
        return s, ""

    def ping(self) -> bool:
        return True

    def card(self) -> dict:
        return {
            **self.model.describe(),
            "modality": self.model.modality,
            "default_layer": self.layer,
            "assign": {"layer": self.assign_layer, "note": "" if self.assign_layer else self.model.centroid_note},
            "search": {
                "layer": self.layer,
                "items": len(self.searcher.ids) if self.searcher else 0,
                "index": self._index_info(),
                "note": self.index_note,
            },
        }

    def _index_info(self) -> dict | None:
        s = self.searcher
        return None if s is None else {"uri": s.uri, "kind": s.info.get("kind"), "metric": s.info.get("metric")}

    def stats(self) -> dict:
        """Batch sizes seen by this replica: {size: count}."""
        return dict(self.batches)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer(self, items: list[dict]) -> list[dict]:
        """Each item: {pixels, op (embed|assign|search), layer, k}. One forward pass for the whole batch."""
        return await asyncio.to_thread(self._infer, items)

    def _infer(self, items: list[dict]) -> list[dict]:
        n = len(items)
        self.batches[n] += 1
        metrics.serve_batch(self.model.modality, n)
        assigning = any(it["op"] == "assign" for it in items)
        layers = sorted({it["layer"] for it in items} | ({self.assign_layer} if assigning else set()))
        feats = self.model.forward(np.stack([it["pixels"] for it in items]), layers)
        out: list[dict] = [{"batch_size": n} for _ in items]
        for i, it in enumerate(items):
            if it["op"] == "embed":
                out[i]["embedding"] = feats[it["layer"]][i]
        rows = [i for i, it in enumerate(items) if it["op"] == "assign"]
        if rows:
            cluster, dist = self.model.assign(feats[self.assign_layer][rows])
            for j, i in enumerate(rows):
                out[i].update(cluster=int(cluster[j]), distance=float(dist[j]))
        rows = [i for i, it in enumerate(items) if it["op"] == "search"]
        if rows:
            s = self.searcher
            scores, idx = s.search(feats[self.layer][rows], max(items[i]["k"] for i in rows))
            cosine = s.info["metric"] == "cosine"  # similarity -> a distance (1 - cos): always smaller = closer
            for j, i in enumerate(rows):
                k = items[i]["k"]
                out[i]["neighbours"] = [
                    {"id": s.ids[t], "path": s.paths[t], "distance": float(1 - d if cosine else d)}
                    for d, t in zip(scores[j][:k], idx[j][:k])
                    if t >= 0
                ]
                out[i]["metric"] = s.info["metric"]
        return out


def _run_cluster_layer(run_dir: str) -> str:
    from cf_ray.api import read_run_config, run_cluster_config

    return run_cluster_config(read_run_config(run_dir)).layer


# --------------------------------------------------------------------------- HTTP ingress


async def _await(response):
    return await response


def _unavailable(e: Exception) -> bool:
    """A dead, restarting or overloaded replica (retry later), as opposed to a bug."""
    import ray.exceptions as rex
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    return isinstance(
        e,
        (
            rex.RayActorError,
            rex.ActorUnavailableError,
            rex.TaskCancelledError,
            BackPressureError,
            DeploymentUnavailableError,
            ReplicaUnavailableError,
        ),
    )


api = FastAPI(
    title="cf_ray",
    summary="ClusterFit embeddings, clusters and nearest neighbours for images and videos",
    docs_url="/v1/docs",
    redoc_url=None,
    openapi_url="/v1/openapi.json",
)


@api.exception_handler(RequestValidationError)
async def _bad_params(request: Request, exc: RequestValidationError) -> JSONResponse:
    msgs = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
    return _error(400, f"bad query parameter: {msgs}")


@serve.deployment
@serve.ingress(api)
class Ingress:
    """Routes, input checks, deadlines and error mapping; the work happens in the Decoder and the models."""

    def __init__(self, decoder, models: dict, cfg: dict):
        self.decoder, self.models = decoder, models
        self.cfg = ServeConfig.model_validate(cfg)
        self.max_bytes = int(self.cfg.max_body_mb * 2**20)
        self._cards: dict[str, dict] = {}

    # --- routes
    @api.post("/v1/embed")
    async def embed(self, request: Request, layer: str | None = Query(None, description="tap, e.g. res5")):
        return await self._handle("embed", request, layer=layer)

    @api.post("/v1/assign")
    async def assign(self, request: Request):
        return await self._handle("assign", request)

    @api.post("/v1/search")
    async def search(self, request: Request, k: int = Query(10, ge=1, description="neighbours to return")):
        if k > self.cfg.max_k:
            return self._done("search", time.perf_counter(), _error(400, f"k={k} is above the limit {self.cfg.max_k}"))
        return await self._handle("search", request, k=k)

    @api.get("/v1/model")
    async def model(self):
        t0 = time.perf_counter()
        try:
            cards = {kind: await self._card(kind) for kind in self.models}
        except HttpError as e:
            return self._done("model", t0, _error(e.status, e.reason))
        limits = {
            "max_body_bytes": self.max_bytes,
            "max_video_s": self.cfg.max_video_s,
            "request_timeout_s": self.cfg.request_timeout_s,
            "max_k": self.cfg.max_k,
            "uris": {"allowed": self.cfg.allow_uris, "prefixes": self.cfg.uri_prefixes if self.cfg.allow_uris else []},
            "max_batch_size": self.cfg.max_batch_size,
        }
        return self._done("model", t0, JSONResponse({"models": cards, "limits": limits}))

    @api.get("/v1/health")
    async def health(self):
        t0 = time.perf_counter()
        checks = {"decoder": self.decoder, **{f"{k}_model": h for k, h in self.models.items()}}
        bad = {}
        for name, h in checks.items():
            try:
                await asyncio.wait_for(_await(h.ping.remote()), timeout=5)
            except Exception as e:  # any failure is "not ready", with its reason
                bad[name] = f"{type(e).__name__}: {e}"[:200]
        if bad:
            return self._done("health", t0, JSONResponse({"status": "unavailable", "failing": bad}, status_code=503))
        return self._done("health", t0, JSONResponse({"status": "ok", "models": sorted(self.models)}))

    # --- the work
    def _done(self, route: str, t0: float, resp: JSONResponse) -> JSONResponse:
        metrics.serve_request(route, resp.status_code, time.perf_counter() - t0)
        return resp

    def _deadline(self, request: Request) -> float:
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return self.cfg.request_timeout_s
        try:
            asked = float(raw)
        except ValueError:
            raise HttpError(400, f"{TIMEOUT_HEADER}: {raw!r} is not a number of seconds") from None
        return max(0.0, min(asked, self.cfg.request_timeout_s))

    async def _card(self, kind: str) -> dict:
        if kind not in self._cards:
            self._cards[kind] = await asyncio.wait_for(_await(self.models[kind].card.remote()), timeout=30)
        return self._cards[kind]

    async def _handle(self, op: str, request: Request, layer: str | None = None, k: int = 0) -> JSONResponse:
        t0 = time.perf_counter()
        pending: list = []
        try:
            deadline = self._deadline(request)
            try:
                resp = await asyncio.wait_for(self._run(op, request, layer, k, pending), timeout=deadline)
            except asyncio.TimeoutError:
                for r in pending:
                    r.cancel()  # frees the decoder's or the model's slot
                resp = _error(504, f"no answer within {deadline:g} s (request_timeout_s or {TIMEOUT_HEADER})")
        except HttpError as e:
            resp = _error(e.status, e.reason, {"Retry-After": "1"} if e.status == 503 else None)
        except Exception as e:  # a bug: logged with its traceback, answered without one
            log.exception("%s failed", op)
            resp = _error(500, f"internal error ({type(e).__name__}); see the ingress replica's log")
        return self._done(op, t0, resp)

    async def _call(self, pending: list, response):
        pending.append(response)
        try:
            return await response
        except Exception as e:
            if _unavailable(e):
                raise HttpError(503, f"a replica failed or is restarting ({type(e).__name__}); retry") from None
            raise

    async def _run(self, op: str, request: Request, layer: str | None, k: int, pending: list) -> JSONResponse:
        payload = await read_payload(request, self.max_bytes, self.cfg.allow_uris, tuple(self.cfg.uri_prefixes))
        if payload.kind not in self.models:
            served = " and ".join(f"{m}s" for m in sorted(self.models))
            raise HttpError(415, f"this server's model takes {served}, not {payload.kind}s")
        card = await self._card(payload.kind)
        layer = layer or card["default_layer"]
        if layer not in card["taps"]:
            raise HttpError(
                400, f"layer {layer!r} is not a tap of {card['arch']}; use one of {', '.join(card['taps'])}"
            )
        if op == "assign" and not card["assign"]["layer"]:
            raise HttpError(409, f"this model cannot assign clusters: {card['assign']['note']}")
        if op == "search":
            if not card["search"]["items"]:
                raise HttpError(409, f"this model cannot search: {card['search']['note'] or 'empty index'}")
            layer = card["search"]["layer"]
        decoded = await self._call(
            pending, self.decoder.decode.remote(payload.kind, payload.data, payload.uri, self.cfg.request_timeout_s)
        )
        if "error" in decoded:
            raise HttpError(decoded["status"], decoded["error"])
        out = await self._call(
            pending,
            self.models[payload.kind].infer.remote({"pixels": decoded["pixels"], "op": op, "layer": layer, "k": k}),
        )
        headers = {BATCH_HEADER: str(out.pop("batch_size"))}
        body: dict = {"modality": payload.kind, "model": card["model"]}
        if op == "embed":
            emb = out["embedding"]
            body.update(layer=layer, dim=int(emb.shape[0]), embedding=emb.astype(float).tolist())
        elif op == "assign":
            body.update(layer=card["assign"]["layer"], cluster=out["cluster"], distance=out["distance"])
        else:
            body.update(layer=layer, k=k, metric=out["metric"], neighbours=out["neighbours"])
        return JSONResponse(body, headers=headers)
