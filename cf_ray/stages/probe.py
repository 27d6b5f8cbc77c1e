"""Transfer: linear probes on frozen features, one per layer (VISSL's protocol, scaled down).

For each layer: standardise with train statistics, fit a multinomial logistic regression (full-batch
L-BFGS) for each weight decay in the grid on part of train, keep the best on the held-out part, refit
on all of train and report top-1 on test. Multi-label targets (several labels per item, ``a|b`` in the
label column) get one-vs-rest logistic probes instead and report mAP, averaged over the classes with a
positive test item, with VOC's AP (area under the monotone precision envelope, as VISSL's VOC07 benchmark).
"""

from __future__ import annotations

import numpy as np
import torch

from cf_ray.config import ProbeConfig
from cf_ray.features import read_features


def fit_logreg(x: np.ndarray, y: np.ndarray, num_classes: int, wd: float, steps: int, seed: int = 0) -> torch.nn.Linear:
    """Multinomial logistic regression (y: class index) or, for a 2-D 0/1 ``y``, one-vs-rest (multi-label)."""
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    lin = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")
    multi = yt.ndim == 2

    def closure():
        opt.zero_grad()
        logits = lin(xt)
        data = (
            torch.nn.functional.binary_cross_entropy_with_logits(logits, yt.float()) * num_classes
            if multi
            else torch.nn.functional.cross_entropy(logits, yt)
        )
        loss = data + wd * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def accuracy(lin: torch.nn.Linear, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((lin(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """VOC AP of one class: area under the precision envelope over recall (VISSL's ``calculate_ap``)."""
    order = np.argsort(-scores, kind="stable")
    tp = positive[order].astype(np.float64)
    recall = np.cumsum(tp) / max(1.0, tp.sum())
    precision = np.cumsum(tp) / np.arange(1, len(tp) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(((mrec[steps] - mrec[steps - 1]) * mpre[steps]).sum())


def mean_ap(lin: torch.nn.Linear, x: np.ndarray, y: np.ndarray) -> float:
    """mAP over the classes with at least one positive in ``y`` (items x classes, 0/1)."""
    with torch.no_grad():
        scores = lin(torch.from_numpy(x)).numpy()
    aps = [average_precision(scores[:, c], y[:, c]) for c in range(y.shape[1]) if y[:, c].any()]
    return float(np.mean(aps)) if aps else float("nan")


def probe_layer(xtr, ytr, xte, yte, num_classes: int, cfg: ProbeConfig) -> dict:
    """Single-label (y: class indices) -> top1; multi-label (y: items x classes 0/1) -> mAP.

    ``score`` is the headline."""
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    metric, name = (mean_ap, "map") if ytr.ndim == 2 else (accuracy, "top1")
    rng = np.random.default_rng(cfg.seed)
    val = rng.random(len(xtr)) < cfg.val_fraction
    grid = {}
    for wd in cfg.weight_decays:
        lin = fit_logreg(xtr[~val], ytr[~val], num_classes, wd, cfg.epochs, cfg.seed)
        grid[wd] = metric(lin, xtr[val], ytr[val])
    best = max(grid, key=lambda w: (np.nan_to_num(grid[w], nan=-1.0), w))
    lin = fit_logreg(xtr, ytr, num_classes, best, cfg.epochs, cfg.seed)
    test = metric(lin, xte, yte)
    return {
        name: test,
        "score": test,
        "metric": name,
        f"train_{name}": metric(lin, xtr, ytr),
        "weight_decay": best,
        f"val_{name}": grid[best],
        "grid": {str(k): v for k, v in grid.items()},
    }


def encode_labels(ltr: list, lte: list, multi_label: bool, sep: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(train targets, test targets, class names): class indices, or items x classes 0/1 for multi-label."""
    split = (lambda l: [p for p in str(l).split(sep) if p]) if multi_label else (lambda l: [l])
    classes = sorted({c for l in ltr for c in split(l)})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for l in lte for c in split(l)} - set(classes))
    if unknown:
        raise ValueError(f"test labels {unknown[:5]} never occur in train; the probe cannot predict them")
    if not multi_label:
        return (
            np.array([index[l] for l in ltr], dtype=np.int64),
            np.array([index[l] for l in lte], dtype=np.int64),
            classes,
        )

    def onehot(labels):
        y = np.zeros((len(labels), len(classes)), dtype=np.int64)
        for i, l in enumerate(labels):
            y[i, [index[c] for c in split(l)]] = 1
        return y

    return onehot(ltr), onehot(lte), classes


def by_id(ids: list, x: np.ndarray, labels: list) -> tuple[np.ndarray, list]:
    """Rows sorted by item id: the seeded held-out split then picks the same items whatever order extraction
    wrote its part files in."""
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    return x[order], [labels[i] for i in order]


def run_probe(cfg: ProbeConfig, train_features_uri: str, test_features_uri: str) -> dict:
    """{layer: {score, top1 or map, ...}} for linear probes trained on one feature set and tested on another."""
    out = {}
    for layer in cfg.layers:
        xtr, ltr = by_id(*read_features(train_features_uri, layer, with_labels=True))
        xte, lte = by_id(*read_features(test_features_uri, layer, with_labels=True))
        ytr, yte, classes = encode_labels(ltr, lte, cfg.multi_label, cfg.label_sep)
        out[layer] = probe_layer(xtr, ytr, xte, yte, len(classes), cfg)
        out[layer].update(n_train=len(ytr), n_test=len(yte), dim=int(xtr.shape[1]), classes=len(classes))
    return out
