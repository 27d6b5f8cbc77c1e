"""--seeds: the seed -> config mapping, the mean ± sd / paired-difference maths, the CLI, and the stages whose
results must not depend on the order extraction wrote its rows in. No Ray."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from cf_ray import features
from cf_ray.config import ClusterConfig, ConfigError, JobConfig, ProbeConfig, load_config
from cf_ray.seeds import SEED_FIELDS, parse_seeds, seed_values, sweep_with_seed, with_seed
from cf_ray.stages.seeds_report import (
    commands_behind,
    mean_sd,
    paired,
    summarize_job,
    summarize_sweep,
    write_job_seeds_report,
    write_sweep_seeds_report,
)


def test_seed_zero_is_the_config_as_given_and_seed_s_adds_s_everywhere():
    base = load_config(JobConfig, None, ["run_dir=runs/x", "cluster.seed=100", "probe.seed=7"])
    zero, two = with_seed(base, 0), with_seed(base, 2)
    assert seed_values(zero) == seed_values(base)
    assert zero.model_dump(exclude={"run_dir"}) == base.model_dump(exclude={"run_dir"})
    assert (zero.run_dir, two.run_dir) == ("runs/x/seed_0", "runs/x/seed_2")
    assert seed_values(two) == {k: v + 2 for k, v in seed_values(base).items()}
    assert (two.cluster.seed, two.probe.seed, two.retrain.seed, two.pretrain.train.seed) == (102, 9, 2, 2)
    assert base.run_dir == "runs/x" and base.cluster.seed == 100  # the base is not changed
    # nothing else moves: the two configs differ only in the seed fields and run_dir
    flat = lambda c: {k: v for k, v in _flatten(c.model_dump()).items() if k not in SEED_FIELDS + ("run_dir",)}  # noqa: E731
    assert flat(two) == flat(base)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_every_seed_field_exists_and_the_sweep_maps_its_job():
    from cf_ray.sweep import SweepConfig

    base = JobConfig()
    assert set(seed_values(base)) == set(SEED_FIELDS)
    sweep = SweepConfig(run_dir="runs/sw", job=base)
    s1 = sweep_with_seed(sweep, 1)
    assert s1.run_dir == "runs/sw/seed_1" and s1.job.cluster.seed == base.cluster.seed + 1
    assert s1.job.run_dir == base.run_dir and sweep.job.cluster.seed == base.cluster.seed


def test_a_base_run_made_with_seeds_gives_each_sweep_seed_its_own_pretraining(tmp_path):
    from cf_ray.config import ConfigError
    from cf_ray.sweep import Sweep, load_sweep_config

    base, plain = tmp_path / "cifar10", tmp_path / "plain"
    for seed in (0, 1):
        (base / f"seed_{seed}").mkdir(parents=True)
        (base / f"seed_{seed}" / "manifest.json").write_text('{"stages": {}}')
    (base / "seeds.json").write_text('{"seeds": [0, 1]}')
    plain.mkdir()
    (plain / "manifest.json").write_text('{"stages": {}}')
    cfg = load_sweep_config(None, [f"base_run={base}", "job.target=y", f"run_dir={tmp_path / 'sw'}"])
    assert sweep_with_seed(cfg, 1).base_run == str(base / "seed_1")
    with pytest.raises(ConfigError, match="no run for seed 2"):
        sweep_with_seed(cfg, 2)
    with pytest.raises(ConfigError, match="--seeds"):
        Sweep(cfg)  # one sweep over per-seed runs: which seed's pre-training is meant is not guessed
    shared = cfg.model_copy(update={"base_run": str(plain)})
    assert sweep_with_seed(shared, 1).base_run == str(plain)  # a plain run directory is every seed's base
    with pytest.raises(ConfigError, match="not a run directory"):
        load_sweep_config(None, [f"base_run={tmp_path / 'sw'}", "job.target=y"])


@pytest.mark.parametrize("text, seeds", [("0,1,2", [0, 1, 2]), ("5", [5]), (" 3, 1 ", [3, 1])])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "0,0", "-1", "1.5"])
def test_parse_seeds_rejects(text):
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds(text)


def test_mean_sd_is_the_sample_sd():
    s = mean_sd([0.50, 0.54, 0.58])
    assert s["mean"] == pytest.approx(0.54) and s["sd"] == pytest.approx(0.04)
    assert mean_sd([0.5])["sd"] is None


def test_significance_rule_both_ways():
    # diffs +0.03, +0.04, +0.05: mean 0.04 > 2 x sd 0.01 -> significant
    yes = paired([0.53, 0.54, 0.55], [0.50, 0.50, 0.50])
    assert yes["mean"] == pytest.approx(0.04) and yes["sd"] == pytest.approx(0.01) and yes["significant"]
    # diffs +0.10, -0.06, +0.02: mean 0.02, sd 0.08 -> not
    no = paired([0.60, 0.44, 0.52], [0.50, 0.50, 0.50])
    assert no["mean"] == pytest.approx(0.02) and no["sd"] == pytest.approx(0.08) and not no["significant"]
    # a negative difference counts by its size; one seed has no sd and is never marked
    assert paired([0.40, 0.41, 0.39], [0.50, 0.50, 0.50])["significant"]
    assert not paired([0.9], [0.1])["significant"]
    # pairing matters: the same values unpaired would spread far more than their differences
    assert paired([0.40, 0.60, 0.80], [0.38, 0.58, 0.78])["significant"]


def _metrics(cf: dict, pre: dict, rnd: dict, nmi: float) -> dict:
    return {
        "transfer": {"target": {"random": rnd, "pretrained": pre, "clusterfit": cf}},
        "transfer_metric": {"target": "top-1"},
        "cluster": {"nmi": nmi},
    }


PER_SEED = {
    0: _metrics({"res4": 0.53, "res5": 0.60}, {"res4": 0.50, "res5": 0.50}, {"res4": 0.3, "res5": 0.3}, 0.2),
    1: _metrics({"res4": 0.54, "res5": 0.44}, {"res4": 0.50, "res5": 0.50}, {"res4": 0.3, "res5": 0.3}, 0.3),
    2: _metrics({"res4": 0.55, "res5": 0.52}, {"res4": 0.50, "res5": 0.50}, {"res4": 0.3, "res5": 0.3}, 0.4),
}


def test_job_summary_over_hand_made_seeds():
    s = summarize_job(PER_SEED)
    t = s["targets"]["target"]
    assert t["seeds"] == [0, 1, 2] and t["metric"] == "top-1"
    assert t["scores"]["clusterfit"]["res5"]["mean"] == pytest.approx(0.52)
    d = t["differences"]["clusterfit - pretrained"]
    assert d["res4"]["significant"] and not d["res5"]["significant"]
    assert d["res5"]["sd"] == pytest.approx(0.08)
    assert t["differences"]["pretrained - random"]["res4"]["mean"] == pytest.approx(0.2)
    assert s["cluster"]["nmi"]["mean"] == pytest.approx(0.3) and s["cluster"]["nmi"]["sd"] == pytest.approx(0.1)


def test_job_seeds_report_files(tmp_path):
    for seed, m in PER_SEED.items():
        if seed != 2:  # seed 2 has not finished
            (tmp_path / f"seed_{seed}").mkdir()
            (tmp_path / f"seed_{seed}" / "metrics.json").write_text(json.dumps(m))
    write_job_seeds_report(str(tmp_path), [0, 1, 2], "python jobs/clusterfit_image.py --demo --seeds 0,1,2")
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["missing"] == [2]
    text = (tmp_path / "report_seeds.md").read_text()
    assert "--seeds 0,1,2" in text and "2 x their sample sd" in text and "without results yet" in text
    # res4: diffs +3, +4 points -> mean 3.5, sd 0.7: significant; res5: +10, -6 -> not
    assert "| res4 | 30.0 ± 0.0 | 50.0 ± 0.0 | 53.5 ± 0.7 | +3.5 ± 0.7 * |" in text
    assert "| res5 |" in text and "+2.0 ± 11.3 |" in text
    last = "ClusterFit res5 52.0 ± 11.3 vs pre-trained 50.0 ± 0.0, paired difference +2.0 ± 11.3 points: not beyond"
    assert last in text


def _sweep_results(pre: float, row: float, fit: float = 0.75) -> dict:
    ref = lambda v: {"target": {"res5": {"score": v}}}  # noqa: E731
    setting = {
        "kind": "clusterfit",
        "k": 10,
        "layer": "res5",
        "epochs": 8,
        "model": {"arch": "resnet_tiny", "width": 16},
        "cluster": {"nmi": 0.2},
        "train_acc": fit,
    }
    control = {"task": "rotation", "model": {"arch": "resnet_tiny", "width": 16}, "train_acc": 0.9}
    return {
        "references": {"random": ref(0.3), "pretrained": ref(pre)},
        "rows": [
            {**setting, "transfer": ref(row)},
            {**control, "kind": "distill", "epochs": 2, "transfer": ref(pre - 0.05)},  # 2 x 4 rotations = 8 ep
            {**control, "kind": "longer_pretrain", "epochs": 4, "transfer": ref(row)},  # 16 ep: not a match
            {**setting, "model": {"arch": "resnet_tiny", "width": 32}, "transfer": ref(row)},  # wider: no control
        ],
    }


def test_sweep_summary_and_report(tmp_path):
    per_seed = {0: _sweep_results(0.50, 0.53, 0.7), 1: _sweep_results(0.60, 0.64), 2: _sweep_results(0.40, 0.45, 0.8)}
    s = summarize_sweep(per_seed)
    rows = s["targets"]["target"]["rows"]
    label = "ClusterFit K=10 res5 8ep resnet_tiny w16"
    assert rows[label]["scores"]["res5"]["mean"] == pytest.approx(0.54)
    assert rows[label]["scores"]["res5"]["sd"] == pytest.approx(math.sqrt(0.0091))
    vs = rows[label]["vs_pretrained"]["res5"]
    assert vs["mean"] == pytest.approx(0.04) and vs["significant"]  # +3, +4, +5 points, paired
    assert rows["control: distillation 2ep"]["vs_pretrained"]["res5"]["significant"]  # -5 points each seed
    # against the same-compute control only (2 RotNet epochs = 8 images' worth), paired: +8, +9, +10 points
    vs_controls = rows[label]["vs_controls"]
    assert list(vs_controls) == ["control: distillation 2ep"]
    assert vs_controls["control: distillation 2ep"]["res5"]["mean"] == pytest.approx(0.09)
    assert vs_controls["control: distillation 2ep"]["res5"]["significant"]
    assert rows["ClusterFit K=10 res5 8ep resnet_tiny w32"]["vs_controls"] == {}
    for seed, r in per_seed.items():
        (tmp_path / f"seed_{seed}").mkdir()
        (tmp_path / f"seed_{seed}" / "sweep_results.json").write_text(json.dumps(r))
    write_sweep_seeds_report(str(tmp_path), [0, 1, 2])
    text = (tmp_path / "report_seeds.md").read_text()
    assert f"| {label} | 3 | 54.0 ± 9.5 | +4.0 ± 1.0 * |" in text
    assert f"| {label} | control: distillation 2ep | 3 | +9.0 ± 1.0 * |" in text
    # the clusters' NMI and each row's fit of its own targets, over the seeds (0.70, 0.75, 0.80 below)
    assert s["fit"][label]["train_acc"]["mean"] == pytest.approx(0.75)
    assert f"| {label} | 3 | 0.200 ± 0.000 |  | 75.0 ± 5.0 |" in text


def test_cli_takes_seeds(tmp_path, capsys):
    from cf_ray.cli import main

    rc = main(["all", "--seeds", "0,3", "--print-config", "data=x", "target=y", f"run_dir={tmp_path}"])
    assert rc == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["run_dir"] for d in docs] == [str(tmp_path / "seed_0"), str(tmp_path / "seed_3")]
    assert [d["cluster"]["seed"] for d in docs] == [1234, 1237]
    assert main(["all", "--seeds", "x", "--print-config", "data=x", "target=y"]) == 2


def _write_shuffled(uri: str, ids, x, labels, order, parts: int) -> str:
    """One feature folder of the same rows, in ``order`` and split into ``parts`` part files."""
    table = features.feature_table(
        [ids[i] for i in order], [""] * len(ids), [labels[i] for i in order], [""] * len(ids), {"res5": x[order]}
    )
    for chunk in np.array_split(np.arange(len(ids)), parts):
        features.write_part(uri, table.take(chunk))
    features.finish(uri, {})
    return uri


def test_probe_and_kmeans_do_not_depend_on_the_order_rows_were_written_in(tmp_path):
    """Extraction writes part files whose rows and names depend on Ray Data's block order: the probe's seeded
    held-out split and faiss's seeded init must pick the same items whatever that order was."""
    from cf_ray.stages.cluster import _faiss_task
    from cf_ray.stages.probe import run_probe

    rng = np.random.default_rng(0)
    n = 240
    ids = [f"item{i:04d}" for i in range(n)]
    x = rng.normal(size=(n, 8)).astype(np.float32)  # noise: the held-out score depends on which rows are held out
    labels = [str(v) for v in rng.integers(0, 3, n)]
    a = _write_shuffled(str(tmp_path / "a"), ids, x, labels, np.arange(n), 1)
    b = _write_shuffled(str(tmp_path / "b"), ids, x, labels, rng.permutation(n), 3)
    cfg = ProbeConfig(layers=["res5"], epochs=15, weight_decays=[1e-4, 1e-2])
    assert run_probe(cfg, a, a) == run_probe(cfg, b, b)
    km = ClusterConfig(k=6, layer="res5", niter=5, cpus_per_actor=1)
    out = {}
    for name, uri in (("a", a), ("b", b)):
        _faiss_task(km, uri, str(tmp_path / f"km_{name}"), False)
        assignments = pq.read_table(str(tmp_path / f"km_{name}" / "assignments.parquet"))
        out[name] = dict(zip(assignments["id"].to_pylist(), assignments["cluster"].to_pylist()))
    assert out["a"] == out["b"]


