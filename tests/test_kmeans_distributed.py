"""cf_ray.kmeans.distributed on a real local Ray: faiss agreement, splits, determinism, resume, failures."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import normalized_mutual_info_score

from cf_ray.config import ClusterConfig
from cf_ray.features import part_files
from cf_ray.kmeans import core
from cf_ray.kmeans._checkpoint import CheckpointMismatch
from cf_ray.kmeans.distributed import ShardPool, fit_distributed

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)  # a resource deadlock fails fast instead of hanging the suite


def write_shards(root: Path, x: np.ndarray, files: int, bad_rows: int = 0) -> list[str]:
    """Extract-stage-shaped Parquet parts (id, error, feat_res5), with ``bad_rows`` failed items per part."""
    root.mkdir(parents=True, exist_ok=True)
    d, out = x.shape[1], []
    for j, idx in enumerate(np.array_split(np.arange(len(x)), files)):
        ok = np.r_[np.ones(len(idx), bool), np.zeros(bad_rows, bool)]
        vals = np.zeros((len(ok), d), np.float32)
        vals[: len(idx)] = x[idx]
        feat = pa.FixedSizeListArray.from_arrays(pa.array(vals.reshape(-1)), d, mask=pa.array(~ok))
        ids = [f"r{i:06d}" for i in idx] + [f"bad{j}_{b}" for b in range(bad_rows)]
        errors = [""] * len(idx) + ["decode failed"] * bad_rows
        path = root / f"part-{j:05d}.parquet"
        pq.write_table(pa.table({"id": ids, "error": errors, "feat_res5": feat}), path)
        out.append(str(path))
    (root / "_SUCCESS.json").write_text("{}")  # a complete extract output, as run_cluster requires
    return out


def blobs(n, d, centers, spread, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, centers, n)
    means = rng.standard_normal((centers, d)) * spread
    return (means[truth] + rng.standard_normal((n, d))).astype(np.float32), truth


def cfg(**kw) -> ClusterConfig:
    base = {"k": 10, "niter": 6, "seed": 7, "l2_normalize": False, "backend": "ray"}
    return ClusterConfig(**(base | kw))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    x, truth = blobs(n=3000, d=16, centers=6, spread=3.0)
    files = write_shards(tmp_path_factory.mktemp("feats"), x, files=4, bad_rows=3)
    return x, truth, files


@pytest.fixture(scope="module")
def pool4(ray_session, data):
    pool = ShardPool(
        data[2], "res5", num_actors=4, cpus_per_actor=0.25, l2=False
    )  # 1 of the 2 CPUs: room for more pools
    yield pool
    pool.shutdown()


def sse(x, c):
    return float(faiss.knn(x, c, 1)[0].astype(np.float64).sum())


def test_shards_hold_every_good_row_once(pool4, data):
    x = data[0]
    assert (pool4.n, pool4.d, len(pool4.actors)) == (len(x), 16, 4)
    np.testing.assert_array_equal(pool4.rows(np.array([2999, 0, 1500])), x[[2999, 0, 1500]])


@pytest.mark.parametrize("shards", [1, 4])
def test_objective_agrees_with_faiss_kmeans(ray_session, data, pool4, shards):
    x, _, files = data
    c0 = core.init_random(x, 10, seed=1)
    pool = pool4 if shards == 4 else None
    c, hist = fit_distributed(files, "res5", cfg(), shards, 0.5, pool=pool, init_centroids=c0)
    km = faiss.Kmeans(16, 10, niter=6, max_points_per_centroid=10**7, min_points_per_centroid=1)
    km.train(x, init_centroids=c0)
    assert [h["nsplit"] for h in hist] == [0] * 6
    for mine, ref in zip(hist, km.iteration_stats):
        assert mine["obj"] == pytest.approx(ref["obj"], rel=1e-3)
    assert sse(x, c) == pytest.approx(sse(x, km.centroids), rel=1e-3)
    assert set(hist[0]) >= {"iter", "obj", "imbalance", "nsplit", "empty", "time", "time_search"}


def test_subsample_trains_like_faiss_on_the_same_sample_then_assigns_every_row(ray_session, data, pool4, tmp_path):
    from cf_ray.kmeans.distributed import training_rows
    from cf_ray.stages.cluster import read_assignments, run_cluster

    x, _, files = data
    conf = cfg(max_points_per_centroid=50)  # k=10: train on 500 of the 3000 rows
    sample = training_rows(len(x), 10, 50, conf.seed)
    assert len(sample) == 500 and len(np.unique(sample)) == 500
    c, hist = fit_distributed(files, "res5", conf, 4, 0.25, pool=pool4)
    xs = x[sample]
    km = faiss.Kmeans(16, 10, niter=6, max_points_per_centroid=10**7, min_points_per_centroid=1)
    km.train(xs, init_centroids=core.init_random(xs, 10, conf.seed))  # the same initial rows, drawn among the sample
    for mine, ref in zip(hist, km.iteration_stats):
        assert mine["obj"] == pytest.approx(ref["obj"], rel=1e-3)
    assert sum(pool4.step(c, False)[1]) == len(x)  # the pool trains on all rows again afterwards

    summary = run_cluster(
        conf.model_copy(update={"num_actors": 2, "cpus_per_actor": 0.25}), str(Path(files[0]).parent), str(tmp_path)
    )
    assert summary["n"] == len(x) and read_assignments(str(tmp_path)).num_rows == len(x)


def test_same_seed_same_result_whatever_the_actor_count(ray_session, data, pool4):
    files = data[2]
    a, ha = fit_distributed(files, "res5", cfg(init="kmeans++"), 4, 0.5, pool=pool4)
    b, hb = fit_distributed(files, "res5", cfg(init="kmeans++"), 4, 0.5, pool=pool4)
    np.testing.assert_array_equal(a, b)
    assert [h["obj"] for h in ha] == [h["obj"] for h in hb]
    one, _ = fit_distributed(files, "res5", cfg(init="kmeans++"), 1, 1)
    np.testing.assert_allclose(one, a, rtol=1e-5, atol=1e-5)
    other, _ = fit_distributed(files, "res5", cfg(init="kmeans++", seed=8), 4, 0.5, pool=pool4)
    assert not np.allclose(other, a)


def test_duplicated_rows_are_split_and_no_cluster_ends_empty(ray_session, tmp_path):
    x, _ = blobs(n=1200, d=8, centers=8, spread=4.0, seed=3)
    x[:700] = x[0]  # most random initial centroids coincide: empty clusters from the first iteration
    files = write_shards(tmp_path / "dup", x, files=2)
    pool = ShardPool(files, "res5", 2, 0.5, l2=False)
    try:
        c, hist = fit_distributed(files, "res5", cfg(k=16, niter=10, seed=0), 2, 0.5, pool=pool)
        sizes, _ = pool.write_assignments(str(tmp_path / "assign"), c, spherical=False)
    finally:
        pool.shutdown()
    assert hist[0]["nsplit"] > 0 and hist[0]["empty"] == hist[0]["nsplit"]
    assert (sizes > 0).all() and sizes.sum() == len(x)


def test_resume_after_interruption_gives_the_uninterrupted_result(ray_session, data, pool4, tmp_path):
    files = data[2]
    conf = cfg(pca_dim=8, l2_normalize=True, niter=5)
    fresh = ShardPool(files, "res5", 2, 0.5, l2=True)  # whitening changes the rows: a pool per transform
    try:
        want, want_hist = fit_distributed(files, "res5", conf, 2, 0.5, pool=fresh)
    finally:
        fresh.shutdown()

    class Crash(Exception):
        pass

    def crash_at_2(rec):
        if rec["iter"] == 2:
            raise Crash

    with pytest.raises(Crash):
        fit_distributed(files, "res5", conf, 2, 0.5, checkpoint_uri=str(tmp_path / "ck"), callback=crash_at_2)
    assert sorted(os.listdir(tmp_path / "ck")) == ["centroids-00003.npy", "state.json", "transform.npz"]
    got, hist = fit_distributed(files, "res5", conf, 2, 0.5, checkpoint_uri=str(tmp_path / "ck"))
    np.testing.assert_array_equal(got, want)
    assert [h["obj"] for h in hist] == pytest.approx([h["obj"] for h in want_hist], rel=1e-6)
    with pytest.raises(CheckpointMismatch, match="k: saved 10, now 12"):
        fit_distributed(
            files, "res5", cfg(pca_dim=8, l2_normalize=True, k=12), 2, 0.5, checkpoint_uri=str(tmp_path / "ck")
        )


def test_tol_stops_early(ray_session, data, pool4):
    _, hist = fit_distributed(data[2], "res5", cfg(niter=50, tol=1e-3), 4, 0.5, pool=pool4)
    assert 2 <= len(hist) < 50


def test_dead_actor_is_restarted_or_replaced_and_result_unchanged(ray_session, data):
    import ray

    files = data[2]
    pool = ShardPool(files, "res5", 2, 0.5, l2=False, max_restarts=1)
    try:
        want, _ = fit_distributed(files, "res5", cfg(), 2, 0.5, pool=pool)
        pid = ray.get(pool.actors[1].info.remote())["pid"]
        kills = {
            1: lambda: ray.kill(pool.actors[1], no_restart=False),  # Ray restarts it, the call is retried
            3: lambda: ray.kill(pool.actors[0], no_restart=True),
        }  # gone for good: the driver replaces it

        def kill(rec):
            if rec["iter"] in kills:
                kills[rec["iter"]]()

        got, _ = fit_distributed(files, "res5", cfg(), 2, 0.5, pool=pool, callback=kill)
        assert ray.get(pool.actors[1].info.remote())["pid"] != pid
        assert pool.reissues == [1, 0]
    finally:
        pool.shutdown()
    np.testing.assert_array_equal(got, want)


def test_run_cluster_ray_backend_writes_stage_outputs(ray_session, data, tmp_path):
    from cf_ray.stages.cluster import read_assignments, run_cluster

    x, truth, files = data
    out = tmp_path / "cluster"
    conf = ClusterConfig(
        k=6, niter=10, backend="ray", init="kmeans++", num_actors=2, cpus_per_actor=0.5, l2_normalize=False
    )
    summary = run_cluster(conf, str(Path(files[0]).parent), str(out))
    assert summary["n"] == len(x) and summary["empty"] == 0
    assert {"centroids.npy", "assignments.parquet", "stats.json", "_SUCCESS.json"} <= set(os.listdir(out))
    assert not (out / "_checkpoint").exists()
    a = read_assignments(str(out)).to_pandas().set_index("id").loc[[f"r{i:06d}" for i in range(len(x))]]
    assert normalized_mutual_info_score(truth, a["cluster"]) > 0.9
    c = np.load(out / "centroids.npy")
    np.testing.assert_allclose(a["distance"].sum(), sse(x, c), rtol=1e-4)
    assert len(part_files(str(Path(files[0]).parent))) == 4


CLUSTER_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray.cluster_utils import Cluster
    from cf_ray.config import ClusterConfig
    from cf_ray.kmeans.distributed import ShardPool, fit_distributed
    files = sys.argv[1:]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20})
    cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    ray.init(address=cluster.address, log_to_driver=False)
    pool = ShardPool(files, "res5", 2, 1, l2=False)
    nodes = {i["node"] for i in ray.get([a.info.remote() for a in pool.actors])}
    cfg = ClusterConfig(k=6, niter=5, backend="ray", l2_normalize=False)
    c, hist = fit_distributed(files, "res5", cfg, 2, 1, pool=pool)
    print("NODES", len(nodes), "OBJ", hist[-1]["obj"])
    pool.shutdown(); ray.shutdown(); cluster.shutdown()
""")


def test_two_raylet_cluster_runs_one_actor_per_node(data):
    """ray.cluster_utils.Cluster needs its own Ray instance: run it in a subprocess."""
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    res = subprocess.run(
        [sys.executable, "-c", CLUSTER_SCRIPT, *data[2]], capture_output=True, text=True, timeout=180, cwd=ROOT, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("NODES")][0].split()
    assert line[1] == "2" and float(line[3]) > 0
