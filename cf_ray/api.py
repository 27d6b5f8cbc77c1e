"""The models of a finished run as Python objects: load one, embed new images or videos, assign them to clusters.

    import cf_ray
    model = cf_ray.load_model("runs/mine")                 # the ClusterFit network, eval mode, on CPU
    emb = model.embed(["a.jpg", open("b.png", "rb").read()], layer="res5")   # float32 (2, dim)
    cluster, distance = model.assign(emb)                  # against model.centroid_info's centroids

Decoding is the extraction stage's (``cf_ray.media``), normalisation and the forward pass are the
extraction's too, so ``embed`` gives the features ``cf-ray extract`` writes for the same file.

Which centroids ``assign`` uses (``model.centroid_info["source"]``):
- ``run``: the run's k-means (``<run>/cluster``), built on the *pre-trained* model's features at
  ``cluster.layer``; they fit only the pre-trained model's features (``which="pretrained"``).
- ``own``: a k-means of the chosen model's own features of the run's source data at that layer,
  with the run's cluster settings (``<run>/own_clusters/<model>_<layer>``), built once by
  ``build_own_centroids`` (``cf-ray embed`` does it when needed) and tied to the model's weights by hash.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import yaml

from cf_ray import storage
from cf_ray.config import ClusterConfig, ImageConfig, ModelConfig, VideoConfig

log = logging.getLogger(__name__)

MODELS = ("random", "pretrained", "clusterfit")
CENTROIDS = ("auto", "run", "own", "none")
OWN_DIR = "own_clusters"


class ApiError(ValueError):
    """A request that cannot be served; the message (one line) says what to do."""


# --------------------------------------------------------------------------- the run's settings


def read_run_config(run_dir: str) -> dict:
    """The run's resolved config.yaml as a plain dict."""
    path = storage.join(run_dir, "config.yaml")
    if not storage.exists(path):
        raise ApiError(f"{run_dir} has no config.yaml: it is not a cf_ray run directory; pass the --run-dir of a job")
    return yaml.safe_load(storage.read_bytes(path)) or {}


def run_media(cfg: dict) -> ImageConfig | VideoConfig:
    """The run's image or video input settings (size, mean/std, clip_len/stride/num_clips)."""
    if cfg.get("modality") == "video":
        return VideoConfig.model_validate(cfg.get("video") or {})
    return ImageConfig.model_validate(cfg.get("image") or {})


def run_cluster_config(cfg: dict) -> ClusterConfig:
    return ClusterConfig.model_validate(cfg.get("cluster") or {})


def check_run_dir(run_dir: str) -> str:
    run_dir = str(run_dir)
    if not storage.exists(run_dir):
        raise ApiError(f"run directory {run_dir} does not exist; pass the --run-dir of a finished cf-ray job")
    return storage.absolute(run_dir)


def model_dir(run_dir: str, which: str) -> str:
    """``<run>/models/<which>``, checked: a one-line error when the run has not made that model yet."""
    if which not in MODELS:
        raise ApiError(f"unknown model {which!r}; use one of {', '.join(MODELS)}")
    uri = storage.join(run_dir, "models", which)
    if not storage.exists(storage.join(uri, "backbone.pt")):
        stage = "retrain" if which == "clusterfit" else "pretrain"
        hint = " or --model pretrained" if which == "clusterfit" else ""
        raise ApiError(
            f"run {run_dir} has no {which} model yet (models/{which}/backbone.pt is missing: its {stage} stage has "
            f"not finished); finish the job with `cf-ray all --run-dir {run_dir} ...`{hint}"
        )
    return uri


def weights_digest(model_uri: str) -> str:
    return hashlib.sha1(storage.read_bytes(storage.join(model_uri, "backbone.pt"))).hexdigest()


def own_centroids_dir(run_dir: str, which: str, layer: str) -> str:
    return storage.join(run_dir, OWN_DIR, f"{which}_{layer}")


