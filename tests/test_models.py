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


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_image_defaults_are_torchvisions_net(name):
    """By name and with the config's defaults, resnet18/50 are torchvision's nets without fc: same keys in the same
    order (torchvision's names, so its state_dicts load as they are), same shapes, same parameter count."""
    import torchvision

    cfg = ModelConfig(arch=name)
    assert (cfg.width, cfg.stem) == (64, "imagenet")
    with torch.device("meta"):  # shapes only: skip the initialisation of full-size nets
        ours, theirs = build(cfg), getattr(torchvision.models, name)()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in theirs.state_dict().items() if not k.startswith("fc.")
    ]
    fc = sum(p.numel() for p in theirs.fc.parameters())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) - fc


def test_model_folder_saved_before_torchvision_names_loads(tmp_path):
    """A folder saved by earlier cf_ray (keys stem.0/stem.1/stages.N, model.json without midplanes) loads exactly."""
    import json
    import re

    cfg = ModelConfig(arch="resnet_tiny", width=4)
    new = build(cfg, seed=3).eval()

    def old_name(k):
        k = re.sub(r"^conv1\.", "stem.0.", re.sub(r"^bn1\.", "stem.1.", k))
        return re.sub(r"^layer(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.", k)

    old_sd = {old_name(k): v for k, v in new.state_dict().items()}
    assert "stages.3.0.conv1.weight" in old_sd and "stem.1.running_var" in old_sd
    (tmp_path / "old").mkdir()
    torch.save(old_sd, tmp_path / "old" / "backbone.pt")
    (tmp_path / "old" / "model.json").write_text(json.dumps({"arch": "resnet_tiny", "width": 4, "stem": "cifar"}))
    loaded, loaded_cfg = load_backbone(str(tmp_path / "old"))
    assert loaded_cfg == cfg
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), new.state_dict().values()))
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(loaded.eval()(x), new(x))
