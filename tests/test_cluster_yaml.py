"""cluster.yaml passes Ray's own cluster-launcher validation; the KubeRay manifests carry what KubeRay needs.

Both have the shape the docs promise: CPU head, GPU workers from zero, the pinned Ray version's image, token auth,
the dashboard on localhost only (or a ClusterIP Service), cf_ray's dependencies with faiss-gpu.
"""

import shlex
from pathlib import Path

import ray
import tomllib
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cf_ray.cli import parser, resolve_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"
KUBERAY = ROOT / "deploy" / "kuberay"


def _dependencies_for_gpu_nodes() -> list[str]:
    """pyproject's dependencies as a GPU node installs them: Ray from the image, faiss-gpu for faiss-cpu."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d.replace("faiss-cpu", "faiss-gpu") for d in deps if not d.startswith("ray[")]


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
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"  # not the dead ray-ml images
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    starts = cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]
    assert all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("pip install -q faiss-gpu" in c for c in cfg["setup_commands"])


def _pod_images(group: dict) -> list[str]:
    return [c["image"] for c in group["template"]["spec"]["containers"]]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__ and spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert _pod_images(head) == [f"rayproject/ray:{ray.__version__}-py311"]
    assert {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]} >= {6379, 8265, 10001}
    gpus = []
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1 and g["groupName"]
        assert _pod_images(g) == [f"rayproject/ray:{ray.__version__}-py311-gpu"]
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
    assert yaml.safe_load((KUBERAY / "runtime_env.yaml").read_text())["pip"] == _dependencies_for_gpu_nodes()


def test_kuberay_rayjob_runs_the_video_job_with_a_valid_config():
    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    _check_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["pip"] == _dependencies_for_gpu_nodes() and env["working_dir"].startswith("s3://")
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/clusterfit_video.py"] and (ROOT / argv[1]).exists()
    # The entrypoint's arguments load as a cf_ray configuration (keys exist, values have the right types).
    args = parser("clusterfit_video.py", with_stage=False).parse_args(argv[2:])
    args.video = True
    cfg = resolve_config(args)
    assert cfg.modality == "video" and cfg.run_dir.startswith("s3://") and cfg.retrain.use_gpu == "yes"
