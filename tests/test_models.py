import pytest
import torch

from cf_ray.config import ModelConfig
from cf_ray.models import create_backbone, list_backbones
from cf_ray.models.checkpoint import build, import_checkpoint, load_backbone, save_backbone

IMAGE_NETS = list_backbones("image")


@pytest.mark.parametrize("name", IMAGE_NETS)
def test_image_backbone_taps(name):
    m = create_backbone(name, width=4, stem="cifar").eval()
    with torch.no_grad():
        out = m.forward_features(torch.randn(2, 3, 16, 16), ["res2", "res3", "res4", "res5"])
    for tap, t in out.items():
        assert t.shape == (2, m.feature_info[tap])


def test_unknown_backbone_lists_valid_ones():
    with pytest.raises(KeyError, match="resnet_tiny"):
        create_backbone("nope")


def test_save_load_roundtrip(tmp_path):
    cfg = ModelConfig(arch="resnet_tiny", width=4)
    m = build(cfg, seed=1).eval()
    save_backbone(m, cfg, str(tmp_path / "m"))
    m2, cfg2 = load_backbone(str(tmp_path / "m"))
    x = torch.randn(1, 3, 16, 16)
    assert cfg2 == cfg
    assert torch.equal(m(x), m2.eval()(x))


def test_import_user_checkpoint(tmp_path):
    cfg = ModelConfig(arch="resnet_tiny", width=4)
    sd = {"module." + k: v for k, v in build(cfg, seed=2).state_dict().items()}
    sd["fc.weight"] = torch.zeros(3, 32)
    torch.save({"state_dict": sd}, tmp_path / "user.pt")
    import_checkpoint(str(tmp_path / "user.pt"), cfg, str(tmp_path / "m"))
    assert load_backbone(str(tmp_path / "m"))[1] == cfg
    with pytest.raises(ValueError, match="does not match"):
        import_checkpoint(str(tmp_path / "user.pt"), ModelConfig(arch="resnet_tiny", width=8), str(tmp_path / "m2"))


def test_torchvision_weights_from_local_cache(tmp_path, monkeypatch):
    """The torch-cache loader maps torchvision's keys onto ours (weights here are random, not downloaded)."""
    import os

    import torchvision

    from cf_ray.models.resnet import load_torchvision_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = create_backbone("resnet18")
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        load_torchvision_weights(model, "resnet18")
    tv = torchvision.models.resnet18().eval()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    os.makedirs(tmp_path / "hub" / "checkpoints")
    torch.save(tv.state_dict(), tmp_path / "hub" / "checkpoints" / os.path.basename(url))
    load_torchvision_weights(model, "resnet18")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.eval().forward_features(x, ["res5"])["res5"]
        theirs = torch.flatten(
            tv.avgpool(tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))), 1
        )
    assert torch.allclose(ours, theirs, atol=1e-5)
