"""Per-iteration checkpoints of a k-means fit, so that a rerun resumes from the last iteration.

Layout under the checkpoint folder (any storage URI):
  transform.npz          the preprocessing transform (PCA-whitening only; written once, before any state)
  centroids-00007.npy    centroids after 7 completed iterations (0: the initial centroids)
  state.json             {"iteration", "converged", "centroids" (file name), "fingerprint", "history"}

state.json is written last and names its centroids file, so a crash between the two writes leaves the
previous consistent state; older centroid files are deleted afterwards.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from cf_ray import storage

STATE = "state.json"
TRANSFORM = "transform.npz"


class CheckpointMismatch(ValueError):
    """The checkpoint folder holds a fit of other data or settings."""


@dataclass
class FitState:
    iteration: int  # completed Lloyd iterations
    centroids: np.ndarray
    history: list[dict]
    converged: bool
    transform: dict | None


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def save_transform(uri: str, transform: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **transform)
    storage.write_bytes(storage.join(uri, TRANSFORM), buf.getvalue())


def save_state(uri: str, state: FitState, fingerprint: dict) -> None:
    name = f"centroids-{state.iteration:05d}.npy"
    storage.write_bytes(storage.join(uri, name), _npy_bytes(state.centroids))
    previous = (
        storage.read_json(storage.join(uri, STATE))["centroids"] if storage.exists(storage.join(uri, STATE)) else None
    )
    storage.write_json(
        storage.join(uri, STATE),
        {
            "iteration": state.iteration,
            "converged": state.converged,
            "centroids": name,
            "fingerprint": fingerprint,
            "history": state.history,
        },
    )
    if previous and previous != name:
        fs, p = storage.resolve(storage.join(uri, previous))
        fs.delete_file(p)


def load_state(uri: str, fingerprint: dict) -> FitState | None:
    """The saved state, or None when there is none; CheckpointMismatch when it is of another fit."""
    path = storage.join(uri, STATE)
    if not storage.exists(path):
        return None
    s = storage.read_json(path)
    diff = {k: (s["fingerprint"].get(k), v) for k, v in fingerprint.items() if s["fingerprint"].get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointMismatch(
            f"checkpoint {uri} belongs to another k-means fit ({detail}); delete it or use another folder"
        )
    centroids = np.load(io.BytesIO(storage.read_bytes(storage.join(uri, s["centroids"]))), allow_pickle=False)
    transform = None
    if storage.exists(storage.join(uri, TRANSFORM)):
        with np.load(io.BytesIO(storage.read_bytes(storage.join(uri, TRANSFORM))), allow_pickle=False) as z:
            transform = {k: z[k] for k in z.files}
    return FitState(s["iteration"], centroids, s["history"], s["converged"], transform)
