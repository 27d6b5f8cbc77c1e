"""Small real image and media files for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size=(40, 30), mode="RGB", fmt="JPEG", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16)).save(path, format=fmt)
        return path
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}[mode]
    a = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(a.squeeze(-1) if channels == 1 else a, mode).save(path, format=fmt)
    return path


def write_audio_only(path: Path) -> None:
    """A container holding one AAC stream and no video: listed as a video, rejected by the decoder."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=8000)
        s.layout = "mono"
        for i in range(4):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 8000, i * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
