import os

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import write_image

from cf_ray.config import ExtractConfig, ImageConfig, ModelConfig
from cf_ray.features import read_features
from cf_ray.media.items import write_items
from cf_ray.models.checkpoint import build, save_backbone
from cf_ray.sources import list_items
from cf_ray.stages.extract import run_extract


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    for i in range(30):
        write_image(root / "data" / ("a" if i % 2 else "b") / f"{i:02d}.jpg", size=(20 + i, 24), seed=i)
    (root / "data" / "a" / "zero.jpg").write_bytes(b"")
    (root / "data" / "b" / "trunc.jpg").write_bytes(write_image(root / "full.jpg", size=(64, 64)).read_bytes()[:100])
    items, _ = list_items(str(root / "data"))
    write_items(items, str(root / "items.parquet"))
    cfg = ModelConfig(arch="resnet_tiny", width=4)
    save_backbone(build(cfg, seed=0), cfg, str(root / "model"))
    return root, items


def test_every_item_once_with_errors_recorded(ray_session, setup):
    root, items = setup
    cfg = ExtractConfig(layers=["res4", "res5"], batch_size=8, block_rows=10)
    res = run_extract(cfg, ImageConfig(size=16), str(root / "items.parquet"), str(root / "model"), str(root / "feat"))
    assert res["rows"] == items.num_rows == 32 and res["skipped"] == 2
    t = pq.read_table(root / "feat")
    assert sorted(t["id"].to_pylist()) == sorted(items["id"].to_pylist())
    assert t.schema.field("feat_res5").type.list_size == 32
    bad = t.filter(pc.not_equal(t["error"], ""))
    assert sorted(bad["id"].to_pylist()) == ["a/zero.jpg", "b/trunc.jpg"]
    assert bad["feat_res5"].null_count == 2
    errs = pq.read_table(root / "feat" / "_errors.parquet")
    assert "empty file" in errs.filter(pc.equal(errs["id"], "a/zero.jpg"))["error"][0].as_py()
    ids, feats, labels = read_features(str(root / "feat"), "res4", with_labels=True)
    assert feats.shape == (30, 16) and np.isfinite(feats).all() and set(labels) == {"a", "b"}
    files = sorted(f for f in os.listdir(root / "feat") if f.startswith("part-"))
    assert len(files) == 4  # one file per block of 10 rows: stable names part-00000...


def test_rerun_of_complete_output_does_nothing(ray_session, setup):
    root, _ = setup
    cfg = ExtractConfig(layers=["res4", "res5"], batch_size=8, block_rows=10)
    before = {f: os.path.getmtime(root / "feat" / f) for f in os.listdir(root / "feat")}
    res = run_extract(cfg, ImageConfig(size=16), str(root / "items.parquet"), str(root / "model"), str(root / "feat"))
    assert res["rows"] == 32
    assert {f: os.path.getmtime(root / "feat" / f) for f in os.listdir(root / "feat")} == before


def test_partial_output_is_redone(ray_session, setup):
    root, _ = setup
    out = root / "partial"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"half a file")  # no _SUCCESS.json: not complete
    cfg = ExtractConfig(layers=["res5"], batch_size=16, block_rows=32)
    res = run_extract(cfg, ImageConfig(size=16), str(root / "items.parquet"), str(root / "model"), str(out))
    assert res["rows"] == 32 and pq.read_table(out).num_rows == 32


def test_one_pool_serves_consecutive_extractions_and_both_decode_paths_agree(ray_session, setup):
    from cf_ray.stages.extract import ExtractPool, pool_size

    root, items = setup
    args = (ImageConfig(size=16), str(root / "items.parquet"), str(root / "model"))
    cfg = ExtractConfig(layers=["res5"], batch_size=8, block_rows=10)
    assert pool_size(cfg, gpu=False, decode_in_actors=True) == 2  # auto: as many as the 2 CPUs take
    assert pool_size(cfg, gpu=False, decode_in_actors=False) == 1  # one CPU left for the decode tasks
    pool = ExtractPool(cfg)
    try:
        first = run_extract(cfg, *args, str(root / "pooled_1"), pool=pool)
        pids = ray_session.get([a.ready.remote() for a in pool.actors])
        second = run_extract(cfg, *args, str(root / "pooled_2"), pool=pool)
        assert ray_session.get([a.ready.remote() for a in pool.actors]) == pids  # the same actor processes
    finally:
        pool.close()
    assert first["pool_start_s"] > 0 and second["pool_start_s"] == 0
    assert first["actors"] == 2 and first["decode"] == "actors" and set(first["profile"]) >= {"decode", "model"}
    assert second["startup_s"] < first["startup_s"]
    tasks = run_extract(cfg.model_copy(update={"decode": "tasks"}), *args, str(root / "tasks"))
    assert tasks["decode"] == "tasks" and tasks["actors"] == 1 and tasks["skipped"] == 2
    feats = [dict(zip(*read_features(str(root / d), "res5"))) for d in ("pooled_1", "pooled_2", "tasks")]
    assert feats[0].keys() == feats[1].keys() == feats[2].keys() and len(feats[0]) == 30
    for i in feats[0]:
        np.testing.assert_allclose(feats[1][i], feats[0][i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(feats[2][i], feats[0][i], rtol=1e-5, atol=1e-6)
