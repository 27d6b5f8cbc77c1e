"""Uniform sampling over (pseudo-)labels on a stream of batches (DeepCluster's answer to imbalanced clusters)."""

import numpy as np
import torch

from cf_ray.config import TrainConfig
from cf_ray.train.sampling import balance_rates, uniform_over_classes


def _stream(labels: np.ndarray, batch_size: int):
    for i in range(0, len(labels), batch_size):
        y = torch.from_numpy(labels[i : i + batch_size])
        yield {"target": y, "row": torch.arange(i, i + len(y))}


def test_uniform_sampler_balances_an_imbalanced_epoch():
    counts = np.array([900, 60, 25, 0, 15])  # cluster 3 is empty
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(len(counts)), counts))
    rates = torch.tensor(balance_rates(counts), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    out = list(uniform_over_classes(_stream(labels, 32), rates, gen, batch_size=32))
    drawn = torch.cat([b["target"] for b in out]).numpy()
    per_class = np.bincount(drawn, minlength=len(counts))
    assert per_class[3] == 0
    expected = len(labels) / 4  # N draws in expectation, shared by the 4 non-empty clusters
    assert abs(len(drawn) - len(labels)) < 0.1 * len(labels)
    for c in (0, 1, 2, 4):
        assert abs(per_class[c] - expected) < 0.15 * expected, per_class
    assert all(len(b["target"]) == 32 for b in out[:-1]) and 0 < len(out[-1]["target"]) <= 32
    rows = torch.cat([b["row"] for b in out]).numpy()
    assert np.array_equal(labels[rows], drawn)  # every column is re-sampled with the same rows
    assert len(np.unique(rows[drawn == 4])) == 15  # the small cluster is repeated, not invented
    assert (np.diff(rows) < 0).any()  # repeats are shuffled, not emitted in a run


def test_balanced_rates_ignore_empty_clusters():
    assert balance_rates(np.array([30, 0, 10])) == [40 / 60, 0.0, 40 / 20]


def test_legacy_balanced_sampling_key_means_loss_weights():
    cfg = TrainConfig.model_validate({"balanced_sampling": True})
    assert cfg.class_weighted_loss and cfg.sampling == "natural"