def own_features_dir(run_dir: str, which: str, layer: str) -> str:
    """Where network ``which``'s own features of the run's source data are (what `cf-ray index --run-dir` indexes
    and Serve searches by default): the job's extraction for the pre-trained network, else those
    build_own_centroids extracts."""
    if which == "pretrained":
        return storage.join(run_dir, "features", "pretrained", "source")
    return storage.join(own_centroids_dir(run_dir, which, layer), "features")


# --------------------------------------------------------------------------- centroids


@dataclass
class Centroids:
    """k-means centroids and the preprocessing of the features they were fit on."""

    centroids: np.ndarray  # (k, d') float32, in the preprocessed space
    layer: str
    l2: bool
    transform: dict | None  # PCA-whitening (mean, proj) when the clustering used pca_dim
    spherical: bool
    info: dict = field(default_factory=dict)

    @classmethod
    def load(cls, cluster_uri: str, cluster: ClusterConfig, info: dict) -> "Centroids":
        c = np.load(io.BytesIO(storage.read_bytes(storage.join(cluster_uri, "centroids.npy"))))
        t_uri = storage.join(cluster_uri, "transform.npz")
        transform = None
        if storage.exists(t_uri):
            with np.load(io.BytesIO(storage.read_bytes(t_uri))) as z:
                transform = {k: z[k] for k in z.files}
        spherical = cluster.backend == "ray" and cluster.spherical
        meta = {
            **info,
            "uri": cluster_uri,
            "layer": cluster.layer,
            "k": int(c.shape[0]),
            "l2_normalize": cluster.l2_normalize,
            "pca_dim": cluster.pca_dim,
            "spherical": spherical,
        }
        return cls(np.ascontiguousarray(c, np.float32), cluster.layer, cluster.l2_normalize, transform, spherical, meta)

    @property
    def input_dim(self) -> int:
        return int(self.transform["proj"].shape[0]) if self.transform is not None else int(self.centroids.shape[1])

    def assign(self, embeddings: np.ndarray, backend: str = "faiss") -> tuple[np.ndarray, np.ndarray]:
        """(cluster int64, distance float32) per row, as the clustering stage assigns: L2-normalise, whiten,
        nearest centroid (squared L2; inner product when spherical).

        backend="torch" computes the same with torch's matmul on the calling thread settings: an extraction
        actor uses it so as not to import faiss and start its OpenMP pool next to torch's."""
        from cf_ray.kmeans.core import l2_normalize, nearest, pca_whiten_apply

        x = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ApiError(
                f"embeddings of shape {x.shape} do not fit these centroids (built on {self.layer} features of "
                f"dimension {self.input_dim}); embed with layer={self.layer!r}"
            )
        if self.l2:
            x = l2_normalize(x)
        if self.transform is not None:
            x = pca_whiten_apply(x, self.transform)
        x = np.ascontiguousarray(x, np.float32)
        if backend == "torch":
            return nearest_torch(x, self.centroids, self.spherical)
        return nearest(x, self.centroids, self.spherical)


def nearest_torch(x: np.ndarray, centroids: np.ndarray, spherical: bool = False, rows: int = 4096):
    """faiss.knn(x, centroids, 1) with torch: squared L2 as ||x||^2 - 2 x.c + ||c||^2 clamped at 0 (faiss's
    formula), or the largest inner product when spherical; ``rows`` at a time."""
    import torch

    c = torch.tensor(np.asarray(centroids), dtype=torch.float32)  # a copy: Ray hands actors read-only arrays
    cc = (c * c).sum(1)
    labels, scores = np.zeros(len(x), np.int64), np.zeros(len(x), np.float32)
    with torch.inference_mode():
        for s in range(0, len(x), rows):
            xt = torch.from_numpy(x[s : s + rows])
            ip = xt @ c.T
            if spherical:
                score, idx = ip.max(1)
            else:
                score, idx = ((xt * xt).sum(1, keepdim=True) - 2 * ip + cc[None]).clamp_min_(0).min(1)
            labels[s : s + rows], scores[s : s + rows] = idx.numpy(), score.numpy()
    return labels, scores


