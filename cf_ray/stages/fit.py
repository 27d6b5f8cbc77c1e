"""Pseudo-label fit: how many items the retrained network assigns to their own cluster, on the clustered views.

The retraining's accuracy is measured on augmented views (for video, one random clip) while the weights
change; this measures the finished network on the inputs the pseudo-labels were computed from: its
backbone's features of the source, extracted like the clustered ones (the same clips, no augmentation),
through its saved classifier head. The head is linear and a video's feature is the mean over its clips,
so a video's prediction is the argmax of its clips' mean logits; with per-clip features each clip is also
scored against its own cluster id.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from cf_ray.features import clip_column, dataset, read_table
from cf_ray.train.loop import load_head

LAYER = "res5"  # the backbone's output, which the head reads


def _matrix(col: pa.ChunkedArray) -> np.ndarray:
    col = col.combine_chunks()
    values = col.flatten()
    if pa.types.is_fixed_size_list(values.type):  # per-clip features: (n, clips, d)
        return values.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size, -1)
    return values.to_numpy(zero_copy_only=False).reshape(len(col), -1)


def _predict(head: torch.nn.Linear, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).argmax(-1).numpy()


def _lookup(ids: list[str], table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``ids`` found in ``table``, ``table[column]`` for them, in that order)."""
    where = {k: i for i, k in enumerate(table["id"].to_pylist())}
    found = np.array([i for i, k in enumerate(ids) if k in where], dtype=np.int64)
    rows = np.array([where[ids[i]] for i in found], dtype=np.int64)
    return found, _matrix(table[column])[rows] if column != "cluster" else table[column].to_numpy()[rows]


def pseudo_label_fit(
    features_uri: str, model_uri: str, assignments: pa.Table, clip_assignments: pa.Table | None = None
) -> dict:
    """{"items", "fit"} and, with per-clip features and ``clip_assignments`` (id, clusters), "clip_fit" (each clip
    against its own cluster) and "clip_fit_video_label" (each clip against its video's cluster)."""
    head = load_head(model_uri)
    clip_col = clip_column(LAYER)
    per_clip = clip_assignments is not None and clip_col in dataset(features_uri).schema.names
    t = read_table(features_uri, ["id", f"feat_{LAYER}"] + ([clip_col] if per_clip else []))
    ids = t["id"].to_pylist()
    rows, target = _lookup(ids, assignments, "cluster")
    out = {"items": len(rows), "fit": float((_predict(head, _matrix(t[f"feat_{LAYER}"])[rows]) == target).mean())}
    if per_clip:
        pred = _predict(head, _matrix(t[clip_col])[rows])  # (n, clips)
        _, clusters = _lookup([ids[i] for i in rows], clip_assignments, "clusters")
        out["clip_fit"] = float((pred == clusters).mean())
        out["clip_fit_video_label"] = float((pred == target[:, None]).mean())
    return out
