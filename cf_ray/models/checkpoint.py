"""A saved backbone is a folder: backbone.pt (plain state_dict) + model.json (its ModelConfig).

Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)``.
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
    return create_backbone(cfg.arch, width=cfg.width, stem=cfg.stem)


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


def import_checkpoint(state_dict_path: str, cfg: ModelConfig, uri: str) -> None:
    """A user's state_dict file -> a cf_ray model folder; key mismatches are reported, not ignored."""
    model = build(cfg)
    sd = load_state_dict(state_dict_path)
    sd = {k: v for k, v in sd.items() if not k.startswith(("fc.", "head.", "heads."))}
    shape_errors = [k for k, v in model.state_dict().items() if k in sd and sd[k].shape != v.shape]
    missing = [k for k in model.state_dict() if k not in sd]
    unexpected = [k for k in sd if k not in model.state_dict()]
    if missing or unexpected or shape_errors:
        raise ValueError(
            f"checkpoint {state_dict_path} does not match backbone {cfg.arch} (width={cfg.width}, stem={cfg.stem}): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {shape_errors[:5]}"
        )
    model.load_state_dict(sd)
    save_backbone(model, cfg, uri)
