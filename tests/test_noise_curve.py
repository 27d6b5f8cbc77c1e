"""The label-noise curve: one sweep per noise level and seed, and the report of the gain against the noise."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cf_ray.config import ConfigError
from cf_ray.demo import make_demo_splits
from cf_ray.stages.noise_report import summarize_noise, write_noise_report
from cf_ray.sweep import load_sweep_config

ROOT = Path(__file__).resolve().parent.parent
LABEL = "ClusterFit K=6 res5 1ep resnet_tiny w8"


def _results(pre: float, cf: float) -> dict:
    """A sweep_results.json with one target and layer: random 0.2, pre-trained ``pre``, one setting ``cf``."""
    ref = lambda v: {"target": {"res5": {"score": v}}}  # noqa: E731
    setting = {"kind": "clusterfit", "k": 6, "layer": "res5", "epochs": 1, "model": {"arch": "resnet_tiny", "width": 8}}
    control = {"kind": "distill", "task": "labels", "epochs": 1, "model": setting["model"]}  # same compute
    control["transfer"] = ref(pre + 0.01)  # one point above pre-trained
    return {
        "references": {"random": ref(0.2), "pretrained": ref(pre)},
        "rows": [{**setting, "transfer": ref(cf)}, control],
    }


def test_gain_per_level_and_its_trend_are_paired_by_seed(tmp_path):
    # Gains: noise 0: -2, -4 points; noise 0.5: +1, +3 points -> trend +3, +7 points.
    per_level = {
        0.0: {0: _results(0.60, 0.58), 1: _results(0.50, 0.46)},
        0.5: {0: _results(0.40, 0.41), 1: _results(0.30, 0.33)},
    }
    s = summarize_noise(per_level)
    rows = s["targets"]["target"]["rows"]
    assert rows[LABEL][0.0]["gain"]["res5"]["mean"] == pytest.approx(-0.03)
    assert rows[LABEL][0.5]["gain"]["res5"]["mean"] == pytest.approx(0.02)
    assert rows["pretrained"][0.5]["scores"]["res5"]["mean"] == pytest.approx(0.35)
    trend = s["targets"]["target"]["trend"][LABEL]["res5"]
    assert trend["values"] == pytest.approx([0.03, 0.07]) and trend["mean"] == pytest.approx(0.05)
    assert not trend["significant"]  # 5 +- 2.8 points: |mean| < 2 sd

    for level, by_seed in per_level.items():
        for seed, res in by_seed.items():
            d = tmp_path / f"noise_{level:g}" / f"seed_{seed}"
            d.mkdir(parents=True)
            (d / "sweep_results.json").write_text(json.dumps(res))
    out = write_noise_report(str(tmp_path), [0.0, 0.5, 0.75], [0, 1], "python jobs/clusterfit_sweep.py ...")
    text = Path(out["report"]).read_text()
    assert f"| {LABEL} | res5 | -3.0 ± 1.4 * | +2.0 ± 1.4 |  | +5.0 ± 2.8 |" in text
    assert "| pretrained | res5 | 55.0 ± 7.1 | 35.0 ± 7.1 |  |" in text
    # ClusterFit minus the control, paired by seed: noise 0: -3, -5 points; noise 0.5: 0, +2 points.
    assert f"| {LABEL} - control: distillation 1ep | res5 | -4.0 ± 1.4 * | +1.0 ± 1.4 |  |" in text
    assert "noise 0.75 seed 0, noise 0.75 seed 1" in text  # what is still owed is listed
    assert (tmp_path / "plots" / "noise_target.png").stat().st_size > 1000
    assert json.loads(Path(out["summary"]).read_text())["levels"] == [0.0, 0.5]


def test_noise_levels_config_errors(tmp_path):
    base = ["job.data=x", "job.target=y", f"run_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="noise_levels needs job.pretrain.source=labels"):
        load_sweep_config(None, base + ["noise_levels=[0,0.5]"])
    with pytest.raises(ConfigError, match="distinct fractions"):
        load_sweep_config(None, base + ["noise_levels=[0,1.0]", "job.pretrain.source=labels"])
    cfg = load_sweep_config(None, base + ["noise_levels=[0,0.25]", "job.pretrain.source=labels"])
    assert cfg.noise_levels == [0, 0.25]


def test_noise_curve_end_to_end_and_resume(ray_session, tmp_path):
    """One real noise level (the levels' arithmetic is the test above), one seed, tiny images: the level pre-trains
    on its own flipped labels in noise_<level>/seed_<s>, the report has its row, a rerun trains nothing, and the
    sweep script rewrites the report (--report-only, no Ray), listing what is owed."""
    from cf_ray.noise_curve import run_noise_curve, sweep_at_noise

    data, target = make_demo_splits(tmp_path / "data", n_unlabelled=8, n_train=4, n_test=4, size=16)
    run = tmp_path / "run"
    args = [f"job.data={data}", f"job.target={target}", f"run_dir={run}", "noise_levels=[0.5]"]
    args += ["job.pretrain.source=labels", "job.image.size=16", "job.pretrain.train.model.width=8"]
    args += ["job.retrain.model.width=8", "job.pretrain.train.epochs=1", "job.pretrain.train.batch_size=32"]
    args += ["job.retrain.batch_size=32", "job.extract.layers=[res5]", "job.cluster.niter=5", "job.probe.layers=[res5]"]
    args += ["job.probe.epochs=20", "job.probe.weight_decays=[0.001]"]
    args += ["grid.k=[6]", "grid.layer=[res5]", "grid.epochs=[1]"]
    args += ["controls.longer_pretrain=false", "controls.distill=false"]  # the controls' rows: the test above
    cfg = load_sweep_config(None, args)
    assert sweep_at_noise(cfg, 0.25).job.pretrain.label_noise == 0.25 and cfg.job.pretrain.label_noise == 0
    out = run_noise_curve(cfg, [0], command="the command")
    assert out["report"] == str(run / "report_noise.md")
    seed = run / "noise_0.5" / "seed_0"
    assert "label_noise: 0.5\n" in (seed / "sweep.yaml").read_text()
    pre = json.loads((seed / "manifest.json").read_text())["stages"]["pretrain"]["result"]
    assert pre["flipped"] == 24  # half of the 48 source images
    assert (run / "noise_0.5" / "report_seeds.md").exists()
    text = (run / "report_noise.md").read_text()
    assert f"| {LABEL} | res5 |" in text and "| pretrained | res5 |" in text
    assert "Seeds without results yet" not in text and (run / "plots" / "noise_target.png").exists()

    model = seed / "settings" / "k6_res5_e1_resnet_tiny-w8" / "models" / "clusterfit"
    mtime = (model / "backbone.pt").stat().st_mtime
    run_noise_curve(cfg, [0], command="the command")
    assert (model / "backbone.pt").stat().st_mtime == mtime

    script = [sys.executable, str(ROOT / "jobs" / "clusterfit_sweep.py"), "--report-only", "--seeds", "0,1"]
    res = subprocess.run(script + args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "report_noise.md" in res.stdout and not (run / "noise_0.5" / "seed_1").exists()
    assert "noise curve: noise 0.5, seed 1 (2 of 2)" in res.stdout  # the driver's progress lines are shown
    text = (run / "report_noise.md").read_text()
    assert "Seeds without results yet (rerun the same command): noise 0.5 seed 1." in text
    assert "the command" in text and "--report-only" not in text  # the command that made the runs is kept
