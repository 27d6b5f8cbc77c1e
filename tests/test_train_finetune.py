"""Transfer by full fine-tuning (a Ray Train job from a saved backbone), scored through Ray Data extraction."""

import numpy as np
import torch

from cf_ray.config import ExtractConfig, ImageConfig, ModelConfig, TrainConfig
from cf_ray.demo import make_image_demo
from cf_ray.media.decode import normalize
from cf_ray.media.image import decode_images
from cf_ray.media.items import write_items
from cf_ray.models.checkpoint import build, load_backbone, save_backbone
from cf_ray.sources import list_items
from cf_ray.stages.finetune import run_finetune
from cf_ray.train.loop import load_head


def test_finetune_starts_from_the_backbone_and_scores_its_own_forward_pass(ray_session, tmp_path):
    train, _ = list_items(str(make_image_demo(tmp_path / "train", n_per_class=6, size=16, seed=0)))
    test, _ = list_items(str(make_image_demo(tmp_path / "test", n_per_class=3, size=16, seed=1)))
    write_items(train, str(tmp_path / "train.parquet"))
    write_items(test, str(tmp_path / "test.parquet"))
    mcfg = ModelConfig(width=8)
    start = build(mcfg, seed=5)
    save_backbone(start, mcfg, str(tmp_path / "pre"))
    media = ImageConfig(size=16)
    res = run_finetune(
        TrainConfig(epochs=1, batch_size=16, lr=1e-4, warmup_epochs=0),
        ExtractConfig(batch_size=32),
        media,
        str(tmp_path / "train.parquet"),
        str(tmp_path / "test.parquet"),
        str(tmp_path / "pre"),
        str(tmp_path / "ft"),
        str(tmp_path / "ft_feats"),
        str(tmp_path / "runs"),
        "finetune_pre",
    )
    assert res["metric"] == "top1" and res["n_train"] == 36 and res["n_test"] == 18 and res["classes"] == 6

    tuned, _ = load_backbone(str(tmp_path / "ft"))
    moved = max((a - b).abs().max().item() for a, b in zip(tuned.parameters(), start.parameters()))
    fresh = max((a - b).abs().max().item() for a, b in zip(build(mcfg, seed=6).parameters(), start.parameters()))
    assert moved < 1e-2 < fresh  # fine-tuned from the given weights (tiny lr), not from a new initialisation

    # The reported top-1 is the fine-tuned network's own forward pass on the decoded test images.
    head = load_head(str(tmp_path / "ft"))
    dec = decode_images({"path": np.array(test["path"].to_pylist(), dtype=object)}, 16)
    classes = sorted(set(train["label"].to_pylist()))
    with torch.no_grad():
        pred = head(tuned.eval()(normalize(dec["image"], media.mean, media.std))).argmax(1).numpy()
    truth = np.array([classes.index(l) for l in test["label"].to_pylist()])
    assert res["top1"] == float((pred == truth).mean())
