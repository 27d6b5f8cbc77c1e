"""cf_ray.kmeans.core: pure k-means pieces, checked against brute-force numpy and faiss.Kmeans."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from cf_ray.kmeans import core
from cf_ray.kmeans.distributed import partition_rows


def blobs(n=3000, d=16, centers=6, spread=2.0, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, centers, n)
    means = rng.standard_normal((centers, d)) * spread * 3
    return (means[truth] + rng.standard_normal((n, d))).astype(np.float32), truth


def lloyd(x, c, niter, seed=0, shards=1, spherical=False):
    """The driver loop of fit_distributed, in one process, over row shards."""
    history = []
    for it in range(niter):
        parts = [core.partial_stats(xs, c, spherical) for xs in np.array_split(x, shards)]
        sums, counts, obj = sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts)
        c, nsplit = core.update_centroids(sums, counts, c, np.random.default_rng([seed, it]), spherical)
        history.append({"obj": obj, "nsplit": nsplit})
    return c, history


def faiss_kmeans(x, c0, niter, **kw):
    km = faiss.Kmeans(x.shape[1], len(c0), niter=niter, max_points_per_centroid=10**7, min_points_per_centroid=1, **kw)
    km.train(x, init_centroids=c0)
    return km


def sse(x, c):
    return float(faiss.knn(x, c, 1)[0].astype(np.float64).sum())


def test_partial_stats_match_brute_force_and_add_up_over_shards():
    x, _ = blobs(n=1000, d=8)
    c = x[:7].copy()
    sums, counts, obj = core.partial_stats(x, c)
    d2 = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    lab = d2.argmin(1)
    np.testing.assert_array_equal(counts, np.bincount(lab, minlength=7))
    np.testing.assert_allclose(
        sums, np.stack([x[lab == j].astype(np.float64).sum(0) for j in range(7)]), rtol=1e-6, atol=1e-6
    )
    assert obj == pytest.approx(d2.min(1).sum(), rel=1e-5)
    parts = [core.partial_stats(xs, c) for xs in np.array_split(x, 3)]
    np.testing.assert_allclose(sum(p[0] for p in parts), sums, rtol=1e-6)
    np.testing.assert_array_equal(sum(p[1] for p in parts), counts)


def test_sums_by_label_spans_several_row_blocks(monkeypatch):
    monkeypatch.setattr(core, "SUM_BLOCK_ROWS", 64)
    x, _ = blobs(n=500, d=4)
    lab = np.random.default_rng(1).integers(0, 5, 500)
    expect = np.stack([x[lab == j].astype(np.float64).sum(0) for j in range(5)])
    np.testing.assert_allclose(core.sums_by_label(x, lab, 5), expect, rtol=1e-6)


@pytest.mark.parametrize("shards", [1, 4])
def test_lloyd_objective_matches_faiss_with_same_init(shards):
    x, _ = blobs()
    c0 = core.init_random(x, 12, seed=3)
    c, hist = lloyd(x, c0, niter=10, shards=shards)
    km = faiss_kmeans(x, c0, niter=10)
    assert all(h["nsplit"] == 0 for h in hist)
    for mine, ref in zip(hist, km.iteration_stats):
        assert mine["obj"] == pytest.approx(ref["obj"], rel=1e-3)
    assert sse(x, c) == pytest.approx(sse(x, km.centroids), rel=1e-3)


def test_spherical_lloyd_matches_faiss():
    x, _ = blobs(d=8)
    x = core.l2_normalize(x).astype(np.float32)
    c0 = core.init_random(x, 10, seed=1)
    c, hist = lloyd(x, c0, niter=6, spherical=True)
    km = faiss_kmeans(x, c0, niter=6, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, rtol=1e-5)
    for mine, ref in zip(hist, km.iteration_stats):
        assert mine["obj"] == pytest.approx(ref["obj"], rel=1e-3)


def test_update_centroids_means_and_split_of_empty_clusters():
    old = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32) + 5
    counts = np.array([10, 0, 30, 0])
    sums = np.zeros((4, 6))
    sums[0], sums[2] = 10 * np.arange(1.0, 7.0), 30 * np.ones(6)
    means = np.stack([np.arange(1.0, 7.0), np.ones(6)])
    c, nsplit = core.update_centroids(sums, counts, old, np.random.default_rng(1))
    assert nsplit == 2
    for row in c:  # every centroid is a donor's mean up to a few (1 +/- 1/1024) factors
        rel = np.abs(row / means - 1).max(1)
        assert rel.min() < 3 * core.SPLIT_EPS, row
    assert len(np.unique(c, axis=0)) == 4
    means_only, nsplit = core.update_centroids(sums[[0, 2]], counts[[0, 2]], old[[0, 2]], np.random.default_rng(1))
    assert nsplit == 0
    np.testing.assert_allclose(means_only, means, rtol=1e-6)


def test_split_follows_faiss_perturbation_pattern():
    c = np.array([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    nsplit = core.split_empty(c, np.array([5, 0]), np.random.default_rng(0))
    eps = core.SPLIT_EPS
    assert nsplit == 1
    np.testing.assert_allclose(c[1], [2 * (1 + eps), 2 * (1 - eps), 2 * (1 + eps)])
    np.testing.assert_allclose(c[0], [2 * (1 - eps), 2 * (1 + eps), 2 * (1 - eps)])


def test_split_without_any_donor_keeps_old_centroid():
    c = np.array([[1.0, 1.0], [3.0, 3.0], [7.0, 7.0]])
    assert core.split_empty(c, np.array([1, 1, 0]), np.random.default_rng(0)) == 0
    np.testing.assert_array_equal(c[2], [7.0, 7.0])


def test_split_prefers_large_donors():
    counts = np.zeros(50, dtype=np.int64)
    counts[7], counts[30] = 1000, 2
    picks = [core._pick_donor(counts.astype(float), counts.sum(), np.random.default_rng(s)) for s in range(200)]
    assert picks.count(7) > 180 and set(picks) <= {7, 30}


def test_duplicated_rows_force_splits_and_stay_close_to_faiss():
    """faiss's own check: half the rows identical forces empty clusters; SSE within 1.1x of faiss."""
    x, _ = blobs(n=2000, d=8)
    x[:1000] = x[0]
    c0 = x[np.random.default_rng(0).choice(2000, 20, replace=False)]
    c, hist = lloyd(x, c0, niter=10)
    km = faiss_kmeans(x, c0, niter=10)
    assert hist[0]["nsplit"] > 0
    assert sse(x, c) < 1.1 * sse(x, km.centroids)
    _, counts, _ = core.partial_stats(x, c)
    assert (counts > 0).all()


