"""ClusterFit sweep: `python jobs/clusterfit_sweep.py --config sweep_cifar10.yaml [key=value ...]`.

Reuses one pre-trained network and its source features for a grid of ClusterFit settings (K, layer
clustered, retraining epochs, retrained model) and the paper's controls; writes one table and one plot per
target into <run_dir>/report.md. Rerunning the same command resumes; --report-only rewrites the report
from what has finished. --demo runs the packaged sweep_demo.yaml (cf_ray/configs/) on the generated image demo set.
A config with noise_levels (e.g. sweep_cifar10_noise.yaml) runs the sweep once per label-noise level and seed and
writes the label-noise curve, <run_dir>/report_noise.md.
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cf_ray.environment import add_version_argument, require_environment  # noqa: E402  (standard library only)

require_environment("jobs/clusterfit_sweep.py")

from cf_ray.config import ConfigError, packaged_config  # noqa: E402
from cf_ray.sources import SourceError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clusterfit_sweep.py", description=__doc__.split("\n")[0])
    add_version_argument(p)
    p.add_argument("--config", help="sweep YAML file, or the bare name of a packaged one (cf_ray/configs/sweep_*.yaml)")
    p.add_argument("--run-dir", help="where the sweep's outputs go")
    p.add_argument(
        "--demo",
        action="store_true",
        help="generate the image demo set under ./data/ and sweep it with the packaged sweep_demo.yaml",
    )
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from the finished settings")
    p.add_argument(
        "--seeds",
        help="run the sweep once per seed, e.g. 0,1,2: seed s in <run_dir>/seed_<s> with s added to every job seed "
        "field, then <run_dir>/report_seeds.md with mean ± sd and the paired differences",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grid.k=[50,200] job.retrain.epochs=4")
    args = p.parse_args(argv)
    from cf_ray import log
    from cf_ray.sweep import load_sweep_config, run_sweep

    log.setup()  # the driver's progress lines (settings, transfer, seeds, noise levels); workers set up their own

    overrides, config = list(args.overrides), args.config
    if args.demo:
        from cf_ray.cli import DEMO_IMAGES
        from cf_ray.demo import make_demo_splits

        config = config or packaged_config("sweep_demo.yaml")
        data, target = make_demo_splits(Path("data") / "demo_images", **DEMO_IMAGES)
        overrides = [f"job.data={data}", f"job.target={target}"] + overrides
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    try:
        cfg = load_sweep_config(config, overrides)
        from cf_ray.cli import command_line
        from cf_ray.seeds import parse_seeds, run_sweep_seeds

        command = command_line(p.prog, sys.argv[1:] if argv is None else list(argv))
        if cfg.noise_levels:
            from cf_ray.noise_curve import run_noise_curve

            out = run_noise_curve(cfg, parse_seeds(args.seeds or "0"), args.report_only, command)
        elif args.seeds is None:
            out = run_sweep(cfg, report_only=args.report_only)
        else:
            out = run_sweep_seeds(cfg, parse_seeds(args.seeds), args.report_only, command)
    except (ConfigError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run directory: {out['run_dir']}\nreport: {out['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
