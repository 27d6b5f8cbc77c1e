"""cluster.yaml passes Ray's own cluster-launcher validation and has the shape the docs promise."""
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


def test_cluster_yaml_validates_with_ray():
    cfg = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert all(t["min_workers"] == 0 for t in workers.values())
    assert all("IamInstanceProfile" in t["node_config"] for t in workers.values())
    assert any(t["node_config"]["InstanceType"].startswith(("g5", "p4d", "p5")) for t in workers.values())
    image = cfg["docker"]["image"]
    assert image.startswith("rayproject/ray:2.") and image.endswith("-py311-gpu")  # not the dead ray-ml images
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
