"""A small run directory in seconds, to try the service (and for its tests and benchmark).

It has everything a finished job leaves that the service reads: config.yaml, items, models/{pretrained,clusterfit},
the pre-trained features and the run's k-means, and the ClusterFit network's own features and k-means
(``cf_ray.api.build_own_centroids``). The networks are freshly initialised, not trained: the answers are real
computations, not meaningful ones. Extraction and clustering are the job's own stages, on the current Ray.

    python -m cf_ray.serve.demo_run runs/serve_demo                 # an image run (generated JPEGs)
    python -m cf_ray.serve.demo_run runs/serve_video --modality video
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cf_ray import storage
from cf_ray.config import JobConfig, dump_config, load_config

log = logging.getLogger(__name__)

TINY_IMAGE = ["image.size=16", "extract.block_rows=64", "extract.batch_size=32"]
TINY_VIDEO = [
    "modality=video",
    "video.size=16",
    "video.clip_len=4",
    "video.stride=1",
    "video.num_clips=2",
    "extract.batch_size=8",
    "extract.block_rows=32",
]


def make_demo_run(
    root: str | Path,
    modality: str = "image",
    per_class: int = 3,
    width: int = 4,
    arch: str | None = None,
    overrides: list[str] = (),
    own: bool = True,
) -> Path:
    """root/data (generated inputs) and root/run (the run directory); returns the run directory.

    own=False skips the ClusterFit network's own features and k-means (then serve it with which=pretrained)."""
    from cf_ray.api import build_own_centroids
    from cf_ray.models.checkpoint import build, save_backbone
    from cf_ray.sources import IMAGE_EXTS, VIDEO_EXTS, list_items
    from cf_ray.stages.cluster import run_cluster
    from cf_ray.stages.extract import run_extract, write_items

    root = Path(root)
    if modality == "video":
        from cf_ray.demo_video import make_video_demo

        data = make_video_demo(root / "data", n_per_class=per_class, size=16, frames=8)
        base, exts = TINY_VIDEO, VIDEO_EXTS
    else:
        from cf_ray.demo import make_image_demo

        data = make_image_demo(root / "data", n_per_class=per_class, size=16)
        base, exts = TINY_IMAGE, IMAGE_EXTS
    run = root / "run"
    model = [f"retrain.model.width={width}", f"pretrain.train.model.width={width}"]
    if arch:
        model += [f"retrain.model.arch={arch}", f"pretrain.train.model.arch={arch}"]
    cfg: JobConfig = load_config(
        JobConfig, None, [*base, *model, "cluster.k=3", "cluster.niter=5", f"data={data}", f"run_dir={run}", *overrides]
    )
    storage.makedirs(str(run))
    (run / "config.yaml").write_text(dump_config(cfg))
    items, _ = list_items(str(data), exts)
    write_items(items, str(run / "items" / "source.parquet"))
    for seed, which, m in ((0, "pretrained", cfg.pretrain.train.model), (1, "clusterfit", cfg.retrain.model)):
        save_backbone(build(m, seed=seed), m, str(run / "models" / which))
    features = str(run / "features" / "pretrained" / "source")
    run_extract(
        cfg.extract, cfg.media, str(run / "items" / "source.parquet"), str(run / "models" / "pretrained"), features
    )
    run_cluster(cfg.cluster, features, str(run / "cluster"))
    if own:
        build_own_centroids(str(run), "clusterfit")
    log.info("demo run ready: %s", run)
    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="folder for data/ and run/")
    p.add_argument("--modality", choices=["image", "video"], default="image")
    p.add_argument("--per-class", type=int, default=3)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--arch", default=None)
    p.add_argument("overrides", nargs="*", help="job config key=value, e.g. image.size=64")
    a = p.parse_args(argv)
    from cf_ray.runtime import init_ray

    logging.basicConfig(level=logging.INFO)
    init_ray(num_cpus=2)
    print(make_demo_run(a.root, a.modality, a.per_class, a.width, a.arch, a.overrides))


if __name__ == "__main__":
    main()
