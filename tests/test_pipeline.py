"""The stage table, the training-task registry, the import layering, and the extraction pool's lifetime."""

import ast
from pathlib import Path
from typing import get_args

import pytest
import torch

from cf_ray.config import JobConfig, PretrainConfig, load_config
from cf_ray.pipeline import dependents, prerequisites, stage_table
from cf_ray.train.tasks import TASKS, get_task, proxy_tasks

ROOT = Path(__file__).resolve().parent.parent


def _table(*overrides):
    return stage_table(load_config(JobConfig, None, ["data=d", "target=t", *overrides]))


def test_stage_table_is_in_dependency_order_with_unique_names():
    table = _table("targets.flowers=f")
    names = [s.name for s in table]
    assert len(names) == len(set(names))
    for i, s in enumerate(table):
        assert set(s.needs) <= set(names[:i]), f"{s.name} needs a stage that runs after it"
    assert names[:5] == ["items", "pretrain", "extract_source", "cluster", "retrain"] and names[-1] == "report"
    assert {s.group for s in table} == {"items", "pretrain", "extract", "cluster", "retrain", "transfer", "report"}


def test_redoing_a_stage_forgets_only_what_depends_on_it():
    table = _table()
    assert dependents(table, ["cluster"]) == [
        "cluster",
        "retrain",
        "extract_clusterfit_target_train",
        "extract_clusterfit_target_test",
        "transfer_target",
        "report",
    ]
    assert prerequisites(table, ["retrain"]) == {"items", "pretrain", "extract_source", "cluster", "retrain"}
    assert "extract_pretrained_target_test" in prerequisites(table, ["transfer_target"])


def test_proxy_config_choices_are_the_registered_proxies():
    assert sorted(get_args(PretrainConfig.model_fields["proxy"].annotation)) == proxy_tasks()
    assert set(TASKS) == {"labels", *proxy_tasks()}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_batches_and_teacher_targets_agree(name):
    task, gen = get_task(name), torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 4, 8, 8)  # clips: every task takes them
    y = torch.zeros(3, dtype=torch.long)
    xb, yb = task.batch(x, y, gen)
    assert len(xb) == len(yb) == 3 * task.views
    # A teacher's soft targets per item come back, per network input, in the order batch() makes the inputs.
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 8 * 8, task.num_classes or 5))
    soft = task.teacher_targets(teacher, x, temperature=1.0)
    assert soft.shape == (3, task.views * (task.num_classes or 5))
    xs, ys = task.batch(x, soft, gen)
    if name != "arrow_of_time":  # its inputs are drawn at random; the others are deterministic views
        torch.testing.assert_close(ys, torch.softmax(teacher(xs), 1))


def test_lower_layers_never_import_stages_pipeline_sweep_or_cli():
    upper = ("cf_ray.stages", "cf_ray.pipeline", "cf_ray.sweep", "cf_ray.cli")
    bad = []
    for layer in ("train", "kmeans", "media", "models"):
        for f in (ROOT / "cf_ray" / layer).glob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                mods = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                mods += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                bad += [f"{f.name}: {m}" for m in mods if m.startswith(upper)]
    assert not bad


def test_each_local_train_worker_gets_its_share_of_the_cores(ray_session):
    from cf_ray.runtime import worker_threads

    assert ray_session.cluster_resources()["CPU"] == 2
    assert worker_threads(1, 1) == 2  # one worker may use the machine
    assert worker_threads(2, 1) == 1  # two workers do not oversubscribe it


