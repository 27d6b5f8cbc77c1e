"""Why a video run's retrained network fits its pseudo-labels or not, and fit against transfer across runs.

    python benchmarks/fit_diagnosis.py RUN_DIR [RUN_DIR ...] [--names a,b,..] [--json out.json] [--plot out.png]

For each finished video run (items, pretrain, extract_source with extract.clip_features, cluster, retrain and
transfer done), in this process, no Ray:

- clip_agreement: each clip the extraction took (video.num_clips, uniformly spaced) assigned to the video-level
  centroids after the clustering's own preprocessing; how often it lands in its video's cluster;
  clips_same_cluster: how often two clips of one video land in the same cluster.
- the retrained network (backbone + saved head) on its source videos, against each video's cluster id:
  fit_clustered: the argmax of the mean logits over the extracted clips (the clustered view; what
  retrain.measure_fit reports as "fit"); fit_clip_own: each extracted clip against its own cluster id;
  fit_clip_video: each extracted clip against its video's cluster;
  fit_start_<s>: one un-augmented clip starting at frame s (every start a random training clip can take);
  fit_train_view: a random start under the training augmentation (crop of the 4-pixel reflection-padded clip
  and flip), as retrain.clips=random with augment=crop_flip sees it.
- fit_own_targets: the fit of what the retraining was asked to predict (OWN_TARGETS): one of the above.
- from the manifest: the retraining's last-epoch training accuracy and the transfer table.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cf_ray import log, storage  # noqa: E402
from cf_ray.api import read_run_config, run_media  # noqa: E402
from cf_ray.features import clip_column, read_table  # noqa: E402
from cf_ray.kmeans.core import l2_normalize, nearest, pca_whiten_apply  # noqa: E402
from cf_ray.media.decode import normalize  # noqa: E402
from cf_ray.media.items import read_items  # noqa: E402
from cf_ray.media.video import decode_clips, sample_clip_starts  # noqa: E402
from cf_ray.models.checkpoint import load_backbone  # noqa: E402
from cf_ray.stages.cluster import read_assignments  # noqa: E402
from cf_ray.train.loop import augment, load_head  # noqa: E402

logger = logging.getLogger("cf_ray.fit_diagnosis")
# What a run's retraining was asked to predict, on the clustered clips: (retrain.clips, per-clip targets) -> measure.
OWN_TARGETS = {
    ("random", False): "fit_clip_video",  # one clip -> its video's cluster
    ("extracted", False): "fit_clip_video",
    ("extracted", True): "fit_clip_own",  # one clip -> its own cluster
    ("all", False): "fit_clustered",  # the video's clips together -> its video's cluster
}


def _matrix(col) -> np.ndarray:
    col = col.combine_chunks()
    return col.flatten().flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size, -1)


def clip_labels(run: str, cfg: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, video cluster (n,), each extracted clip's nearest video-level centroid (n, clips))."""
    layer = cfg["cluster"]["layer"]
    t = read_table(storage.join(run, "features", "pretrained", "source"), ["id", clip_column(layer)])
    x = _matrix(t[clip_column(layer)])
    n, clips, d = x.shape
    x = x.reshape(-1, d).astype(np.float32)
    if cfg["cluster"].get("l2_normalize", True):
        x = l2_normalize(x)
    transform = storage.join(run, "cluster", "transform.npz")
    if storage.exists(transform):
        x = pca_whiten_apply(x, dict(np.load(io.BytesIO(storage.read_bytes(transform)))))
    centroids = np.load(io.BytesIO(storage.read_bytes(storage.join(run, "cluster", "centroids.npy"))))
    own = nearest(np.ascontiguousarray(x), centroids)[0].reshape(n, clips)
    a = read_assignments(storage.join(run, "cluster"))
    video_of = dict(zip(a["id"].to_pylist(), a["cluster"].to_pylist()))
    ids = t["id"].to_pylist()
    return ids, np.array([video_of[i] for i in ids]), own


