"""Published weights by name, never downloaded at run time: the local torch hub cache or a file the user gives.

- ``torchvision``: torchvision's ImageNet ResNets (resnet18, resnet50) and Kinetics-400 video nets (r2plus1d_18,
  r3d_18, mc3_18), read from ``<torch hub dir>/checkpoints/<published file name>`` (``$TORCH_HOME/hub``,
  default ``~/.cache/torch/hub``), the file ``torchvision.models.<arch>(weights=...)`` would have downloaded.
- ``checkpoint``: a file in one of the layouts users have on disk (``FORMATS``), detected from its keys:

  torchvision   a plain torchvision (or cf_ray) state_dict: ``conv1``/``layer1``.. or ``stem``/``layer1``..; its
                ``fc`` is dropped. Any registered architecture in torchvision's layout.
  pytorchvideo  pytorchvideo's model-zoo checkpoint (``R2PLUS1D_16x4_R50.pyth``): ``{"model_state": {blocks.N...}}``;
                the head ``blocks.5`` is dropped. Architecture r2plus1d_50.
  vmz           the VMZ / IG-65M R(2+1)D-34 ``.pth`` files (ig65m-pytorch): torchvision keys with Caffe2 mid-planes
                (``layer2.0.conv2.0.0.weight`` has 288 = M(128, 128) rows, not torchvision's 230). Architecture
                r2plus1d_34_vmz.

Every load is exact: every tensor of the backbone comes from the file, or a one-line error names the first
mismatched keys and the architecture and width that expected them. Files are read with ``weights_only=True``.
"""

from __future__ import annotations

import io
import logging
import os

import torch
from torch import nn

from cf_ray import storage
from cf_ray.config import ConfigError, ModelConfig, PretrainConfig

log = logging.getLogger(__name__)

FORMATS = ("auto", "torchvision", "pytorchvideo", "vmz")
TORCHVISION_ARCHS = ("resnet18", "resnet50", "r2plus1d_18", "r3d_18", "mc3_18")  # cf_ray name = torchvision name
FORMAT_ARCH = {"pytorchvideo": "r2plus1d_50", "vmz": "r2plus1d_34_vmz"}  # the architecture a layout needs
HEADS = {"torchvision": ("fc.", "head.", "heads."), "vmz": ("fc.",), "pytorchvideo": ("blocks.5.",)}
WRAPPERS = ("model_state", "state_dict", "model")  # pytorchvideo/SlowFast, Lightning and many trainers
PUBLISHED_NAMES = {  # for messages: what a user's file is usually called
    "pytorchvideo": "R2PLUS1D_16x4_R50.pyth (pytorchvideo's r2plus1d_r50)",
    "vmz": "r2plus1d_34_clip8_ig65m_from_scratch-9bae36ae.pth (ig65m-pytorch release v1.0.0) or its siblings",
}


class WeightsError(ConfigError):
    """Weights that cannot be loaded exactly; the message says what to change."""


def hub_checkpoints_dir() -> str:
    """Where torch hub keeps weight files: ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/...``)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def torchvision_weights(arch: str, name: str = "DEFAULT"):
    """torchvision's weights enum member for a cf_ray architecture, e.g. (resnet50, DEFAULT) -> IMAGENET1K_V2."""
    from torchvision.models import get_model_weights

    if arch not in TORCHVISION_ARCHS:
        raise WeightsError(
            f"torchvision publishes no weights for {arch}; pretrain.source=torchvision takes "
            f"{', '.join(TORCHVISION_ARCHS)} (or use pretrain.source=checkpoint with your own file)"
        )
    enum = get_model_weights(arch)
    try:
        return enum[name]
    except KeyError:
        raise WeightsError(
            f"torchvision has no weights {name!r} for {arch}; pretrain.weights takes DEFAULT or "
            f"{', '.join(m.name for m in enum)}"
        ) from None


def torchvision_weights_path(arch: str, name: str = "DEFAULT") -> str:
    return os.path.join(hub_checkpoints_dir(), os.path.basename(torchvision_weights(arch, name).url))


