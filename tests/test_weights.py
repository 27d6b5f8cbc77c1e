"""Published weights by name (cf_ray.models.weights): torchvision's files in a temporary torch hub cache, and user
checkpoints in torchvision, pytorchvideo and VMZ / IG-65M layouts. Every file here holds random weights written by
the test in the published layout (nothing is downloaded); loading must be exact and give the library's features."""

from __future__ import annotations

import os
import re

import pytest
import torch
import torchvision
from helpers import write_image
from torch import nn
from torchvision.models import video as tvv

from cf_ray.config import JobConfig, ModelConfig, PretrainConfig
from cf_ray.models.checkpoint import build, load_backbone
from cf_ray.models.weights import (
    WeightsError,
    check_pretrained,
    hub_checkpoints_dir,
    load_checkpoint,
    load_pretrained,
    torchvision_weights_path,
)

IMAGE = (1, 3, 32, 32)
CLIP = (1, 3, 4, 32, 32)  # full-size nets stay cheap on CPU at this input


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch):
    """An empty torch cache per test (TORCH_HOME), so nothing from ~/.cache is read."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path / "torch"
    torch.set_num_threads(n)


def randomize(make, seed: int) -> nn.Module:
    """``make()`` with every tensor random (BatchNorm statistics too), so equality after loading means every tensor
    was copied (built on the meta device: the library's own initialisation would only be overwritten)."""
    with torch.device("meta"):
        net = make()
    net.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.1 + (0.95 if "running_var" in k or "norm" in k else 0))
            else:
                t.fill_(7)
    return net.eval()


def assert_exact(ours: nn.Module, theirs: dict, skip: str) -> None:
    want = {k: v for k, v in theirs.items() if not k.startswith(skip)}
    got = ours.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


# r3d_18 loads the same way (its keys and shapes are checked in test_video_models); left out to keep this file fast
TORCHVISION = [
    ("resnet18", torchvision.models.resnet18, IMAGE),
    ("resnet50", torchvision.models.resnet50, IMAGE),
    ("r2plus1d_18", tvv.r2plus1d_18, CLIP),
    ("mc3_18", tvv.mc3_18, CLIP),
]


@pytest.mark.parametrize("arch, builder, shape", TORCHVISION, ids=[t[0] for t in TORCHVISION])
def test_torchvision_weights_from_hub_cache(arch, builder, shape, torch_home):
    pre, cfg = PretrainConfig(source="torchvision"), ModelConfig(arch=arch)
    path = torchvision_weights_path(arch)
    assert path.startswith(str(torch_home / "hub" / "checkpoints")) and re.search(r"-[0-9a-f]{8}\.pth$", path)
    with pytest.raises(WeightsError, match=re.escape(path)) as missing:  # names the file and where it goes
        check_pretrained(pre, cfg)
    assert "\n" not in str(missing.value) and "download.pytorch.org" in str(missing.value)

    theirs = randomize(builder, seed=1)
    os.makedirs(os.path.dirname(path))
    torch.save(theirs.state_dict(), path)
    ours, record = load_pretrained(pre, cfg)
    assert record["file"] == path and record["weights"].endswith(("IMAGENET1K_V1", "IMAGENET1K_V2", "KINETICS400_V1"))
    assert_exact(ours, theirs.state_dict(), "fc.")
    theirs.fc = nn.Identity()  # torchvision's own forward then ends in the pooled res5 features
    x = torch.randn(shape)
    with torch.no_grad():
        feats = ours.eval().forward_features(x, ["res4", "res5"])
        assert torch.allclose(feats["res5"], theirs(x), atol=1e-5)
    assert feats["res4"].shape[1] == ours.feature_info["res4"]


