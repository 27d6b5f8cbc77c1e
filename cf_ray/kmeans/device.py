"""Which device faiss runs on, decided inside the process that runs it (a Ray actor or task, not the driver).

A GPU node of the cluster may carry faiss-gpu while the driver's node carries faiss-cpu (or the other way
round), so only the process that holds the GPU can tell whether faiss can use it.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install cf_ray with one faiss build: pip install 'cf_ray[cpu]' (faiss-cpu) or deploy/install.sh --gpu "
    "(faiss-gpu; docs/cluster.md)"
)


def import_faiss():
    """faiss, or an ImportError that says how to install it (cf_ray's extras carry it, the base install does not)."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(f"faiss is not installed: {INSTALL_HINT}") from e
    return faiss


def faiss_has_gpu(faiss) -> bool:
    """This process's faiss build has GPU code (faiss-gpu) and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose(want_gpu: bool) -> tuple[str, str | None]:
    """('cuda' or 'cpu', why not the GPU that was asked for, or None), decided in this process.

    ``want_gpu`` means Ray gave this process a GPU; it runs faiss on it only if this process's faiss build
    supports GPUs. Otherwise faiss runs on the CPU and the reason is returned (and logged) for the stats.
    """
    if not want_gpu:
        return "cpu", None
    faiss = import_faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        note = "this node's faiss has no GPU support (faiss-cpu); k-means ran on the CPU. " + INSTALL_HINT
    elif faiss.get_num_gpus() == 0:
        note = "faiss-gpu sees no GPU in this process (CUDA_VISIBLE_DEVICES, driver); k-means ran on the CPU"
    else:
        return "cuda", None
    log.warning("kmeans: %s", note)
    return "cpu", note


def gpu_name() -> str | None:
    """The first visible GPU's name, via torch (faiss exposes none); None without CUDA."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 (a broken CUDA install must not fail the k-means that already ran)
        return None


def describe(device: str) -> str:
    """'cpu', or 'cuda (NVIDIA H200)' for the stats and the report."""
    name = gpu_name() if device == "cuda" else None
    return f"{device} ({name})" if name else device


class GpuFlatIndex:
    """A flat (exact) faiss index on this process's GPU holding the centroids; one GPU resource object reused."""

    def __init__(self):
        faiss = import_faiss()
        self._faiss = faiss
        self._res = faiss.StandardGpuResources()

    def of(self, centroids: np.ndarray, spherical: bool = False):
        faiss = self._faiss
        d = centroids.shape[1]
        cpu = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
        index = faiss.index_cpu_to_gpu(self._res, 0, cpu)
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        return index
