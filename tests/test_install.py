"""A new user's first commands: a wheel installed into a fresh venv, run from another folder; --version on every
entry point; a job started by a Python without cf_ray's dependencies fails in one line."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
VERSION = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
JOBS = ["jobs/clusterfit_image.py", "jobs/clusterfit_video.py", "jobs/clusterfit_sweep.py"]


def _env() -> dict:
    """The caller's environment without the checkout on the path: what a new shell has."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(cmd, cwd, timeout=120, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def test_wheel_installs_and_runs_from_another_folder(tmp_path):
    """Build the wheel offline, install it (no deps) into a fresh venv, and run the documented first commands from
    an unrelated folder: the packaged demo config is found and the demo data goes under that folder."""
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT / "cf_ray", src / "cf_ray", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(src)], tmp_path, timeout=300)  # fmt: skip
    (wheel,) = dist.glob("cf_ray-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp_path)
    py, bindir = venv / "bin" / "python", venv / "bin"
    # --system-site-packages exposes the base interpreter's packages, and this test's interpreter may itself be a
    # venv: point the new venv at this interpreter's packages too (torch, ray, ...), after its own.
    purelib = Path(
        _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    )
    (purelib / "zz_base_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         tmp_path, timeout=300)  # fmt: skip

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(py), "-c", "import cf_ray; print(cf_ray.__file__, cf_ray.__version__)"], work).stdout.split()
    assert where[0].startswith(str(venv)) and where[1] == VERSION  # the wheel's copy, version from its metadata
    assert "--print-config" in _run([str(bindir / "cf-ray"), "--help"], work).stdout
    assert _run([str(py), "-m", "cf_ray", "--version"], work).stdout.startswith(f"cf_ray {VERSION} (")

    out = _run([str(bindir / "cf-ray"), "all", "--demo", "--print-config"], work, timeout=300).stdout
    cfg = yaml.safe_load(out)
    shipped = yaml.safe_load((ROOT / "cf_ray" / "configs" / "image_demo.yaml").read_text())
    assert cfg["cluster"]["k"] == shipped["cluster"]["k"] and cfg["run_dir"] == shipped["run_dir"]
    assert (work / cfg["data"]).is_dir() and (work / cfg["target"] / "train").is_dir()
    assert Path(cfg["data"]).parts[0] == "data" and not (venv / "data").exists()


@pytest.mark.parametrize("cmd", [["-m", "cf_ray"], *([j] for j in JOBS)], ids=lambda c: c[-1])
def test_every_entry_point_has_version(tmp_path, cmd):
    env = {**_env(), "PYTHONPATH": str(ROOT)}  # -m cf_ray: this checkout's (jobs/*.py put it on sys.path themselves)
    r = _run(
        [sys.executable, *[str(ROOT / c) if c.endswith(".py") else c for c in cmd], "--version"], tmp_path, env=env
    )
    line = r.stdout.strip()
    assert "\n" not in line and line.startswith(f"cf_ray {VERSION} (")
    for dep in ("Ray", "torch", "faiss", "pyarrow", "PyAV"):
        assert re.search(rf"\b{dep} \d", line), line


@pytest.mark.parametrize("cmd", [["-m", "cf_ray"], *([j] for j in JOBS)], ids=lambda c: c[-1])
def test_a_python_without_the_dependencies_fails_in_one_line(tmp_path, cmd):
    """What `ray job submit` does on a head started outside the venv: the entrypoint's `python` lacks torch & co.
    -I -S: no site-packages (and no PYTHONPATH), so only the standard library and the script's own folder."""
    env = _env()
    if cmd[0] == "-m":
        env["PYTHONPATH"] = str(ROOT)  # -I ignores it: use -S alone so cf_ray itself is found
    argv = [sys.executable, "-S", *([] if cmd[0] == "-m" else ["-I"]), *cmd, "--demo"]
    argv = [str(ROOT / a) if a.endswith(".py") else a for a in argv]
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"({sys.executable})" in r.stderr and "torch" in r.stderr and "yaml" in r.stderr
    assert "docs/cluster.md" in r.stderr and not (tmp_path / "data").exists()
