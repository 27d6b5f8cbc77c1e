"""Faults on a real local Ray: a killed extraction actor, a killed driver, interrupted outputs.

Kills come from outside (SIGKILL to the process), as a preempted node or the OOM killer would send them.
The k-means actor kill is in test_kmeans_distributed.py, the Train worker kill in test_train.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from helpers import write_image

from cf_ray.config import ExtractConfig, ImageConfig, ModelConfig
from cf_ray.features import IncompleteOutputError, read_features
from cf_ray.media.items import write_items
from cf_ray.models.checkpoint import build, save_backbone
from cf_ray.sources import list_items
from cf_ray.stages.cluster import read_assignments
from cf_ray.stages.extract import run_extract

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)


def _proc_children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the direct children of ``pid``, from /proc."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{d}/cmdline") as f:
                    out.append((int(d), f.read().replace("\0", " ")))
        except (OSError, ValueError, IndexError):
            pass
    return out


def _committed(folder: Path) -> list[str]:
    return (
        [f for f in os.listdir(folder) if f.startswith("part-") and f.endswith(".parquet")] if folder.exists() else []
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    for i in range(32):
        write_image(root / "data" / f"{i:03d}.jpg", size=(24, 24), seed=i)
    (root / "data" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    items, _ = list_items(str(root / "data"))
    write_items(items, str(root / "items.parquet"))
    cfg = ModelConfig(arch="resnet_tiny", width=8)
    save_backbone(build(cfg, seed=0), cfg, str(root / "model"))
    return root, items


def _extract(root: Path, out: Path) -> dict:
    cfg = ExtractConfig(layers=["res5"], batch_size=4, block_rows=4)
    return run_extract(cfg, ImageConfig(size=16), str(root / "items.parquet"), str(root / "model"), str(out))


def _assert_exactly_once(out: Path, items) -> None:
    t = pq.read_table(out, columns=["id", "error"])
    assert sorted(t["id"].to_pylist()) == sorted(items["id"].to_pylist())  # each input once: none lost, none doubled
    bad = t.filter(pc.not_equal(t["error"], ""))["id"].to_pylist()
    assert bad == ["broken.jpg"]
    assert pq.read_table(out / "_errors.parquet")["id"].to_pylist() == bad


def test_killed_extraction_actor_loses_no_item(ray_session, small):
    import ray

    root, items = small
    out = root / "feat_killed"
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    killed: list[int] = []
    done = threading.Event()

    def kill_extractor_while_it_works():
        while not done.is_set() and not killed:
            for pid, cmd in _proc_children(raylet):
                # Ray titles an actor process "ray::<class>.<method>" while it runs a task; once a part is
                # committed the actor is mid-run whatever it is doing.
                if cmd.startswith("ray::ExtractWorker") and (".extract_rows" in cmd or _committed(out)):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_extractor_while_it_works, daemon=True)
    watcher.start()
    try:
        res = _extract(root, out)
    finally:
        done.set()
        watcher.join()
    assert killed, "the extraction finished before its actor could be killed"
    assert res["rows"] == items.num_rows == 33 and res["skipped"] == 1
    _assert_exactly_once(out, items)


def test_interrupted_output_is_refused_then_resumed_from_its_parts(ray_session, small):
    root, items = small
    out = root / "feat_killed"  # the complete output of the test above
    if not (out / "_SUCCESS.json").exists():
        _extract(root, out)
    # What a kill mid-extraction leaves: no marker, a temporary, a torn part; the other parts are whole.
    (out / "_SUCCESS.json").unlink()
    parts = sorted(_committed(out))
    assert len(parts) >= 3
    os.remove(out / parts[0])
    kept = {p: os.path.getmtime(out / p) for p in parts[1:]}
    (out / "part-0123456789abcdef.parquet.tmp").write_bytes(b"half a file")
    (out / "part-torn.parquet").write_bytes(b"PAR1 torn")
    with pytest.raises(IncompleteOutputError, match="rerun"):
        read_features(str(out), "res5")

    res = _extract(root, out)
    assert 0 < res["resumed"] < items.num_rows  # only the missing items were extracted again
    assert {p: os.path.getmtime(out / p) for p in kept} == kept
    assert not [f for f in os.listdir(out) if f.endswith(".tmp") or f == "part-torn.parquet"]
    _assert_exactly_once(out, items)
    ids, feats = read_features(str(out), "res5")
    assert len(ids) == 32 and feats.shape == (32, 64)


def test_cluster_output_without_marker_is_refused(tmp_path):
    (tmp_path / "assignments.parquet").write_bytes(b"")
    with pytest.raises(IncompleteOutputError, match="clustering did not finish"):
        read_assignments(str(tmp_path))


TINY_JOB = [
    "image.size=16",
    "pretrain.train.model.width=8",
    "retrain.model.width=8",
    "retrain.epochs=1",
    "retrain.batch_size=16",
    "extract.block_rows=4",
    "extract.batch_size=4",
    "cluster.k=4",
    "cluster.niter=5",
    "probe.epochs=5",
    "probe.weight_decays=[0.001]",
    "ray.num_cpus=2",
    "ray.object_store_mb=300",
]


def _job(run: Path, data: Path, target: Path, ckpt: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "jobs" / "clusterfit_image.py"),
        "--data",
        str(data),
        "--target",
        str(target),
        "--run-dir",
        str(run),
        *TINY_JOB,
        "pretrain.source=checkpoint",
        f"pretrain.checkpoint={ckpt}",
    ]


def _manifest(run: Path) -> dict:
    try:
        return json.loads((run / "manifest.json").read_text())["stages"]
    except (OSError, ValueError):
        return {}


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    return alive


def test_killed_driver_rerun_skips_done_stages_and_resumes(tmp_path):
    from cf_ray.demo import make_demo_splits

    data, target = make_demo_splits(tmp_path / "data", n_unlabelled=6, n_train=3, n_test=2, size=16)
    (data / "triangle" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    ckpt = tmp_path / "pretrained.pt"
    torch.save(build(ModelConfig(arch="resnet_tiny", width=8), seed=1).state_dict(), ckpt)
    run = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    features = run / "features" / "pretrained" / "source"

    # Run 1: SIGKILL the driver and every process it started once extraction has committed a part.
    log1 = open(tmp_path / "run1.log", "w")
    p = subprocess.Popen(
        _job(run, data, target, ckpt),
        cwd=tmp_path,
        env=env,
        stdout=log1,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 400
        while time.time() < deadline and p.poll() is None and not _committed(features):
            time.sleep(0.02)
        assert p.poll() is None, (
            f"the job ended before it could be killed: {(tmp_path / 'run1.log').read_text()[-3000:]}"
        )
        assert _committed(features), "extraction did not start in time"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        for _ in range(100):  # Ray's processes share the group; wait until they are gone
            if not _group_alive(p.pid):
                break
            time.sleep(0.1)
    stages = _manifest(run)
    assert stages["items"]["status"] == stages["pretrain"]["status"] == "done"
    assert stages["extract_source"]["status"] == "running" and not (features / "_SUCCESS.json").exists()
    committed = set(_committed(features))

    # Run 2: the same command completes; done stages are skipped, extraction resumes from its parts.
    r = subprocess.run(
        _job(run, data, target, ckpt), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stage pretrain: already done" in r.stdout
    after = _manifest(run)
    assert after["pretrain"] == stages["pretrain"] and after["items"] == stages["items"]
    assert all(s["status"] == "done" for s in after.values())
    assert after["extract_source"]["result"]["resumed"] > 0
    assert committed <= set(_committed(features))  # committed parts were kept, not redone

    # The outputs a clean run has: every source item once in the features, every decodable one assigned once.
    items = pq.read_table(run / "items" / "source.parquet")
    feats = pq.read_table(features, columns=["id", "error"])
    assert sorted(feats["id"].to_pylist()) == sorted(items["id"].to_pylist())
    ok = sorted(feats.filter(pc.equal(feats["error"], ""))["id"].to_pylist())
    a = read_assignments(str(run / "cluster"))
    assert sorted(a["id"].to_pylist()) == ok and len(ok) == items.num_rows - 1
    errors = pq.read_table(run / "errors.parquet").to_pylist()
    assert [e["id"] for e in errors if e["dataset"] == "source"] == ["triangle/broken.jpg"]
    assert (run / "report.md").exists()
