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
    return pca_whiten_from_cov(mean, cov, dim)


def pca_whiten_from_cov(mean: np.ndarray, cov: np.ndarray, dim: int) -> dict:
    """Whitening transform from a mean (d,) and covariance (d, d), e.g. combined from shard moments."""
    if dim > cov.shape[0]:
        raise ValueError(f"cluster.pca_dim={dim} is larger than the feature dimension {cov.shape[0]}")
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
    return sizes_stats(np.bincount(labels, minlength=k), float(dist.astype(np.float64).sum()))


def sizes_stats(sizes: np.ndarray, objective: float) -> dict:
    """The stats.json summary from cluster sizes and the summed distance (what shards can add up)."""
    sizes = np.asarray(sizes)
    return {
        "objective": float(objective),
        "sizes": sizes.tolist(),
        "imbalance": imbalance_factor(sizes),
        "empty": int((sizes == 0).sum()),
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
    }


# --- Lloyd's algorithm in pieces a shard can compute and a driver can combine -------------------

SPLIT_EPS = 1.0 / 1024  # faiss's relative perturbation of a split centroid
CHUNK_ROWS = 65536  # rows per block when a per-row temporary (a float64 copy) is built
SUM_BLOCK_ROWS = 16384  # rows per float32 partial sum in sums_by_label


def sample_indices(n: int, m: int, seed: int) -> np.ndarray:
    """m distinct row indices of n, seeded (faiss contrib's RandomState(seed).choice)."""
    if m > n:
        raise ValueError(f"cannot draw {m} distinct rows from {n}; lower k or provide more data")
    return np.random.RandomState(seed).choice(n, m, replace=False)


def init_random(x_sample: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k distinct seeded random rows of the sample as initial centroids."""
    return np.ascontiguousarray(x_sample[sample_indices(len(x_sample), k, seed)], dtype=np.float32)


def init_kmeanspp(x_sample: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ (D^2 sampling) on a sample: k sequential passes of O(m d), for moderate k only."""
    x = np.ascontiguousarray(x_sample, dtype=np.float32)
    m = len(x)
    if k > m:
        raise ValueError(f"k-means++ needs at least k={k} sample rows, got {m}")
    rng = np.random.default_rng(seed)
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    chosen = [int(rng.integers(m))]
    d2 = np.maximum(sq - 2 * (x @ x[chosen[0]]) + sq[chosen[0]], 0)
    for _ in range(1, k):
        total = d2.sum()
        i = int(rng.choice(m, p=d2 / total)) if total > 0 else int(rng.integers(m))
        chosen.append(i)
        d2 = np.minimum(d2, np.maximum(sq - 2 * (x @ x[i]) + sq[i], 0))
    return x[chosen].copy()


def nearest(x: np.ndarray, centroids: np.ndarray, spherical: bool = False, index=None) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64, score float32) per row: squared L2 distance, or inner product when spherical.

    ``index`` is an optional faiss index already holding ``centroids`` (e.g. on a GPU).
    """
    import faiss

    if len(x) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    if index is not None:
        score, idx = index.search(x, 1)
    else:
        metric = faiss.METRIC_INNER_PRODUCT if spherical else faiss.METRIC_L2
        score, idx = faiss.knn(x, centroids, 1, metric=metric)
    return idx[:, 0].astype(np.int64), score[:, 0]


def sums_by_label(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per-cluster sums of the rows of x (k, d) float64.

    A one-hot (k x rows) sparse matrix times each block of SUM_BLOCK_ROWS rows, in float32 (the
    rounding error stays ~1e-7 relative, as faiss's float32 accumulation), added up in float64.
    """
    import scipy.sparse as sp

    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    for s in range(0, len(x), SUM_BLOCK_ROWS):
        lab = labels[s : s + SUM_BLOCK_ROWS]
        onehot = sp.csc_matrix((np.ones(len(lab), np.float32), lab, np.arange(len(lab) + 1)), shape=(k, len(lab)))
        sums += onehot @ np.asarray(x[s : s + SUM_BLOCK_ROWS], dtype=np.float32)
    return sums


