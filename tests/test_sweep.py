"""The ClusterFit sweep end to end on tiny generated images, on the session's real local Ray."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cf_ray
from cf_ray.config import ConfigError, dump_config
from cf_ray.demo import make_demo_splits
from cf_ray.pipeline import cluster_quality, noisy_labels
from cf_ray.sweep import load_sweep_config, run_sweep

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "job.image.size=16",
    "job.pretrain.train.model.width=8",
    "job.retrain.model.width=8",
    "job.pretrain.train.epochs=1",
    "job.pretrain.train.batch_size=32",
    "job.retrain.batch_size=32",
    "job.extract.block_rows=64",
    "job.extract.layers=[res4,res5]",
    "job.cluster.niter=5",
    "job.probe.layers=[res4,res5]",
    "job.probe.epochs=20",
    "job.probe.weight_decays=[0.001]",
    "grid.k=[6]",
    "grid.layer=[res4+res5]",
    "grid.epochs=[1]",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data, target = make_demo_splits(root / "data", n_unlabelled=8, n_train=4, n_test=4, size=16)
    return root, data, target


def _table_rows(report: str) -> list[str]:
    return [l for l in report.splitlines() if l.startswith("| ") and ("ClusterFit K=" in l or "control:" in l)]


def test_sweep_reuses_pretraining_and_resumes(ray_session, demo):
    root, data, target = demo
    cfg = load_sweep_config(None, TINY + [f"job.data={data}", f"job.target={target}", f"run_dir={root / 'run'}"])
    out = run_sweep(cfg)
    run = Path(out["run_dir"])
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert all(s["status"] == "done" for s in stages.values())
    # One pre-training and one source extraction serve every setting and control.
    assert [n for n in stages if n in ("pretrain", "extract_source")] == ["pretrain", "extract_source"]
    settings = sorted(p.name for p in (run / "settings").iterdir())
    assert settings == ["k6_res4-res5_e1_resnet_tiny-w8"]
    sub = json.loads((run / "settings" / settings[0] / "manifest.json").read_text())["stages"]
    assert "pretrain" not in sub and sub["retrain"]["status"] == "done"
    source = next((run / "features" / "pretrained" / "source").glob("part-*.parquet"))
    dims = {n: pq.read_schema(source).field(f"feat_{n}").type.list_size for n in ("res4", "res5")}
    assert (
        json.loads((run / "features" / "cluster_input" / "res4-res5" / "_SUCCESS.json").read_text())["dim"]
        == dims["res4"] + dims["res5"]
    )
    assert sub["cluster"]["result"]["d"] == dims["res4"] + dims["res5"]

    report = (run / "report.md").read_text()
    rows = _table_rows(report)
    assert len(rows) == 3 and sum("control:" in r for r in rows) == 2  # 1 setting + longer pre-training + distillation
    assert "pre-trained (start of ClusterFit)" in report and "random init" in report
    assert report.splitlines()[2].startswith(f"cf_ray {cf_ray.__version__}; Ray ") and "faiss " in report
    assert "test split (train/ and test/)" in report
    res = json.loads((run / "sweep_results.json").read_text())
    assert res["versions"]["cf_ray"] == cf_ray.__version__
    for r in res["rows"]:
        assert set(r["transfer"]["target"]) == {"res4", "res5"}
        assert all(0 <= v["top1"] <= 1 for v in r["transfer"]["target"].values())
    cluster = res["rows"][0]["cluster"]
    assert 0 <= cluster["nmi"] <= 1 and 1 / 6 <= cluster["purity"] <= 1 and cluster["imbalance"] >= 1
    # One extraction pool serves consecutive extractions: it starts for the source, then again after each training.
    markers = [json.loads(p.read_text()) for p in run.glob("**/features/*/*/_SUCCESS.json")]
    started = [m["pool_start_s"] > 0 for m in markers if "pool_start_s" in m]
    assert len(started) == 11 and sum(started) == 4  # of 11 extractions
    distill = json.loads((run / "controls" / "distill_e1" / "manifest.json").read_text())["stages"]["train"]["result"]
    assert distill["items"] == 48 and (run / "plots" / "sweep_target.png").stat().st_size > 1000

    # A rerun skips every finished setting and control: nothing is retrained.
    started = {
        s: json.loads((run / "settings" / s / "manifest.json").read_text())["stages"]["retrain"]["started"]
        for s in settings
    }
    model = run / "controls" / "longer_pretrain_e1" / "models" / "clusterfit" / "backbone.pt"
    mtime = model.stat().st_mtime
    run_sweep(cfg)
    again = {
        s: json.loads((run / "settings" / s / "manifest.json").read_text())["stages"]["retrain"]["started"]
        for s in settings
    }
    assert again == started and model.stat().st_mtime == mtime
    assert _table_rows((run / "report.md").read_text()) == rows

    # The directory accumulates: a report for another grid keeps the rows done earlier and lists the new one as owed.
    other = load_sweep_config(None, TINY + [f"job.data={data}", f"job.target={target}", f"run_dir={run}", "grid.k=[5]"])
    res = run_sweep(other, report_only=True)
    assert sorted(_table_rows((run / "report.md").read_text())) == sorted(rows)
    assert res["missing"] == ["setting_k5_res4-res5_e1_resnet_tiny-w8"]


def test_fuse_layer_joins_two_networks_features(ray_session, demo):
    """fuse:res5 clusters [l2(base res5) | l2(fuse_run res5)] for the source items both networks have features of."""
    from cf_ray.features import read_features
    from cf_ray.kmeans.core import l2_normalize
    from cf_ray.pipeline import Paths
    from cf_ray.rundir import RunDir
    from cf_ray.stages.extract import run_extract
    from cf_ray.sweep import Sweep

    root, data, target = demo
    base = root / "run"  # the sweep of the test above: its pre-training and source features are done
    assert (base / "manifest.json").exists(), "needs test_sweep_reuses_pretraining_and_resumes to run first"
    # A second network: the base's random init, extracted on the same source items into a run directory of its own.
    job = load_sweep_config(None, TINY + [f"job.data={data}", f"job.target={target}"]).job
    (base / "config.yaml").write_text(dump_config(job))  # what makes a run directory usable as base_run
    fuse = RunDir(str(root / "fuse"))
    fuse.stage(
        "extract_source",
        lambda: run_extract(
            job.extract,
            job.media,
            str(base / "items" / "source.parquet"),
            str(base / "models" / "random"),
            Paths(fuse).features("pretrained", "source"),
        ),
    )
    cfg = load_sweep_config(
        None,
        TINY
        + [
            f"base_run={base}",
            f"fuse_run={fuse.root}",
            "grid.layer=[fuse:res5]",
            f"job.target={target}",
            f"run_dir={root / 'fused'}",
            "source_limit=20",
        ],
    )
    sweep = Sweep(cfg)
    sweep._write_cluster_source()
    res = sweep._write_cluster_input("fuse:res5")
    ids, x = read_features(sweep.cluster_input("fuse:res5"), "input")
    ids_a, a = read_features(str(base / "features" / "pretrained" / "source"), "res5")
    ids_b, b = read_features(Paths(fuse).features("pretrained", "source"), "res5")
    assert res["rows"] == len(ids) == 20 and x.shape[1] == a.shape[1] + b.shape[1]
    ia, ib = {i: k for k, i in enumerate(ids_a)}, {i: k for k, i in enumerate(ids_b)}
    a, b = l2_normalize(a[[ia[i] for i in ids]]), l2_normalize(b[[ib[i] for i in ids]])
    np.testing.assert_allclose(x, np.concatenate([a, b], axis=1), rtol=1e-5, atol=1e-6)
    assert a.shape == b.shape and not np.allclose(a, b)  # two different networks


def test_controls_match_each_retraining_budget(tmp_path):
    from cf_ray.sweep import Sweep, controls

    cfg = load_sweep_config(None, ["job.data=x", "job.target=y", f"run_dir={tmp_path}", "grid.epochs=[6,24,8]"])
    sweep = Sweep(cfg)
    assert sweep.control_epochs() == [2, 6]  # RotNet shows each image 4 times per epoch
    assert [s for s, _, _ in controls(sweep)] == [
        "control_longer_pretrain_e2",
        "control_distill_e2",
        "control_longer_pretrain_e6",
        "control_distill_e6",
    ]
    cfg = load_sweep_config(
        None,
        [
            "job.data=x",
            "job.target=y",
            f"run_dir={tmp_path}",
            "grid.epochs=[6]",
            "job.pretrain.source=labels",
            "controls.distill=false",
        ],
    )
    assert [s for s, _, _ in controls(Sweep(cfg))] == ["control_longer_pretrain_e6"]


def test_sweep_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="fuse_run"):
        load_sweep_config(None, ["grid.layer=[fuse:res5]", "job.data=x", "job.target=y"])
    with pytest.raises(ConfigError, match="not a run directory"):
        load_sweep_config(None, [f"base_run={tmp_path}", "job.target=y"])
    with pytest.raises(ConfigError, match="no transfer target"):
        load_sweep_config(None, ["job.data=x"])
    r = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "clusterfit_sweep.py"), "grid.k=[0]", "job.data=x", "job.target=y"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "grid.k" in r.stderr


def test_noisy_labels_flip_exactly_the_fraction_to_other_classes():
    truth = np.arange(1000) % 10
    noisy = noisy_labels(truth, 10, 0.3, seed=3)
    assert (noisy != truth).sum() == 300 and noisy.min() >= 0 and noisy.max() <= 9
    assert np.array_equal(noisy, noisy_labels(truth, 10, 0.3, seed=3))
    assert np.array_equal(noisy_labels(truth, 10, 0.0, seed=3), truth)


def test_cluster_quality_against_true_labels():
    items = pa.table({"id": list("abcdef"), "label": ["x", "x", "x", "y", "y", "y"]})
    perfect = cluster_quality(
        items, pa.table({"id": list("abcdef"), "cluster": pa.array([1, 1, 1, 0, 0, 0], pa.int64())})
    )
    assert perfect == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0), "purity": 1.0}
    mixed = cluster_quality(
        items, pa.table({"id": list("abcdef"), "cluster": pa.array([0, 1, 0, 1, 0, 1], pa.int64())})
    )
    assert mixed["purity"] == pytest.approx(4 / 6) and mixed["nmi"] < 0.2
    assert (
        cluster_quality(
            pa.table({"id": ["a"], "label": pa.array([None], pa.string())}),
            pa.table({"id": ["a"], "cluster": pa.array([0], pa.int64())}),
        )
        == {}
    )
