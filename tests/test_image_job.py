"""The whole image job end to end on tiny generated data, on the session's real local Ray."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import cf_ray
from cf_ray.config import ConfigError, JobConfig, load_config
from cf_ray.demo import make_demo_splits
from cf_ray.pipeline import run_job
from cf_ray.sources import SourceError

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "image.size=16",
    "pretrain.train.model.width=4",
    "retrain.model.width=4",
    "pretrain.train.epochs=1",
    "retrain.epochs=1",
    "pretrain.train.batch_size=32",
    "retrain.batch_size=32",
    "extract.block_rows=64",
    "cluster.k=6",
    "cluster.niter=5",
    "probe.epochs=20",
    "probe.weight_decays=[0.001]",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    data, target = make_demo_splits(root / "data", n_unlabelled=10, n_train=5, n_test=4, size=16)
    (target / "test").rename(target / "val")  # the ImageNet convention: train/ + val/
    (data / "triangle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (data / "notes.txt").write_text("not an image")
    return root, data, target


def _multi_label_manifest(target: Path, path: Path) -> Path:
    """The target's images as one manifest whose items carry their shape and, for every other one, 'odd' too."""
    rows = ["path,label"] + [
        f"{f},{f.parent.name}" + ("|odd" if i % 2 else "") for i, f in enumerate(sorted(target.glob("*/*/*.jpg")))
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_image_job_end_to_end_resume_and_a_second_target(ray_session, demo):
    root, data, target = demo
    cfg = load_config(JobConfig, None, TINY + [f"data={data}", f"target={target}", f"run_dir={root / 'run'}"])
    out = run_job(cfg)
    run = Path(out["run_dir"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert set(out["transfer"]) == {"target"} and set(out["transfer"]["target"]) == {
        "random",
        "pretrained",
        "clusterfit",
    }
    for m in out["transfer"]["target"].values():
        assert set(m) == {"res3", "res4", "res5"} and all(
            v["metric"] == "top1" and 0 <= v["score"] <= 1 for v in m.values()
        )

    a = pq.read_table(run / "cluster" / "assignments.parquet")
    assert a.num_rows == 60 and set(a["cluster"].to_pylist()) <= set(range(6))  # 61 files, 1 undecodable
    errors = pq.read_table(run / "errors.parquet").to_pylist()
    reasons = {Path(e["path"]).name: e["error"] for e in errors}
    assert "cannot decode" in reasons["broken.jpg"] and "unsupported" in reasons["notes.txt"]
    assert len([e for e in errors if e["path"].endswith("broken.jpg")]) == 1  # seen by pretrain and extract, kept once

    # A rerun with a second (multi-label) target resumes: every done stage is skipped, outputs are untouched,
    # and only the new target's items, features and probes are computed.
    mtime = (run / "cluster" / "assignments.parquet").stat().st_mtime
    shapes = _multi_label_manifest(target, root / "shapes.csv")
    cfg2 = load_config(
        JobConfig,
        None,
        TINY
        + [
            f"data={data}",
            f"target={target}",
            f"run_dir={root / 'run'}",
            f"targets.shapes.path={shapes}",
            "targets.shapes.multi_label=true",
        ],
    )
    out2 = run_job(cfg2)
    assert (run / "cluster" / "assignments.parquet").stat().st_mtime == mtime
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert all(stages[n] == manifest["stages"][n] for n in manifest["stages"] if n != "report")
    assert all(
        stages[n]["status"] == "done" for n in ("items_shapes", "extract_clusterfit_shapes_test", "transfer_shapes")
    )
    assert out2["transfer"]["target"] == out["transfer"]["target"]
    for m in out2["transfer"]["shapes"].values():
        assert set(m) == {"res3", "res4", "res5"} and all(
            v["metric"] == "map" and 0 <= v["score"] <= 1 for v in m.values()
        )

    report = (run / "report.md").read_text()
    assert "ClusterFit - pre-trained" in report and "broken.jpg" in report
    assert report.splitlines()[2].startswith(f"cf_ray {cf_ray.__version__}; Ray ") and "PyAV " in report.splitlines()[2]
    assert f"test split of `{target}` (train/ and val/; val/ used as the test split)" in report
    assert "(one labelled set, split by probe.test_fraction)" in report  # the shapes manifest
    assert "## Transfer to shapes" in report and "mAP (%)" in report
    for plot in ("transfer.png", "transfer_shapes.png", "cluster_sizes.png", "training.png"):
        assert (run / "plots" / plot).stat().st_size > 1000
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["transfer_metric"] == {"target": "top-1", "shapes": "mAP"}
    assert metrics["versions"]["cf_ray"] == cf_ray.__version__ and metrics["versions"]["torch"][0].isdigit()
    assert metrics["skipped_inputs"] == 2 and "nmi" in metrics["cluster"]
    assert metrics["cluster"]["device"] == "cpu" and "k-means ran on cpu (backend faiss)" in report
    assert "pretrain per epoch:" in report and "retrain per epoch:" in report
    assert all(h[0]["items_per_s"] > 0 and h[0]["loss"] > 0 for h in metrics["training_history"].values())
    assert (run / "models" / "clusterfit" / "backbone.pt").exists()
    assert load_config(JobConfig, run / "config.yaml") == cfg2

    # `cf-ray cluster` redoes k-means alone (the same opening as the whole job: config.yaml is rewritten); the
    # stages that depend on it are forgotten, the others are kept as they were.
    from cf_ray.cli import main

    before = stages
    args = TINY + [f"data={data}", f"target={target}", f"run_dir={run}", f"targets.shapes.path={shapes}"]
    assert main(["cluster", *args, "targets.shapes.multi_label=true", "cluster.k=5"]) == 0
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert "k: 5" in (run / "config.yaml").read_text() and stages["cluster"]["status"] == "done"
    assert pq.read_table(run / "cluster" / "assignments.parquet")["cluster"].to_numpy().max() < 5
    forgotten = {"retrain", "extract_clusterfit_target_test", "transfer_target", "transfer_shapes", "report"}
    assert not forgotten & set(stages) and not (run / "models" / "clusterfit").exists()
    kept = ("pretrain", "extract_source", "extract_pretrained_target_test", "extract_random_shapes_train")
    assert all(stages[n] == before[n] for n in kept)


def test_bad_inputs_fail_before_ray_work(demo, tmp_path):
    _, data, target = demo
    with pytest.raises(ConfigError, match="cluster.k=500"):
        run_job(
            load_config(
                JobConfig,
                None,
                TINY + [f"data={data}", f"target={target}", "cluster.k=500", f"run_dir={tmp_path / 'r1'}"],
            )
        )
    with pytest.raises(SourceError, match="does not exist"):
        run_job(load_config(JobConfig, None, [f"data={tmp_path / 'nope'}", f"target={target}"]))
    assert not (tmp_path / "r1").exists()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "run").write_text("a file where the run directory should go")
    with pytest.raises(ConfigError, match="not writable"):
        run_job(
            load_config(
                JobConfig, None, TINY + [f"data={data}", f"target={target}", f"run_dir={tmp_path / 'ro' / 'run'}"]
            )
        )


def test_job_script_reports_config_errors_clearly(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "clusterfit_image.py"), "--data", str(tmp_path), "cluster.kk=3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 2 and "cluster.kk: unknown key" in r.stderr
