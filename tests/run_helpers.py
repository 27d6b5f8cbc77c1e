"""A small finished-looking run directory built from the real stage functions (no training: the three
models are seeded random nets of the run's architecture), for the API, export, embed and search tests."""

from __future__ import annotations

from pathlib import Path

from cf_ray import storage
from cf_ray.config import JobConfig, dump_config, load_config
from cf_ray.media.items import write_items
from cf_ray.models.checkpoint import build, save_backbone
from cf_ray.sources import IMAGE_EXTS, VIDEO_EXTS, list_items
from cf_ray.stages.cluster import run_cluster
from cf_ray.stages.extract import run_extract

IMAGE = ["image.size=16", "extract.batch_size=8", "extract.block_rows=8", "cluster.k=4", "cluster.niter=5"]
VIDEO = [
    "modality=video",
    "video.size=16",
    "video.clip_len=4",
    "video.stride=1",
    "video.num_clips=2",
    "extract.batch_size=4",
    "extract.block_rows=6",
    "cluster.k=3",
    "cluster.niter=5",
]


def make_data(root: Path, modality: str, n_per_class: int = 4) -> Path:
    if modality == "video":
        from cf_ray.demo_video import make_video_demo

        return make_video_demo(root / "videos", n_per_class, size=16, frames=8, classes=("up", "spin"))
    from cf_ray.demo import make_image_demo

    return make_image_demo(root / "images", n_per_class, size=24, classes=("triangle", "arrow", "tee"))


def make_run(root: Path, modality: str = "image", extra: list[str] = (), cluster: bool = True) -> tuple[Path, Path]:
    """(run dir, data folder): config.yaml, items/source.parquet, models/{random,pretrained,clusterfit}, and,
    with ``cluster``, the pre-trained features of the source and the run's k-means (real Ray extraction)."""
    data = make_data(root, modality)
    run = root / f"run_{modality}"
    base = VIDEO if modality == "video" else IMAGE
    width = ["pretrain.train.model.width=4", "retrain.model.width=4"]
    cfg = load_config(JobConfig, None, [*base, *width, f"data={data}", f"run_dir={run}", *extra])
    storage.write_bytes(str(run / "config.yaml"), dump_config(cfg).encode())
    items, _ = list_items(str(data), VIDEO_EXTS if modality == "video" else IMAGE_EXTS)
    write_items(items, str(run / "items" / "source.parquet"))
    m = cfg.retrain.model
    for seed, name in enumerate(("random", "pretrained", "clusterfit")):
        save_backbone(build(m, seed=seed), m, str(run / "models" / name))
    if cluster:
        feats = str(run / "features" / "pretrained" / "source")
        run_extract(
            cfg.extract, cfg.media, str(run / "items" / "source.parquet"), str(run / "models" / "pretrained"), feats
        )
        run_cluster(cfg.cluster, feats, str(run / "cluster"))
    return run, data
