"""cf_ray.load_model / Model.embed / Model.assign / cf_ray.run_job on real run folders, images and MP4s."""

import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from run_helpers import make_run

import cf_ray
from cf_ray.api import ApiError
from cf_ray.config import ConfigError
from cf_ray.features import read_features


@pytest.fixture(scope="module")
def image_run(ray_session, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("api_image"), "image")


@pytest.fixture(scope="module")
def video_run(ray_session, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("api_video"), "video")


def _run_features(run, ids):
    got, feats = read_features(str(run / "features" / "pretrained" / "source"), "res5")
    pos = {i: n for n, i in enumerate(got)}
    return feats[[pos[i] for i in ids]]


def test_import_is_lazy():
    code = (
        "import sys, cf_ray; assert 'torch' not in sys.modules and 'ray' not in sys.modules; print(cf_ray.load_model)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "load_model" in out.stdout


def test_image_embed_equals_extraction_and_assign_equals_clustering(image_run):
    run, data = image_run
    m = cf_ray.load_model(run, which="pretrained")
    assert not m.backbone.training and m.modality == "image" and m.arch == "resnet_tiny"
    assert m.taps == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert m.input_spec["size"] == 16 and m.input_spec["tensor"] == ["N", 3, 16, 16]
    assert m.mean == (0.485, 0.456, 0.406)
    assert m.centroid_info["source"] == "run" and m.centroid_info["built_on"] == "pretrained"
    assert m.centroid_info["k"] == 4

    paths = sorted(data.glob("*/*.jpg"))
    ids = [f"{p.parent.name}/{p.name}" for p in paths]
    emb = m.embed([str(p) for p in paths], batch_size=5)  # several batches
    assert emb.dtype == np.float32 and emb.shape == (len(paths), 32)
    want = _run_features(run, ids)
    diff = float(np.abs(emb - want).max())
    print(f"max abs diff, embed vs the extraction stage: {diff:.2e}")
    assert diff < 1e-5

    # Bytes and decoded arrays give the same embedding as the path.
    from PIL import Image

    from cf_ray.media.image import decode_image

    raw = paths[0].read_bytes()
    decoded = decode_image(raw, 16)
    full = np.asarray(Image.open(paths[0]).convert("RGB"))  # 24 x 24: resized and cropped like the file
    assert full.shape == (24, 24, 3)
    for x in (raw, decoded, full, [raw], decoded[None]):
        np.testing.assert_allclose(m.embed(x), emb[:1], atol=1e-6)

    cluster, dist = m.assign(emb)
    a = pq.read_table(run / "cluster" / "assignments.parquet").to_pydict()
    by_id = dict(zip(a["id"], zip(a["cluster"], a["distance"])))
    assert cluster.tolist() == [by_id[i][0] for i in ids]
    np.testing.assert_allclose(dist, [by_id[i][1] for i in ids], atol=1e-4)

    # Other layers are there too; assign refuses embeddings of another layer.
    assert m.embed(str(paths[0]), layer="res3").shape == (1, 8)
    with pytest.raises(ApiError, match="embed with layer='res5'"):
        m.assign(m.embed(str(paths[0]), layer="res4"))


def test_clusterfit_model_has_no_run_centroids(image_run):
    run, data = image_run
    m = cf_ray.load_model(str(run))  # default: the ClusterFit model
    assert m.which == "clusterfit" and m.centroids is None
    emb = m.embed(str(next(data.glob("*/*.jpg"))))
    assert emb.shape == (1, 32) and np.isfinite(emb).all()
    with pytest.raises(ApiError, match="build_own_centroids") as e:
        m.assign(emb)
    assert "\n" not in str(e.value)
    with pytest.raises(ApiError, match="pre-trained model's features"):
        cf_ray.load_model(run, centroids="run")


def test_video_embed_equals_extraction(video_run):
    run, data = video_run
    m = cf_ray.load_model(run, which="pretrained")
    assert m.modality == "video" and m.input_spec["clip_len"] == 4 and m.input_spec["num_clips"] == 2
    assert m.mean == (0.43216, 0.394666, 0.37645)
    paths = sorted(data.glob("*/*.mp4"))
    ids = [f"{p.parent.name}/{p.name}" for p in paths]
    emb = m.embed([str(p) for p in paths], batch_size=3)
    want = _run_features(run, ids)
    diff = float(np.abs(emb - want).max())
    print(f"max abs diff, video embed vs the extraction stage: {diff:.2e}")
    assert emb.shape == (len(paths), 32) and diff < 1e-5
    from cf_ray.media.video import decode_clips

    clips = decode_clips(paths[0].read_bytes(), 2, 4, 1, 16)
    np.testing.assert_allclose(m.embed([paths[0].read_bytes()]), emb[:1], atol=1e-6)
    np.testing.assert_allclose(m.embed([clips]), emb[:1], atol=1e-6)
    one_clip = m.embed(clips[0])  # a single clip (T, S, S, 3)
    assert one_clip.shape == (1, 32) and not np.allclose(one_clip, emb[:1])
    cluster, _ = m.assign(emb)
    a = pq.read_table(run / "cluster" / "assignments.parquet").to_pydict()
    assert cluster.tolist() == [dict(zip(a["id"], a["cluster"]))[i] for i in ids]


def test_bad_inputs_get_one_line_errors(image_run, tmp_path):
    run, data = image_run

    def one_line(exc_info, *words):
        msg = str(exc_info.value)
        print(msg)
        assert "\n" not in msg and all(w in msg for w in words), msg

    with pytest.raises(ApiError) as e:
        cf_ray.load_model(tmp_path / "nope")
    one_line(e, "does not exist", "--run-dir")
    partial = tmp_path / "partial"
    shutil.copytree(run, partial, ignore=shutil.ignore_patterns("clusterfit"))
    with pytest.raises(ApiError) as e:
        cf_ray.load_model(partial)
    one_line(e, "no clusterfit model yet", "retrain", "--model pretrained")
    m = cf_ray.load_model(partial, which="pretrained")
    with pytest.raises(ApiError) as e:
        m.embed(str(next(data.glob("*/*.jpg"))), layer="res9")
    one_line(e, "'res9'", "res2, res3, res4, res5")
    with pytest.raises(ApiError) as e:
        cf_ray.load_model(partial, which="pretrained", layer="fc")
    one_line(e, "'fc'", "res5")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ApiError) as e:
        m.embed([str(next(data.glob("*/*.jpg"))), str(tmp_path / "bad.jpg")])
    one_line(e, "bad.jpg", "cannot decode image", "embed_with_errors")
    emb, errors = m.embed_with_errors([str(tmp_path / "bad.jpg"), str(next(data.glob("*/*.jpg"))), b"", "missing.png"])
    assert np.isnan(emb[0]).all() and np.isfinite(emb[1]).all() and np.isnan(emb[2:]).all()
    assert errors[1] == "" and "cannot decode" in errors[0] and "empty" in errors[2] and "cannot read" in errors[3]
    with pytest.raises(ApiError) as e:
        m.embed(np.zeros((16, 16, 3), np.float32))
    one_line(e, "uint8")


