"""cf-ray export: torch.export and ONNX files of an image and a video backbone, checked against eager PyTorch."""

import json

import numpy as np
import pytest
import torch
from run_helpers import make_run

import cf_ray
from cf_ray.cli import main
from cf_ray.export import example_input, run_exported


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    image, _ = make_run(root, "image", cluster=False)
    video, _ = make_run(root, "video", cluster=False)
    metrics = {  # what the report stage leaves: the card shows the transfer table from it
        "transfer": {
            "target": {m: {"res4": 0.5 + i / 10, "res5": 0.6 + i / 10} for i, m in enumerate(cf_ray.api.MODELS)}
        },
        "transfer_metric": {"target": "top-1"},
    }
    (image / "metrics.json").write_text(json.dumps(metrics))
    return {"image": image, "video": video}


@pytest.mark.parametrize("modality", ["image", "video"])
@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_export_matches_eager(runs, modality, fmt, tmp_path, capsys):
    run = runs[modality]
    out = tmp_path / "exported"
    assert main(["export", "--run-dir", str(run), "--format", fmt, "--layers", "res4,res5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    file = out / ("model.pt2" if fmt == "torch_export" else "model.onnx")
    assert file.stat().st_size > 0 and "max abs diff" in printed
    card = json.loads((out / "model_card.json").read_text())
    md = (out / "MODEL_CARD.md").read_text()

    # Independently of the card: load the file as a user would and compare with the eager backbone.
    model = cf_ray.load_model(run)
    x = example_input(model, 5, seed=7)
    with torch.inference_mode():
        eager = model.backbone.forward_features(x, ["res4", "res5"])
    got = run_exported(str(file), fmt, x)
    diff = max(float(np.abs(g - eager[l].numpy()).max()) for g, l in zip(got, ["res4", "res5"]))
    print(
        f"{modality} {fmt}: max abs diff exported vs eager {diff:.3g} "
        f"(card: {card['check']['max_abs_diff_vs_eager']:.3g})"
    )
    assert [g.shape for g in got] == [(5, 16), (5, 32)]
    assert diff < 1e-4 and card["check"]["max_abs_diff_vs_eager"] < 1e-4

    assert card["format"] == fmt and card["model"] == "clusterfit" and card["cf_ray_version"] == cf_ray.__version__
    assert card["architecture"]["arch"] == ("r2plus1d_tiny" if modality == "video" else "resnet_tiny")
    assert card["architecture"]["parameters"] == sum(p.numel() for p in model.backbone.parameters())
    assert card["outputs"] == {"res4": ["N", 16], "res5": ["N", 32]} and card["taps"]["res5"] == 32
    assert card["normalization"]["mean"] == list(model.mean) and card["input"]["size"] == 16
    assert card["training"]["cluster"]["k"] in (3, 4) and card["training"]["train"]["model"]["width"] == 4
    if modality == "video":
        assert card["input"]["clip_len"] == 4 and "(N, 3, T, S, S)" in md and "mean over 2" in md
    else:
        assert card["transfer"]["target"]["scores"] == {"res4": 0.7, "res5": 0.8}
        assert "| **clusterfit** (this model) | 70.0 | 80.0 |" in md
    assert "## Transfer" in md and f"`{card['architecture']['arch']}`" in md


def test_export_bad_input(runs, tmp_path, capsys):
    run = runs["image"]
    cases = [
        (["--run-dir", str(tmp_path / "none")], "does not exist"),
        (
            ["--run-dir", str(run), "--format", "tflite"],
            "unknown export format 'tflite'; use one of torch_export, onnx",
        ),
        (["--run-dir", str(run), "--layers", "res9"], "layer 'res9' is not a tap"),
        (["--run-dir", str(run), "--model", "best"], "unknown model 'best'"),
    ]
    for args, words in cases:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip()
        print(err)
        assert err.count("\n") == 0 and err.startswith("error: ") and words in err
