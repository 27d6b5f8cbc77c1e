"""A copy of a finished run that keeps its pre-training, features and clusters and forgets its retraining.

    python benchmarks/retrain_variant.py SRC_RUN DST_RUN
    python jobs/clusterfit_video.py --demo --run-dir DST_RUN <SRC's overrides> retrain.clips=extracted ...

The copy's clustering gains clip_assignments.parquet (each extracted clip against the same centroids; needs
extract.clip_features) when it has none, and retrain, the clusterfit extractions, transfer and report are
forgotten, so the next job run redoes only them with the new retrain.* settings: every variant of a comparison
shares one pre-trained network and one set of pseudo-labels.
"""

from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cf_ray import log, pipeline, storage  # noqa: E402
from cf_ray.config import JobConfig, load_config  # noqa: E402
from cf_ray.stages.cluster import CLIP_ASSIGNMENTS, _clip_task, features_uri_has_clips  # noqa: E402


def main(src: str, dst: str) -> None:
    log.setup()
    shutil.copytree(src, dst)
    cfg = load_config(JobConfig, os.path.join(dst, "config.yaml"), [f"run_dir={dst}"])
    job = pipeline.open_job(cfg, list_inputs=False, start_ray=False)
    features = job.paths.features("pretrained", "source")
    if not storage.exists(storage.join(job.paths.cluster, CLIP_ASSIGNMENTS)) and features_uri_has_clips(
        features, cfg.cluster.layer
    ):
        print(_clip_task(cfg.cluster, features, job.paths.cluster))
    table = pipeline.stage_table(cfg)
    forgotten = pipeline.dependents(table, ["retrain"])
    pipeline.forget(job, table, forgotten)
    print(f"{dst}: forgot {', '.join(forgotten)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
