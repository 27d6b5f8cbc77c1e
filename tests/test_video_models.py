"""Video backbones: taps, widths, stems, torchvision weight layout, config integration."""

import pytest
import torch

from cf_ray.config import ModelConfig
from cf_ray.models import create_backbone, list_backbones
from cf_ray.models.checkpoint import build

TAPS = ["res2", "res3", "res4", "res5"]
VIDEO_NETS = [n for n in list_backbones() if create_backbone(n, width=4).modality == "video"]
DEFAULT_DIMS = {
    "r2plus1d_tiny": [16, 32, 64, 128],
    "r2plus1d_18": [64, 128, 256, 512],
    "r2plus1d_34": [64, 128, 256, 512],
    "r2plus1d_34_vmz": [64, 128, 256, 512],
    "r3d_18": [64, 128, 256, 512],
    "mc3_18": [64, 128, 256, 512],
    "r2plus1d_50": [256, 512, 1024, 2048],
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny 3-D convs are dominated by thread start-up and contention on a busy 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_all_video_backbones_registered():
    assert sorted(VIDEO_NETS) == sorted(DEFAULT_DIMS)


@pytest.mark.parametrize("name", VIDEO_NETS)
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_taps_match_feature_info(name, stem):
    m = create_backbone(name, width=8, stem=stem).eval()
    with torch.no_grad():
        out = m.forward_features(torch.randn(2, 3, 4, 16, 16), TAPS)
    assert list(out) == TAPS
    for tap in TAPS:
        assert out[tap].shape == (2, m.feature_info[tap])
    assert m(torch.randn(1, 3, 2, 16, 16)).shape == (1, m.num_features)


@pytest.mark.parametrize("name", VIDEO_NETS)
def test_default_width_feature_dims(name):
    with torch.device("meta"):  # shapes only: skip the initialisation of full-size nets
        m = create_backbone(name)
    assert [m.feature_info[t] for t in TAPS] == DEFAULT_DIMS[name]
    assert m.num_features == DEFAULT_DIMS[name][-1]


@pytest.mark.parametrize("name", ["r2plus1d_18", "r2plus1d_50"])
def test_default_width_forward(name):
    m = create_backbone(name).eval()
    with torch.no_grad():
        out = m.forward_features(torch.randn(1, 3, 4, 32, 32), ["res4", "res5"])
    assert {t: v.shape[1] for t, v in out.items()} == {"res4": DEFAULT_DIMS[name][2], "res5": DEFAULT_DIMS[name][3]}


def test_tiny_trains():
    m = create_backbone("r2plus1d_tiny", width=4)
    m(torch.randn(2, 3, 4, 16, 16)).pow(2).mean().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("name", ["r2plus1d_18", "r3d_18", "mc3_18"])
def test_defaults_are_torchvisions_net(name):
    """By name and with the config's defaults, the backbone is torchvision's net without fc: same keys in the same
    order, same shapes, same parameter count (r2plus1d_18: 31,505,325 - 205,200)."""
    import torchvision.models.video as tvv

    with torch.device("meta"):  # shapes only: skip the initialisation of full-size nets
        ours = build(ModelConfig(arch=name))
        theirs = getattr(tvv, name)()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in theirs.state_dict().items() if not k.startswith("fc.")
    ]
    fc = sum(p.numel() for p in theirs.fc.parameters())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) - fc


def test_r2plus1d_34_and_its_vmz_variant():
    """torchvision-style R(2+1)D-34 is 61,831,661 parameters with a 400-way fc (512 * 400 + 400); IG-65M's (400
    classes) 63,697,175: only the second conv of layer2..4's first block differs (Caffe2 mid-planes M(p, p):
    288/576/1152), and BatchNorm eps is Caffe2's 1e-3."""
    cfg = ModelConfig(arch="r2plus1d_34_vmz")
    assert (cfg.width, cfg.stem, cfg.midplanes) == (64, "imagenet", "vmz")
    with torch.device("meta"):  # shapes only: skip the initialisation of full-size nets
        net = build(cfg)
        vmz, tv = net.state_dict(), build(ModelConfig(arch="r2plus1d_34")).state_dict()

    def params(sd):
        return sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k)

    assert params(tv) == 61_831_661 - 205_200 and params(vmz) == 63_697_175 - 205_200
    assert list(vmz) == list(tv)
    differ = sorted({k.rsplit(".", 2)[0] for k in vmz if vmz[k].shape != tv[k].shape})
    assert differ == ["layer2.0.conv2.0", "layer3.0.conv2.0", "layer4.0.conv2.0"]
    assert [vmz[f"layer{i}.0.conv2.0.0.weight"].shape[0] for i in (2, 3, 4)] == [288, 576, 1152]
    assert {m.eps for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d)} == {1e-3}


def test_config_defaults_are_the_archs_own():
    """Unset width/stem/midplanes take the architecture's own (resolved on validation); set ones are kept."""
    assert ModelConfig(arch="r2plus1d_18").model_dump() == {
        "arch": "r2plus1d_18",
        "width": 64,
        "stem": "imagenet",
        "midplanes": "torchvision",
    }
    assert (ModelConfig(arch="r2plus1d_tiny").width, ModelConfig(arch="r2plus1d_tiny").stem) == (16, "cifar")
    assert ModelConfig(arch="r2plus1d_18", width=8, stem="cifar", midplanes="vmz").model_dump()["midplanes"] == "vmz"
    with pytest.raises(ValueError, match="midplanes does not apply to r3d_18"):
        ModelConfig(arch="r3d_18", midplanes="vmz")


def test_bad_stem_is_rejected():
    with pytest.raises(ValueError, match="stem"):
        create_backbone("r2plus1d_tiny", stem="vit")


def test_built_from_model_config():
    m = build(ModelConfig(arch="r2plus1d_tiny", width=8, stem="cifar"), seed=0)
    assert m.modality == "video" and m.feature_info["res5"] == 64


@pytest.mark.parametrize("arch, shape", [("resnet_tiny", (4, 3, 16, 16)), ("r2plus1d_tiny", (4, 3, 4, 16, 16))])
def test_gpu_step_settings_run_on_cpu(arch, shape):
    """The GPU training step (bf16 autocast, channels-last weights and inputs) forced on CPU, for images and video:
    video needs channels_last_3d (plain channels_last refuses rank-5 tensors, which broke video training on GPU)."""
    from cf_ray.runtime import step_settings
    from cf_ray.train.loop import Classifier

    assert step_settings("auto", "auto", "cpu", video=len(shape) == 5)[0] is None  # auto: nothing changes on CPU
    fmt, autocast = step_settings("bf16", "yes", "cpu", video=len(shape) == 5)
    torch.manual_seed(0)
    model = Classifier(create_backbone(arch, width=4), 3).to(memory_format=fmt)
    x = torch.randn(shape).contiguous(memory_format=fmt)
    assert x.is_contiguous(memory_format=fmt)
    with autocast():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(
        p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()
    )
    if len(shape) == 5:
        with pytest.raises(RuntimeError, match="rank 4"):
            x.contiguous(memory_format=torch.channels_last)
