"""Video decoding on real files written with PyAV: sizes, frame rates, rotation, short videos, bad input."""

import time
from fractions import Fraction

import numpy as np
import pytest

from cf_ray.demo_video import MOTIONS, make_video_demo, make_video_demo_splits, render_clip, write_video
from cf_ray.media.video import (
    clip_frame_indices,
    decode_clips,
    decode_video_batch,
    probe_video,
    sample_clip_starts,
)

RED = (255, 0, 0)


def id_frames(n: int, w: int = 64, h: int = 48) -> list[np.ndarray]:
    """Flat frames whose colour encodes the frame number (survives H.264 and resizing)."""
    out = []
    for i in range(n):
        f = np.empty((h, w, 3), np.uint8)
        f[:] = (24 + 16 * (i % 14), 24 + 16 * (i // 14), 128)
        out.append(f)
    return out


def frame_ids(clips: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) decoded id frames -> (...) frame numbers."""
    rgb = clips.reshape(*clips.shape[:-3], -1, 3).mean(-2)
    return (np.round((rgb[..., 0] - 24) / 16) + 14 * np.round((rgb[..., 1] - 24) / 16)).astype(int)


def read(path) -> bytes:
    return path.read_bytes()


# ----------------------------------------------------------------------------- clip sampler


@pytest.mark.parametrize(
    "num_frames,num_clips,clip_len,stride", [(100, 5, 8, 2), (16, 3, 16, 1), (40, 1, 4, 4), (17, 7, 3, 1)]
)
def test_uniform_starts_count_bounds_spacing(num_frames, num_clips, clip_len, stride):
    starts = sample_clip_starts(num_frames, num_clips, clip_len, stride)
    span = (clip_len - 1) * stride + 1
    assert len(starts) == num_clips
    assert all(0 <= s and s + span <= num_frames for s in starts)
    assert starts == sample_clip_starts(num_frames, num_clips, clip_len, stride)
    if num_clips > 1:
        assert starts[0] == 0 and starts[-1] == num_frames - span  # covers the whole video
        assert np.ptp(np.diff(starts)) <= 1  # evenly spaced up to rounding
    else:
        assert starts == [(num_frames - span) // 2]


def test_random_starts_seeded_and_in_bounds():
    a = sample_clip_starts(300, 10, 16, 2, "random", rng=7)
    assert a == sample_clip_starts(300, 10, 16, 2, "random", rng=np.random.default_rng(7))
    assert a != sample_clip_starts(300, 10, 16, 2, "random", rng=8)
    assert len(a) == 10 and a == sorted(a)
    assert all(0 <= s <= 300 - 31 for s in a)


def test_short_video_loop_and_pad_indices():
    assert sample_clip_starts(5, 2, 8, 1, short="pad") == [0, 0]
    starts = sample_clip_starts(5, 2, 8, 1, short="loop")
    assert starts == [0, 2]
    assert clip_frame_indices(starts, 8, 1, 5, "loop").tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [2, 3, 4, 0, 1, 2, 3, 4]]
    assert clip_frame_indices([0], 8, 1, 5, "pad").tolist() == [[0, 1, 2, 3, 4, 4, 4, 4]]


@pytest.mark.parametrize("kwargs", [{"num_frames": 0}, {"stride": 0}, {"mode": "dense"}, {"short": "drop"}])
def test_sampler_rejects_bad_arguments(kwargs):
    args = {"num_frames": 10, "num_clips": 2, "clip_len": 4, "stride": 1} | kwargs
    with pytest.raises(ValueError):
        sample_clip_starts(**args)


# ----------------------------------------------------------------------------- decoding real files


def test_clips_pick_the_sampled_frames_after_keyframe_seeks(tmp_path):
    # 60 frames, a keyframe every 5 and B-frames: clips late in the file need a seek and reordering.
    p = write_video(tmp_path / "gop5.mp4", id_frames(60), fps=25, options={"g": "5", "bf": "2", "crf": "10"})
    clips = decode_clips(read(p), num_clips=3, clip_len=4, stride=3, size=32)
    assert clips.shape == (3, 4, 32, 32, 3) and clips.dtype == np.uint8
    expected = clip_frame_indices(sample_clip_starts(60, 3, 4, 3), 4, 3, 60)
    assert frame_ids(clips).tolist() == expected.tolist()


def test_random_mode_is_seeded(tmp_path):
    p = write_video(tmp_path / "v.mp4", id_frames(50), fps=10)
    a = frame_ids(decode_clips(read(p), 3, 4, 2, 32, mode="random", seed=3))
    assert a.tolist() == frame_ids(decode_clips(read(p), 3, 4, 2, 32, mode="random", seed=3)).tolist()
    assert (np.diff(a, axis=1) == 2).all()  # every clip is a run of stride-2 frames
    assert a.tolist() == clip_frame_indices(sample_clip_starts(50, 3, 4, 2, "random", rng=3), 4, 2, 50).tolist()


@pytest.mark.parametrize(
    "w,h,fps,codec,pix_fmt,suffix",
    [
        (64, 48, 8, "libx264", "yuv420p", "mp4"),
        (320, 180, Fraction(30000, 1001), "libx264", "yuv420p", "mp4"),
        (65, 47, 24, "libx264", "yuv444p", "mp4"),  # odd sizes: 4:2:0 H.264 cannot, 4:4:4 can
        (65, 47, 15, "mpeg4", "yuv420p", "avi"),
        (48, 80, 25, "libvpx", "yuv420p", "webm"),  # no frame count in the header
    ],
)
def test_sizes_rates_and_containers(tmp_path, w, h, fps, codec, pix_fmt, suffix):
    p = write_video(tmp_path / f"v.{suffix}", id_frames(20, w, h), fps=fps, codec=codec, pix_fmt=pix_fmt)
    info = probe_video(read(p))
    assert (info["width"], info["height"], info["frames"], info["rotation"]) == (w, h, 20, 0)
    assert info["fps"] == pytest.approx(float(fps), rel=1e-3)
    assert info["duration"] == pytest.approx(20 / float(fps), rel=1e-3)
    clips = decode_clips(read(p), 2, 8, 2, size=24, resize=28)
    assert clips.shape == (2, 8, 24, 24, 3)
    assert frame_ids(clips).tolist() == clip_frame_indices([0, 5], 8, 2, 20).tolist()


def test_variable_frame_rate_maps_by_timestamp(tmp_path):
    pts_ms = [0, 100, 150, 400, 450, 900]
    p = write_video(tmp_path / "vfr.mp4", id_frames(6), fps=10, pts=pts_ms, time_base=Fraction(1, 1000))
    info = probe_video(read(p))
    n, fps = info["frames"], info["fps"]
    ids = frame_ids(decode_clips(read(p), 1, n, 1, 32))[0]
    # grid frame k shows the last frame shown by time k/fps (half a frame of slack for rounded timestamps)
    expected = [max(i for i, t in enumerate(pts_ms) if t / 1000 <= (k + 0.5) / fps) for k in range(n)]
    assert ids.tolist() == expected
    assert ids[0] == 0 and ids[-1] == 5 and n > 6  # resampled to a constant rate, not frame order


def quadrant_with_red(img: np.ndarray) -> str:
    h, w = img.shape[:2]
    red = (img[..., 0] > 180) & (img[..., 1] < 90)
    q = {
        "tl": red[: h // 2, : w // 2],
        "tr": red[: h // 2, w // 2 :],
        "bl": red[h // 2 :, : w // 2],
        "br": red[h // 2 :, w // 2 :],
    }
    return max(q, key=lambda k: q[k].mean())


@pytest.mark.parametrize("rotation,quadrant", [(0, "tl"), (90, "bl"), (180, "br"), (-90, "tr")])
def test_rotation_metadata_is_applied(tmp_path, rotation, quadrant):
    frames = [np.full((48, 64, 3), 128, np.uint8) for _ in range(4)]
    for f in frames:
        f[:24, :32] = RED  # the top-left quadrant as stored
    p = write_video(tmp_path / "rot.mp4", frames, rotation=rotation)
    assert probe_video(read(p))["rotation"] == rotation % 360
    clip = decode_clips(read(p), 1, 2, 1, size=32)[0, 0]
    assert quadrant_with_red(clip) == quadrant  # numpy rot90 turns counter-clockwise, as the display matrix says


def test_non_square_pixels_widen_the_frame(tmp_path):
    import av

    p = tmp_path / "sar.mp4"
    with av.open(str(p), mode="w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        s.codec_context.sample_aspect_ratio = Fraction(2, 1)  # displayed 64x32
        f = np.full((32, 32, 3), 128, np.uint8)
        f[:, :8] = RED
        c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    clip = decode_clips(read(p), 1, 1, 1, size=32)[0, 0]
    assert (clip[..., 0] < 180).all()  # the red left quarter falls outside the centre crop of the wide frame


@pytest.mark.parametrize("short,expected", [("loop", [0, 1, 2, 3, 4, 0, 1, 2]), ("pad", [0, 1, 2, 3, 4, 4, 4, 4])])
def test_video_shorter_than_a_clip(tmp_path, short, expected):
    p = write_video(tmp_path / "short.mp4", id_frames(5))
    assert frame_ids(decode_clips(read(p), 1, 8, 1, 32, short=short))[0].tolist() == expected


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def bad_files(tmp_path):
    import av

    good = write_video(tmp_path / "good.mp4", id_frames(24))
    fast = tmp_path / "fast.mp4"
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mp4").write_text("this is a text file, not a video\n" * 20)
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    (tmp_path / "cut.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # index (moov) at the end: lost
    with av.open(str(fast), mode="w", options={"movflags": "faststart"}) as c:  # index first, then half the frames
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for f in id_frames(24):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    (tmp_path / "cut_faststart.mp4").write_bytes(fast.read_bytes()[: int(fast.stat().st_size * 0.6)])
    with av.open(str(tmp_path / "audio.m4a"), mode="w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(8):
            a = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            a.sample_rate, a.pts = 16000, i * 1024
            c.mux(s.encode(a))
        c.mux(s.encode())
    return tmp_path


@pytest.mark.parametrize(
    "name,reason",
    [
        ("empty.mp4", "empty file"),
        ("notes.mp4", "not a readable video container"),
        ("noise.mp4", "not a readable video container"),
        ("cut.mp4", "not a readable video container"),
        ("cut_faststart.mp4", "truncated video"),
        ("audio.m4a", "no video stream"),
    ],
)
def test_bad_input_raises_value_error_with_reason(bad_files, name, reason):
    data = (bad_files / name).read_bytes()
    with pytest.raises(ValueError, match=reason):
        decode_clips(data, 2, 4, 1, 32)
    with pytest.raises(ValueError, match=reason):
        probe_video(data)


def test_timeout_gives_value_error_and_cancels_the_worker():
    # A decode that blocks until cancelled: deterministic, unlike racing a real decode against a tiny timeout.
    from cf_ray.media.video import _with_timeout

    seen = {}

    def stuck(cancel):
        seen["cancelled"] = cancel.wait(10)
        return "too late"

    with pytest.raises(ValueError, match="timed out after 0.05s"):
        _with_timeout(stuck, 0.05)
    time.sleep(0.2)
    assert seen["cancelled"] is True


def test_batch_udf_records_errors_instead_of_raising(bad_files):
    names = ["good.mp4", "notes.mp4", "empty.mp4", "audio.m4a", "cut_faststart.mp4", "missing.mp4"]
    batch = {"path": np.array([str(bad_files / n) for n in names], dtype=object), "id": np.arange(len(names))}
    out = decode_video_batch(batch, num_clips=2, clip_len=4, stride=2, size=16)
    assert out["clips"].shape == (6, 2, 4, 16, 16, 3) and out["clips"].dtype == np.uint8
    assert out["id"].tolist() == list(range(6))
    errors = out["error"].tolist()
    assert errors[0] == "" and out["clips"][0].any()
    assert all(errors[1:]) and not out["clips"][1:].any()
    assert errors[5].startswith("cannot read file")


def test_batch_udf_in_ray_data(ray_session, tmp_path):
    root = make_video_demo(tmp_path / "demo", n_per_class=1, size=32, frames=8, classes=("up", "down"))
    paths = sorted(str(p) for p in root.rglob("*.mp4")) + [str(tmp_path / "missing.mp4")]
    ds = ray_session.data.from_items([{"path": p} for p in paths]).map_batches(
        decode_video_batch,
        fn_kwargs=dict(num_clips=2, clip_len=4, stride=1, size=16),
        batch_size=2,
        batch_format="numpy",
    )
    rows = sorted(ds.take_all(), key=lambda r: r["path"])
    assert [r["error"] == "" for r in rows] == [True, True, False]
    assert rows[0]["clips"].shape == (2, 4, 16, 16, 3)


# ----------------------------------------------------------------------------- demo generator


def circular_centroid(cover: np.ndarray) -> np.ndarray:
    """(T, H, W) coverage -> (T, 2) mean (y, x) angle on the torus, in radians."""
    out = []
    for axis, n in ((1, cover.shape[1]), (2, cover.shape[2])):
        w = cover.sum(axis=3 - axis)
        ang = 2 * np.pi * np.arange(n) / n
        out.append(np.angle((w * np.exp(1j * ang)).sum(-1)))
    return np.stack(out, -1)


def step_yx(cover: np.ndarray) -> np.ndarray:
    """(T-1, 2) per-frame (y, x) displacement of the coverage's circular centroid, in pixels."""
    n = cover.shape[1]
    return np.angle(np.exp(1j * np.diff(circular_centroid(cover), axis=0))) * n / (2 * np.pi)


@pytest.mark.parametrize("motion,direction", [("up", (-1, 0)), ("down", (1, 0))])
@pytest.mark.parametrize("seed", [0, 1])
def test_demo_slides_move_their_way(motion, direction, seed):
    _, cover = render_clip(motion, 32, 12, np.random.default_rng(seed), objects=1)
    total = step_yx(cover)[:6].sum(0)  # before it comes to rest
    assert np.sign(np.round(total, 1)).tolist() == list(direction)


def test_demo_sideways_goes_left_or_right():
    signs = set()
    for seed in range(8):
        _, cover = render_clip("sideways", 32, 12, np.random.default_rng(seed), objects=1)
        dy, dx = step_yx(cover)[:6].sum(0)
        assert abs(dx) > 3 and abs(dy) < 1
        signs.add(int(np.sign(dx)))
    assert signs == {-1, 1}  # mirrored clips share the class


@pytest.mark.parametrize("motion", ["up", "down", "sideways"])
def test_demo_slides_decelerate_to_rest(motion):
    """The arrow of time: fast at launch, slowing every frame, at rest by the end (backwards: starts from rest)."""
    _, cover = render_clip(motion, 64, 12, np.random.default_rng(3), objects=1)
    speed = np.linalg.norm(step_yx(cover), axis=1)
    assert speed[:3].mean() > 3 * max(speed[-3:].mean(), 0.05)
    assert speed[-1] < 0.5


def orientation(rgb: np.ndarray, cover: np.ndarray) -> np.ndarray:
    """(T,) dominant gradient orientation inside the shape (structure tensor), radians, y axis down."""
    gy, gx = np.gradient(rgb.astype(float).mean(-1), axis=(1, 2))
    w = (cover > 0.99).astype(float)
    jxx, jyy, jxy = (w * gx * gx).sum((1, 2)), (w * gy * gy).sum((1, 2)), (w * gx * gy).sum((1, 2))
    return 0.5 * np.arctan2(2 * jxy, jxx - jyy)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_demo_spin_turns_one_way_in_place_and_slows(seed):
    rgb, cover = render_clip("spin", 128, 12, np.random.default_rng(seed), objects=1)  # large: a clean orientation
    turn = (np.diff(orientation(rgb, cover)) + np.pi / 2) % np.pi - np.pi / 2
    early, late = turn[:4], turn[-4:]
    assert np.all(np.sign(early) == np.sign(early[0])) and abs(early.mean()) > 2 * abs(late.mean())
    centre = circular_centroid(cover)
    # Spins in place: an off-centre outline (an L) swings its centroid a little; a slide moves >= 38 px.
    assert np.abs(np.angle(np.exp(1j * (centre - centre[0])))).max() < 2 * np.pi * 24 / 128


def test_demo_shake_and_orbit_fade_out():
    _, cover = render_clip("shake", 64, 12, np.random.default_rng(0), objects=1)
    step = step_yx(cover)
    assert (
        np.abs(step[:, 0]).max() < 0.5 and np.abs(step[:4, 1]).sum() > 2 * np.abs(step[-4:, 1]).sum()
    )  # horizontal, damped
    assert (np.diff(np.sign(step[:6, 1])) != 0).any()  # goes back and forth
    _, cover = render_clip("orbit", 64, 12, np.random.default_rng(0), objects=1)
    step = step_yx(cover)
    heading = np.angle(step[:6, 1] + 1j * step[:6, 0])
    assert np.ptp(np.unwrap(heading)) > np.pi / 2  # a curved path, not a slide
    assert np.linalg.norm(step[:3], axis=1).mean() > 3 * np.linalg.norm(step[-3:], axis=1).mean()


def test_demo_writes_decodable_videos_per_class(tmp_path):
    root = make_video_demo(tmp_path / "demo", n_per_class=2, size=32, frames=12, fps=8)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(MOTIONS)
    files = sorted(root.rglob("*.mp4"))
    assert len(files) == 2 * len(MOTIONS) and all(f.name.startswith(f.parent.name + "_") for f in files)
    info = probe_video(files[0].read_bytes())
    assert (info["frames"], info["fps"], info["width"], info["height"]) == (12, 8.0, 32, 32)
    clips = decode_clips(files[0].read_bytes(), 2, 6, 2, 32)
    assert clips.shape == (2, 6, 32, 32, 3) and clips.std() > 10
    mtime = files[0].stat().st_mtime_ns
    make_video_demo(tmp_path / "demo", n_per_class=2, size=32, frames=12, fps=8)  # complete: nothing rewritten
    assert files[0].stat().st_mtime_ns == mtime
    make_video_demo(tmp_path / "demo", n_per_class=1, size=32, frames=12, fps=8, classes=("up",))  # other settings:
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [".complete", "up"]  # the old set is replaced whole
    assert len(list((tmp_path / "demo").rglob("*.mp4"))) == 1
    odd = make_video_demo(
        tmp_path / "odd", n_per_class=1, size=15, frames=4, classes=("spin",)
    )  # yuv444p: odd sizes work
    assert probe_video(next(odd.rglob("*.mp4")).read_bytes())["width"] == 15


def test_demo_splits(tmp_path):
    unlabelled, target = make_video_demo_splits(tmp_path, n_unlabelled=1, n_train=1, n_test=1, frames=4)
    assert len(list(unlabelled.rglob("*.mp4"))) == len(MOTIONS)
    assert len(list((target / "train").rglob("*.mp4"))) == len(list((target / "test").rglob("*.mp4"))) == len(MOTIONS)
