"""`ray job submit` against a real head node on loopback, as on a cluster: token authentication on, the job reads its
input from and writes every output to S3 (a real S3-compatible server on loopback)."""

import io
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from loopback_head import LoopbackHead
from s3_server import LoopbackS3

from cf_ray.config import ModelConfig
from cf_ray.demo import make_demo_splits
from cf_ray.models.checkpoint import build

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "image.size=16",
    "pretrain.train.model.width=4",
    "retrain.model.width=4",
    "retrain.epochs=1",
    "retrain.batch_size=32",
    "extract.block_rows=64",
    "extract.layers=[res5]",
    "cluster.k=4",
    "cluster.niter=5",
    "probe.epochs=10",
    "probe.layers=[res5]",
    "probe.weight_decays=[0.001]",
    "retrain.max_failures=0",
    "cluster.backend=ray",
    "cluster.num_actors=1",  # sharded k-means: its per-iteration checkpoints go to S3 too
]


@pytest.fixture(scope="module")
def s3():
    server = LoopbackS3()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def head(s3):
    h = LoopbackHead(
        auth_mode="token", extra_env=s3.env
    )  # S3 credentials on the node, as an instance profile gives them
    yield h
    h.stop()


def test_token_auth_refuses_a_wrong_token(head):
    r = head.cli("job", "list", env={"RAY_AUTH_TOKEN": "0" * 64})
    assert r.returncode != 0 and "token" in (r.stdout + r.stderr).lower()


def test_a_head_python_without_the_dependencies_fails_fast_in_one_line(head):
    """A head started outside the project's venv runs the entrypoint's `python` without torch & co (docs/cluster.md);
    here a Python without site-packages plays it (-I -S). The job ends at once with one line naming the cause."""
    head.submit(
        [sys.executable, "-I", "-S", "jobs/clusterfit_image.py", "--demo"], working_dir=str(ROOT), submission_id="bare"
    )
    status, logs, _ = head.wait("bare", timeout=120)
    assert status == "FAILED" and "Traceback" not in logs, logs[-3000:]
    line = next(l for l in logs.splitlines() if "cannot import cf_ray's dependencies" in l)
    assert (
        line.startswith("error: jobs/clusterfit_image.py: this Python")
        and "torch" in line
        and "docs/cluster.md" in line
    )


def test_image_job_through_ray_job_submit_on_s3(head, s3, tmp_path):
    data, target = make_demo_splits(tmp_path / "data", n_unlabelled=4, n_train=3, n_test=2, size=16)
    (data / "tree" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data_uri, target_uri = s3.upload(data, "in", "unlabelled"), s3.upload(target, "in", "target")
    buf = io.BytesIO()
    torch.save(build(ModelConfig(width=4), seed=0).state_dict(), buf)
    with s3.fs.open_output_stream(s3.key("in", "weights.pt")) as f:
        f.write(buf.getvalue())
    run = s3.uri("runs", "job")

    head.submit(
        [
            "python",
            "jobs/clusterfit_image.py",
            "--data",
            data_uri,
            "--target",
            target_uri,
            "--run-dir",
            run,
            "pretrain.source=checkpoint",
            f"pretrain.checkpoint={s3.uri('in', 'weights.pt')}",
            *TINY,
        ],
        working_dir=str(ROOT),
        submission_id="cf-image",
    )
    status, logs, seen = head.wait("cf-image", timeout=400, metrics_prefix="ray_cf_ray_")
    assert status == "SUCCEEDED", logs[-4000:]
    assert "Connecting to existing Ray cluster" in logs and "stage report: done" in logs

    files = s3.listing("runs", "job")
    for f in (
        "config.yaml",
        "manifest.json",
        "metrics.json",
        "report.md",
        "errors.parquet",
        "items/source.parquet",
        "models/clusterfit/backbone.pt",
        "cluster/centroids.npy",
        "cluster/assignments.parquet/part-00000.parquet",
        "features/pretrained/source/_SUCCESS.json",
        "plots/transfer.png",
    ):
        assert f in files, files
    assert any(f.startswith("train/retrain/checkpoint_") and f.endswith("state.pt") for f in files)
    assert not any(
        f.startswith("cluster/_checkpoint/") for f in files
    )  # k-means checkpoints: removed once the fit is done
    assert any(f.startswith("features/clusterfit/target_test/") and f.endswith(".parquet") for f in files)
    manifest = json.loads(s3.read("runs", "job", "manifest.json"))
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    metrics = json.loads(s3.read("runs", "job", "metrics.json"))
    assert (
        set(metrics["transfer"]["target"]) == {"random", "pretrained", "clusterfit"} and metrics["skipped_inputs"] == 1
    )
    assert pq.read_table(s3.key("runs", "job", "cluster", "assignments.parquet"), filesystem=s3.fs).num_rows == 24
    report = s3.read("runs", "job", "report.md").decode()
    assert "broken.jpg" in report and f"Ray dashboard of this run: {head.address}" in report

    # The custom metrics reached the head's Prometheus export,
    # from the extraction actors, the Train worker and the driver.
    def value(name, **tags):
        hits = [
            v for k, v in seen.items() if k.startswith(name + "{") and all(f'{t}="{x}"' in k for t, x in tags.items())
        ]
        return sum(hits) if hits else None

    assert value("ray_cf_ray_items_processed_total", stage="extract") == 24 + 3 * (
        18 + 12
    )  # source, then the target with 3 models
    assert value("ray_cf_ray_items_skipped_total", stage="extract") == 1
    assert value("ray_cf_ray_items_processed_total", stage="retrain") == 24
    iterations = len(
        json.loads(s3.read("runs", "job", "cluster", "stats.json"))["history"]
    )  # faiss stops once converged
    assert (
        value("ray_cf_ray_kmeans_iterations_total", layer="res5") == iterations
        and value("ray_cf_ray_kmeans_objective") > 0
    )
    assert (
        value("ray_cf_ray_train_loss", run="retrain") > 0
        and value("ray_cf_ray_train_items_per_second", run="retrain") > 0
    )


def test_use_gpu_yes_is_trusted_only_on_a_joined_cluster(monkeypatch):
    from cf_ray.runtime import want_gpu

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RuntimeError, match="has no GPU"):
        want_gpu("yes")  # a local Ray never gets a GPU it lacks: an error, not a hang
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert want_gpu("yes") and not want_gpu("auto")  # GPU workers may autoscale from zero there
