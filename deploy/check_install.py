"""Checks what deploy/install.sh installed (or, with --report, what pip resolved): one faiss build, one CUDA major.

    python deploy/check_install.py --flavour gpu                     # the installed environment (this interpreter)
    python deploy/check_install.py --flavour gpu --report pip.json   # a `pip install --dry-run --report` resolution

Exits non-zero with one line per problem. Standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from importlib import metadata

FAISS = {"cpu": "faiss-cpu", "gpu": "faiss-gpu"}


def cuda_major(requires: list[str]) -> int | None:
    """The CUDA major a wheel's Requires-Dist ties it to: nvidia-*-cu12 -> 12, cuda-toolkit==13.0.3 -> 13."""
    for r in requires:
        req = r.split(";")[0].strip().lower()
        m = re.match(r"nvidia-cuda-runtime-cu(\d+)\b", req)
        if m:
            return int(m.group(1))
        m = re.match(r"(?:cuda-toolkit|nvidia-cuda-runtime)(?:\[[^\]]*\])?\s*(?:==|>=|~=)\s*(\d+)", req)
        if m:
            return int(m.group(1))
        m = re.match(r"(?:nvidia-cuda-runtime)\s*<\s*\d+\s*,\s*>=\s*(\d+)", req)
        if m:
            return int(m.group(1))
    return None


def check_set(flavour: str, dists: dict[str, tuple[str, list[str]]], ray_version: str | None) -> list[str]:
    """Problems with a set of {normalised name: (version, requires)}; [] when it is a sound install."""
    problems = []
    want, other = FAISS[flavour], FAISS["gpu" if flavour == "cpu" else "cpu"]
    for name in ("torch", "torchvision", "pytorchvideo", "av", "pyarrow", want):
        if name not in dists:
            problems.append(f"{name} is missing")
    if other in dists:
        problems.append(f"{other} is installed next to {want}: both import as faiss; uninstall {other}")
    if ray_version and "ray" in dists and dists["ray"][0] != ray_version:
        problems.append(f"ray {dists['ray'][0]} is not the pinned {ray_version} (the image's Ray)")
    if flavour == "gpu" and "torch" in dists and want in dists:
        t, f = cuda_major(dists["torch"][1]), cuda_major(dists[want][1])
        if t is None:
            problems.append(f"torch {dists['torch'][0]} has no CUDA runtime dependency (a CPU-only torch build)")
        elif t != f:
            problems.append(
                f"torch {dists['torch'][0]} uses CUDA {t} but {want} {dists[want][0]} uses CUDA {f}: "
                "use deploy/constraints-gpu.txt"
            )
    return problems


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def from_report(path: str) -> dict[str, tuple[str, list[str]]]:
    with open(path) as f:
        report = json.load(f)
    return {
        _norm(i["metadata"]["name"]): (i["metadata"]["version"], i["metadata"].get("requires_dist") or [])
        for i in report["install"]
    }


def installed() -> dict[str, tuple[str, list[str]]]:
    return {_norm(d.metadata["Name"]): (d.version, d.requires or []) for d in metadata.distributions()}


def runtime_checks(flavour: str) -> list[str]:
    """Import what cf_ray needs; on a machine with a GPU, run a tiny faiss and torch computation on it."""
    problems = []
    try:
        import av  # noqa: F401
        import faiss
        import numpy as np
        import pytorchvideo  # noqa: F401
        import torch
        import torchvision  # noqa: F401

        import cf_ray  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return [f"import failed: {type(e).__name__}: {e}"]
    gpu_faiss = hasattr(faiss, "StandardGpuResources")
    if flavour == "gpu" and not gpu_faiss:
        problems.append("faiss has no GPU support: faiss-cpu shadows faiss-gpu")
    if flavour == "gpu" and torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    print(
        f"check_install: torch {torch.__version__} (CUDA {torch.version.cuda}), faiss {faiss.__version__} "
        f"({'GPU' if gpu_faiss else 'CPU'} build), cf_ray from {cf_ray.__file__}"
    )
    if gpu_faiss and faiss.get_num_gpus() > 0 and torch.cuda.is_available():
        x = np.random.default_rng(0).standard_normal((1000, 32)).astype("float32")
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss.IndexFlatL2(32))
        index.add(x)
        if not (index.search(x[:10], 1)[1][:, 0] == np.arange(10)).all():
            problems.append("faiss GPU search returned wrong neighbours")
        a = torch.randn(256, 256, device="cuda")
        if not torch.allclose((a @ a).cpu(), a.cpu() @ a.cpu(), rtol=1e-3, atol=1e-2):
            problems.append("torch CUDA matmul disagrees with the CPU")
        print(f"check_install: GPU {torch.cuda.get_device_name(0)}: faiss and torch ran on it")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavour", choices=sorted(FAISS), required=True)
    ap.add_argument("--report", help="pip's --report JSON of a --dry-run resolution (no imports then)")
    ap.add_argument("--ray-version", help="the Ray version the set must keep")
    args = ap.parse_args(argv)
    dists = from_report(args.report) if args.report else installed()
    problems = check_set(args.flavour, dists, args.ray_version)
    if not args.report and not problems:
        problems = runtime_checks(args.flavour)
    for p in problems:
        print(f"check_install: {p}", file=sys.stderr)
    if not problems:
        what = "resolves to" if args.report else "installed"
        cuda = cuda_major(dists["torch"][1])
        print(
            f"check_install: OK: {args.flavour} {what} torch {dists['torch'][0]}"
            + (f" (CUDA {cuda})" if cuda else "")
            + f", {FAISS[args.flavour]} {dists[FAISS[args.flavour]][0]}"
            + (f", ray {dists['ray'][0]}" if "ray" in dists else "")
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