def run_centroids(run_dir: str, cfg: dict) -> Centroids | None:
    """The run's k-means (on the pre-trained model's features), or None before its cluster stage finished."""
    uri = storage.join(run_dir, "cluster")
    if not storage.exists(storage.join(uri, "_SUCCESS.json")):
        return None
    return Centroids.load(
        uri, run_cluster_config(cfg), {"source": "run", "built_on": "pretrained", "description": RUN_CENTROIDS}
    )


RUN_CENTROIDS = "the run's k-means, fit on the pre-trained model's features of the source data"
OWN_CENTROIDS = "a k-means of this model's own features of the run's source data, with the run's cluster settings"


def own_centroids(run_dir: str, which: str, layer: str, cfg: dict, digest: str) -> Centroids | None:
    """This model's own k-means at ``layer``, when built for these very weights (else None)."""
    uri = own_centroids_dir(run_dir, which, layer)
    marker = storage.join(uri, "cluster", "_SUCCESS.json")
    if not storage.exists(marker) or storage.read_json(storage.join(uri, "own.json")).get("weights_sha1") != digest:
        return None
    cluster = run_cluster_config(cfg).model_copy(update={"layer": layer})
    return Centroids.load(
        storage.join(uri, "cluster"), cluster, {"source": "own", "built_on": which, "description": OWN_CENTROIDS}
    )


def build_own_centroids(run_dir: str, which: str = "clusterfit", layer: str | None = None) -> dict:
    """k-means of ``which``'s own ``layer`` features of the run's source items (Ray: the extraction stage's
    actor pool, then the clustering stage), stored in ``<run>/own_clusters/<which>_<layer>/``. Idempotent."""
    from cf_ray.config import ExtractConfig
    from cf_ray.stages.cluster import run_cluster
    from cf_ray.stages.extract import run_extract

    run_dir = check_run_dir(run_dir)
    cfg = read_run_config(run_dir)
    model_uri = model_dir(run_dir, which)
    cluster = run_cluster_config(cfg)
    layer = layer or cluster.layer
    digest = weights_digest(model_uri)
    uri = own_centroids_dir(run_dir, which, layer)
    meta_uri = storage.join(uri, "own.json")
    if storage.exists(meta_uri) and storage.read_json(meta_uri).get("weights_sha1") != digest:
        log.info("own centroids in %s were built for other weights; rebuilding", uri)
        storage.delete_dir(uri)
    items = storage.join(run_dir, "items", "source.parquet")
    if not storage.exists(items):
        raise ApiError(f"run {run_dir} has no items/source.parquet; its own centroids need the run's source items")
    storage.write_json(meta_uri, {"model": which, "layer": layer, "weights_sha1": digest})
    extract = ExtractConfig.model_validate(cfg.get("extract") or {}).model_copy(update={"layers": [layer]})
    feats = storage.join(uri, "features")
    run_extract(extract, run_media(cfg), items, model_uri, feats)
    stats = run_cluster(cluster.model_copy(update={"layer": layer}), feats, storage.join(uri, "cluster"))
    return {"uri": uri, "features": feats, **stats}


# --------------------------------------------------------------------------- the model


