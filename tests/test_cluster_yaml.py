"""cluster.yaml passes Ray's own cluster-launcher validation; the KubeRay manifests carry what KubeRay needs.

Both have the shape the docs promise: CPU head, GPU workers from zero, cf_ray's one image (deploy/Dockerfile) on every
node with nothing installed at start, token auth, the dashboard on localhost only (or a ClusterIP Service), and
cluster.yaml syncs no environment, run output, data or git history (checked with a real rsync and Ray's own flags).
"""

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.command_runner import SSHCommandRunner
from ray.autoscaler._private.util import prepare_config, validate_config

from cf_ray.cli import parser, resolve_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"
KUBERAY = ROOT / "deploy" / "kuberay"
IMAGE = "REPLACE-WITH-YOUR-REGISTRY/cf-ray:0.1.0"  # deploy/Dockerfile's image, once built and pushed


def test_cluster_yaml_validates_with_ray():
    cfg = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert all(t["min_workers"] == 0 for t in workers.values())
    assert all("IamInstanceProfile" in t["node_config"] for t in workers.values())
    gpu_types = [t["node_config"]["InstanceType"] for t in workers.values()]
    assert "g5.2xlarge" in gpu_types and "p4d.24xlarge" in gpu_types  # 1 GPU and 8 GPUs
    assert cfg["docker"]["image"] == IMAGE and "head_image" not in cfg["docker"] and "worker_image" not in cfg["docker"]
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    assert all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    dash = "/home/ray/cf_ray/deploy/grafana/cf_ray.json"  # where deploy/Dockerfile puts it
    assert f"cp {dash} /tmp/ray/session_latest/metrics/grafana/dashboards/" in cfg["head_start_ray_commands"]
    assert (ROOT / "deploy" / "grafana" / "cf_ray.json").exists()
    # nothing heavy at node start: no setup commands of ours; the launcher's AWS default only adds boto3 on the head
    assert not cfg["setup_commands"] and not cfg.get("worker_setup_commands")
    assert all(c.startswith("pip install 'boto3") for c in cfg.get("head_setup_commands", []))
    assert ".gitignore" in cfg["rsync_filter"]
    assert {".git", ".venv", "/runs", "/data"} <= set(cfg["rsync_exclude"])


def test_cluster_yaml_rsync_filters_keep_environments_outputs_and_history_behind(tmp_path):
    """Ray's own rsync arguments for this cluster.yaml, run through a real rsync on a checkout-shaped tree."""
    if not shutil.which("rsync"):
        pytest.skip("rsync is not installed (apt-get install rsync)")
    cfg = yaml.safe_load(CLUSTER.read_text())
    opts = {"rsync_exclude": cfg["rsync_exclude"], "rsync_filter": cfg["rsync_filter"]}
    flags = SSHCommandRunner._create_rsync_filter_args(None, opts)
    src, dst = tmp_path / "src", tmp_path / "dst"
    for f in [
        "cf_ray/a.py",
        "jobs/j.py",
        "docs/guide.md",
        ".git/HEAD",
        ".venv/bin/python",
        "runs/r1/report.md",
        "data/demo/v.mp4",
        "cf_ray/__pycache__/a.pyc",
        "build/x.whl",
        "local.pyc",
    ]:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_text("x")
    shutil.copy(ROOT / ".gitignore", src / ".gitignore")
    subprocess.run(["rsync", "-a", *flags, f"{src}/", str(dst)], check=True)
    synced = {str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()}
    assert synced == {"cf_ray/a.py", "jobs/j.py", "docs/guide.md", ".gitignore"}


def _pod_images(group: dict) -> list[str]:
    return [c["image"] for c in group["template"]["spec"]["containers"]]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__ and spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert _pod_images(head) == [IMAGE]
    assert {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]} >= {6379, 8265, 10001}
    gpus = []
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1 and g["groupName"]
        assert _pod_images(g) == [IMAGE]
        c = g["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
        gpus.append(int(c["resources"]["limits"]["nvidia.com/gpu"]))
        assert {"secretRef": {"name": "cf-ray-s3"}} in c["envFrom"]  # S3 credentials from a Secret
    assert 1 in gpus


def test_kuberay_raycluster():
    rc = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(rc["spec"])
    assert (
        max(
            int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            for g in rc["spec"]["workerGroupSpecs"]
        )
        == 8
    )


def test_kuberay_rayjob_runs_the_video_job_with_a_valid_config():
    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    _check_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "pip" not in env and "conda" not in env and env["working_dir"].startswith("s3://")  # the image has them
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/clusterfit_video.py"] and (ROOT / argv[1]).exists()
    # The entrypoint's arguments load as a cf_ray configuration (keys exist, values have the right types).
    args = parser("clusterfit_video.py", with_stage=False).parse_args(argv[2:])
    args.video = True
    cfg = resolve_config(args)
    assert cfg.modality == "video" and cfg.run_dir.startswith("s3://") and cfg.retrain.use_gpu == "yes"
    assert cfg.cluster.use_gpu == "yes"
