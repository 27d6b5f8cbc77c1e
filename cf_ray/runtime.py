"""Starting or joining Ray, and choosing devices the cluster really has."""

from __future__ import annotations

import logging
import os
import socket

import ray

logger = logging.getLogger(__name__)

_dashboard: str | None = None  # the cluster's dashboard, when this process joined one
DASHBOARD_PORT = 8265  # Ray's default


def dashboard_url() -> str | None:
    """http://host:port of the joined cluster's dashboard (None for a local Ray without one)."""
    if _dashboard and not _dashboard.startswith("http"):
        return "http://" + _dashboard
    return _dashboard


def init_ray(num_cpus: int | None = None, object_store_mb: int = 1024, dashboard: bool = True) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local Ray.

    Inside a submitted job ``ray.init()`` must get no resource arguments. A local Ray gets its dashboard (on
    127.0.0.1, 8265 or the next free port) unless ``dashboard`` is false: it is where a laptop run is watched, and
    Ray Train's placement-group cleaner asks it whether the training controller is alive.
    """
    global _dashboard
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        _dashboard = ray.init().dashboard_url or None
        return
    port = _free_port(DASHBOARD_PORT) if dashboard else None
    if port:
        # Ray's state API finds "the" local Ray by scanning the machine's processes; with another Ray on the machine
        # the cleaner then asked the wrong one (or none: a warning every second of training) and, told that this
        # run's controller was gone, removed the training's placement group and killed its worker. The node
        # processes and workers inherit this variable, so every state query goes to this Ray's own dashboard.
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ctx = ray.init(
        address="local",  # a new local Ray, even if `ray start` left a cluster address behind
        num_cpus=num_cpus or os.cpu_count(),
        object_store_memory=object_store_mb * 2**20,
        include_dashboard=None if dashboard else False,  # None: Ray's default, start it but not fail without it
        dashboard_host="127.0.0.1",
        dashboard_port=port or DASHBOARD_PORT,
        log_to_driver=True,
    )
    _dashboard = ctx.dashboard_url or None
    if _dashboard:
        logger.info(f"Ray dashboard of this local Ray (until the job ends): {dashboard_url()}")
    if port and dashboard_url() != os.environ["RAY_API_SERVER_ADDRESS"]:
        where = f"is at {dashboard_url()}, not at port {port} as planned" if _dashboard else "did not start"
        logger.warning(
            f"the local Ray's dashboard {where}: Ray Train's placement-group cleaner may query another Ray on this "
            "machine; run one local job at a time"
        )


def _free_port(start: int, tries: int = 100) -> int | None:
    """The first port from ``start`` that 127.0.0.1 can bind now (None if none of ``tries`` can)."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return None


def step_settings(precision: str, channels_last: str, device_type: str, video: bool):
    """(memory format or None, autocast context factory) for a model's forward passes on ``device_type``.

    precision bf16 -> bfloat16 autocast; channels_last yes -> channels-last weights and inputs; auto -> on GPU only.
    Video tensors and Conv3d weights are rank 5, so they take channels_last_3d (channels_last needs rank 4).
    """
    import torch

    gpu = device_type == "cuda"
    fmt = None
    if channels_last == "yes" or (channels_last == "auto" and gpu):
        fmt = torch.channels_last_3d if video else torch.channels_last
    bf16 = precision == "bf16" or (precision == "auto" and gpu)
    return fmt, lambda: torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16)


def worker_threads(num_workers: int, cpus_per_worker: float) -> int:
    """Torch threads for each of ``num_workers`` training workers: on a local Ray its share of the machine's CPUs
    (Ray Data's decode tasks use the same cores between steps), at least its own CPUs; 0 (= its cpus_per_worker)
    on a joined cluster, whose nodes Ray shares out."""
    if os.environ.get("RAY_ADDRESS") or not ray.is_initialized():
        return 0
    local = int(ray.cluster_resources().get("CPU", 1))
    return max(int(cpus_per_worker), local // max(1, num_workers), 1)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def want_gpu(choice: str) -> bool:
    """'auto' -> a GPU only where the cluster has one now; 'yes' on a GPU-less local Ray is an error, not a hang.

    A joined cluster may autoscale GPU workers from zero (cluster.yaml, KubeRay): there 'yes' is trusted and the
    autoscaler starts GPU nodes for the request, while 'auto' sees no GPU yet and would run on CPUs.
    """
    gpus = cluster_gpus()
    if choice == "yes" and gpus == 0 and not os.environ.get("RAY_ADDRESS"):
        raise RuntimeError("use_gpu=yes but the Ray cluster has no GPU; set use_gpu=auto or no")
    return choice == "yes" or (choice == "auto" and gpus > 0)
