"""Balancing over (pseudo-)labels for retraining on cluster ids.

ClusterFit's clusters are imbalanced; DeepCluster answers with ``UnifLabelSampler``: each epoch draws
N samples so that every non-empty cluster is equally likely. Ray Train workers see a stream of batches
from their Ray Data shard, not an indexable dataset, so the same draw is made on the stream: a row of
class c is repeated ``floor(r_c)`` or ``ceil(r_c)`` times with ``r_c = N / (K' * |c|)`` (K' = non-empty
classes), which gives each non-empty class N/K' draws per epoch in expectation and N draws in total.
Repeats are shuffled within a window of a few batches and re-batched.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def balance_rates(counts: np.ndarray) -> list[float]:
    """N / (K' * |c|) per class (0 for empty ones): the expected draws per row of class c under uniform
    sampling, and equally the cross-entropy weight with the same effect in expectation."""
    counts = np.asarray(counts, dtype=np.float64)
    nonempty = max(1, int((counts > 0).sum()))
    return [float(counts.sum() / (nonempty * c)) if c else 0.0 for c in counts]


def uniform_over_classes(
    batches: Iterator[dict[str, torch.Tensor]],
    rates: torch.Tensor,
    gen: torch.Generator,
    batch_size: int,
    target: str = "target",
    window_batches: int = 4,
) -> Iterator[dict[str, torch.Tensor]]:
    """Re-batch a stream so that every class with a non-zero rate is drawn equally often (see module doc)."""
    pool: list[dict[str, torch.Tensor]] = []
    pooled = 0

    def drain(keep: int) -> Iterator[dict[str, torch.Tensor]]:
        nonlocal pool, pooled
        perm = torch.randperm(pooled, generator=gen)
        merged = {c: torch.cat([b[c] for b in pool])[perm] for c in pool[0]}
        emit = (pooled - keep) // batch_size * batch_size if keep else pooled
        for i in range(0, emit, batch_size):
            yield {c: v[i : min(i + batch_size, emit)] for c, v in merged.items()}
        pool = [{c: v[emit:] for c, v in merged.items()}] if emit < pooled else []
        pooled -= emit

    for b in batches:
        r = rates[b[target].long()]
        whole = torch.floor(r)
        k = (whole + (torch.rand(len(r), generator=gen) < r - whole)).long()
        idx = torch.repeat_interleave(torch.arange(len(r)), k)
        if len(idx):
            pool.append({c: v[idx] for c, v in b.items()})
            pooled += len(idx)
        if pooled >= window_batches * batch_size:
            yield from drain(keep=batch_size)
    if pooled:
        yield from drain(keep=0)