def test_torchvision_weights_need_the_archs_own_settings(torch_home):
    with pytest.raises(WeightsError, match=r"resnet50 at its own settings \(width=64, stem=imagenet\).*width=16"):
        check_pretrained(PretrainConfig(source="torchvision"), ModelConfig(arch="resnet50", width=16, stem="cifar"))
    assert torchvision_weights_path("resnet50").endswith("resnet50-11ad3fa6.pth")  # DEFAULT = IMAGENET1K_V2
    assert torchvision_weights_path("resnet50", "IMAGENET1K_V1").endswith("resnet50-0676ba61.pth")
    with pytest.raises(WeightsError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        check_pretrained(PretrainConfig(source="torchvision", weights="V3"), ModelConfig(arch="resnet50"))
    with pytest.raises(WeightsError, match="no weights for r2plus1d_34"):
        check_pretrained(PretrainConfig(source="torchvision"), ModelConfig(arch="r2plus1d_34"))


def test_torchvision_state_dict_as_checkpoint(tmp_path):
    """A torchvision state_dict a user saved from training (DDP prefix, under state_dict): layout told from keys."""
    theirs = randomize(lambda: torchvision.models.resnet18(num_classes=10), seed=2)
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, tmp_path / "mine.pt")
    ours, fmt = load_checkpoint(str(tmp_path / "mine.pt"), ModelConfig(arch="resnet18"))
    assert fmt == "torchvision"
    assert_exact(ours, theirs.state_dict(), "fc.")
    with pytest.raises(WeightsError) as e:  # one line: first mismatched keys, the architecture and width expected
        load_checkpoint(str(tmp_path / "mine.pt"), ModelConfig(arch="resnet18", width=32))
    msg = str(e.value)
    assert "\n" not in msg and "resnet18 (width=32, stem=imagenet)" in msg and "conv1.weight (64, 3, 7, 7)" in msg


def pytorchvideo_r2plus1d_r50() -> nn.Module:
    """The network pytorchvideo's hub r2plus1d_r50 builds (its checkpoint's layout)."""
    from pytorchvideo.models.r2plus1d import create_r2plus1d

    return create_r2plus1d(dropout_rate=0.5)


def test_pytorchvideo_checkpoint_from_hub_cache(torch_home):
    """R2PLUS1D_16x4_R50.pyth as pytorchvideo's hub reads it ({"model_state": ...}), by bare name from the cache."""
    theirs = randomize(pytorchvideo_r2plus1d_r50, seed=3)
    os.makedirs(hub_checkpoints_dir())
    torch.save(
        {"model_state": theirs.state_dict(), "epoch": 196},
        os.path.join(hub_checkpoints_dir(), "R2PLUS1D_16x4_R50.pyth"),
    )
    pre = PretrainConfig(source="checkpoint", checkpoint="R2PLUS1D_16x4_R50.pyth")
    ours, record = load_pretrained(pre, ModelConfig(arch="r2plus1d_50"))
    assert record["format"] == "pytorchvideo" and record["checkpoint"].startswith(str(torch_home))
    assert_exact(ours, theirs.state_dict(), "blocks.5.")
    x = torch.randn(CLIP)
    with torch.no_grad():
        y = x
        for block in theirs.blocks[:5]:
            y = block(y)
        assert torch.allclose(ours.eval().forward_features(x, ["res5"])["res5"], y.mean((2, 3, 4)), atol=1e-5)
    with pytest.raises(WeightsError, match="set pretrain.train.model.arch=r2plus1d_50"):
        load_pretrained(pre, ModelConfig(arch="r2plus1d_18"))


