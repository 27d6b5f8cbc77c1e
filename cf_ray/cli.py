"""`cf-ray <stage>`: run the whole image job or any one stage of it inside a run directory."""

from __future__ import annotations

import argparse
import sys

from cf_ray import log
from cf_ray.config import ConfigError, JobConfig, dump_config, load_config, packaged_config
from cf_ray.seeds import parse_seeds, run_job_seeds, with_seed
from cf_ray.sources import SourceError

# The embedded demo datasets' sizes (per class), chosen so `make demo` runs in minutes on 2 CPU cores.
DEMO_IMAGES = {"n_unlabelled": 300, "n_train": 100, "n_test": 100, "size": 32}
DEMO_VIDEOS = {"n_unlabelled": 150, "n_train": 30, "n_test": 30, "size": 16, "frames": 12, "fps": 8}
STAGES = ("all", "pretrain", "extract", "cluster", "retrain", "transfer", "report")


def parser(prog: str = "cf-ray", with_stage: bool = True) -> argparse.ArgumentParser:
    from cf_ray.environment import add_version_argument

    p = argparse.ArgumentParser(
        prog=prog,
        description="ClusterFit on Ray, for images and video. "
        "A finished run's models: cf-ray export | embed | index | search (each with -h).",
    )
    add_version_argument(p)
    if with_stage:
        p.add_argument(
            "stage",
            choices=STAGES,
            help="'all' runs every stage not yet done; a stage name redoes that stage "
            "(and forgets later ones, so the next 'all' recomputes them)",
        )
    p.add_argument(
        "--config",
        help="YAML file overriding the defaults (see docs/config.md); a bare name that is not a file, e.g. "
        "image_cifar10.yaml, is one of the configs shipped in cf_ray/configs/",
    )
    p.add_argument("--data", help="images to pre-train and cluster on: folder or manifest (.csv/.parquet), path or URI")
    p.add_argument(
        "--target", help="labelled target for transfer: folder with train/ and test/, or one labelled folder"
    )
    p.add_argument("--run-dir", help="where outputs go (path or URI)")
    p.add_argument("--video", action="store_true", help="the inputs are videos (same as modality=video)")
    p.add_argument(
        "--demo",
        action="store_true",
        help="generate the demo dataset under ./data/ and run on it with the packaged <image|video>_demo.yaml",
    )
    p.add_argument(
        "--seeds",
        help="run once per seed, e.g. 0,1,2: seed s in <run_dir>/seed_<s> with s added to every seed field, then "
        "<run_dir>/report_seeds.md with mean ± sd over the seeds (docs/reproducibility.md)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. cluster.k=500 retrain.epochs=30")
    return p


def resolve_config(args: argparse.Namespace) -> JobConfig:
    from pathlib import Path

    overrides = list(args.overrides)
    config = args.config
    video = args.video or "modality=video" in overrides
    if video and "modality=video" not in overrides:
        overrides.insert(0, "modality=video")
    if args.demo:  # the demo data goes under the current directory; the config is the packaged one
        config = config or packaged_config("video_demo.yaml" if video else "image_demo.yaml")
        if video:
            from cf_ray.demo_video import make_video_demo_splits

            data, target = make_video_demo_splits(Path("data") / "demo_videos", **DEMO_VIDEOS)
        else:
            from cf_ray.demo import make_demo_splits

            data, target = make_demo_splits(Path("data") / "demo_images", **DEMO_IMAGES)
        overrides = [f"data={data}", f"target={target}"] + overrides
    for key in ("data", "target", "run_dir"):
        if getattr(args, key, None):
            overrides.append(f"{key}={getattr(args, key)}")
    return load_config(JobConfig, config, overrides)


def run_stage(stage: str, cfg: JobConfig) -> dict:
    from cf_ray import pipeline

    if stage == "all":
        return pipeline.run_job(cfg)
    return pipeline.run_cli_stage(stage, cfg)


def main(argv: list[str] | None = None, prog: str = "cf-ray", stage: str | None = None, video: bool = False) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if stage is None and argv and argv[0] in ("export", "embed", "index", "search"):  # using a finished run's models
        from cf_ray.commands import main as command

        return command(argv, prog)
    args = parser(prog, with_stage=stage is None).parse_intermixed_args(argv)  # overrides may follow options
    args.video = args.video or video
    log.setup()
    try:
        cfg = resolve_config(args)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        if args.print_config:
            print_config(cfg, seeds)
            return 0
        if seeds is None:
            result = run_stage(stage or args.stage, cfg)
        else:
            result = run_job_seeds(cfg, seeds, stage or args.stage, command_line(prog, argv))
    except (ConfigError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(result, dict) and "report" in result:
        print(f"run directory: {cfg.run_dir}\nreport: {result['report']}")
    return 0


def print_config(cfg: JobConfig, seeds: list[int] | None) -> None:
    """The resolved config; with seeds, one YAML document per seed's run."""
    if seeds is None:
        print(dump_config(cfg), end="")
        return
    for s in seeds:
        print(f"--- # seed {s}\n" + dump_config(with_seed(cfg, s)), end="")


def command_line(prog: str, argv: list[str]) -> str:
    """The command that reproduces this run, for the seeds report."""
    import shlex

    return shlex.join(["python", f"jobs/{prog}"] if prog.endswith(".py") else prog.split()) + " " + shlex.join(argv)


if __name__ == "__main__":
    sys.exit(main())