@dataclass
class Model:
    """A run's backbone, ready to embed: eval mode, its input settings and normalisation, its taps."""

    backbone: Any  # torch.nn.Module, eval mode
    model_config: ModelConfig
    media: ImageConfig | VideoConfig
    which: str
    run_dir: str
    model_uri: str
    device: str = "cpu"
    centroids: Centroids | None = None
    centroid_note: str = ""
    weights_sha1: str = ""
    precision: str = "auto"
    channels_last: str = "auto"

    def __post_init__(self):
        from cf_ray.runtime import step_settings

        self._format, self._autocast = step_settings(
            self.precision, self.channels_last, self.device.split(":")[0], video=self.modality == "video"
        )
        if self._format is not None:
            self.backbone.to(memory_format=self._format)

    # --- what it is
    @property
    def modality(self) -> str:
        return "video" if isinstance(self.media, VideoConfig) else "image"

    @property
    def arch(self) -> str:
        return self.model_config.arch

    @property
    def taps(self) -> dict[str, int]:
        """Tap name -> embedding dimension (``backbone.feature_info``)."""
        return dict(self.backbone.feature_info)

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.media.mean)

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.media.std)

    @property
    def input_spec(self) -> dict:
        """What one input becomes before the network: the decoder's settings and the tensor shape it feeds."""
        m = self.media
        if isinstance(m, VideoConfig):
            return {
                "modality": "video",
                "size": m.size,
                "resize": m.resize or m.size,
                "clip_len": m.clip_len,
                "stride": m.stride,
                "num_clips": m.num_clips,
                "short": m.short,
                "tensor": ["N*num_clips", 3, m.clip_len, m.size, m.size],
                "layout": "NCTHW float32, RGB, (x/255 - mean)/std; a video's embedding is the mean over its clips",
            }
        return {
            "modality": "image",
            "size": m.size,
            "resize": m.resize or m.size,
            "tensor": ["N", 3, m.size, m.size],
            "layout": "NCHW float32, RGB, (x/255 - mean)/std; short side resized to `resize`, centre crop",
        }

    @property
    def centroid_info(self) -> dict | None:
        return None if self.centroids is None else dict(self.centroids.info)

    def describe(self) -> dict:
        """JSON-able summary (model card, serve's metadata)."""
        return {
            "run_dir": self.run_dir,
            "model": self.which,
            "arch": self.arch,
            "model_config": self.model_config.model_dump(mode="json"),
            "input": self.input_spec,
            "normalization": {"mean": list(self.mean), "std": list(self.std), "scale": "x/255"},
            "taps": self.taps,
            "centroids": self.centroid_info,
            "weights_sha1": self.weights_sha1,
        }

    def check_layer(self, layer: str) -> str:
        if layer not in self.backbone.feature_info:
            raise ApiError(f"layer {layer!r} is not a tap of {self.arch}; use one of {', '.join(self.taps)}")
        return layer

    # --- decoding
    def decode(self, item) -> np.ndarray:
        """One input -> the uint8 array the network takes: (S, S, 3) for images, (clips, T, S, S, 3) for video.

        An input is a path or URI, encoded bytes (JPEG/PNG..., or a video file's bytes), or a decoded uint8
        array: an image (H, W, 3) of any size, or a video's clip (T, S, S, 3) / clips (C, T, S, S, 3)."""
        m = self.media
        if isinstance(item, np.ndarray):
            return self._from_array(item)
        if isinstance(item, (str, os.PathLike)):
            try:
                data = storage.read_bytes(str(item))
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read file {item}: {e}") from None
        elif isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        else:
            raise ValueError(f"an input is a path, encoded bytes or a uint8 array, not {type(item).__name__}")
        if isinstance(m, VideoConfig):
            from cf_ray.media.video import decode_clips

            return decode_clips(
                data, m.num_clips, m.clip_len, m.stride, m.size, m.resize, m.short, timeout_s=m.timeout_s
            )
        from cf_ray.media.image import decode_image

        return decode_image(data, m.size, m.resize)

    def _from_array(self, a: np.ndarray) -> np.ndarray:
        m = self.media
        if a.dtype != np.uint8:
            raise ValueError(f"a decoded input must be uint8 RGB, got {a.dtype}")
        if isinstance(m, VideoConfig):
            clip = (m.clip_len, m.size, m.size, 3)
            if a.shape == clip:
                return a[None]
            if a.ndim == 5 and a.shape[1:] == clip:
                return a
            raise ValueError(
                f"a decoded video is a clip {clip} or clips (C, {', '.join(map(str, clip))}) uint8, got {a.shape}"
            )
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"a decoded image is (H, W, 3) uint8 RGB, got {a.shape}")
        if a.shape[:2] == (m.size, m.size):
            return a
        from PIL import Image

        from cf_ray.media.image import decode_image

        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")  # lossless; then the decoder's own resize and crop
        return decode_image(buf.getvalue(), m.size, m.resize)

    def _split(self, inputs) -> list:
        """A single input or a batch of them -> a list of inputs."""
        if isinstance(inputs, (str, os.PathLike, bytes, bytearray, memoryview)):
            return [inputs]
        if isinstance(inputs, np.ndarray):
            single = 4 if self.modality == "video" else 3  # a clip, or an image
            if inputs.ndim <= single:
                return [inputs]
            return list(inputs)
        return list(inputs)

    # --- embedding
    def forward(self, pixels: np.ndarray, layers: Sequence[str]) -> dict[str, np.ndarray]:
        """Decoded uint8 inputs (N, S, S, 3) or (N, C, T, S, S, 3) -> {layer: (N, dim) float32}, as the
        extraction stage computes them (a video's feature is the mean over its clips)."""
        import torch

        from cf_ray.media.decode import normalize

        n = len(pixels)
        per_item = pixels.shape[1] if self.modality == "video" else 1
        if self.modality == "video":
            pixels = pixels.reshape(-1, *pixels.shape[2:])
        x = normalize(pixels, self.media.mean, self.media.std, self.device)
        if self._format is not None:
            x = x.contiguous(memory_format=self._format)
        with torch.inference_mode(), self._autocast():
            out = self.backbone.forward_features(x, list(layers))
        return {l: out[l].float().cpu().numpy().reshape(n, per_item, -1).mean(1) for l in layers}

    def embed_with_errors(self, inputs, layer: str = "res5", batch_size: int = 32) -> tuple[np.ndarray, list[str]]:
        """Like ``embed``, but a bad input gets a NaN row and its reason in the list ('' where fine)."""
        self.check_layer(layer)
        items = self._split(inputs)
        dim = self.backbone.feature_info[layer]
        out = np.full((len(items), dim), np.nan, dtype=np.float32)
        errors = [""] * len(items)
        for start in range(0, len(items), batch_size):
            chunk, ok, arrays = items[start : start + batch_size], [], []
            for i, item in enumerate(chunk):
                try:
                    arrays.append(self.decode(item))
                    ok.append(start + i)
                except ValueError as e:
                    errors[start + i] = str(e)
            if arrays:
                shapes = {a.shape for a in arrays}
                if len(shapes) > 1:  # clips given as arrays may differ in count: one forward pass each
                    for j, a in zip(ok, arrays):
                        out[j] = self.forward(a[None], [layer])[layer][0]
                else:
                    out[ok] = self.forward(np.stack(arrays), [layer])[layer]
        return out, errors

    def embed(self, inputs, layer: str = "res5", batch_size: int = 32) -> np.ndarray:
        """Inputs (paths/URIs, encoded bytes, decoded uint8 arrays; one or a batch) -> float32 (N, dim) at
        ``layer``. Raises ApiError naming the first input that cannot be decoded."""
        emb, errors = self.embed_with_errors(inputs, layer, batch_size)
        bad = [i for i, e in enumerate(errors) if e]
        if bad:
            items = self._split(inputs)
            what = items[bad[0]] if isinstance(items[bad[0]], (str, os.PathLike)) else f"input {bad[0]}"
            raise ApiError(
                f"{len(bad)} of {len(items)} inputs could not be used; {what}: {errors[bad[0]]} "
                f"(pass {self.modality} files, their bytes, or decoded uint8 arrays; embed_with_errors skips them)"
            )
        return emb

    def assign(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster ids int64, distances float32) of embeddings from ``centroid_info['layer']`` against this
        model's centroids (see the module doc for which)."""
        if self.centroids is None:
            raise ApiError(self.centroid_note or "this model has no centroids")
        return self.centroids.assign(embeddings)


