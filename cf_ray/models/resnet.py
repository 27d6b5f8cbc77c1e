"""ResNets for images, built from torchvision's residual blocks with configurable width.

The module names are torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``), so a torchvision ResNet
state_dict (without ``fc``) loads as it is. Taps follow VISSL's names: res2..res5 are the outputs of the four
stages, globally average-pooled.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torchvision.models import resnet as tv

from cf_ray.models._registry import register_backbone

TAPS = ("res2", "res3", "res4", "res5")
# cf_ray before torchvision naming (model folders saved until 2026-12): stem.{0,1} and stages.{0..3}
_LEGACY = ((re.compile(r"stem\.0\."), "conv1."), (re.compile(r"stem\.1\."), "bn1."))
_LEGACY_STAGE = re.compile(r"stages\.(\d)\.")


class ResNetBackbone(nn.Module):
    modality = "image"

    def __init__(self, block, layers: list[int], width: int = 64, stem: str = "imagenet"):
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"unknown stem {stem!r}; use 'imagenet' or 'cifar'")
        # imagenet: 7x7/2 conv + 3x3/2 max-pool (torchvision); cifar: 3x3/1 conv, no max-pool (small images)
        k, s, p = (7, 2, 3) if stem == "imagenet" else (3, 1, 1)
        self.conv1 = nn.Conv2d(3, width, k, s, p, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        self._inplanes = width
        widths = [width, width * 2, width * 4, width * 8]
        for i, (w, n) in enumerate(zip(widths, layers)):
            setattr(self, f"layer{i + 1}", self._make_stage(block, w, n, stride=1 if i == 0 else 2))
        self.feature_info = {tap: w * block.expansion for tap, w in zip(TAPS, widths)}
        self.num_features = self.feature_info["res5"]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.register_load_state_dict_pre_hook(_legacy_keys)

    def _make_stage(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes * block.expansion
        mods += [block(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def upgrade_state_dict(self, sd: dict) -> dict:
        """``sd`` with keys saved by cf_ray before it adopted torchvision's names renamed."""
        sd = dict(sd)
        _legacy_keys(self, sd, "")
        return sd

    def forward_features(self, x: torch.Tensor, taps: list[str] | None = None) -> dict[str, torch.Tensor]:
        taps = list(taps or ["res5"])
        last = max(TAPS.index(t) for t in taps)
        out = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(last + 1):
            x = getattr(self, f"layer{i + 1}")(x)
            if TAPS[i] in taps:
                out[TAPS[i]] = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x, ["res5"])["res5"]


def _legacy_keys(module, state_dict, prefix, *args) -> None:
    """Rename the keys of a state_dict saved by cf_ray before it adopted torchvision's names, in place."""
    for key in [k for k in state_dict if k.startswith(prefix + "stem.") or k.startswith(prefix + "stages.")]:
        rest = key[len(prefix) :]
        for pattern, new in _LEGACY:
            rest = pattern.sub(new, rest, count=1) if pattern.match(rest) else rest
        m = _LEGACY_STAGE.match(rest)
        if m:
            rest = f"layer{int(m.group(1)) + 1}." + rest[m.end() :]
        state_dict[prefix + rest] = state_dict.pop(key)


@register_backbone("resnet_tiny")
def resnet_tiny(width: int = 16, stem: str = "cifar") -> ResNetBackbone:
    """ResNet-10-style (one BasicBlock per stage): the CPU demo and test network."""
    return ResNetBackbone(tv.BasicBlock, [1, 1, 1, 1], width, stem)


@register_backbone("resnet18")
def resnet18(width: int = 64, stem: str = "imagenet") -> ResNetBackbone:
    """torchvision's ResNet-18 without fc (at the defaults)."""
    return ResNetBackbone(tv.BasicBlock, [2, 2, 2, 2], width, stem)


@register_backbone("resnet50")
def resnet50(width: int = 64, stem: str = "imagenet") -> ResNetBackbone:
    """torchvision's ResNet-50 without fc (at the defaults)."""
    return ResNetBackbone(tv.Bottleneck, [3, 4, 6, 3], width, stem)