def test_run_job_checks_its_config_first(tmp_path):
    with pytest.raises(ConfigError, match="cluster.kk: unknown key"):
        cf_ray.run_job({"cluster": {"kk": 3}})
    with pytest.raises(ConfigError, match="does not exist"):
        cf_ray.run_job(str(tmp_path / "missing.yaml"))
    from cf_ray.sources import SourceError

    with pytest.raises(SourceError, match="does not exist"):
        cf_ray.run_job({"data": str(tmp_path / "no_data"), "run_dir": str(tmp_path / "r")}, ["cluster.k=3"])
    from cf_ray.config import JobConfig

    with pytest.raises(SourceError, match="no data path"):
        cf_ray.run_job(JobConfig(run_dir=str(tmp_path / "r")))


def test_load_model_and_embed_from_s3(tmp_path, monkeypatch):
    """A run directory and inputs on S3 (a real S3-compatible server on loopback): load, embed by URI, export."""
    from s3_server import LoopbackS3

    run, data = make_run(tmp_path, "image", cluster=False)
    server = LoopbackS3()
    try:
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        uri = server.upload(run, "runs", "r")
        images = server.upload(data, "in", "images")
        m = cf_ray.load_model(uri, which="pretrained")
        assert m.run_dir == uri and m.centroids is None and "cluster stage" in m.centroid_note
        local = sorted(data.glob("*/*.jpg"))[:2]
        remote = [f"{images}/{p.parent.name}/{p.name}" for p in local]
        np.testing.assert_allclose(m.embed(remote), m.embed([str(p) for p in local]), atol=1e-6)
        from cf_ray.export import export_model

        card = export_model(uri, "torch_export", which="pretrained")
        assert card["out"] == f"{uri}/export/pretrained_torch_export" and card["check"]["max_abs_diff_vs_eager"] < 1e-4
        assert {"model.pt2", "model_card.json", "MODEL_CARD.md"} <= set(
            server.listing("runs", "r", "export", "pretrained_torch_export")
        )
        with pytest.raises(ApiError, match="does not exist"):
            cf_ray.load_model(server.uri("runs", "missing"))
    finally:
        server.stop()


def test_torch_assignment_equals_faiss():
    """The extraction actors assign with torch (no faiss import there); it must agree with faiss."""
    from cf_ray.api import Centroids

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 24)).astype(np.float32)
    for spherical in (False, True):
        c = Centroids(rng.normal(size=(37, 24)).astype(np.float32), "res5", True, None, spherical)
        (l1, d1), (l2, d2) = c.assign(x), c.assign(x, backend="torch")
        assert (l1 == l2).mean() > 0.999
        np.testing.assert_allclose(d1, d2, atol=1e-4)


def test_own_features_dir_is_where_index_and_serve_look():
    """One rule for `cf-ray index --run-dir` and Serve's default index: the job's extraction for the pre-trained
    network, the folder build_own_centroids writes for any other."""
    from cf_ray.api import OWN_DIR, own_features_dir

    assert own_features_dir("runs/r", "pretrained", "res4") == "runs/r/features/pretrained/source"
    assert own_features_dir("runs/r", "clusterfit", "res4") == f"runs/r/{OWN_DIR}/clusterfit_res4/features"
