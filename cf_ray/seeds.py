"""Running a job or a sweep once per seed: `--seeds 0,1,2`.

Seed s runs in ``<run_dir>/seed_<s>`` with ``with_seed(cfg, s)``: every seed field of the config plus s, so seed 0 is
the config as given and each seed's run directory resumes on its own. After the seeds, report_seeds.md and
seeds.json in ``<run_dir>`` give mean ± sd over the seeds and the paired differences (stages/seeds_report.py).
"""

from __future__ import annotations

import logging

from cf_ray import storage
from cf_ray.config import ConfigError, JobConfig

logger = logging.getLogger(__name__)

# Every seed field of a JobConfig, as dotted paths; with_seed adds the run's seed to each.
SEED_FIELDS = (
    "seed",  # random-init network, data_limit subset, the split of a target without one, label noise
    "pretrain.train.seed",  # pre-training: initial weights, augmentation, item shuffle
    "cluster.seed",  # k-means initialisation and sampling
    "retrain.seed",  # ClusterFit retraining
    "probe.seed",  # the probes' held-out split (weight decay choice) and init
    "probe.finetune_train.seed",  # fine-tuning (probe.finetune)
)


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; distinct non-negative integers, in the order given."""
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give distinct non-negative integers, e.g. --seeds 0,1,2")
    return seeds


def seed_dir(run_dir: str, seed: int) -> str:
    return storage.join(run_dir, f"seed_{seed}")


def _get(cfg, dotted: str):
    for key in dotted.split("."):
        cfg = getattr(cfg, key)
    return cfg


def with_seed(cfg: JobConfig, seed: int, run_dir: str | None = None) -> JobConfig:
    """The config of seed ``seed``'s run: every field in SEED_FIELDS plus ``seed`` (seed 0 changes none of them),
    run_dir ``<run_dir>/seed_<seed>`` unless ``run_dir`` is given. ``cfg`` is not changed."""
    out = cfg.model_copy(deep=True)
    for dotted in SEED_FIELDS:
        *parents, leaf = dotted.split(".")
        node = _get(out, ".".join(parents)) if parents else out
        setattr(node, leaf, getattr(node, leaf) + seed)
    out.run_dir = run_dir if run_dir is not None else seed_dir(cfg.run_dir, seed)
    return out


def seed_values(cfg: JobConfig) -> dict[str, int]:
    """{dotted seed field: value} of a config (what with_seed changed, for messages and tests)."""
    return {dotted: _get(cfg, dotted) for dotted in SEED_FIELDS}


def run_job_seeds(cfg: JobConfig, seeds: list[int], stage: str = "all", command: str = "") -> dict:
    """Run ``stage`` ('all' or a `cf-ray <stage>` name) for every seed in turn, then write the seeds report."""
    from cf_ray import pipeline
    from cf_ray.stages.seeds_report import write_job_seeds_report

    for s in seeds:
        logger.info(f"seeds: seed {s} ({seeds.index(s) + 1} of {len(seeds)}) in {seed_dir(cfg.run_dir, s)}")
        if stage == "all":
            pipeline.run_job(with_seed(cfg, s))
        else:
            pipeline.run_cli_stage(stage, with_seed(cfg, s))
    root = storage.absolute(cfg.run_dir)
    out = write_job_seeds_report(root, seeds, command, report_only=stage == "report")
    logger.info(f"seeds report: {out['report']}")
    return {"run_dir": root, **out}


def run_sweep_seeds(cfg, seeds: list[int], report_only: bool = False, command: str = "") -> dict:
    """The sweep once per seed, in ``<run_dir>/seed_<s>`` (job seeds as with_seed), then the combined table.

    A base_run (or fuse_run) made by the job's own ``--seeds`` (it holds seed_<s> run directories) gives each seed
    its own pre-training, ``<base_run>/seed_<s>``; a plain run directory is shared, the same pre-training for all."""
    from cf_ray.stages.seeds_report import write_sweep_seeds_report
    from cf_ray.sweep import run_sweep

    for s in seeds:
        logger.info(f"seeds: sweep seed {s} ({seeds.index(s) + 1} of {len(seeds)}) in {seed_dir(cfg.run_dir, s)}")
        run_sweep(sweep_with_seed(cfg, s), report_only=report_only)
    root = storage.absolute(cfg.run_dir)
    out = write_sweep_seeds_report(root, seeds, command, report_only)
    logger.info(f"seeds report: {out['report']}")
    return {"run_dir": root, **out}


def is_seeded_run(path: str) -> bool:
    """Whether ``path`` holds per-seed run directories (a job run with --seeds) rather than being one run itself."""
    if storage.exists(storage.join(path, "manifest.json")):
        return False
    seed_0 = storage.join(path, "seed_0", "manifest.json")
    return storage.exists(storage.join(path, "seeds.json")) or storage.exists(seed_0)


def _run_of_seed(path: str | None, seed: int, what: str) -> str | None:
    if not path or not is_seeded_run(path):
        return path
    run = seed_dir(path, seed)
    if not storage.exists(storage.join(run, "manifest.json")):
        raise ConfigError(f"{what} {path} has no run for seed {seed} ({run}); run the job there with --seeds first")
    return run


def sweep_with_seed(cfg, seed: int):
    """A SweepConfig for seed ``seed``: its job's seed fields as with_seed, run_dir ``<run_dir>/seed_<seed>``,
    and a seeded base_run/fuse_run narrowed to that seed's run."""
    return cfg.model_copy(
        update={
            "run_dir": seed_dir(cfg.run_dir, seed),
            "job": with_seed(cfg.job, seed, run_dir=cfg.job.run_dir),
            "base_run": _run_of_seed(cfg.base_run, seed, "base_run"),
            "fuse_run": _run_of_seed(cfg.fuse_run, seed, "fuse_run"),
        }
    )
