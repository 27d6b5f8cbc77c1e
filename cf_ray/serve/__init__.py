"""ClusterFit as an online service: a Ray Serve application built from a run directory.

    serve run cf_ray.serve:app run_dir=runs/x                         # http://127.0.0.1:8000/v1/...
    serve run cf_ray.serve:app run_dir=runs/img more_run_dirs=[runs/vid] model.max_replicas=4
    serve deploy deploy/serve_config.yaml                            # on a running cluster

``app`` is a Serve application builder: its arguments are a ``cf_ray.config.ServeConfig`` (flat ``key=value``
strings from ``serve run``, dotted for the sections, or typed ``args:`` from a config file). Routes, limits and
how to expose it safely: docs/serve.md.
"""

# No `from __future__ import annotations`: Serve validates the builder's arguments only when its annotation is
# the ServeConfig class itself, not the string "ServeConfig".
import logging

from ray.serve import Application

from cf_ray.config import ReplicaConfig, ServeConfig
from cf_ray.serve.app import Decoder, Ingress, ModelServer

log = logging.getLogger(__name__)

MODEL_NAMES = {"image": "ImageModel", "video": "VideoModel"}


def deployment_options(r: ReplicaConfig, gpu: bool = False) -> dict:
    """Serve deployment options from one ReplicaConfig: resources, concurrency, autoscaling."""
    return {
        "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": 1 if gpu else 0},
        "max_ongoing_requests": r.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": r.min_replicas,
            "max_replicas": r.max_replicas,
            "target_ongoing_requests": r.target_ongoing_requests,
        },
    }


def build(cfg: ServeConfig) -> Application:
    """The application: Ingress -> Decoder and one ModelServer per served run (an image run, a video run)."""
    from cf_ray.api import check_run_dir, model_dir, read_run_config, run_media
    from cf_ray.runtime import want_gpu

    gpu = want_gpu(cfg.model.use_gpu)
    models, media = {}, {}
    for run in [cfg.run_dir, *cfg.more_run_dirs]:
        run = check_run_dir(run)
        run_cfg = read_run_config(run)
        kind = "video" if run_cfg.get("modality") == "video" else "image"
        if kind in models:
            raise ValueError(f"two {kind} runs given ({run}); serve one image run and one video run at most")
        model_dir(run, cfg.which)  # a run without that network fails here, not in a replica
        media[kind] = run_media(run_cfg).model_dump(mode="json")
        opts = deployment_options(cfg.model, gpu)
        models[kind] = ModelServer.options(name=MODEL_NAMES[kind], **opts).bind(run, cfg.model_dump(mode="json"), gpu)
        log.info("serving the %s model of %s (%s) on %s", cfg.which, run, kind, "GPU" if gpu else "CPU")
    decoder = Decoder.options(name="Decoder", **deployment_options(cfg.decoder)).bind(
        media, int(cfg.max_body_mb * 2**20), cfg.max_video_s
    )
    _check_cpus(cfg, len(models))
    return Ingress.options(name="Ingress", **deployment_options(cfg.ingress)).bind(
        decoder, models, cfg.model_dump(mode="json")
    )


def _check_cpus(cfg: ServeConfig, n_models: int) -> None:
    """Warn when the minimum replicas reserve more CPUs than the Ray cluster has now (they would wait forever on a
    fixed-size local Ray; an autoscaling cluster adds nodes)."""
    import ray

    if not ray.is_initialized():
        return
    need = sum(r.num_cpus * r.min_replicas for r in (cfg.decoder, cfg.ingress)) + n_models * cfg.model.num_cpus * (
        cfg.model.min_replicas
    )
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        log.warning(
            "the minimum replicas reserve %.2f CPUs but the cluster has %.2f now: unless it autoscales they stay "
            "pending; lower model.num_cpus / decoder.num_cpus (e.g. model.num_cpus=0.5)",
            need,
            have,
        )


def app(args: ServeConfig) -> Application:
    """`serve run cf_ray.serve:app run_dir=...`: Serve validates the arguments into a ServeConfig first."""
    return build(args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args))


__all__ = ["app", "build", "deployment_options"]
