"""deploy/: the one install script (a real install into a fresh venv), the GPU dependency set and the image's base.

No image can be built here; what can go wrong without Docker is checked: the script installs cf_ray and passes its
own checks in a new virtual environment, the GPU constraints keep one CUDA major, and the Dockerfile's base image is
the pinned Ray, this Python and that CUDA.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import tomllib

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(DEPLOY))
import check_install  # noqa: E402  (deploy/check_install.py: standard library only)

# Requires-Dist as published on PyPI (pip's --report of `pip install --dry-run --no-deps`), abridged to the CUDA lines
TORCH_2_10 = ['nvidia-cuda-runtime-cu12==12.8.90; platform_system == "Linux"', "nvidia-nccl-cu12==2.27.5"]
TORCH_2_14 = ['cuda-toolkit[cublas,cudart,cufft]==13.0.3; platform_system == "Linux"', "nvidia-nccl-cu13==2.30.7"]
FAISS_GPU_1_15_1 = ["numpy>=1.25", "packaging", "nvidia-cuda-runtime-cu12<13,>=12.6", "nvidia-cublas-cu12<13,>=12.6"]
FAISS_GPU_CUVS_1_15_1 = ["numpy>=1.25", "nvidia-cuda-runtime<14,>=13.2", "libcuvs-cu13==26.06.*"]


def test_cuda_major_of_published_wheels():
    assert check_install.cuda_major(TORCH_2_10) == 12
    assert check_install.cuda_major(TORCH_2_14) == 13
    assert check_install.cuda_major(FAISS_GPU_1_15_1) == 12
    assert check_install.cuda_major(FAISS_GPU_CUVS_1_15_1) == 13
    assert check_install.cuda_major(["numpy", "filelock"]) is None  # a CPU-only torch


def _set(torch_req, faiss_name="faiss-gpu", faiss_req=FAISS_GPU_1_15_1, extra=()):
    base = {n: ("1", []) for n in ("torchvision", "pytorchvideo", "av", "pyarrow")}
    return (
        base
        | {"torch": ("x", torch_req), faiss_name: ("1.15.1", faiss_req), "ray": (ray.__version__, [])}
        | {n: ("1", []) for n in extra}
    )


def test_check_set_accepts_one_cuda_and_refuses_mixtures():
    assert check_install.check_set("gpu", _set(TORCH_2_10), ray.__version__) == []
    mixed = check_install.check_set("gpu", _set(TORCH_2_14), ray.__version__)
    assert len(mixed) == 1 and "CUDA 13" in mixed[0] and "constraints-gpu.txt" in mixed[0]
    both = check_install.check_set("gpu", _set(TORCH_2_10, extra=["faiss-cpu"]), ray.__version__)
    assert any("both import as faiss" in p for p in both)
    assert any("not the pinned" in p for p in check_install.check_set("gpu", _set(TORCH_2_10), "0.0.1"))
    assert any("faiss-cpu is missing" in p for p in check_install.check_set("cpu", _set(TORCH_2_10), None))


def _constraints() -> dict[str, str]:
    lines = [l.split("#")[0].strip() for l in (DEPLOY / "constraints-gpu.txt").read_text().splitlines()]
    return {re.split(r"[<>=!~]", l, maxsplit=1)[0]: l for l in lines if l}


def test_pyproject_leaves_the_faiss_build_to_an_extra_and_constraints_pin_the_image():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("faiss") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["cpu"]] == ["faiss-cpu"]
    assert [d.split(">")[0] for d in extras["gpu"]] == ["faiss-gpu"]
    c = _constraints()
    assert c["ray"] == f"ray=={ray.__version__}"  # the image's Ray is never replaced
    assert c["faiss-cpu"] == "faiss-cpu<0"  # anything that pulls faiss-cpu into a GPU install fails to resolve
    assert "<2.11" in c["torch"]  # torch 2.11+ on PyPI is CUDA 13; faiss-gpu links CUDA 12
    makefile = (ROOT / "Makefile").read_text()
    assert "deploy/install.sh --cpu --test --editable" in makefile  # CI (`make test`) installs through the script


def test_dockerfile_starts_from_the_pinned_ray_python_and_cuda_and_runs_the_script():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    m = re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-{py}-cu(\d\d)(\d)", base)
    assert m, f"{base} is not rayproject/ray:{ray.__version__}-{py}-cuXY"
    assert int(m.group(1)) == check_install.cuda_major(FAISS_GPU_1_15_1)  # the image's CUDA major = faiss-gpu's
    assert "FROM ${RAY_IMAGE}" in text
    assert re.search(r"^RUN .*deploy/install\.sh --gpu", text, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "data"} <= set(ignored)


def test_install_script_installs_cf_ray_into_a_fresh_venv(tmp_path):
    """The CPU path for real: a new venv that sees this environment's packages (no 3-minute torch download), where
    the script must install cf_ray itself and then pass deploy/check_install.py (imports, one faiss build)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    site = subprocess.run(
        [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    parent = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "parent_env.pth").write_text("\n".join(parent) + "\n")  # after the venv's own site-packages
    # PIP_NO_BUILD_ISOLATION=0 means "build without isolation" to pip (its inverted --no-* variables): setuptools
    # comes from the parent env instead of a fresh download into a build env (halves the time)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PIP_NO_BUILD_ISOLATION": "0"}
    r = subprocess.run(
        ["bash", str(DEPLOY / "install.sh"), "--cpu", "--editable", "--python", str(vpy)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "check_install: OK: cpu installed" in r.stdout
    assert f"cf_ray from {ROOT}/cf_ray/__init__.py" in r.stdout  # this checkout, installed into the new venv
    assert list(Path(site).glob("*cf_ray*")), "cf_ray was not installed into the venv's own site-packages"


def test_install_script_refuses_unknown_arguments():
    r = subprocess.run(["bash", str(DEPLOY / "install.sh"), "--gpus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument --gpus" in r.stderr


@pytest.mark.skipif(
    not os.environ.get("CF_RAY_RESOLVE_GPU"),
    reason="resolves the GPU set against the package index: ~5 min where it serves no wheel metadata; "
    "set CF_RAY_RESOLVE_GPU=1",
)
def test_gpu_dry_run_resolves_one_cuda_major():
    r = subprocess.run(
        ["bash", str(DEPLOY / "install.sh"), "--gpu", "--dry-run", "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"check_install: OK: gpu resolves to torch \S+ \(CUDA 12\), faiss-gpu", r.stdout)


def test_grafana_dashboard_shows_every_cf_ray_series_and_only_those():
    import json

    from cf_ray import metrics

    dash = json.loads((DEPLOY / "grafana" / "cf_ray.json").read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "SessionName", "window"} <= variables
    shown = set()
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        for t in p["targets"]:
            names = set(re.findall(r"\b(ray_[a-z_]+)\s*\{", t["expr"]))
            assert names and names <= set(metrics.EXPORTED), f"{p['title']}: {names - set(metrics.EXPORTED)}"
            assert 'SessionName=~"$SessionName"' in t["expr"]
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables
            shown |= names
    assert shown == set(metrics.EXPORTED)  # every series cf_ray exports has a panel
