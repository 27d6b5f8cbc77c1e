"""Video ResNet backbones: input (N, 3, T, H, W) float, taps res2..res5 pooled over T, H and W.

R(2+1)D-tiny/18/34, R3D-18 and MC3-18 are built from torchvision's video blocks with a configurable width; at
their default settings their state_dict keys and shapes are those of torchvision's ``r2plus1d_18``, ``r3d_18`` and
``mc3_18`` (minus ``fc``), so its Kinetics weights load as they are. ``r2plus1d_34_vmz`` is R(2+1)D-34 with the
Caffe2 mid-planes of the VMZ / IG-65M weights.
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


def _stem(width: int, stem: str, kind: str) -> nn.Sequential:
    """torchvision's video stems, scaled with width.

    kind r2plus1d: R2Plus1dStem (1xkxk spatial conv to 45 channels at width 64, then 3x1x1 temporal conv);
    kind 3d: BasicStem (one 3xkxk conv). stem imagenet: k=7 with spatial stride 2; cifar: k=3, stride 1 (small frames).
    """
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"unknown stem {stem!r}; use 'imagenet' or 'cifar'")
    k, s, p = (7, 2, 3) if stem == "imagenet" else (3, 1, 1)
    if kind == "3d":
        return nn.Sequential(
            nn.Conv3d(3, width, kernel_size=(3, k, k), stride=(1, s, s), padding=(1, p, p), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )
    mid = max(1, 45 * width // 64)
    return nn.Sequential(
        nn.Conv3d(3, mid, kernel_size=(1, k, k), stride=(1, s, s), padding=(0, p, p), bias=False),
        nn.BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid, width, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )


def midplanes_of(inplanes: int, planes: int) -> int:
    """Inner width of a (2+1)D conv from inplanes to planes with the parameters of a full 3x3x3 conv."""
    return (inplanes * planes * 3 * 3 * 3) // (inplanes * 3 * 3 + 3 * planes)


class VideoResNetBackbone(nn.Module):
    """torchvision's VideoResNet layout (stem, layer1..layer4) without avgpool/fc, with a configurable width.

    midplanes (R(2+1)D only): torchvision computes the inner width once per block, M(inplanes, planes), and uses it
    in both convs; vmz (Caffe2 VMZ, the IG-65M weights) computes it per conv, so the second conv of the first block
    of layer2..4 is M(planes, planes) (288/576/1152 instead of 230/460/921 at width 64).
    """

    modality = "video"

    def __init__(
        self,
        layers: list[int],
        width: int = 64,
        stem: str = "imagenet",
        conv_makers=(tvv.Conv2Plus1D,) * 4,
        midplanes: str = "torchvision",
        bn_eps: float = 1e-5,
    ):
        super().__init__()
        if midplanes not in ("torchvision", "vmz"):
            raise ValueError(f"unknown midplanes {midplanes!r}; use 'torchvision' or 'vmz'")
        self.stem = _stem(width, stem, "r2plus1d" if conv_makers[0] is tvv.Conv2Plus1D else "3d")
        self._inplanes = width
        widths = [width, width * 2, width * 4, width * 8]
        for i, (w, n, conv) in enumerate(zip(widths, layers, conv_makers)):
            setattr(self, f"layer{i + 1}", self._make_layer(conv, w, n, 1 if i == 0 else 2, midplanes))
        self.feature_info = dict(zip(TAPS, widths))
        self.num_features = self.feature_info["res5"]
        self._init_weights()
        for m in self.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.eps = bn_eps

    def _make_layer(self, conv, planes: int, blocks: int, stride: int, midplanes: str) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv3d(self._inplanes, planes, kernel_size=1, stride=conv.get_downsample_stride(stride), bias=False),
                nn.BatchNorm3d(planes),
            )
        first = tvv.BasicBlock(self._inplanes, planes, conv, stride, downsample)
        if midplanes == "vmz" and conv is tvv.Conv2Plus1D and self._inplanes != planes:
            first.conv2[0] = tvv.Conv2Plus1D(planes, planes, midplanes_of(planes, planes))
        self._inplanes = planes
        return nn.Sequential(first, *[tvv.BasicBlock(planes, planes, conv) for _ in range(1, blocks)])

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


R2Plus1dBackbone = VideoResNetBackbone  # the name before r3d/mc3 joined


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
def r2plus1d_tiny(width: int = 16, stem: str = "cifar", midplanes: str = "torchvision") -> VideoResNetBackbone:
    """One BasicBlock per stage: the CPU demo and test network."""
    return VideoResNetBackbone([1, 1, 1, 1], width, stem, midplanes=midplanes)


@register_backbone("r2plus1d_18", modality="video")
def r2plus1d_18(width: int = 64, stem: str = "imagenet", midplanes: str = "torchvision") -> VideoResNetBackbone:
    """torchvision's r2plus1d_18 without fc (at the defaults)."""
    return VideoResNetBackbone([2, 2, 2, 2], width, stem, midplanes=midplanes)


@register_backbone("r2plus1d_34", modality="video")
def r2plus1d_34(width: int = 64, stem: str = "imagenet", midplanes: str = "torchvision") -> VideoResNetBackbone:
    """The ClusterFit video network in torchvision's layout (torchvision has no builder or weights for it)."""
    return VideoResNetBackbone([3, 4, 6, 3], width, stem, midplanes=midplanes)


@register_backbone("r2plus1d_34_vmz", modality="video")
def r2plus1d_34_vmz(width: int = 64, stem: str = "imagenet", midplanes: str = "vmz") -> VideoResNetBackbone:
    """R(2+1)D-34 as VMZ / IG-65M built it: Caffe2 mid-planes and BatchNorm eps 1e-3 (their weights load exactly)."""
    return VideoResNetBackbone([3, 4, 6, 3], width, stem, midplanes=midplanes, bn_eps=1e-3)


@register_backbone("r3d_18", modality="video")
def r3d_18(width: int = 64, stem: str = "imagenet") -> VideoResNetBackbone:
    """torchvision's r3d_18 (full 3x3x3 convs) without fc (at the defaults)."""
    return VideoResNetBackbone([2, 2, 2, 2], width, stem, conv_makers=(tvv.Conv3DSimple,) * 4)


@register_backbone("mc3_18", modality="video")
def mc3_18(width: int = 64, stem: str = "imagenet") -> VideoResNetBackbone:
    """torchvision's mc3_18 (3D convs in layer1, 2D in layers 2-4) without fc (at the defaults)."""
    return VideoResNetBackbone([2, 2, 2, 2], width, stem, conv_makers=(tvv.Conv3DSimple,) + (tvv.Conv3DNoTemporal,) * 3)


@register_backbone("r2plus1d_50", modality="video")
def r2plus1d_50(width: int = 64, stem: str = "imagenet") -> PyTorchVideoR2Plus1d:
    """pytorchvideo's R(2+1)D-R50 (``create_r2plus1d``) without its head: the r2plus1d_r50 checkpoint loads."""
    return PyTorchVideoR2Plus1d(width, stem, depth=50)
