"""Transfer: linear probes on frozen features, one per layer (VISSL's protocol, scaled down).

For each layer: standardise with train statistics, fit a multinomial logistic regression (full-batch
L-BFGS) for each weight decay in the grid on part of train, keep the best on the held-out part, refit
on all of train and report top-1 on test.
"""
from __future__ import annotations

import numpy as np
import torch

from cf_ray.config import ProbeConfig
from cf_ray.stages.extract import read_features


def fit_logreg(x: np.ndarray, y: np.ndarray, num_classes: int, wd: float, steps: int) -> torch.nn.Linear:
    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    lin = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), yt) + wd * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def accuracy(lin: torch.nn.Linear, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((lin(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def probe_layer(xtr, ytr, xte, yte, num_classes: int, cfg: ProbeConfig) -> dict:
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    rng = np.random.default_rng(cfg.seed)
    val = rng.random(len(xtr)) < cfg.val_fraction
    grid = {}
    for wd in cfg.weight_decays:
        grid[wd] = accuracy(fit_logreg(xtr[~val], ytr[~val], num_classes, wd, cfg.epochs), xtr[val], ytr[val])
    best = max(grid, key=lambda w: (grid[w], w))
    lin = fit_logreg(xtr, ytr, num_classes, best, cfg.epochs)
    return {"top1": accuracy(lin, xte, yte), "train_top1": accuracy(lin, xtr, ytr), "weight_decay": best,
            "val_top1": grid[best], "grid": {str(k): v for k, v in grid.items()}}


def run_probe(cfg: ProbeConfig, train_features_uri: str, test_features_uri: str) -> dict:
    """{layer: {top1, ...}} for linear probes trained on one feature set and tested on another."""
    out = {}
    for layer in cfg.layers:
        _, xtr, ltr = read_features(train_features_uri, layer, with_labels=True)
        _, xte, lte = read_features(test_features_uri, layer, with_labels=True)
        classes = sorted(set(ltr))
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(lte) - set(classes))
        if unknown:
            raise ValueError(f"test labels {unknown[:5]} never occur in train; the probe cannot predict them")
        ytr = np.array([index[l] for l in ltr], dtype=np.int64)
        yte = np.array([index[l] for l in lte], dtype=np.int64)
        out[layer] = probe_layer(xtr, ytr, xte, yte, len(classes), cfg)
        out[layer].update(n_train=len(ytr), n_test=len(yte), dim=int(xtr.shape[1]), classes=len(classes))
    return out
