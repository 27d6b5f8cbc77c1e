"""A saved backbone is a folder: backbone.pt (plain state_dict) + model.json (its ModelConfig, every setting
resolved, so the folder rebuilds the same network whatever the architecture's defaults become).

Image backbones saved before cf_ray adopted torchvision's key names (stem.N, stages.N) still load: the backbone
renames them when loading. Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json

import torch

from cf_ray import storage
from cf_ray.config import ModelConfig
from cf_ray.models._registry import create_backbone


def build(cfg: ModelConfig, seed: int | None = None) -> torch.nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    return create_backbone(cfg.arch, width=cfg.width, stem=cfg.stem, midplanes=cfg.midplanes)


def save_backbone(model: torch.nn.Module, cfg: ModelConfig, uri: str) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    storage.write_bytes(storage.join(uri, "backbone.pt"), buf.getvalue())
    storage.write_json(storage.join(uri, "model.json"), cfg.model_dump(mode="json"))


def load_state_dict(path: str) -> dict:
    sd = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_backbone(uri: str) -> tuple[torch.nn.Module, ModelConfig]:
    cfg = ModelConfig.model_validate(json.loads(storage.read_bytes(storage.join(uri, "model.json"))))
    model = build(cfg)
    model.load_state_dict(load_state_dict(storage.join(uri, "backbone.pt")))
    return model, cfg


def import_checkpoint(state_dict_path: str, cfg: ModelConfig, uri: str, fmt: str = "auto") -> None:
    """A user's weight file -> a cf_ray model folder; mismatches are reported, not ignored (see models.weights)."""
    from cf_ray.models.weights import load_checkpoint

    save_backbone(load_checkpoint(state_dict_path, cfg, fmt)[0], cfg, uri)
