"""The label-noise curve, the ClusterFit paper's control experiment: does ClusterFit's gain grow with the noise in
the labels the network was pre-trained on?

A sweep config with ``noise_levels`` runs the whole sweep (weakly supervised pre-training on the source's labels
with that fraction flipped, ClusterFit settings, same-compute controls, probes) once per level and seed, in
``<run_dir>/noise_<level>/seed_<s>``: seeds outermost, so a run stopped early has every level for its first seeds.
Then each level gets its seeds report and ``<run_dir>`` the curve (stages/noise_report.py).
"""

from __future__ import annotations

import logging

from cf_ray import storage
from cf_ray.seeds import sweep_with_seed

logger = logging.getLogger(__name__)


def noise_dir(run_dir: str, level: float) -> str:
    return storage.join(run_dir, f"noise_{level:g}")


def sweep_at_noise(cfg, level: float):
    """The SweepConfig of one noise level: job.pretrain.label_noise = level, run_dir <run_dir>/noise_<level>."""
    job = cfg.job.model_copy(deep=True)
    job.pretrain.label_noise = level
    return cfg.model_copy(update={"run_dir": noise_dir(cfg.run_dir, level), "job": job, "noise_levels": []})


def run_noise_curve(cfg, seeds: list[int], report_only: bool = False, command: str = "") -> dict:
    """Every (seed, level) sweep that is not finished, each level's seeds report, then report_noise.md."""
    from cf_ray.stages.noise_report import write_noise_report
    from cf_ray.stages.seeds_report import write_sweep_seeds_report
    from cf_ray.sweep import run_sweep

    levels = cfg.noise_levels
    total = len(seeds) * len(levels)
    for i, s in enumerate(seeds):
        for j, level in enumerate(levels):
            at = sweep_with_seed(sweep_at_noise(cfg, level), s)
            n = i * len(levels) + j + 1
            logger.info(f"noise curve: noise {level:g}, seed {s} ({n} of {total}) in {at.run_dir}")
            if report_only and not storage.exists(storage.join(at.run_dir, "manifest.json")):
                continue
            run_sweep(at, report_only=report_only)
    root = storage.absolute(cfg.run_dir)
    for level in levels:
        write_sweep_seeds_report(noise_dir(root, level), seeds, command, report_only)
    out = write_noise_report(root, levels, seeds, command, report_only)
    logger.info(f"noise curve report: {out['report']}")
    return {"run_dir": root, **out}
