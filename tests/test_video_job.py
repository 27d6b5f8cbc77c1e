"""The whole video job end to end on tiny generated MP4s, on the session's real local Ray."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import write_audio_only

from cf_ray.config import JobConfig, load_config
from cf_ray.demo_video import MOTIONS, make_video_demo_splits
from cf_ray.pipeline import run_job

TINY = [
    "modality=video",
    "video.size=16",
    "video.clip_len=4",
    "video.stride=1",
    "video.num_clips=2",
    "pretrain.proxy=arrow_of_time",
    "pretrain.train.model.width=4",
    "retrain.model.width=4",
    "pretrain.train.epochs=1",
    "retrain.epochs=1",
    "pretrain.train.batch_size=8",
    "retrain.batch_size=8",
    "extract.batch_size=8",
    "extract.block_rows=8",
    "cluster.k=4",
    "cluster.niter=5",
    "probe.epochs=20",
    "probe.weight_decays=[0.001]",
    # The GPU settings (bf16 autocast, channels_last_3d) forced on CPU for retraining and extraction.
    "retrain.precision=bf16",
    "retrain.channels_last=yes",
    "extract.precision=bf16",
    "extract.channels_last=yes",
    "extract.clip_features=true",
    # Retraining on the clips that were clustered, each with its own cluster id, and its fit measured on them.
    "retrain.clips=extracted",
    "retrain.measure_fit=true",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_job")
    data, target = make_video_demo_splits(root / "data", n_unlabelled=2, n_train=2, n_test=2, size=16, frames=6)
    (data / "up" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 then nothing a decoder can read")
    write_audio_only(data / "down" / "voice.mp4")
    (data / "notes.txt").write_text("not a video")
    return root, data, target


def test_video_job_end_to_end_and_resume(ray_session, demo):
    root, data, target = demo
    cfg = load_config(JobConfig, None, TINY + [f"data={data}", f"target={target}", f"run_dir={root / 'run'}"])
    out = run_job(cfg)
    run = Path(out["run_dir"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert manifest["stages"]["pretrain"]["result"]["proxy"] == "arrow_of_time"

    # Transfer table: every model, every probed layer.
    assert set(out["transfer"]["target"]) == {"random", "pretrained", "clusterfit"}
    for m in out["transfer"]["target"].values():
        assert set(m) == {"res3", "res4", "res5"} and all(0 <= v["top1"] <= 1 for v in m.values())
        assert all(v["n_train"] == v["n_test"] == 2 * len(MOTIONS) for v in m.values())

    # Features: a video-level column (mean over clips) and the per-clip features, for every model and dataset.
    for model, dataset in [("pretrained", "source")] + [
        (m, d) for m in out["transfer"]["target"] for d in ("target_train", "target_test")
    ]:
        t = pq.read_table(run / "features" / model / dataset)
        for layer, dim in (("res3", 8), ("res4", 16), ("res5", 32)):  # width 4: 2w, 4w, 8w
            video, clips = t.schema.field(f"feat_{layer}").type, t.schema.field(f"clipfeat_{layer}").type
            assert pa.types.is_fixed_size_list(video) and video.list_size == dim
            assert clips.list_size == 2 and clips.value_type.list_size == dim  # num_clips x dim
        ok = t.filter(pc.equal(t["error"], ""))
        per_clip = np.array(ok["clipfeat_res5"].to_pylist(), dtype=np.float32)  # (videos, clips, dim)
        video = np.array(ok["feat_res5"].to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(per_clip.mean(1), video, rtol=1e-5, atol=1e-6)  # the video feature is the clip mean

    # The bad inputs: skipped with their reasons, once each, never clustered.
    source = pq.read_table(run / "features" / "pretrained" / "source")
    bad = {Path(p).name for p, e in zip(source["path"].to_pylist(), source["error"].to_pylist()) if e}
    assert (
        bad == {"broken.mp4", "voice.mp4"} and source.filter(pc.equal(source["error"], ""))["feat_res5"].null_count == 0
    )
    errors = pq.read_table(run / "errors.parquet").to_pylist()
    reasons = {Path(e["path"]).name: e["error"] for e in errors}
    assert "not a readable video container" in reasons["broken.mp4"]
    assert "no video stream" in reasons["voice.mp4"] and "audio" in reasons["voice.mp4"]
    assert "unsupported file type" in reasons["notes.txt"]
    assert sorted(Path(e["path"]).name for e in errors) == ["broken.mp4", "notes.txt", "voice.mp4"]
    a = pq.read_table(run / "cluster" / "assignments.parquet")
    assert a.num_rows == 2 * len(MOTIONS) and set(a["cluster"].to_pylist()) <= set(range(4))

    # Per-clip pseudo-labels: each clip of each clustered video assigned to the video centroids.
    clips = pq.read_table(run / "cluster" / "clip_assignments.parquet")
    assert sorted(clips["id"].to_pylist()) == sorted(a["id"].to_pylist())
    assert clips.schema.field("clusters").type.list_size == 2 and set(
        pc.list_flatten(clips["clusters"]).to_pylist()
    ) <= set(range(4))
    cluster = manifest["stages"]["cluster"]["result"]
    video_of = dict(zip(a["id"].to_pylist(), a["cluster"].to_pylist()))
    same = [c == video_of[i] for i, cs in zip(clips["id"].to_pylist(), clips["clusters"].to_pylist()) for c in cs]
    assert cluster["clip_agreement"] == pytest.approx(np.mean(same))
    retrain = manifest["stages"]["retrain"]["result"]
    assert retrain["clip_targets"] and retrain["fit"]["items"] == a.num_rows
    assert all(0 <= retrain["fit"][k] <= 1 for k in ("fit", "clip_fit", "clip_fit_video_label"))

    report = (run / "report.md").read_text()
    assert "ClusterFit - pre-trained" in report and "voice.mp4" in report and "videos" in report
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["skipped_inputs"] == 3
    assert load_config(JobConfig, run / "config.yaml") == cfg

    # A rerun resumes: every done stage is skipped, outputs are untouched.
    mtimes = {
        p: p.stat().st_mtime_ns
        for p in [run / "cluster" / "assignments.parquet", *sorted((run / "features").rglob("*.parquet"))]
    }
    again = run_job(cfg)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    after = json.loads((run / "manifest.json").read_text())["stages"]
    assert {k: v for k, v in after.items() if k != "report"} == {
        k: v for k, v in manifest["stages"].items() if k != "report"
    }
    assert again["transfer"] == out["transfer"]