def _logits(backbone, head, x: torch.Tensor, rows: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([head(backbone(x[i : i + rows])) for i in range(0, len(x), rows)])


def diagnose(run: str) -> dict:
    cfg = read_run_config(run)
    media = run_media(cfg)
    ids, video, own = clip_labels(run, cfg)
    out = {"run": run, "clip_agreement": float((own == video[:, None]).mean())}
    pairs = [(i, j) for i in range(own.shape[1]) for j in range(i + 1, own.shape[1])]
    out["clips_same_cluster"] = float(np.mean([own[:, i] == own[:, j] for i, j in pairs])) if pairs else 1.0
    backbone, _ = load_backbone(storage.join(run, "models", "clusterfit"))
    head = load_head(storage.join(run, "models", "clusterfit"))
    backbone.eval()
    items = read_items(storage.join(run, "items", "source.parquet"))
    path_of = dict(zip(items["id"].to_pylist(), items["path"].to_pylist()))
    span = (media.clip_len - 1) * media.stride + 1
    num_frames = _num_frames(storage.read_bytes(path_of[ids[0]]))  # the demo's videos all have the same length
    starts = list(range(max(1, num_frames - span + 1)))
    extracted = sample_clip_starts(num_frames, media.num_clips, media.clip_len, media.stride, "uniform")
    pix = np.stack(
        [
            decode_clips(
                storage.read_bytes(path_of[i]),
                len(starts),
                media.clip_len,
                media.stride,
                media.size,
                media.resize,
                media.short,
                timeout_s=None,
            )
            for i in ids
        ]
    )  # (n, starts, T, H, W, 3): one clip per possible start
    gen = torch.Generator().manual_seed(0)
    clean = {s: _logits(backbone, head, normalize(pix[:, s], media.mean, media.std)) for s in starts}
    for s in starts:
        out[f"fit_start_{s}"] = float((clean[s].argmax(1).numpy() == video).mean())
    mean_logits = torch.stack([clean[s] for s in extracted]).mean(0)
    out["fit_clustered"] = float((mean_logits.argmax(1).numpy() == video).mean())
    per_clip = np.stack([clean[s].argmax(1).numpy() for s in extracted], 1)
    out["fit_clip_own"] = float((per_clip == own).mean())
    out["fit_clip_video"] = float((per_clip == video[:, None]).mean())
    pick = torch.randint(0, len(starts), (len(ids),), generator=gen).numpy()
    x = normalize(pix[np.arange(len(ids)), pick], media.mean, media.std)
    out["fit_train_view"] = float((_logits(backbone, head, augment(x, gen)).argmax(1).numpy() == video).mean())
    out["extracted_starts"] = extracted
    manifest = json.loads(storage.read_bytes(storage.join(run, "manifest.json")))
    stages = manifest["stages"]
    retrain = stages["retrain"]["result"]
    out["train_acc"] = retrain["history"][-1]["acc"]
    out["measure_fit"] = retrain.get("fit")
    transfer = stages["transfer_target"]["result"]["transfer"]
    out["transfer"] = {m: {l: v["top1"] for l, v in t.items()} for m, t in transfer.items()}
    out["retrain"] = {k: cfg["retrain"].get(k) for k in ("epochs", "lr", "clips", "augment")}
    out["fit_own_targets"] = out[OWN_TARGETS[(out["retrain"]["clips"] or "random", retrain.get("clip_targets", False))]]
    return out


def _num_frames(data: bytes) -> int:
    from cf_ray.media.video import probe_video

    return int(probe_video(data)["frames"])


def plot(rows: list[dict], names: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(rows[0]["transfer"]["clusterfit"])
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.8), sharey=True)
    for ax, layer in zip(np.atleast_1d(axes), layers):
        for r, name in zip(rows, names):
            delta = 100 * (r["transfer"]["clusterfit"][layer] - r["transfer"]["pretrained"][layer])
            ax.scatter(100 * r["fit_own_targets"], delta, s=30)
            ax.annotate(
                name, (100 * r["fit_own_targets"], delta), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.margins(0.15)
        ax.set_title(layer)
        ax.set_xlabel("fit of its training targets, clustered clips (%)")
    np.atleast_1d(axes)[0].set_ylabel("ClusterFit - pre-trained, linear probe (points)")
    fig.suptitle("Video demo: pseudo-label fit vs transfer", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--names", help="comma-separated labels for the runs (plot and JSON)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write fit vs transfer here (PNG)")
    args = p.parse_args()
    log.setup()
    names = args.names.split(",") if args.names else [os.path.basename(r.rstrip("/")) for r in args.runs]
    rows = []
    for run, name in zip(args.runs, names):
        rows.append({"name": name, **diagnose(run)})
        print(json.dumps(rows[-1]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, names, args.plot)


if __name__ == "__main__":
    main()
