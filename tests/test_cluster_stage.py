"""The cluster stage off the driver: faiss k-means in a Ray task, the device decided where it runs, same results."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cf_ray import storage
from cf_ray.config import ClusterConfig
from cf_ray.kmeans import device
from cf_ray.kmeans.core import preprocess_fit
from cf_ray.stages.cluster import assign, fit_faiss, read_assignments, run_cluster
from tests.test_kmeans_distributed import blobs, write_shards

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    x, truth = blobs(n=1200, d=16, centers=5, spread=3.0, seed=3)
    files = write_shards(tmp_path_factory.mktemp("feats"), x, files=2, bad_rows=2)
    return x, str(Path(files[0]).parent)


def test_faiss_backend_runs_in_a_ray_task_with_the_driver_result(ray_session, feats, tmp_path):
    """Centroids and assignments are exactly what faiss gives in this process for the same seed."""
    x, uri = feats
    conf = ClusterConfig(k=5, niter=8, seed=11, backend="faiss", use_gpu="auto", cpus_per_actor=1)
    summary = run_cluster(conf, uri, str(tmp_path))
    assert summary["device"] == "cpu" and summary["n"] == len(x)

    xp, _ = preprocess_fit(x, l2=conf.l2_normalize)  # the pre-change path: faiss in the calling process
    want_c, want_hist = fit_faiss(xp, conf)
    want_labels, want_dist = assign(xp, want_c)
    np.testing.assert_array_equal(np.load(tmp_path / "centroids.npy"), want_c)
    got = read_assignments(str(tmp_path)).to_pandas().set_index("id").loc[[f"r{i:06d}" for i in range(len(x))]]
    np.testing.assert_array_equal(got["cluster"].to_numpy(), want_labels)
    np.testing.assert_array_equal(got["distance"].to_numpy(), want_dist)

    stats = storage.read_json(str(tmp_path / "stats.json"))
    assert stats["device"] == "cpu" and stats["backend"] == "faiss" and "device_note" not in stats
    assert [h["obj"] for h in stats["history"]] == [h["obj"] for h in want_hist]
    assert pq.read_metadata(tmp_path / "assignments.parquet").num_rows == len(x)


def test_ray_backend_records_each_actors_device(ray_session, feats, tmp_path):
    conf = ClusterConfig(k=5, niter=4, backend="ray", num_actors=2, cpus_per_actor=0.5, use_gpu="no")
    summary = run_cluster(conf, feats[1], str(tmp_path))
    assert summary["device"] == "cpu"
    assert storage.read_json(str(tmp_path / "stats.json"))["device"] == "cpu"


def test_use_gpu_yes_without_a_gpu_is_a_clear_error(ray_session, feats, tmp_path):
    conf = ClusterConfig(k=5, niter=2, backend="faiss", use_gpu="yes")
    with pytest.raises(RuntimeError, match="no GPU; set use_gpu=auto or no"):
        run_cluster(conf, feats[1], str(tmp_path))
    assert not os.path.exists(tmp_path / "_SUCCESS.json")


def test_a_gpu_process_whose_faiss_has_no_gpu_code_falls_back_and_says_why():
    """The per-process decision: faiss-cpu on a GPU node -> CPU, with the reason for stats.json."""
    assert device.choose(False) == ("cpu", None)
    got, note = device.choose(True)
    faiss = device.import_faiss()
    if device.faiss_has_gpu(faiss):  # a GPU machine with faiss-gpu
        assert (got, note) == ("cuda", None)
    else:
        assert got == "cpu" and ("faiss-cpu" in note or "sees no GPU" in note)
