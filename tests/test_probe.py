import numpy as np

from cf_ray.config import ProbeConfig
from cf_ray.stages.probe import probe_layer


def _blobs(n, d, k, sep, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, sep, (k, d))
    y = rng.integers(0, k, n)
    return (centres[y] + rng.normal(0, 1, (n, d))).astype(np.float32), y


def test_separable_features_score_high():
    x, y = _blobs(600, 16, 4, 3.0, 0)
    r = probe_layer(x[:400], y[:400], x[400:], y[400:], 4, ProbeConfig(epochs=50))
    assert r["top1"] > 0.95 and r["weight_decay"] in ProbeConfig().weight_decays


def test_noise_scores_near_chance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    y = rng.integers(0, 4, 600)
    r = probe_layer(x[:400], y[:400], x[400:], y[400:], 4, ProbeConfig(epochs=50))
    assert r["top1"] < 0.4
