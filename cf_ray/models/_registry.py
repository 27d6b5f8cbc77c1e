from __future__ import annotations

import inspect
from typing import Callable, Protocol

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_MODALITY: dict[str, str] = {}


class Backbone(Protocol):
    feature_info: dict[str, int]  # tap name -> channels after pooling
    modality: str  # "image" or "video"

    def forward_features(self, x: torch.Tensor, taps: list[str] | None = None) -> dict[str, torch.Tensor]: ...


def register_backbone(name: str, modality: str = "image"):
    def wrap(fn: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = fn
        _MODALITY[name] = modality
        return fn

    return wrap


def list_backbones(modality: str | None = None) -> list[str]:
    return sorted(n for n in _REGISTRY if modality is None or _MODALITY[n] == modality)


def backbone_modality(name: str) -> str:
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}")
    return _MODALITY[name]


def arch_defaults(name: str) -> dict:
    """The architecture's own settings (its builder's keyword defaults, e.g. width, stem, midplanes)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}")
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def create_backbone(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None: the architecture's own
    extra = sorted(set(kwargs) - set(arch_defaults(name)))
    if extra:
        raise ValueError(
            f"{', '.join(extra)} does not apply to backbone {name!r} (its settings: {arch_defaults(name)})"
        )
    return _REGISTRY[name](**kwargs)
