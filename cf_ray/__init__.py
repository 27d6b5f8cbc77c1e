"""cf_ray: ClusterFit on Ray.

Importing the package needs only the standard library (jobs/*.py check the environment through it before
anything else is imported); the version lives in pyproject.toml alone. ``load_model``, ``Model``,
``run_job`` and ``ApiError`` (cf_ray.api) are imported on first use.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

# Distribution names of what a report and `--version` name, by what the reader knows them as.
DEPENDENCIES = {
    "Ray": ("ray",),
    "torch": ("torch",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"),
    "pyarrow": ("pyarrow",),
    "PyAV": ("av",),
}


def _version() -> str:
    """cf_ray's version: from pyproject.toml when running from a checkout (so a stale install of another
    version is never named), else from the installed distribution's metadata."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        text = pyproject.read_text(encoding="utf-8", errors="replace")
        if re.search(r'^name\s*=\s*"cf[_-]ray"', text, re.M):
            m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
            if m:
                return m.group(1)
    try:
        return importlib.metadata.version("cf_ray")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _version()


def dependency_versions() -> dict[str, str]:
    """Installed versions of Ray, torch, faiss, pyarrow and PyAV (from package metadata; nothing is imported)."""
    out = {}
    for name, dists in DEPENDENCIES.items():
        for dist in dists:
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            out[name] = "not installed"
    return out


def version_line() -> str:
    """One line for `--version` and the top of a report, e.g. ``cf_ray 0.1.0 (Ray 2.60.0, torch 2.9.1, ...)``."""
    deps = ", ".join(f"{k} {v}" for k, v in dependency_versions().items())
    return f"cf_ray {__version__} (Python {_python()}; {deps})"


def _python() -> str:
    import platform

    return platform.python_version()


_LAZY = {"load_model": "cf_ray.api", "Model": "cf_ray.api", "run_job": "cf_ray.api", "ApiError": "cf_ray.api"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cf_ray' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
