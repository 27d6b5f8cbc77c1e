"""Is faiss's bundled BLAS running generic kernels? (A ~4x slower k-means search on recent Xeons.)"""

from __future__ import annotations

import os

GENERIC_BLAS = {
    "Prescott",
    "Core2",
    "Penryn",
    "Dunnington",
    "Nehalem",
    "Atom",
    "Katmai",
    "Coppermine",
    "Northwood",
    "Banias",
}


def faiss_blas_note() -> str | None:
    """A hint when faiss's bundled OpenBLAS runs generic kernels on a CPU that has AVX2/AVX-512.

    faiss-cpu 1.15.1 ships OpenBLAS 0.3.15, which does not know recent Xeons and falls back to
    Prescott (SSE3) kernels: the k-means search then runs ~4x slower. OPENBLAS_CORETYPE, set before
    the process starts, fixes it; it cannot be changed once the library is loaded.
    """
    if os.environ.get("OPENBLAS_CORETYPE"):
        return None
    try:
        import faiss  # noqa: F401  (loads its BLAS)
        from threadpoolctl import threadpool_info

        archs = {
            i.get("architecture")
            for i in threadpool_info()
            if i.get("internal_api") == "openblas" and "faiss" in i.get("filepath", "")
        }
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except (ImportError, OSError):
        return None
    target = "SkylakeX" if "avx512f" in flags else "Haswell" if "avx2" in flags else None
    generic = archs & GENERIC_BLAS
    if not (target and generic):
        return None
    return (
        f"faiss's bundled OpenBLAS uses generic {generic.pop()} kernels on this {target}-class CPU; export "
        f"OPENBLAS_CORETYPE={target} before starting the driver and Ray for a several-fold faster k-means search"
    )
