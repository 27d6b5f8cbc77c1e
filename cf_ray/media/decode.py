"""From decoded uint8 pixels to network inputs, and the Ray Data decode step for images or video."""

from __future__ import annotations

import numpy as np
import torch

from cf_ray.config import ImageConfig, VideoConfig


def normalize(pixels: np.ndarray, mean, std, device: str = "cpu") -> torch.Tensor:
    """Channels-last uint8 -> channels-first float32, normalised: images (N,H,W,3) -> (N,3,H,W),
    clips (N,T,H,W,3) -> (N,3,T,H,W)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)
    shape = (1, 3) + (1,) * (x.ndim - 2)
    m = torch.tensor(mean, device=device).view(shape)
    s = torch.tensor(std, device=device).view(shape)
    return (x.float().div_(255) - m) / s


def decoder(media: ImageConfig | VideoConfig) -> tuple:
    """(Ray Data decode UDF, its kwargs, the column it fills) for images or videos.

    The UDF maps a batch of items (id, path, ...) to the same rows plus the pixels and an ``error`` column
    ('' when fine); it never raises for a bad file."""
    if isinstance(media, VideoConfig):
        from cf_ray.media.video import decode_video_batch

        kwargs = {
            "num_clips": media.num_clips,
            "clip_len": media.clip_len,
            "stride": media.stride,
            "size": media.size,
            "resize": media.resize,
            "short": media.short,
            "timeout_s": media.timeout_s,
        }
        return decode_video_batch, kwargs, "clips"
    from cf_ray.media.image import decode_images

    return decode_images, {"size": media.size, "resize": media.resize}, "image"
