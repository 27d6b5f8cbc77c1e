"""Pure k-means helpers: numpy in, numpy out."""
from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)


def pca_whiten_fit(x: np.ndarray, dim: int) -> dict:
    """VISSL-style whitening: centre, eigendecompose the covariance, scale by 1/sqrt(eigval)."""
    if dim > x.shape[1]:
        raise ValueError(f"cluster.pca_dim={dim} is larger than the feature dimension {x.shape[1]}")
    mean = x.mean(0)
    xc = (x - mean).astype(np.float64)
    cov = xc.T @ xc / max(1, len(x) - 1)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1][:dim]
    eigval = np.maximum(eigval[order], eigval.max() * 1e-5)
    proj = (eigvec[:, order] / np.sqrt(eigval)).astype(np.float32)
    return {"mean": mean.astype(np.float32), "proj": proj}


def pca_whiten_apply(x: np.ndarray, t: dict) -> np.ndarray:
    return ((x - t["mean"]) @ t["proj"]).astype(np.float32)


def preprocess_fit(x: np.ndarray, l2: bool = True, pca_dim: int | None = None) -> tuple[np.ndarray, dict | None]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if l2:
        x = l2_normalize(x)
    t = None
    if pca_dim:
        t = pca_whiten_fit(x, pca_dim)
        x = pca_whiten_apply(x, t)
    return np.ascontiguousarray(x, dtype=np.float32), t


def imbalance_factor(sizes: np.ndarray) -> float:
    n = sizes.sum()
    return float(len(sizes) * (sizes.astype(np.float64) ** 2).sum() / max(1, n) ** 2)


def cluster_stats(labels: np.ndarray, dist: np.ndarray, k: int) -> dict:
    sizes = np.bincount(labels, minlength=k)
    return {
        "objective": float(dist.astype(np.float64).sum()),
        "sizes": sizes.tolist(),
        "imbalance": imbalance_factor(sizes),
        "empty": int((sizes == 0).sum()),
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
    }
