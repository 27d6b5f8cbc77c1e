"""Are two finished runs the same? Transfer scores, per-epoch parameter SHA-1s, k-means, features.

    python benchmarks/compare_runs.py runs/a runs/b

Prints, for two job run directories (e.g. the same config and seed run twice): every probe score of both
and their difference, in how many epochs of pre-training and retraining the parameter SHA-1s
(``rank_digests`` in manifest.json) are equal, whether the centroids and the assignments are equal, and the
largest difference of the res5 features (rows matched by item id). docs/reproducibility.md uses it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cf_ray.features import read_features


def _transfer(a: Path, b: Path) -> None:
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for t, models in ma["transfer"].items():
        print(f"target {t} ({ma['transfer_metric'][t]} %, first / second (difference)):")
        for m, layers in models.items():
            other = mb["transfer"][t][m]
            cells = [f"{l} {100 * v:.1f}/{100 * other[l]:.1f} ({100 * (other[l] - v):+.1f})" for l, v in layers.items()]
            print(f"  {m:11s} " + "  ".join(cells))
    sa, sb = (json.loads((d / "manifest.json").read_text())["stages"] for d in (a, b))
    for name in ma["transfer"]:
        stage = f"transfer_{name}"
        same = sa.get(stage, {}).get("result") == sb.get(stage, {}).get("result")
        print(f"  every probe result of {name} (weight decay, held-out scores) equal: {same}")


def _training(a: Path, b: Path) -> None:
    sa, sb = (json.loads((d / "manifest.json").read_text())["stages"] for d in (a, b))
    for stage in ("pretrain", "retrain"):
        ha, hb = (s.get(stage, {}).get("result", {}).get("history") or [] for s in (sa, sb))
        if not ha or not hb:
            continue
        same = sum(x["rank_digests"] == y["rank_digests"] for x, y in zip(ha, hb))
        print(
            f"{stage}: parameter SHA-1 equal after {same} of {min(len(ha), len(hb))} epochs; final loss "
            f"{ha[-1]['loss']:.6f} / {hb[-1]['loss']:.6f}, accuracy {ha[-1]['acc']:.4f} / {hb[-1]['acc']:.4f}"
        )


def _cluster(a: Path, b: Path) -> None:
    ca, cb = (np.load(d / "cluster" / "centroids.npy") for d in (a, b))
    print(f"centroids equal: {np.array_equal(ca, cb)} (max abs difference {float(np.abs(ca - cb).max()):.3g})")
    ta, tb = (pq.read_table(d / "cluster" / "assignments.parquet").sort_by("id") for d in (a, b))
    print(f"assignments equal: {ta['id'].equals(tb['id']) and ta['cluster'].equals(tb['cluster'])}")


def _features(a: Path, b: Path, layer: str) -> None:
    for folder in sorted(p.relative_to(a / "features") for p in (a / "features").glob("*/*") if p.is_dir()):
        if not (b / "features" / folder).is_dir():
            continue
        (ia, xa), (ib, xb) = (read_features(str(d / "features" / folder), layer) for d in (a, b))
        if sorted(ia) != sorted(ib):
            print(f"features {folder}: different items")
            continue
        xa, xb = xa[np.argsort(ia)], xb[np.argsort(ib)]
        print(
            f"features {folder} {layer}: equal {np.array_equal(xa, xb)} "
            f"(max abs difference {np.abs(xa - xb).max():.3g})"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--layer", default="res5", help="feature tap to compare")
    args = p.parse_args()
    _transfer(args.first, args.second)
    _training(args.first, args.second)
    _cluster(args.first, args.second)
    _features(args.first, args.second, args.layer)


if __name__ == "__main__":
    main()