def _check_arch_defaults(model_cfg: ModelConfig, what: str, key: str) -> None:
    """Published weights fit the architecture's own settings only."""
    own = ModelConfig(arch=model_cfg.arch)
    differs = [
        f"{k}={getattr(model_cfg, k)}"
        for k in ("width", "stem", "midplanes")
        if getattr(model_cfg, k) != getattr(own, k)
    ]
    if differs:
        raise WeightsError(
            f"{what} are {model_cfg.arch} at its own settings (width={own.width}, stem={own.stem}), but {key} sets "
            f"{', '.join(differs)}; remove those settings (or set them to null)"
        )


def resolve_checkpoint(path: str) -> str:
    """A local path or URI; a bare file name not found as given is looked up in the torch hub cache."""
    if storage.exists(path):
        return path
    cached = os.path.join(hub_checkpoints_dir(), path)
    if "://" not in path and os.path.dirname(path) == "" and os.path.exists(cached):
        return cached
    raise WeightsError(
        f"pretrain.checkpoint={path}: no such file (nor {cached}); give the path of the weight file "
        f"(or its bare file name, put in {hub_checkpoints_dir()})"
    )


def check_pretrained(pre: PretrainConfig, model_cfg: ModelConfig) -> None:
    """Before any Ray work: the weights named by the config exist and fit the architecture (files are not read)."""
    if pre.source == "torchvision":
        weights = torchvision_weights(model_cfg.arch, pre.weights)
        _check_arch_defaults(model_cfg, f"torchvision's {weights}", "pretrain.train.model")
        path = torchvision_weights_path(model_cfg.arch, pre.weights)
        if not os.path.exists(path):
            raise WeightsError(
                f"torchvision weights {weights} for {model_cfg.arch} are not in the local torch hub cache: put "
                f"{os.path.basename(path)} (from {weights.url}) at {path} (TORCH_HOME sets the cache), or use "
                f"pretrain.source=checkpoint pretrain.checkpoint=<file>"
            )
    elif pre.source == "checkpoint":
        resolve_checkpoint(pre.checkpoint)
        need = FORMAT_ARCH.get(pre.checkpoint_format)
        if need and model_cfg.arch != need:
            raise WeightsError(
                f"pretrain.checkpoint_format={pre.checkpoint_format} is a {need} checkpoint; set "
                f"pretrain.train.model.arch={need} (it is {model_cfg.arch})"
            )


def read_checkpoint(path: str) -> dict:
    """The object in a weight file, read without unpickling arbitrary objects."""
    try:
        return torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or ValueError for files it cannot read
        if path.endswith(".pkl"):
            raise WeightsError(
                f"{path}: Caffe2 blob files (VMZ .pkl) are not read; convert it to a .pth state_dict first "
                "(ig65m-pytorch's convert tool) and load that with pretrain.checkpoint_format=vmz"
            ) from None
        raise WeightsError(
            f"{path} is not a torch weight file readable with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); if you trust it, re-save its state_dict with torch.save(...)"
        ) from None


def _unwrap(obj) -> dict:
    """The state_dict inside a checkpoint: under model_state/state_dict/model if wrapped, without a DDP prefix."""
    for key in WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            "the file holds no state_dict (a dict of tensor names to tensors, possibly under "
            f"{'/'.join(WRAPPERS)}); its top-level keys: {list(obj)[:8] if isinstance(obj, dict) else type(obj)}"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel / DDP


def _midplanes(inplanes: int, planes: int) -> int:
    from cf_ray.models.video_resnet import midplanes_of

    return midplanes_of(inplanes, planes)


