"""ResNets for images, built from torchvision's residual blocks with configurable width.

Taps follow VISSL's names: res2..res5 are the outputs of the four stages, globally average-pooled.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv

from cf_ray.models._registry import register_backbone

TAPS = ("res2", "res3", "res4", "res5")


class ResNetBackbone(nn.Module):
    modality = "image"

    def __init__(self, block, layers: list[int], width: int = 64, stem: str = "imagenet"):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
        self._inplanes = width
        widths = [width, width * 2, width * 4, width * 8]
        self.stages = nn.ModuleList(
            self._make_stage(block, w, n, stride=1 if i == 0 else 2) for i, (w, n) in enumerate(zip(widths, layers))
        )
        self.feature_info = {tap: w * block.expansion for tap, w in zip(TAPS, widths)}
        self.num_features = self.feature_info["res5"]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

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

    def forward_features(self, x: torch.Tensor, taps: list[str] | None = None) -> dict[str, torch.Tensor]:
        taps = list(taps or ["res5"])
        last = max(TAPS.index(t) for t in taps)
        out = {}
        x = self.stem(x)
        for i, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if TAPS[i] in taps:
                out[TAPS[i]] = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x, ["res5"])["res5"]


@register_backbone("resnet_tiny")
def resnet_tiny(width: int = 16, stem: str = "cifar") -> ResNetBackbone:
    """ResNet-10-style (one BasicBlock per stage): the CPU demo and test network."""
    return ResNetBackbone(tv.BasicBlock, [1, 1, 1, 1], width, stem)


@register_backbone("resnet18")
def resnet18(width: int = 64, stem: str = "imagenet") -> ResNetBackbone:
    return ResNetBackbone(tv.BasicBlock, [2, 2, 2, 2], width, stem)


@register_backbone("resnet50")
def resnet50(width: int = 64, stem: str = "imagenet") -> ResNetBackbone:
    return ResNetBackbone(tv.Bottleneck, [3, 4, 6, 3], width, stem)


def load_torchvision_weights(model: ResNetBackbone, arch: str) -> None:
    """Copy torchvision ImageNet weights from the local torch cache (never downloads)."""
    import os

    from torch.hub import get_dir

    enum = {"resnet18": tv.ResNet18_Weights.IMAGENET1K_V1, "resnet50": tv.ResNet50_Weights.IMAGENET1K_V2}.get(arch)
    if enum is None:
        raise ValueError(f"no torchvision weights for {arch!r}; use resnet18 or resnet50 with stem=imagenet, width=64")
    path = os.path.join(get_dir(), "checkpoints", os.path.basename(enum.url))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"torchvision weights not in the local cache ({path}); download them on a machine with internet "
            f"(torchvision.models.{arch}(weights='{enum.name}')) and copy the file there, or use pretrain.source=rotnet"
        )
    sd = torch.load(path, map_location="cpu", weights_only=True)
    mapped = {}
    for k, v in sd.items():
        if k.startswith("fc."):
            continue
        if k.startswith(("conv1.", "bn1.")):
            k = "stem." + {"conv1": "0", "bn1": "1"}[k.split(".")[0]] + "." + k.split(".", 1)[1]
        elif k.startswith("layer"):
            k = f"stages.{int(k[5]) - 1}" + k[6:]
        mapped[k] = v
    model.load_state_dict(mapped)
