"""Soak: the image job on CIFAR-10, SIGKILLed partway and rerun, against a clean run of the same command.

    .venv/bin/python benchmarks/soak_cifar.py --data ../shared/data/cifar10/train --target ../shared/data/cifar10/test \
        --out /tmp/cf_ray_soak

Run 1 is killed (SIGKILL to the driver and every process it started) once the chosen stage is under way
(``--kill-stage``; extract_source, the default: after ``--kill-parts`` committed part files; pretrain or
retrain: after their first checkpoint). Run 2 is the same command and must finish. Run 3 is a clean run
in a fresh directory (``--skip-clean`` reuses <out>/clean). The script compares the assignments (count
and ids) and the features (ids, rows), prints the timings and the ratio (killed + rerun) / clean, and
writes everything to <out>/soak.json. Exit status 1 when the resumed run's outputs differ from the clean run's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Small enough that one run takes minutes on 2 CPU cores, big enough that every stage does real work.
OVERRIDES = [
    "data_limit=10000",
    "pretrain.train.epochs=1",
    "retrain.epochs=2",
    "pretrain.train.model.width=8",
    "retrain.model.width=8",
    "extract.block_rows=1000",
    "cluster.k=50",
    "probe.epochs=30",
    "probe.weight_decays=[0.0001]",
    "ray.object_store_mb=1024",
]


def command(args, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "jobs" / "clusterfit_image.py"),
        "--config",
        "image_cifar10.yaml",  # packaged config (cf_ray/configs/)
        "--data",
        args.data,
        "--target",
        args.target,
        "--run-dir",
        str(run_dir),
        *OVERRIDES,
    ]


def manifest(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "manifest.json").read_text())["stages"]
    except (OSError, ValueError):
        return {}


def committed_parts(folder: Path) -> int:
    return (
        len([f for f in os.listdir(folder) if f.startswith("part-") and f.endswith(".parquet")])
        if folder.exists()
        else 0
    )


def run(cmd: list[str], log: Path, env: dict, kill_when=None) -> dict:
    """Run ``cmd`` in its own process group; SIGKILL the group when ``kill_when()`` turns true."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        killed = None
        while p.poll() is None:
            if kill_when is not None and killed is None and kill_when():
                os.killpg(p.pid, signal.SIGKILL)
                killed = round(time.time() - t0, 1)
            time.sleep(0.2)
    if killed is not None:
        time.sleep(3)  # let the kernel reap the group before the rerun starts a new Ray
    return {"rc": p.returncode, "seconds": round(time.time() - t0, 1), "killed_at_s": killed, "log": str(log)}


def outputs(run_dir: Path) -> dict:
    from cf_ray.stages.cluster import read_assignments

    feats = pq.read_table(run_dir / "features" / "pretrained" / "source", columns=["id", "error"])
    a = read_assignments(str(run_dir / "cluster"))
    return {
        "feature_ids": sorted(feats["id"].to_pylist()),
        "feature_errors": feats.filter(pc.not_equal(feats["error"], "")).num_rows,
        "assignment_ids": sorted(a["id"].to_pylist()),
        "clusters": dict(zip(a["id"].to_pylist(), a["cluster"].to_pylist())),
        "stages": {k: {"status": v.get("status"), "seconds": v.get("seconds")} for k, v in manifest(run_dir).items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/cifar10/train")
    ap.add_argument("--target", default="../shared/data/cifar10/test")
    ap.add_argument("--out", default="/tmp/cf_ray_soak")
    ap.add_argument("--kill-stage", default="extract_source", help="stage during which run 1 is killed")
    ap.add_argument("--kill-parts", type=int, default=2, help="extract_source: kill after this many committed parts")
    ap.add_argument("--skip-clean", action="store_true", help="reuse <out>/clean from an earlier soak")
    args = ap.parse_args()
    args.data, args.target = str(Path(args.data).absolute()), str(Path(args.target).absolute())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_TRAIN_V2_ENABLED": "1",
    }
    resumed_dir, clean_dir = out / "resumed", out / "clean"
    if resumed_dir.exists():
        raise SystemExit(f"{resumed_dir} exists; pass a fresh --out")

    features = resumed_dir / "features" / "pretrained" / "source"

    def kill_now() -> bool:
        if manifest(resumed_dir).get(args.kill_stage, {}).get("status") != "running":
            return False
        if args.kill_stage == "extract_source":
            return committed_parts(features) >= args.kill_parts
        if args.kill_stage in ("pretrain", "retrain"):  # after its first epoch's checkpoint: the rerun resumes from it
            return any((resumed_dir / "train" / args.kill_stage).glob("checkpoint_*"))
        return True

    res = {
        "command": " ".join(command(args, Path("<run_dir>"))),
        "overrides": OVERRIDES,
        "kill_stage": args.kill_stage,
        "load_before": os.getloadavg(),
    }
    print(f"run 1 (killed during {args.kill_stage}) ...", flush=True)
    res["run1"] = run(command(args, resumed_dir), out / "run1.log", env, kill_now)
    res["run1"]["stages_at_kill"] = {k: v.get("status") for k, v in manifest(resumed_dir).items()}
    res["run1"]["parts_at_kill"] = committed_parts(features)
    print(json.dumps(res["run1"]), flush=True)
    if res["run1"]["killed_at_s"] is None:
        print("run 1 was never killed (the stage did not run or ended too fast)", flush=True)
    print("run 2 (the same command, to completion) ...", flush=True)
    res["run2"] = run(command(args, resumed_dir), out / "run2.log", env)
    print(json.dumps(res["run2"]), flush=True)
    if not args.skip_clean:
        print("run 3 (clean) ...", flush=True)
        res["clean"] = run(command(args, clean_dir), out / "clean.log", env)
        print(json.dumps(res["clean"]), flush=True)
    res["load_after"] = os.getloadavg()
    a, b = outputs(resumed_dir), outputs(clean_dir)
    res["resumed_stages"], res["clean_stages"] = a["stages"], b["stages"]
    res["extract_resumed_rows"] = manifest(resumed_dir).get("extract_source", {}).get("result", {}).get("resumed")
    same = {
        "assignments": (len(a["assignment_ids"]), len(b["assignment_ids"])),
        "assignment_ids_equal": a["assignment_ids"] == b["assignment_ids"],
        "feature_rows": (len(a["feature_ids"]), len(b["feature_ids"])),
        "feature_ids_equal": a["feature_ids"] == b["feature_ids"],
        "feature_errors": (a["feature_errors"], b["feature_errors"]),
        "unique_assignment_ids": len(set(a["assignment_ids"])) == len(a["assignment_ids"]),
        "same_cluster_fraction": sum(a["clusters"][i] == b["clusters"].get(i) for i in a["clusters"])
        / max(1, len(a["clusters"])),
    }
    res["compare"] = same
    resumed_s = res["run1"]["seconds"] + res["run2"]["seconds"]
    if "clean" in res:
        res["ratio_killed_plus_rerun_over_clean"] = round(resumed_s / res["clean"]["seconds"], 2)
    (out / "soak.json").write_text(json.dumps(res, indent=2, default=str))
    print(
        json.dumps({k: v for k, v in res.items() if k not in ("resumed_stages", "clean_stages")}, indent=2, default=str)
    )
    ok = (
        res["run2"]["rc"] == 0
        and same["assignment_ids_equal"]
        and same["feature_ids_equal"]
        and same["unique_assignment_ids"]
    )
    print("SOAK " + ("PASSED" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
