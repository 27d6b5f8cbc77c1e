"""The paper's controls for ClusterFit at the same compute: longer pre-training and distillation.

Both start from the pre-training run's last training state (backbone + proxy/label head), which Ray Train
keeps under ``<run>/train/pretrain``.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from cf_ray import storage
from cf_ray.config import ImageConfig, ModelConfig
from cf_ray.rundir import log
from cf_ray.train.loop import STATE, Classifier, rotate4


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

    task=rotation: for each of the 4 rotations of the (upright, un-augmented) image, the teacher's
    probabilities over the 4 rotations (16 values, rotation-major); task=labels: over its classes.
    """
    from cf_ray.media.image import decode_images
    from cf_ray.stages.extract import normalize

    keep, rows = [], []
    with torch.inference_mode():
        for start in range(0, items.num_rows, batch_size):
            chunk = items.slice(start, batch_size)
            out = decode_images({"path": np.array(chunk["path"].to_pylist(), dtype=object)}, media.size, media.resize)
            ok = np.array([e == "" for e in out["error"]])
            if not ok.any():
                continue
            x = normalize(out["image"][ok], media.mean, media.std)
            if task == "rotation":
                xr, _ = rotate4(x)
                p = torch.softmax(teacher(xr) / temperature, 1).view(4, len(x), 4).transpose(0, 1).reshape(len(x), 16)
            else:
                p = torch.softmax(teacher(x) / temperature, 1)
            rows.append(p.numpy().astype(np.float32))
            keep.extend(np.flatnonzero(ok) + start)
    probs = np.concatenate(rows) if rows else np.zeros((0, 16 if task == "rotation" else 1), np.float32)
    log(f"distill: teacher soft targets for {len(keep)} of {items.num_rows} items ({probs.shape[1]} values each)")
    target = pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), probs.shape[1])
    return items.take(pa.array(keep, pa.int64())).append_column("target", target)