def partial_stats(
    x: np.ndarray, centroids: np.ndarray, spherical: bool = False, index=None
) -> tuple[np.ndarray, np.ndarray, float]:
    """One shard's share of a Lloyd iteration: (sums (k,d) float64, counts (k,) int64, objective).

    The objective is the summed squared distance (or inner product when spherical) to the nearest
    centroid, measured before the update as faiss's iteration_stats do.
    """
    k = len(centroids)
    labels, score = nearest(x, centroids, spherical, index)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    return sums_by_label(x, labels, k), counts, float(score.astype(np.float64).sum())


def _pick_donor(h: np.ndarray, n: float, rng: np.random.Generator, max_passes: int = 10) -> int | None:
    """faiss's donor draw: cyclic scan from 0, accepting cj with p=(h[cj]-1)/(n-k); else the largest."""
    k = len(h)
    p = (h - 1.0) / max(n - k, 1.0)
    for _ in range(max_passes):  # 10 passes of k draws = faiss's 10*k draws
        hit = np.flatnonzero(rng.random(k) < p)
        if hit.size:
            return int(hit[0])
    j = int(np.argmax(h))
    return j if h[j] > 1 else None


def split_empty(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> int:
    """Give every empty cluster a perturbed copy of a donor's centroid, in place; returns nsplit.

    Mirrors faiss's C++ split_clusters: donor chosen with p=(size-1)/(n-k), even dims x(1+eps) on the
    new centroid and x(1-eps) on the donor (odd dims the other way), donor count halved. An empty
    cluster with no possible donor (every cluster has <= 1 row) keeps its centroid.
    """
    h = counts.astype(np.float64).copy()
    n = h.sum()
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0)
    nsplit = 0
    for ci in np.flatnonzero(h == 0):
        cj = _pick_donor(h, n, rng)
        if cj is None:
            continue
        donor = centroids[cj].astype(np.float64)
        centroids[ci] = donor * (1 + sign * SPLIT_EPS)
        centroids[cj] = donor * (1 - sign * SPLIT_EPS)
        h[ci] = h[cj] / 2
        h[cj] -= h[ci]
        nsplit += 1
    return nsplit


def renormalize(c: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    return c / np.where(norms > 0, norms, 1)


def update_centroids(
    sums: np.ndarray, counts: np.ndarray, old_centroids: np.ndarray, rng: np.random.Generator, spherical: bool = False
) -> tuple[np.ndarray, int]:
    """New centroids from combined sums/counts: means, empty clusters split, renormalised if spherical."""
    counts = np.asarray(counts)
    centroids = np.array(old_centroids, dtype=np.float64)
    full = counts > 0
    centroids[full] = sums[full] / counts[full, None]
    nsplit = split_empty(centroids, counts, rng)
    if spherical:
        centroids = renormalize(centroids)
    return np.ascontiguousarray(centroids, dtype=np.float32), nsplit


def centred_gram(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(x - mean)^T (x - mean) in float64, in row blocks so the float64 copy stays small."""
    g = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
    for s in range(0, len(x), CHUNK_ROWS):
        xc = x[s : s + CHUNK_ROWS].astype(np.float64) - mean
        g += xc.T @ xc
    return g


def pca_whiten_apply_blocks(x: np.ndarray, t: dict) -> np.ndarray:
    """pca_whiten_apply in row blocks (bounded temporaries); returns a new float32 array."""
    out = np.empty((len(x), t["proj"].shape[1]), dtype=np.float32)
    for s in range(0, len(x), CHUNK_ROWS):
        out[s : s + CHUNK_ROWS] = pca_whiten_apply(x[s : s + CHUNK_ROWS], t)
    return out