def _resolve_centroids(
    run_dir: str, which: str, cfg: dict, digest: str, choice: str, layer: str | None
) -> tuple[Centroids | None, str]:
    if choice not in CENTROIDS:
        raise ApiError(f"unknown centroids {choice!r}; use one of {', '.join(CENTROIDS)}")
    if choice == "none":
        return None, "loaded with centroids='none'"
    cluster_layer = run_cluster_config(cfg).layer
    layer = layer or cluster_layer
    build = (
        f"build them with `cf-ray embed --run-dir {run_dir} --model {which} --layer {layer} --data <files> "
        f"--out <dir>` "
        f"or cf_ray.api.build_own_centroids({run_dir!r}, {which!r}, {layer!r})"
    )
    if choice == "run" or (choice == "auto" and which == "pretrained" and layer == cluster_layer):
        if which != "pretrained":
            raise ApiError(
                f"the run's centroids were fit on the pre-trained model's features, not {which}'s; "
                f"use --model pretrained, or centroids=own ({build})"
            )
        if layer != cluster_layer:
            raise ApiError(
                f"the run's centroids were fit at {cluster_layer}, not {layer}; use layer {cluster_layer} or "
                f"centroids=own"
            )
        c = run_centroids(run_dir, cfg)
        if c is None:
            return None, f"run {run_dir} has no finished cluster stage yet; finish the job with `cf-ray all`"
        return c, ""
    c = own_centroids(run_dir, which, layer, cfg, digest)
    if c is None:
        return None, f"no k-means of {which}'s own {layer} features yet; {build}"
    return c, ""