def ig65m_r2plus1d_34(num_classes: int = 359) -> nn.Module:
    """IG-65M's R(2+1)D-34 as ig65m-pytorch builds it from torchvision's VideoResNet: Caffe2 mid-planes in the
    second conv of layer2..4's first block, BatchNorm eps 1e-3."""
    from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, R2Plus1dStem, VideoResNet

    net = VideoResNet(BasicBlock, [Conv2Plus1D] * 4, [3, 4, 6, 3], R2Plus1dStem, num_classes)
    for layer, p in ((net.layer2, 128), (net.layer3, 256), (net.layer4, 512)):
        layer[0].conv2[0] = Conv2Plus1D(p, p, (p * p * 27) // (p * 9 + 3 * p))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.eps = 1e-3
    return net


def test_vmz_ig65m_checkpoint(tmp_path):
    theirs = randomize(ig65m_r2plus1d_34, seed=4)
    path = str(tmp_path / "r2plus1d_34_clip8_ig65m_from_scratch-9bae36ae.pth")
    torch.save(theirs.state_dict(), path)
    ours, fmt = load_checkpoint(path, ModelConfig(arch="r2plus1d_34_vmz"))
    assert fmt == "vmz"
    assert_exact(ours, theirs.state_dict(), "fc.")
    theirs.fc = nn.Identity()
    x = torch.randn(CLIP)
    with torch.no_grad():
        assert torch.allclose(ours.eval().forward_features(x, ["res5"])["res5"], theirs(x), atol=1e-5)
    # the error cases read a file holding part of it (the stem and layer2's first block): cheaper, same layout
    part = str(tmp_path / "part.pth")
    torch.save({k: v for k, v in theirs.state_dict().items() if k.startswith(("stem.", "layer2.0."))}, part)
    with pytest.raises(WeightsError, match="vmz checkpoint .* set pretrain.train.model.arch=r2plus1d_34_vmz"):
        load_checkpoint(part, ModelConfig(arch="r2plus1d_34"))
    with pytest.raises(WeightsError) as e:  # forced into torchvision's mid-planes: the shapes say where
        load_checkpoint(part, ModelConfig(arch="r2plus1d_34"), fmt="torchvision")
    msg = str(e.value)
    assert "\n" not in msg and "r2plus1d_34 (width=64, stem=imagenet, midplanes=torchvision)" in msg
    assert "layer2.0.conv2.0.0.weight (288, 128, 1, 3, 3) vs (230, 128, 1, 3, 3)" in msg


def test_unreadable_and_unknown_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="junk.pt is not a torch weight file"):
        load_checkpoint(str(tmp_path / "junk.pt"), ModelConfig(arch="resnet_tiny"))
    (tmp_path / "blobs.pkl").write_bytes(b"\x80\x02}q\x00.")  # a plain pickle, as Caffe2's VMZ blobs are
    with pytest.raises(WeightsError, match="Caffe2 blob files"):
        load_checkpoint(str(tmp_path / "blobs.pkl"), ModelConfig(arch="r2plus1d_34_vmz"))
    torch.save({"encoder.proj.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match=r"cannot tell the layout .*encoder.proj.weight"):
        load_checkpoint(str(tmp_path / "other.pt"), ModelConfig(arch="resnet_tiny"))
    with pytest.raises(WeightsError, match=r"pretrain.checkpoint=nowhere.pt: no such file .*hub/checkpoints"):
        check_pretrained(PretrainConfig(source="checkpoint", checkpoint="nowhere.pt"), ModelConfig())


def test_pipeline_pretrain_stage_loads_a_checkpoint(tmp_path):
    """The job's pretrain stage with source=checkpoint writes the pretrained model folder from the file, exactly."""
    from cf_ray.pipeline import Job, Paths, stage_pretrain
    from cf_ray.rundir import RunDir

    cfg_model = ModelConfig(arch="resnet_tiny", width=4)
    theirs = randomize(lambda: build(cfg_model), seed=5)
    torch.save(theirs.state_dict(), tmp_path / "start.pt")
    cfg = JobConfig(
        run_dir=str(tmp_path / "run"),
        pretrain={"source": "checkpoint", "checkpoint": str(tmp_path / "start.pt"), "train": {"model": cfg_model}},
    )
    run = RunDir(cfg.run_dir)
    record = stage_pretrain(Job(cfg, run, Paths(run)))
    assert record["format"] == "torchvision"
    loaded, loaded_cfg = load_backbone(Paths(run).model("pretrained"))
    assert loaded_cfg == cfg_model
    assert_exact(loaded, theirs.state_dict(), "fc.")


def test_cli_names_the_missing_weights_before_ray_starts(tmp_path, capsys):
    from cf_ray.cli import main

    for split in ("data/x", "target/train/a", "target/train/b", "target/test/a", "target/test/b"):
        for i in range(2):
            write_image(tmp_path / split / f"{i}.jpg", seed=i)
    argv = ["all", "--data", str(tmp_path / "data"), "--target", str(tmp_path / "target")]
    argv += ["--run-dir", str(tmp_path / "run"), "pretrain.source=torchvision", "pretrain.train.model.arch=resnet18"]
    assert main(argv + ["cluster.k=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and torchvision_weights_path("resnet18") in err
