"""`ray job submit` against a real head node on loopback, with token authentication on, as on a cluster."""
import json
from pathlib import Path

import pytest

from cf_ray.demo import make_demo_splits
from loopback_head import LoopbackHead

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "image.size=16", "pretrain.train.model.width=4", "retrain.model.width=4", "pretrain.train.epochs=1",
    "retrain.epochs=1", "pretrain.train.batch_size=32", "retrain.batch_size=32", "extract.block_rows=64",
    "cluster.k=4", "cluster.niter=5", "probe.epochs=10", "probe.weight_decays=[0.001]", "probe.layers=[res5]",
    "extract.layers=[res5]", "pretrain.train.max_failures=0", "retrain.max_failures=0",
]


@pytest.fixture(scope="module")
def head():
    h = LoopbackHead(auth_mode="token")
    yield h
    h.stop()


def test_token_auth_refuses_a_wrong_token(head):
    r = head.cli("job", "list", env={"RAY_AUTH_TOKEN": "0" * 64})
    assert r.returncode != 0 and "token" in (r.stdout + r.stderr).lower()


def test_image_job_through_ray_job_submit(head, tmp_path):
    data, target = make_demo_splits(tmp_path / "data", n_unlabelled=4, n_train=3, n_test=2, size=16)
    run_dir = tmp_path / "run"  # absolute: the job runs in a copy of the working dir
    head.submit(["python", "jobs/clusterfit_image.py", "--data", str(data), "--target", str(target), "--run-dir", str(run_dir),
                 *TINY], working_dir=str(ROOT), submission_id="cf-image")
    status, logs = head.wait("cf-image", timeout=300)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "stage report: done" in logs and "Connecting to existing Ray cluster" in logs

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["transfer"]) == {"random", "pretrained", "clusterfit"}
    assert "ClusterFit - pre-trained" in (run_dir / "report.md").read_text()
