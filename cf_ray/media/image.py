"""Image decoding: any size and mode to RGB, short-side resize, centre crop.

Decoding is a Ray Data function UDF: a bad file never fails its block; it gets an all-zero image and
a non-empty ``error`` string, and the extraction stage records it in the run's errors table.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from cf_ray import storage

# Refuse decompression bombs (PIL warns above MAX_IMAGE_PIXELS, raises above twice that).
MAX_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float32)
        hi = a.max() if a.size and a.max() > 0 else 1.0
        img = Image.fromarray((a * (255.0 / hi)).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def decode_image(data: bytes, size: int, resize: int | None = None) -> np.ndarray:
    """Bytes -> (size, size, 3) uint8. Raises ValueError with a reason on any bad input."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    resize = resize or size
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            img.draft("RGB", (resize, resize))  # JPEG: decode at reduced scale when much larger
            img = ImageOps.exif_transpose(img)
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"image too large (decompression-bomb guard): {e}") from None
        except Exception as e:  # PIL raises many types for corrupt data
            raise ValueError(f"cannot decode image: {type(e).__name__}: {e}") from None
    img = to_rgb(img)
    w, h = img.size
    scale = resize / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=2.0 if scale < 0.5 else None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode_images(batch: dict[str, np.ndarray], size: int, resize: int | None = None) -> dict[str, np.ndarray]:
    """Ray Data UDF over rows with a ``path`` column: adds ``image`` and ``error`` ('' when fine)."""
    n = len(batch["path"])
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    errors = [""] * n
    for i, path in enumerate(batch["path"]):
        try:
            images[i] = decode_image(storage.read_bytes(str(path)), size, resize)
        except ValueError as e:
            errors[i] = str(e)
        except OSError as e:
            errors[i] = f"cannot read file: {e}"
    out = dict(batch)
    out["image"] = images
    out["error"] = np.array(errors, dtype=object)
    return out
