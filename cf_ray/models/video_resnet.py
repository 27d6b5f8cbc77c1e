"""Video R(2+1)D backbones: input (N, 3, T, H, W) float, taps res2..res5 pooled over T, H and W.

R(2+1)D-tiny/18/34 are built from torchvision's video blocks (BasicBlock + Conv2Plus1D) with a
configurable width; at width=64 with the imagenet stem their state_dict keys and shapes are those of
torchvision's ``r2plus1d_18`` (minus ``fc``), so its Kinetics weights import as they are.
R(2+1)D-50 is pytorchvideo's ``create_r2plus1d`` (bottleneck blocks) without its classification head.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.video import resnet as tvv

from cf_ray.models._registry import register_backbone

TAPS = ("res2", "res3", "res4", "res5")


def _pool(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(nn.functional.adaptive_avg_pool3d(x, 1), 1)


def _stem(width: int, stem: str) -> nn.Sequential:
    """torchvision's R2Plus1dStem (45 mid channels at width 64), scaled with width.

    imagenet: 1x7x7 conv with spatial stride 2; cifar: 1x3x3 conv, stride 1, for small frames.
    """
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"unknown stem {stem!r}; use 'imagenet' or 'cifar'")
    mid = max(1, 45 * width // 64)
    k, s, p = ((1, 7, 7), (1, 2, 2), (0, 3, 3)) if stem == "imagenet" else ((1, 3, 3), (1, 1, 1), (0, 1, 1))
    return nn.Sequential(
        nn.Conv3d(3, mid, kernel_size=k, stride=s, padding=p, bias=False),
        nn.BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid, width, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )


class R2Plus1dBackbone(nn.Module):
    """torchvision's VideoResNet layout (stem, layer1..layer4) without avgpool/fc."""

    modality = "video"

    def __init__(self, layers: list[int], width: int = 64, stem: str = "imagenet"):
        super().__init__()
        self.stem = _stem(width, stem)
        self._inplanes = width
        widths = [width, width * 2, width * 4, width * 8]
        for i, (w, n) in enumerate(zip(widths, layers)):
            setattr(self, f"layer{i + 1}", self._make_layer(w, n, stride=1 if i == 0 else 2))
        self.feature_info = dict(zip(TAPS, widths))
        self.num_features = self.feature_info["res5"]
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv3d(
                    self._inplanes,
                    planes,
                    kernel_size=1,
                    stride=tvv.Conv2Plus1D.get_downsample_stride(stride),
                    bias=False,
                ),
                nn.BatchNorm3d(planes),
            )
        mods = [tvv.BasicBlock(self._inplanes, planes, tvv.Conv2Plus1D, stride, downsample)]
        self._inplanes = planes
        mods += [tvv.BasicBlock(planes, planes, tvv.Conv2Plus1D) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:  # as torchvision's VideoResNet
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward_features(self, x: torch.Tensor, taps: list[str] | None = None) -> dict[str, torch.Tensor]:
        taps = list(taps or ["res5"])
        last = max(TAPS.index(t) for t in taps)
        out = {}
        x = self.stem(x)
        for i in range(last + 1):
            x = getattr(self, f"layer{i + 1}")(x)
            if TAPS[i] in taps:
                out[TAPS[i]] = _pool(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x, ["res5"])["res5"]


class PyTorchVideoR2Plus1d(nn.Module):
    """pytorchvideo's R(2+1)D-50: ``blocks`` 0 (stem) .. 4 (res5) of ``create_r2plus1d``; its head is dropped."""

    modality = "video"

    def __init__(self, width: int = 64, stem: str = "imagenet", depth: int = 50):
        super().__init__()
        from pytorchvideo.models.r2plus1d import create_r2plus1d

        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"unknown stem {stem!r}; use 'imagenet' or 'cifar'")
        stem_args = {} if stem == "imagenet" else {"stem_conv_kernel_size": (1, 3, 3), "stem_conv_stride": (1, 1, 1)}
        net = create_r2plus1d(model_depth=depth, stem_dim_out=width, head_activation=None, **stem_args)
        self.blocks = nn.ModuleList(net.blocks[:5])
        self.feature_info = {tap: width * 4 * 2**i for i, tap in enumerate(TAPS)}
        self.num_features = self.feature_info["res5"]

    def forward_features(self, x: torch.Tensor, taps: list[str] | None = None) -> dict[str, torch.Tensor]:
        taps = list(taps or ["res5"])
        last = max(TAPS.index(t) for t in taps)
        out = {}
        x = self.blocks[0](x)
        for i in range(last + 1):
            x = self.blocks[i + 1](x)
            if TAPS[i] in taps:
                out[TAPS[i]] = _pool(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x, ["res5"])["res5"]


@register_backbone("r2plus1d_tiny", modality="video")
def r2plus1d_tiny(width: int = 16, stem: str = "cifar") -> R2Plus1dBackbone:
    """One BasicBlock per stage: the CPU demo and test network."""
    return R2Plus1dBackbone([1, 1, 1, 1], width, stem)


@register_backbone("r2plus1d_18", modality="video")
def r2plus1d_18(width: int = 64, stem: str = "imagenet") -> R2Plus1dBackbone:
    return R2Plus1dBackbone([2, 2, 2, 2], width, stem)


@register_backbone("r2plus1d_34", modality="video")
def r2plus1d_34(width: int = 64, stem: str = "imagenet") -> R2Plus1dBackbone:
    """The ClusterFit video network; torchvision midplanes (not the Caffe2/VMZ ones of the IG-65M weights)."""
    return R2Plus1dBackbone([3, 4, 6, 3], width, stem)


@register_backbone("r2plus1d_50", modality="video")
def r2plus1d_50(width: int = 64, stem: str = "imagenet") -> PyTorchVideoR2Plus1d:
    return PyTorchVideoR2Plus1d(width, stem, depth=50)
