import io

import numpy as np
import pytest
from helpers import write_image
from PIL import Image

from cf_ray.media.image import decode_image, decode_images


@pytest.mark.parametrize(
    "mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("LA", "PNG"), ("I;16", "PNG")]
)
def test_any_mode_becomes_rgb(tmp_path, mode, fmt):
    p = write_image(tmp_path / f"x.{fmt.lower()}", size=(50, 20), mode=mode, fmt=fmt)
    out = decode_image(p.read_bytes(), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_sixteen_bit_keeps_contrast(tmp_path):
    p = write_image(tmp_path / "x.png", size=(20, 20), mode="I;16", fmt="PNG")
    assert decode_image(p.read_bytes(), 16).std() > 10


def test_resize_short_side_then_centre_crop():
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, 20:40] = 255  # white centre third
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    out = decode_image(buf.getvalue(), 10)
    assert out.mean() > 200  # the crop is the white centre


def test_png_named_jpg_and_tiny_image(tmp_path):
    p = write_image(tmp_path / "fake.jpg", size=(1, 1), fmt="PNG")
    assert decode_image(p.read_bytes(), 8).shape == (8, 8, 3)


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty file"), (b"this is not an image", "cannot decode"), (None, "cannot decode")],
)
def test_bad_bytes_raise_with_reason(tmp_path, data, reason):
    if data is None:  # truncated JPEG
        data = write_image(tmp_path / "t.jpg", size=(64, 64)).read_bytes()[:200]
    with pytest.raises(ValueError, match=reason):
        decode_image(data, 8)


def test_decompression_bomb_is_refused():
    img = Image.new("1", (12000, 12000))  # 144 Mpx, tiny as PNG
    buf = io.BytesIO()
    img.save(buf, "PNG")
    with pytest.raises(ValueError, match="too large"):
        decode_image(buf.getvalue(), 8)


def test_batch_udf_records_errors_instead_of_raising(tmp_path):
    good = write_image(tmp_path / "good.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    batch = {
        "id": np.array(["g", "b", "m"], dtype=object),
        "path": np.array([str(good), str(bad), str(tmp_path / "missing.jpg")], dtype=object),
    }
    out = decode_images(batch, size=8)
    assert out["image"].shape == (3, 8, 8, 3)
    assert out["error"][0] == ""
    assert "cannot decode" in out["error"][1]
    assert "cannot read" in out["error"][2]
    assert out["image"][1].max() == 0