def test_init_random_is_seeded_and_distinct():
    x, _ = blobs(n=500)
    a, b = core.init_random(x, 20, 5), core.init_random(x, 20, 5)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a, axis=0)) == 20
    assert not np.array_equal(a, core.init_random(x, 20, 6))
    with pytest.raises(ValueError, match="cannot draw"):
        core.init_random(x, 501, 0)


def test_init_kmeanspp_is_seeded_and_spreads_over_blobs():
    x, truth = blobs(n=2000, centers=6, spread=4.0)
    c = core.init_kmeanspp(x, 6, seed=2)
    np.testing.assert_array_equal(c, core.init_kmeanspp(x, 6, seed=2))
    picked = {int(truth[np.flatnonzero((x == row).all(1))[0]]) for row in c}
    assert len(picked) >= 5  # D^2 sampling almost always hits every well-separated blob


def test_pca_whitening_from_moments_equals_direct_fit():
    x, _ = blobs(n=800, d=12)
    x = core.l2_normalize(x).astype(np.float32)
    direct = core.pca_whiten_fit(x, 5)
    mean = x.astype(np.float64).mean(0)
    gram = sum(core.centred_gram(xs, mean) for xs in np.array_split(x, 3))
    sharded = core.pca_whiten_from_cov(mean.astype(np.float32), gram / (len(x) - 1), 5)
    np.testing.assert_allclose(np.abs(sharded["proj"]), np.abs(direct["proj"]), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(core.pca_whiten_apply_blocks(x, direct), core.pca_whiten_apply(x, direct), rtol=1e-6)
    with pytest.raises(ValueError, match="pca_dim=13"):
        core.pca_whiten_from_cov(mean, gram, 13)


def test_sizes_stats_equals_cluster_stats():
    lab = np.array([0, 0, 2, 2, 2])
    dist = np.array([1.0, 2.0, 0.5, 0.5, 1.0], dtype=np.float32)
    assert core.sizes_stats(np.bincount(lab, minlength=4), 5.0) == core.cluster_stats(lab, dist, 4)


@pytest.mark.parametrize(
    "rows,parts,expect",
    [
        ([100] * 4, 4, [[0], [1], [2], [3]]),
        ([100] * 4, 2, [[0, 1], [2, 3]]),
        ([5, 5], 4, [[0], [1]]),
        ([1, 1, 1, 97], 2, [[0, 1, 2], [3]]),
    ],
)
def test_partition_rows_is_contiguous_and_balanced(rows, parts, expect):
    assert partition_rows(rows, parts) == expect