def load_model(
    run_dir_or_uri: str | os.PathLike,
    which: str = "clusterfit",
    device: str = "cpu",
    centroids: str = "auto",
    layer: str | None = None,
    precision: str = "fp32",
    channels_last: str = "auto",
) -> Model:
    """A run's model (``random``, ``pretrained`` or ``clusterfit``) in eval mode on ``device``.

    centroids: ``auto`` (the run's k-means for the pre-trained model at the run's cluster layer, this
    model's own k-means otherwise, when built), ``run``, ``own`` or ``none``; ``layer`` is the layer they are
    for (default: the run's ``cluster.layer``). Missing centroids are not an error until ``assign``.
    precision / channels_last: as ``extract.precision`` / ``extract.channels_last`` (bf16 autocast on GPU...).
    """
    from cf_ray.models.checkpoint import load_backbone

    run_dir = check_run_dir(str(run_dir_or_uri))
    cfg = read_run_config(run_dir)
    uri = model_dir(run_dir, which)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone, model_cfg = load_backbone(uri)
    backbone.eval().to(device)
    digest = weights_digest(uri)
    if layer is not None and layer not in backbone.feature_info:
        raise ApiError(
            f"layer {layer!r} is not a tap of {model_cfg.arch}; use one of {', '.join(backbone.feature_info)}"
        )
    c, note = _resolve_centroids(run_dir, which, cfg, digest, centroids, layer)
    return Model(
        backbone=backbone,
        model_config=model_cfg,
        media=run_media(cfg),
        which=which,
        run_dir=run_dir,
        model_uri=uri,
        device=device,
        centroids=c,
        centroid_note=note,
        weights_sha1=digest,
        precision=precision,
        channels_last=channels_last,
    )


def run_job(config, overrides: Iterable[str] = ()) -> dict:
    """The whole ClusterFit job (every stage not yet done): ``config`` is a JobConfig, a dict of settings or a
    YAML file; ``overrides`` are ``key=value`` strings as on the command line. Returns the run's paths and its
    transfer results."""
    import tempfile

    from cf_ray.config import ConfigError, JobConfig, load_config
    from cf_ray.pipeline import run_job as _run_job

    overrides = list(overrides)
    if isinstance(config, JobConfig):
        config = config.model_dump(mode="json")
    if isinstance(config, dict):
        with tempfile.TemporaryDirectory() as tmp:  # one loader: defaults <- this tree <- overrides, checked
            path = os.path.join(tmp, "config.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(config, f)
            cfg = load_config(JobConfig, path, overrides)
    elif isinstance(config, (str, os.PathLike)) or config is None:
        cfg = load_config(JobConfig, config, overrides)
    else:
        raise ConfigError(f"run_job takes a JobConfig, a dict or a YAML path, not {type(config).__name__}")
    return _run_job(cfg)
