"""Run directories, inputs and checkpoints on S3, against a real S3-compatible server on loopback (moto).

The whole job on S3 through `ray job submit` is in test_job_submit.py; these are the pieces, without Ray.
"""

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from s3_server import LoopbackS3

from cf_ray import storage
from cf_ray.config import ModelConfig
from cf_ray.demo import make_demo_splits
from cf_ray.models.checkpoint import build, import_checkpoint, load_backbone
from cf_ray.models.weights import WeightsError
from cf_ray.rundir import RunDir
from cf_ray.sources import list_items, load_target


@pytest.fixture(scope="module")
def server():
    s = LoopbackS3()
    yield s
    s.stop()


@pytest.fixture
def s3(server, monkeypatch):
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    return server


def test_run_dir_manifest_and_errors_on_s3(s3):
    run = RunDir(s3.uri("runs", "unit"))
    calls = []
    assert run.stage("a", lambda: calls.append(1) or {"n": 3}) == {"n": 3}
    assert run.stage("a", lambda: calls.append(2)) == {"n": 3} and calls == [1]  # done: skipped on a rerun
    run.record_errors(pa.table({"id": ["x"], "path": ["s3://b/x"], "error": ["cannot decode"]}), "decode", "source")
    run.record_errors(pa.table({"id": ["x"], "path": ["s3://b/x"], "error": ["cannot decode"]}), "decode", "source")
    assert run.errors().num_rows == 1
    storage.write_bytes(run.path("models", "m", "w.bin"), b"123")
    assert s3.read("runs", "unit", "models", "m", "w.bin") == b"123"
    assert {"manifest.json", "errors.parquet", "models/m/w.bin"} <= set(s3.listing("runs", "unit"))
    storage.delete_dir(run.path("models"))
    assert not storage.exists(run.path("models", "m", "w.bin"))


def test_inputs_listed_from_s3(s3, tmp_path):
    data, target = make_demo_splits(tmp_path, n_unlabelled=2, n_train=2, n_test=1, size=16)
    (data / "readme.txt").write_text("not an image")
    items, skipped = list_items(s3.upload(data, "in", "data"))
    assert items.num_rows == 12 and all(p.startswith(s3.uri("in", "data") + "/") for p in items["path"].to_pylist())
    assert skipped["id"].to_pylist() == ["readme.txt"]
    train, test, _ = load_target(s3.upload(target, "in", "target"), 0.3, 0)
    assert (train.num_rows, test.num_rows) == (12, 6) and set(train["label"].to_pylist()) == set(
        test["label"].to_pylist()
    )


def test_one_filesystem_per_bucket_and_environment(s3, monkeypatch):
    fs1, p1 = storage.resolve(s3.uri("a", "x.parquet"))
    fs2, p2 = storage.resolve(s3.uri("b") + "/")
    assert fs1 is fs2 and (p1, p2) == (s3.key("a", "x.parquet"), s3.key("b"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # another endpoint: not the cached one
    assert storage.resolve(s3.uri("a"))[0] is not fs1


class _Exploit:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_checkpoint_from_s3_loads_weights_and_refuses_pickled_objects(s3, tmp_path):
    cfg = ModelConfig(width=4)
    buf = io.BytesIO()
    torch.save(build(cfg, seed=0).state_dict(), buf)
    storage.write_bytes(s3.uri("in", "good.pt"), buf.getvalue())
    import_checkpoint(s3.uri("in", "good.pt"), cfg, s3.uri("models", "pre"))
    model, _ = load_backbone(s3.uri("models", "pre"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), build(cfg, seed=0).state_dict().values()))

    evil = build(cfg, seed=0).state_dict()
    evil["payload"] = _Exploit()
    buf = io.BytesIO()
    torch.save(evil, buf)
    storage.write_bytes(s3.uri("in", "evil.pt"), buf.getvalue())
    with pytest.raises(WeightsError, match="not a torch weight file readable with weights_only=True .*Weights only"):
        import_checkpoint(s3.uri("in", "evil.pt"), cfg, s3.uri("models", "evil"))
    assert not storage.exists(s3.uri("models", "evil"))


def test_kmeans_checkpoint_on_s3_refuses_pickled_centroids(s3):
    from cf_ray.kmeans._checkpoint import FitState, load_state, save_state

    uri, fp = s3.uri("runs", "km", "_checkpoint"), {"k": 2}
    save_state(uri, FitState(3, np.eye(2, dtype=np.float32), [{"obj": 1.0}], False, None), fp)
    assert load_state(uri, fp).iteration == 3 and np.array_equal(load_state(uri, fp).centroids, np.eye(2))
    buf = io.BytesIO()
    np.save(buf, np.array([_Exploit()], dtype=object), allow_pickle=True)
    storage.write_bytes(
        storage.join(uri, storage.read_json(storage.join(uri, "state.json"))["centroids"]), buf.getvalue()
    )
    with pytest.raises(ValueError, match="allow_pickle=False"):
        load_state(uri, fp)