def test_sweep_script_takes_seeds(tmp_path):
    """--report-only needs no Ray: each seed's sweep directory and the combined report are written."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "jobs" / "clusterfit_sweep.py"
    args = [sys.executable, str(script), "--seeds", "0,2", "--report-only", "job.data=x", "job.target=y"]
    res = subprocess.run(args + [f"run_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "seed_0" / "report.md").exists() and (tmp_path / "seed_2" / "sweep.yaml").exists()
    assert (
        "cluster:\n    k: 100\n    layer: res5\n    niter: 20\n    seed: 1236"
        in (tmp_path / "seed_2" / "sweep.yaml").read_text()
    )
    assert json.loads((tmp_path / "seeds.json").read_text())["seeds"] == [0, 2]
    assert "report_seeds.md" in res.stdout


def test_report_stage_over_seeds_keeps_the_command_that_made_the_runs(tmp_path):
    """`cf-ray report --seeds` only rewrites reports (no Ray): each seed's report.md, and the summary keeps the
    command of the runs rather than its own."""
    from cf_ray.seeds import run_job_seeds

    (tmp_path / "seeds.json").write_text(json.dumps({"command": "python jobs/clusterfit_image.py --seeds 0,1"}))
    cfg = load_config(JobConfig, None, ["data=x", "target=y", f"run_dir={tmp_path}"])
    out = run_job_seeds(cfg, [0, 1], "report", "cf-ray report --seeds 0,1")
    assert (tmp_path / "seed_1" / "report.md").exists() and "seed: 1\n" in (
        tmp_path / "seed_1" / "config.yaml"
    ).read_text()
    assert json.loads((tmp_path / "seeds.json").read_text())["commands"] == [
        "python jobs/clusterfit_image.py --seeds 0,1"
    ]
    assert out["report"] == str(tmp_path / "report_seeds.md")


def test_a_sweep_directory_filled_by_two_commands_names_both(tmp_path):
    """A second grid into the same run_dir adds rows, so the report must list both commands, in order; rerunning
    one (a resume) adds nothing, and a report-only rewrite keeps them without adding itself."""
    per_seed = {0: _sweep_results(0.50, 0.53, 0.7), 1: _sweep_results(0.60, 0.64)}
    for seed, r in per_seed.items():
        (tmp_path / f"seed_{seed}").mkdir()
        (tmp_path / f"seed_{seed}" / "sweep_results.json").write_text(json.dumps(r))
    first, second = "sweep --seeds 0,1 'grid.k=[50]'", "sweep --seeds 0,1 'grid.layer=[res4]'"
    for command, report_only in [(first, False), (second, False), (first, False), ("sweep --report-only", True)]:
        write_sweep_seeds_report(str(tmp_path), [0, 1], command, report_only)
    assert json.loads((tmp_path / "seeds.json").read_text())["commands"] == [first, second]
    text = (tmp_path / "report_seeds.md").read_text()
    assert f"Reproduce (in this order; each command adds its rows):\n\n```bash\n{first}\n{second}\n```" in text
    # a summary written before the list existed (one "command") is read as a list of one
    (tmp_path / "seeds.json").write_text(json.dumps({"command": first}))
    assert commands_behind(str(tmp_path), "seeds", second) == [first, second]
