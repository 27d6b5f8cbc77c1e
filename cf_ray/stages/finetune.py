"""Transfer by full fine-tuning: a whole backbone (+ a new head) trained on the target's train split as a
Ray Train job, then scored on the target's test split (top-1), next to the linear probes.

The test split goes through the same Ray Data extraction as every other feature set (final tap only);
the fine-tuned head is applied to those features, which is exactly the network's forward pass.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from cf_ray import storage
from cf_ray.config import ExtractConfig, ImageConfig, TrainConfig, VideoConfig
from cf_ray.features import read_features
from cf_ray.media.items import read_items
from cf_ray.stages.extract import run_extract


def run_finetune(
    train_cfg: TrainConfig,
    extract_cfg: ExtractConfig,
    media: ImageConfig | VideoConfig,
    train_items_uri: str,
    test_items_uri: str,
    backbone_uri: str,
    out_model_uri: str,
    test_features_uri: str,
    storage_path: str,
    name: str,
    threads: int | None = None,
) -> dict:
    """Fine-tune ``backbone_uri`` on the labelled items at ``train_items_uri``; {score, top1, ...} on the test items."""
    from cf_ray.models.checkpoint import load_backbone
    from cf_ray.train.loop import load_head, train_classifier

    items = read_items(train_items_uri)
    labels = items["label"].to_pylist()
    classes = sorted(set(labels))
    items = items.append_column("target", pa.array([classes.index(l) for l in labels], pa.int64()))
    backbone, model_cfg = load_backbone(backbone_uri)
    res = train_classifier(
        train_cfg.model_copy(update={"model": model_cfg}),
        media,
        items,
        "labels",
        len(classes),
        storage_path,
        name,
        out_model_uri,
        threads=threads,
        init_backbone=backbone_uri,
    )
    last = list(backbone.feature_info)[-1]  # the final tap: what the head sees
    run_extract(
        extract_cfg.model_copy(update={"layers": [last]}), media, test_items_uri, out_model_uri, test_features_uri
    )
    _, x, test_labels = read_features(test_features_uri, last, with_labels=True)
    unknown = sorted(set(test_labels) - set(classes))
    if unknown:
        raise ValueError(f"test labels {unknown[:5]} never occur in train; the fine-tuned network cannot predict them")
    head = load_head(out_model_uri)
    with torch.no_grad():
        pred = head(torch.from_numpy(np.array(x))).argmax(1).numpy()
    top1 = float((pred == np.array([classes.index(l) for l in test_labels])).mean())
    h = res["history"]
    return {
        "score": top1,
        "top1": top1,
        "metric": "top1",
        "n_train": res["rows"],
        "n_test": len(test_labels),
        "classes": len(classes),
        "epochs": len(h),
        "train_acc": h[-1]["acc"],
        "train_loss": h[-1]["loss"],
        "model": storage.absolute(out_model_uri),
    }
