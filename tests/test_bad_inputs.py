"""A corpus of bad inputs through the real listing and extraction stages (one Ray Data run per modality).

Every input ends up either as a row with features or as a recorded skip with its reason; never a crash,
never a silent drop. Decoder details (colour handling, rotation) are in test_image_decode/test_video_decode.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import write_audio_only, write_image
from PIL import Image

from cf_ray.config import ExtractConfig, ImageConfig, ModelConfig, VideoConfig
from cf_ray.demo_video import write_video
from cf_ray.media.items import write_items
from cf_ray.models.checkpoint import build, save_backbone
from cf_ray.sources import SourceError, list_items
from cf_ray.stages.extract import run_extract

NON_UTF8 = b"caf\xe9.jpg"  # Latin-1 bytes: a legal Linux file name that is not UTF-8


def every_entry(root: Path) -> set[str]:
    """Every non-folder entry under root (files, links of any kind), walked with bytes names, as the
    printable id the listing gives it; a folder link is one entry too (it is where a loop would start)."""
    out = set()
    for top, dirs, files in os.walk(os.fsencode(root)):
        links = [d for d in dirs if os.path.islink(os.path.join(top, d))]
        for name in files + links:
            rel = os.path.relpath(os.path.join(top, name), os.fsencode(root)).decode("utf-8", "backslashreplace")
            if not os.path.basename(rel).startswith("."):
                out.add(rel)
    return out


def outcome(items: pa.Table, skipped: pa.Table, features_uri: Path) -> tuple[dict, dict]:
    """(ok ids -> True, failed/skipped ids -> reason) after listing and extraction."""
    t = pq.read_table(features_uri, columns=["id", "error"])
    assert t.num_rows == items.num_rows and len(set(t["id"].to_pylist())) == t.num_rows
    ok = {i: True for i in t.filter(pc.equal(t["error"], ""))["id"].to_pylist()}
    bad = dict(zip(*[t.filter(pc.not_equal(t["error"], ""))[c].to_pylist() for c in ("id", "error")]))
    bad.update(zip(skipped["id"].to_pylist(), skipped["error"].to_pylist()))
    return ok, bad


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_images")
    d = root / "data"
    write_image(d / "good.jpg", size=(40, 30))
    (d / "truncated.jpg").write_bytes(write_image(root / "full.jpg", size=(64, 64)).read_bytes()[:200])
    write_image(d / "png_named.jpg", size=(20, 20), fmt="PNG")
    (d / "zero.jpg").write_bytes(b"")
    write_image(d / "one_px.png", size=(1, 1), fmt="PNG")
    (d / "bomb.png").write_bytes(_png(Image.new("1", (12000, 12000))))  # 144 Mpx, a few kB on disk
    write_image(d / "cmyk.jpg", mode="CMYK")
    write_image(d / "sixteen.png", size=(20, 20), mode="I;16", fmt="PNG")
    write_image(d / "gray.jpg", mode="L")
    write_image(d / "alpha.png", mode="RGBA", fmt="PNG")
    frames = [Image.new("RGB", (24, 24), c) for c in ("red", "blue", "green")]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (d / "notes.txt").write_text("not an image")
    with open(os.path.join(os.fsencode(d), NON_UTF8), "wb") as f:
        f.write((d / "good.jpg").read_bytes())
    os.symlink("loop_b.jpg", d / "loop_a.jpg")
    os.symlink("loop_a.jpg", d / "loop_b.jpg")
    os.symlink("missing.jpg", d / "dangling.jpg")
    (d / "sub").mkdir()
    write_image(d / "sub" / "nested.jpg")
    os.symlink("..", d / "sub" / "up")  # a folder loop
    return root


def test_image_corpus_every_file_has_features_or_a_reason(ray_session, image_corpus):
    root = image_corpus
    d = root / "data"
    items, skipped = list_items(str(d))
    # A manifest row whose file is gone is read, fails, and is recorded (its ids live next to the folder's).
    (root / "m.csv").write_text(f"id,path\nm/good,{d / 'good.jpg'}\nm/missing,{root / 'gone.jpg'}\n")
    m_items, _ = list_items(str(root / "m.csv"))
    items = pa.concat_tables([items, m_items])
    write_items(items, str(root / "items.parquet"))
    cfg = ModelConfig(arch="resnet_tiny", width=8)
    save_backbone(build(cfg, seed=0), cfg, str(root / "model"))
    run_extract(
        ExtractConfig(layers=["res5"], batch_size=8, block_rows=8),
        ImageConfig(size=16),
        str(root / "items.parquet"),
        str(root / "model"),
        str(root / "feat"),
    )

    ok, bad = outcome(items, skipped, root / "feat")
    assert set(ok) | set(bad) == every_entry(d) | {"m/good", "m/missing"}  # nothing dropped
    assert not set(ok) & set(bad)
    assert set(ok) == {
        "good.jpg",
        "png_named.jpg",
        "one_px.png",
        "cmyk.jpg",
        "sixteen.png",
        "gray.jpg",
        "alpha.png",
        "animated.gif",
        "sub/nested.jpg",
        "m/good",
    }
    reasons = {
        "truncated.jpg": "cannot decode",
        "zero.jpg": "empty file",
        "bomb.png": "too large",
        "notes.txt": "unsupported",
        "caf\\xe9.jpg": "not valid UTF-8",
        "loop_a.jpg": "symlink loop",
        "loop_b.jpg": "symlink loop",
        "dangling.jpg": "broken symbolic link",
        "sub/up": "reached again through a link",
        "m/missing": "cannot read file",
    }
    assert set(bad) == set(reasons)
    for name, reason in reasons.items():
        assert reason in bad[name], (name, bad[name])


def test_manifest_with_duplicate_ids_is_refused_with_the_ids(tmp_path):
    (tmp_path / "m.csv").write_text("id,path\na,x.jpg\nb,y.jpg\na,z.jpg\n")
    with pytest.raises(SourceError, match=r"duplicate ids, e.g. \['a'\]"):
        list_items(str(tmp_path / "m.csv"))


def test_video_corpus_every_file_has_features_or_a_reason(ray_session, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    frames = [np.full((24, 32, 3), 20 * i, np.uint8) for i in range(8)]
    good = write_video(d / "good.mp4", frames)
    (d / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    write_audio_only(d / "audio_only.mp4")
    write_video(d / "one_frame.mp4", frames[:1])
    write_video(d / "rotated.mp4", frames, rotation=90)
    (d / "zero.mp4").write_bytes(b"")
    items, skipped = list_items(str(d), (".mp4",))
    write_items(items, str(tmp_path / "items.parquet"))
    cfg = ModelConfig(arch="r2plus1d_tiny", width=4)
    save_backbone(build(cfg, seed=0), cfg, str(tmp_path / "model"))
    media = VideoConfig(size=16, clip_len=4, stride=1, num_clips=2)
    run_extract(
        ExtractConfig(layers=["res5"], batch_size=4, block_rows=4),
        media,
        str(tmp_path / "items.parquet"),
        str(tmp_path / "model"),
        str(tmp_path / "feat"),
    )

    ok, bad = outcome(items, skipped, tmp_path / "feat")
    assert set(ok) | set(bad) == every_entry(d)
    assert set(ok) == {"good.mp4", "one_frame.mp4", "rotated.mp4"}  # a one-frame video loops its frame
    reasons = {"truncated.mp4": "video", "audio_only.mp4": "no video stream", "zero.mp4": "empty file"}
    assert set(bad) == set(reasons)
    for name, reason in reasons.items():
        assert reason in bad[name], (name, bad[name])


# ----------------------------------------------------------------------------- bad configuration and environment


@pytest.mark.parametrize(
    "override, message",
    [
        ("extract.use_gpu=yes", "extract.use_gpu=yes asks for 1 GPU"),
        ("retrain.use_gpu=yes", "set retrain.use_gpu=auto"),
        ("pretrain.train.num_workers=3", "lower pretrain.train.num_workers"),
        ("extract.num_actors=8", "lower extract.num_actors"),
        ("cluster.use_gpu=yes", "cluster.use_gpu=yes asks for 1 GPU"),
        ("cluster.cpus_per_actor=3", "cluster asks for 1 x 3 CPUs"),
    ],
)
def test_resources_the_local_ray_lacks_fail_fast_before_any_stage(ray_session, tmp_path, override, message):
    from cf_ray.config import ConfigError, JobConfig, load_config
    from cf_ray.demo import make_demo_splits
    from cf_ray.pipeline import run_job

    data, target = make_demo_splits(tmp_path / "data", n_unlabelled=2, n_train=2, n_test=2, size=16)
    cfg = load_config(
        JobConfig, None, [f"data={data}", f"target={target}", f"run_dir={tmp_path / 'run'}", "cluster.k=4", override]
    )
    with pytest.raises(ConfigError, match=message):  # the session's Ray has 2 CPUs and no GPU; waiting would hang
        run_job(cfg)
    assert not (tmp_path / "run" / "manifest.json").exists()