def detect_format(sd: dict) -> str:
    """torchvision, pytorchvideo or vmz, from the keys and one tell-tale shape; raises naming the first keys."""
    if any(k.startswith("blocks.") and ".res_blocks." in k for k in sd) or "blocks.0.conv.weight" in sd:
        return "pytorchvideo"
    tell = sd.get("layer2.0.conv2.0.0.weight")  # R(2+1)D: first spatial conv of layer2's first block, second conv
    if tell is not None and tell.dim() == 5:
        planes = tell.shape[1]
        if tell.shape[0] == _midplanes(planes, planes) != _midplanes(planes // 2, planes):
            return "vmz"
    if any(k.split(".")[0] in ("conv1", "bn1", "stem", "layer1", "stages") for k in sd):
        return "torchvision"
    raise WeightsError(
        f"cannot tell the layout of this state_dict (first keys {list(sd)[:4]}); cf_ray reads torchvision "
        "(conv1/stem, layer1..), pytorchvideo (blocks.N) and vmz (ig65m .pth) layouts; convert others to one of them"
    )


def load_exact(model: nn.Module, sd: dict, model_cfg: ModelConfig, source: str) -> None:
    """Load every tensor of ``model`` from ``sd`` or raise a one-line error naming the first mismatches."""
    if hasattr(model, "upgrade_state_dict"):
        sd = model.upgrade_state_dict(sd)
    want = model.state_dict()
    # older files (torchvision's resnet18) lack BatchNorm's counters; BatchNorm fills them in with 0 itself
    sd = {**{k: torch.tensor(0) for k in want if k.endswith("num_batches_tracked") and k not in sd}, **sd}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in want.items() if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{n} {len(ks)} e.g. {ks[:3]}"
            for n, ks in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", shapes))
            if ks
        ]
        raise WeightsError(
            f"{source} does not match {model_cfg.arch} (width={model_cfg.width}, stem={model_cfg.stem}"
            + (f", midplanes={model_cfg.midplanes}" if model_cfg.midplanes else "")
            + f"): {'; '.join(parts)}"
        )
    meta = any(t.is_meta for t in want.values())
    if meta:  # a model built on the meta device takes the file's tensors (as float32, as copying would give)
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, assign=meta)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise WeightsError(f"{source}: tensors not in a state_dict stayed unset: {left[:3]}")


def load_checkpoint(path: str, model_cfg: ModelConfig, fmt: str = "auto") -> tuple[nn.Module, str]:
    """A backbone of ``model_cfg`` with every tensor from the file at ``path``; returns it and the layout used."""
    from cf_ray.models.checkpoint import build

    sd = _unwrap(read_checkpoint(path))
    found = detect_format(sd) if fmt == "auto" else fmt
    need = FORMAT_ARCH.get(found)
    if need and model_cfg.arch != need:
        raise WeightsError(
            f"{path} is a {found} checkpoint ({PUBLISHED_NAMES[found]} layout); set pretrain.train.model.arch={need} "
            f"(it is {model_cfg.arch})"
        )
    sd = {k: v for k, v in sd.items() if not k.startswith(HEADS[found])}
    with torch.device("meta"):  # every tensor comes from the file: skip the random initialisation
        model = build(model_cfg)
    load_exact(model, sd, model_cfg, f"{path} ({found} layout)")
    return model, found


def load_pretrained(pre: PretrainConfig, model_cfg: ModelConfig) -> tuple[nn.Module, dict]:
    """The pre-trained backbone named by ``pretrain`` (source torchvision or checkpoint) and what to record."""
    check_pretrained(pre, model_cfg)
    if pre.source == "torchvision":
        weights = torchvision_weights(model_cfg.arch, pre.weights)
        path = torchvision_weights_path(model_cfg.arch, pre.weights)
        model, _ = load_checkpoint(path, model_cfg, "torchvision")
        log.info("pre-trained %s: torchvision %s from %s", model_cfg.arch, weights, path)
        return model, {"source": "torchvision", "arch": model_cfg.arch, "weights": str(weights), "file": path}
    if pre.source == "checkpoint":
        path = resolve_checkpoint(pre.checkpoint)
        model, found = load_checkpoint(path, model_cfg, pre.checkpoint_format)
        log.info("pre-trained %s: %s checkpoint %s", model_cfg.arch, found, path)
        return model, {"source": "checkpoint", "arch": model_cfg.arch, "checkpoint": path, "format": found}
    raise ValueError(f"pretrain.source={pre.source} is trained here, not loaded")