def test_sweep_takes_the_jobs_targets_with_their_metric(tmp_path):
    from cf_ray.stages.sweep_report import sweep_table
    from cf_ray.sweep import Sweep, load_sweep_config

    cfg = load_sweep_config(
        None,
        [
            f"run_dir={tmp_path / 'sweep'}",
            "job.data=d",
            "job.modality=video",
            "job.target=t",
            "job.targets.voc.path=v",
            "job.targets.voc.multi_label=true",
        ],
    )
    sweep = Sweep(cfg)
    assert {n: t.multi_label for n, t in sweep.targets.items()} == {"target": False, "voc": True}
    assert ".mp4" in sweep.extensions and ".jpg" not in sweep.extensions
    refs = {
        m: {"voc": {"res5": {"metric": "map", "score": s, "map": s}}} for m, s in (("random", 0.2), ("pretrained", 0.4))
    }
    row = {"kind": "clusterfit", "k": 5, "layer": "res5", "epochs": 1, "model": {"arch": "r2plus1d_tiny", "width": 8}}
    row |= {"cluster": {}, "train_acc": 0.5, "train_seconds": 3, "transfer": {"voc": {"res5": {"score": 0.5}}}}
    table = "\n".join(sweep_table(refs, [row], "voc"))
    assert "res5 mAP" in table and "**+10.0**" in table


def test_consecutive_extractions_share_one_pool_that_training_stages_never_see(ray_session, tmp_path):
    from cf_ray.pipeline import Job, Paths, Stage, run_stages
    from cf_ray.rundir import RunDir

    cfg = load_config(JobConfig, None, ["data=d", "target=t", "extract.num_actors=1"])
    seen = {}

    def record(name):
        def fn(job):
            seen[name] = (job.pool.start(), [a._actor_id for a in job.pool.actors])
            return {}

        return fn

    def train(job):
        seen["retrain"] = list(job.pool.actors)  # closed: its CPUs are free for training
        return {}

    table = [
        Stage("extract_a", record("extract_a"), lambda p: []),
        Stage("extract_b", record("extract_b"), lambda p: []),
        Stage("retrain", train, lambda p: []),
        Stage("extract_c", record("extract_c"), lambda p: []),
    ]
    run = RunDir(str(tmp_path / "run"))
    job = Job(cfg, run, Paths(run))
    run_stages(job, table)
    assert seen["extract_a"][0] > 0 and seen["extract_b"][0] == 0  # started once, then reused
    assert seen["extract_a"][1] == seen["extract_b"][1]
    assert seen["retrain"] == []
    assert seen["extract_c"][0] > 0 and seen["extract_c"][1] != seen["extract_a"][1]
    assert job.pool is None  # closed at the end


def test_a_local_ray_started_by_a_job_has_its_dashboard_and_the_report_says_where(ray_session, monkeypatch):
    """Ray Train's placement-group cleaner asks the state API whether the controller lives; the state API finds "the"
    local Ray by scanning processes. With the test session's Ray also on the machine (ray_session) a job's own Ray
    must still answer for its own actors, from inside its workers. ray.dashboard=false starts no dashboard."""
    import os
    import subprocess
    import sys

    from cf_ray import metrics, runtime

    code = """
import sys, ray
from cf_ray.runtime import init_ray, dashboard_url
init_ray(1, 100, dashboard=sys.argv[1] == "on")
print("URL", dashboard_url())
if sys.argv[1] == "on":
    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self):
            return 1

    @ray.remote(num_cpus=0)
    def ask(actor_id):
        import os
        from ray.util.state import get_actor
        state = get_actor(actor_id, timeout=30)
        return os.environ.get("RAY_API_SERVER_ADDRESS"), state.state if state else None

    a = Probe.remote()
    ray.get(a.ping.remote())
    print("STATE", *ray.get(ask.remote(a._actor_id.hex())))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    out = {}
    for arg in ("on", "off"):
        r = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=240, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        out[arg] = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("URL", "STATE")))
    url = out["on"]["URL"]
    assert url.startswith("http://127.0.0.1:") and out["on"]["STATE"] == f"{url} ALIVE"
    assert out["off"] == {"URL": "None"}

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runtime, "_dashboard", "127.0.0.1:8266")
    text = "\n".join(metrics.report_section())
    assert "local Ray had its dashboard at http://127.0.0.1:8266 while the job ran" in text
    monkeypatch.setattr(runtime, "_dashboard", None)
    assert "without a dashboard (ray.dashboard=false)" in "\n".join(metrics.report_section())
