"""The ClusterFit job (images or video): source -> pretrain -> extract -> k-means -> retrain -> transfer -> report.

Each step is a stage of the run directory: done stages are skipped on a rerun, so a killed job resumes.
All input checks happen before Ray starts.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cf_ray import storage
from cf_ray.config import ConfigError, JobConfig, dump_config
from cf_ray.rundir import RunDir, log
from cf_ray.sources import IMAGE_EXTS, VIDEO_EXTS, list_items, load_target
from cf_ray.stages.cluster import read_assignments, run_cluster
from cf_ray.stages.extract import read_items, run_extract, write_items
from cf_ray.stages.probe import run_probe
from cf_ray.stages.report import run_report

MODELS = ("random", "pretrained", "clusterfit")  # transfer compares these; random init is the floor


class Paths:
    """Where each output of a run lives (one obvious place per thing)."""

    def __init__(self, run: RunDir):
        self.run = run

    def items(self, name: str) -> str:
        return self.run.path("items", f"{name}.parquet")

    def model(self, name: str) -> str:
        return self.run.path("models", name)

    def features(self, model: str, dataset: str) -> str:
        return self.run.path("features", model, dataset)

    @property
    def cluster(self) -> str:
        return self.run.path("cluster")

    @property
    def train(self) -> str:
        return self.run.path("train")


def stage_order() -> list[str]:
    return ["items", "pretrain", "extract_source", "cluster", "retrain",
            *[f"extract_{m}_{d}" for m in MODELS for d in ("target_train", "target_test")], "transfer", "report"]


def stage_outputs(paths: Paths, name: str) -> list[str]:
    if name == "pretrain":
        return [paths.model("random"), paths.model("pretrained"), storage.join(paths.train, "pretrain")]
    if name == "extract_source":
        return [paths.features("pretrained", "source")]
    if name == "cluster":
        return [paths.cluster]
    if name == "retrain":
        return [paths.model("clusterfit"), storage.join(paths.train, "retrain")]
    if name.startswith("extract_"):
        m, d = name[len("extract_"):].split("_", 1)
        return [paths.features(m, d)]
    return []


def redo_from(run: RunDir, paths: Paths, name: str) -> None:
    """Delete the outputs of stage ``name`` and of every later stage, and forget them in the manifest."""
    order = stage_order()
    later = order[order.index(name):]
    for n in later:
        for out in stage_outputs(paths, n):
            storage.delete_dir(out)
    run.invalidate(later)


def check_inputs(cfg: JobConfig) -> dict[str, tuple[pa.Table, pa.Table]]:
    """List every input and check it can be run, before any Ray work: (items, skipped) per dataset."""
    exts = VIDEO_EXTS if cfg.modality == "video" else IMAGE_EXTS
    source, skipped = list_items(cfg.data, exts)
    if cfg.data_limit and source.num_rows > cfg.data_limit:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(source.num_rows, cfg.data_limit, replace=False))
        source = source.take(keep)
    train, test, skipped_t = load_target(cfg.target, cfg.probe.test_fraction, cfg.seed, exts)
    if cfg.cluster.k > source.num_rows:
        raise ConfigError(f"cluster.k={cfg.cluster.k} is larger than the {source.num_rows} {cfg.modality}s in {cfg.data}; "
                          f"set cluster.k <= {source.num_rows}")
    log(f"inputs: {source.num_rows} source {cfg.modality}s ({skipped.num_rows} skipped), target {train.num_rows} train / "
        f"{test.num_rows} test ({skipped_t.num_rows} skipped)")
    empty = skipped.schema.empty_table()
    return {"source": (source, skipped), "target_train": (train, skipped_t), "target_test": (test, empty)}


def stage_items(run: RunDir, paths: Paths, inputs: dict) -> dict:
    for name, (items, skipped) in inputs.items():
        write_items(items, paths.items(name))
        run.record_errors(skipped, "list", name)
    return {name: items.num_rows for name, (items, _) in inputs.items()}


def stage_pretrain(cfg: JobConfig, run: RunDir, paths: Paths) -> dict:
    from cf_ray.models.checkpoint import build, import_checkpoint, save_backbone
    from cf_ray.train.loop import train_classifier

    model_cfg = cfg.pretrain.train.model
    save_backbone(build(model_cfg, seed=cfg.seed), model_cfg, paths.model("random"))
    if cfg.pretrain.source == "checkpoint":
        import_checkpoint(cfg.pretrain.checkpoint, model_cfg, paths.model("pretrained"))
        return {"source": "checkpoint", "checkpoint": cfg.pretrain.checkpoint}
    if cfg.pretrain.source == "torchvision":
        from cf_ray.models.resnet import load_torchvision_weights

        model = build(model_cfg)
        load_torchvision_weights(model, model_cfg.arch)
        save_backbone(model, model_cfg, paths.model("pretrained"))
        return {"source": "torchvision", "arch": model_cfg.arch}
    items = read_items(paths.items("source"))
    items = items.append_column("target", pa.array(np.zeros(items.num_rows, np.int64)))
    from cf_ray.train.loop import PROXY_TASKS

    res = train_classifier(cfg.pretrain.train, cfg.media, items, cfg.pretrain.proxy, PROXY_TASKS[cfg.pretrain.proxy], paths.train, "pretrain",
                           paths.model("pretrained"), threads=_threads(cfg))
    run.record_errors(res["undecodable"], "decode", "source")
    return {"source": "rotnet", "proxy": cfg.pretrain.proxy, "history": res["history"], "items": res["rows"]}


def _threads(cfg: JobConfig) -> int:
    """Locally the trainer may use every core; Ray Train gives a worker cpus_per_worker threads otherwise."""
    import os

    return 0 if os.environ.get("RAY_ADDRESS") else (cfg.ray.num_cpus or os.cpu_count() or 1)


def stage_extract(cfg: JobConfig, run: RunDir, paths: Paths, model: str, dataset: str) -> dict:
    out = paths.features(model, dataset)
    res = run_extract(cfg.extract, cfg.media, paths.items(dataset), paths.model(model), out)
    fs, p = storage.resolve(storage.join(out, "_errors.parquet"))
    run.record_errors(pq.read_table(p, filesystem=fs), "decode", dataset)
    return res


def stage_cluster(cfg: JobConfig, paths: Paths) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    res = run_cluster(cfg.cluster, paths.features("pretrained", "source"), paths.cluster)
    # Source labels are never used for training; where they exist they show cluster quality.
    items = read_items(paths.items("source"))
    if items["label"].null_count < items.num_rows:
        a = read_assignments(paths.cluster)
        labels = dict(zip(items["id"].to_pylist(), items["label"].to_pylist()))
        truth = [labels[i] for i in a["id"].to_pylist()]
        pred = a["cluster"].to_pylist()
        res = {**res, "nmi": float(normalized_mutual_info_score(truth, pred)), "ari": float(adjusted_rand_score(truth, pred))}
    return res


def stage_retrain(cfg: JobConfig, run: RunDir, paths: Paths) -> dict:
    from cf_ray.train.loop import train_classifier

    a = read_assignments(paths.cluster)
    items = read_items(paths.items("source")).join(a.select(["id", "cluster"]), "id", join_type="inner")
    items = items.sort_by("id").rename_columns([c if c != "cluster" else "target" for c in items.column_names])
    counts = np.bincount(items["target"].to_numpy(), minlength=cfg.cluster.k)
    weights = None
    if cfg.retrain.balanced_sampling:
        nonempty = max(1, int((counts > 0).sum()))
        weights = [float(items.num_rows / (nonempty * c)) if c else 0.0 for c in counts]
    res = train_classifier(cfg.retrain, cfg.media, items, "labels", cfg.cluster.k, paths.train, "retrain",
                           paths.model("clusterfit"), class_weights=weights, threads=_threads(cfg))
    return {"history": res["history"], "items": res["rows"], "classes": int((counts > 0).sum())}


def stage_transfer(cfg: JobConfig, paths: Paths) -> dict:
    out = {}
    for m in MODELS:
        out[m] = run_probe(cfg.probe, paths.features(m, "target_train"), paths.features(m, "target_test"))
        log("transfer " + m + ": " + ", ".join(f"{l} {100 * v['top1']:.1f}%" for l, v in out[m].items()))
    return {"transfer": out}


def report_title(cfg: JobConfig) -> str:
    return f"ClusterFit ({cfg.modality}s): {cfg.data}"


def run_job(cfg: JobConfig) -> dict:
    from cf_ray.runtime import init_ray

    inputs = check_inputs(cfg)
    try:
        run = RunDir(cfg.run_dir)
        storage.write_bytes(run.path("config.yaml"), dump_config(cfg).encode())
    except OSError as e:
        raise ConfigError(f"run_dir {cfg.run_dir} is not writable ({e}); pass --run-dir <a writable path or URI>") from None
    paths = Paths(run)
    run.stage("items", lambda: stage_items(run, paths, inputs))
    init_ray(cfg.ray.num_cpus, cfg.ray.object_store_mb)
    run.stage("pretrain", lambda: stage_pretrain(cfg, run, paths))
    run.stage("extract_source", lambda: stage_extract(cfg, run, paths, "pretrained", "source"))
    run.stage("cluster", lambda: stage_cluster(cfg, paths))
    run.stage("retrain", lambda: stage_retrain(cfg, run, paths))
    for m in MODELS:
        for d in ("target_train", "target_test"):
            run.stage(f"extract_{m}_{d}", lambda m=m, d=d: stage_extract(cfg, run, paths, m, d))
    transfer = run.stage("transfer", lambda: stage_transfer(cfg, paths))
    run.stage("report", lambda: run_report(run.root, report_title(cfg)), force=True)
    log(f"report: {run.path('report.md')}")
    return {"run_dir": run.root, "report": run.path("report.md"), "transfer": transfer.get("transfer")}

