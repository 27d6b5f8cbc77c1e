"""benchmarks/gpu_check.py cannot rot: its dry run runs the same code at tiny sizes on CPU (real Ray, faiss, torch,
JPEGs and MP4s) and must produce every row without a FAILED one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_parts_a_b_c_produce_every_row(ray_session, tmp_path):
    """k-means, both extractions against the plain loop, and a Ray Train epoch (the demo of part d is the pipeline
    that tests/test_video_job.py runs; its configuration is checked below)."""
    gc = _load()
    out = tmp_path / "gpu.md"
    rc = gc.main(["--dry-run", "--parts", "abc", "--budget-s", "3000", "--out", str(out), "--work", str(tmp_path)])
    text = out.read_text()
    assert rc == 0, text
    assert "FAILED" not in text and "SKIPPED" not in text
    rows = [l for l in text.splitlines() if l.startswith("| a |") or l.startswith("| b |") or l.startswith("| c |")]
    assert sum(r.startswith("| a |") for r in rows) == 4
    assert sum("x |" in r for r in rows if r.startswith("| b |")) == 2  # two ratios: images and videos
    assert any("backend" in r and "| gloo |" in r for r in rows)  # read inside the Train worker: gloo on CPU
    assert "| part | what | cf_ray / GPU | baseline | ratio |" in text


def test_demo_part_asks_every_stage_for_the_gpu(tmp_path):
    gc = _load()
    c = gc.Check(dry=False, sizes=gc.FULL, work=tmp_path, budget_s=1)
    cfg = gc.demo_config(c, str(tmp_path / "d"), str(tmp_path / "t"))
    assert cfg.modality == "video" and cfg.run_dir == str(tmp_path / "demo_run")
    assert {cfg.pretrain.train.use_gpu, cfg.extract.use_gpu, cfg.cluster.use_gpu, cfg.retrain.use_gpu} == {"yes"}
    assert cfg.extract.precision == "auto" and cfg.retrain.channels_last == "auto"  # bf16 + channels_last on a GPU


def test_a_part_that_raises_is_a_failed_row_and_the_rest_still_run(tmp_path):
    gc = _load()
    c = gc.Check(dry=True, sizes=gc.DRY, work=tmp_path, budget_s=100)

    def boom(check):
        raise ValueError("no | such thing")

    gc.PARTS["x"] = ("broken part", boom)
    gc.PARTS["y"] = ("fine part", lambda check: check.row("y", "ok", "1"))
    gc.MIN_S.update(x=0, y=0)
    gc.run(c, "xy")
    assert c.rows[0][:2] == ("x", "broken part: FAILED") and "ValueError: no / such thing" in c.rows[0][2]
    assert c.rows[1] == ("y", "ok", "1", "", "")
