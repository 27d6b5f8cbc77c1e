"""The paper's controls for ClusterFit at the same compute: longer pre-training and distillation.

Both start from the pre-training run's last training state (backbone + proxy/label head), which Ray Train
keeps under ``<run>/train/pretrain``.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from cf_ray import storage
from cf_ray.config import ImageConfig, ModelConfig
from cf_ray.train.loop import STATE, Classifier
from cf_ray.train.tasks import get_task

logger = logging.getLogger(__name__)


def latest_state(train_dir: str) -> str:
    """The ``state.pt`` with the highest epoch under a Ray Train storage folder (its resume point)."""
    fs, root = storage.resolve(train_dir)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    states = [i.path for i in infos if i.base_name == STATE]
    if not states:
        raise FileNotFoundError(f"no training checkpoint ({STATE}) under {train_dir}; the pre-training run kept none")
    uris = [storage.join(train_dir, p[len(root) :].lstrip("/")) for p in states]
    return max(uris, key=lambda u: _load(u)["epoch"])


def _load(uri: str) -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


def load_teacher(state_uri: str, model: ModelConfig, num_classes: int) -> Classifier:
    from cf_ray.models.checkpoint import build

    net = Classifier(build(model), num_classes)
    net.load_state_dict(_load(state_uri)["model"])
    return net.eval()


def soft_targets(
    teacher: Classifier, items: pa.Table, media: ImageConfig, task: str, temperature: float, batch_size: int = 256
) -> pa.Table:
    """``items`` that decode, with a float ``target`` list: the teacher's softmax(logits / temperature).

    For a multi-view task (RotNet) every view of the (upright, un-augmented) image gets the teacher's
    probabilities (views x classes values, view-major: cf_ray.train.tasks.Task.teacher_targets).
    """
    from cf_ray.media.decode import normalize
    from cf_ray.media.image import decode_images

    keep, rows = [], []
    with torch.inference_mode():
        for start in range(0, items.num_rows, batch_size):
            chunk = items.slice(start, batch_size)
            out = decode_images({"path": np.array(chunk["path"].to_pylist(), dtype=object)}, media.size, media.resize)
            ok = np.array([e == "" for e in out["error"]])
            if not ok.any():
                continue
            x = normalize(out["image"][ok], media.mean, media.std)
            p = get_task(task).teacher_targets(teacher, x, temperature)
            rows.append(p.numpy().astype(np.float32))
            keep.extend(np.flatnonzero(ok) + start)
    probs = np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)
    logger.info(
        f"distill: teacher soft targets for {len(keep)} of {items.num_rows} items ({probs.shape[1]} values each)"
    )
    target = pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), probs.shape[1])
    return items.take(pa.array(keep, pa.int64())).append_column("target", target)
