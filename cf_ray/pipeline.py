"""The ClusterFit job (images or video) as one table of stages:
items -> pretrain -> extract_source -> cluster -> retrain -> per target: items, extracts, transfer -> report.

Each stage names its function, its outputs and the stages it needs. ``run_job`` runs the table; a done
stage is skipped, so a killed job resumes. ``run_cli_stage`` redoes one stage (and forgets what depends on
it), after running whatever it needs that is not done yet. All input checks happen before Ray starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cf_ray import features, storage
from cf_ray.config import ConfigError, JobConfig, TargetConfig, dump_config
from cf_ray.media.items import read_items, write_items
from cf_ray.rundir import RunDir
from cf_ray.sources import IMAGE_EXTS, VIDEO_EXTS, SourceError, list_items, load_target, target_splits
from cf_ray.stages import names
from cf_ray.stages.cluster import read_assignments, read_clip_assignments, run_cluster
from cf_ray.stages.extract import ExtractPool, run_extract
from cf_ray.stages.names import MODELS, SPLITS
from cf_ray.stages.probe import run_probe
from cf_ray.stages.report import run_report

logger = logging.getLogger(__name__)


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


@dataclass
class Job:
    """An opened run: its config, run directory, output paths and listed inputs ((items, skipped) per dataset)."""

    cfg: JobConfig
    run: RunDir
    paths: Paths
    inputs: dict = field(default_factory=dict)
    pool: ExtractPool | None = None  # shared by consecutive extraction stages (run_stages opens and closes it)


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[[Job], dict]
    outputs: Callable[[Paths], list[str]]
    needs: tuple[str, ...] = ()
    group: str = ""  # the `cf-ray <stage>` name that redoes it
    always: bool = False  # rerun every time (the report)


# --- the table ---------------------------------------------------------------------------------------------------
def stage_table(cfg: JobConfig) -> list[Stage]:
    """Every stage of the job, in the order it runs."""
    table = [
        Stage("items", lambda j: stage_items(j, ("source",)), lambda p: [], group="items"),
        Stage(
            "pretrain",
            stage_pretrain,
            lambda p: [p.model("random"), p.model("pretrained"), storage.join(p.train, "pretrain")],
            ("items",),
            "pretrain",
        ),
        Stage(
            "extract_source",
            lambda j: stage_extract(j, "pretrained", "source"),
            lambda p: [p.features("pretrained", "source")],
            ("pretrain",),
            "extract",
        ),
        Stage("cluster", stage_cluster, lambda p: [p.cluster], ("extract_source",), "cluster"),
        Stage(
            "retrain",
            stage_retrain,
            lambda p: [p.model("clusterfit"), storage.join(p.train, "retrain"), p.features("clusterfit", "source")],
            ("cluster",),
            "retrain",
        ),
    ]
    for t, target in cfg.transfer_targets().items():
        datasets = [names.dataset(t, s) for s in SPLITS]
        table.append(Stage(names.items(t), lambda j, d=tuple(datasets): stage_items(j, d), lambda p: [], (), "items"))
        extracts = []
        for m in MODELS:
            for d in datasets:
                extracts.append(names.extract(m, d))
                table.append(
                    Stage(
                        extracts[-1],
                        lambda j, m=m, d=d: stage_extract(j, m, d),
                        lambda p, m=m, d=d: [p.features(m, d)],
                        (names.items(t), names.model_stage(m)),
                        "transfer",
                    )
                )
        table.append(
            Stage(
                names.transfer(t),
                lambda j, t=t, target=target: stage_transfer(j, t, target),
                lambda p, t=t: finetune_outputs(p, t),
                tuple(extracts),
                "transfer",
            )
        )
    targets = list(cfg.transfer_targets())
    table.append(
        Stage(
            "report",
            lambda j: run_report(j.run.root, report_title(j.cfg), targets),
            lambda p: [],
            ("retrain", *[names.transfer(t) for t in targets]),
            "report",
            always=True,
        )
    )
    return table


def finetune_outputs(paths: Paths, target: str) -> list[str]:
    return [
        p
        for m in MODELS
        for p in (
            paths.model(names.finetuned(m, target)),
            paths.features(names.finetuned(m, target), names.dataset(target, "test")),
            storage.join(paths.train, f"finetune_{m}_{target}"),
        )
    ]


def dependents(table: list[Stage], chosen: list[str]) -> list[str]:
    """``chosen`` and every stage that needs one of them, directly or not, in table order."""
    out = set(chosen)
    for s in table:  # the table is in dependency order, so one pass suffices
        if out.intersection(s.needs):
            out.add(s.name)
    return [s.name for s in table if s.name in out]


def prerequisites(table: list[Stage], chosen: list[str]) -> set[str]:
    """``chosen`` and every stage they need, directly or not."""
    by_name, out, todo = {s.name: s for s in table}, set(), list(chosen)
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(by_name[n].needs)
    return out


def forget(job: Job, table: list[Stage], stage_names: list[str]) -> None:
    """Delete the outputs of these stages and forget them in the manifest, so the next run redoes them."""
    by_name = {s.name: s for s in table}
    for n in stage_names:
        for out in by_name[n].outputs(job.paths):
            storage.delete_dir(out)
    job.run.invalidate(stage_names)


def run_stages(job: Job, table: list[Stage], only: set[str] | None = None) -> dict[str, dict]:
    """Run the stages of ``table`` (those in ``only``, if given) in order, skipping done ones: {name: result}."""
    results = {}
    job.pool = ExtractPool(job.cfg.extract)  # its actors start at the first extraction that has work to do
    try:
        for s in table:
            if only is None or s.name in only:
                if not s.name.startswith(names.EXTRACT):
                    job.pool.close()  # free its CPUs/GPUs for training and the other stages
                results[s.name] = job.run.stage(s.name, lambda s=s: s.fn(job), force=s.always)
    finally:
        job.pool.close()
        job.pool = None
    return results


# --- opening a run -------------------------------------------------------------------------------------------------
def check_inputs(cfg: JobConfig) -> dict[str, tuple[pa.Table, pa.Table]]:
    """List every input and check it can be run, before any Ray work: (items, skipped) per dataset."""
    exts = VIDEO_EXTS if cfg.modality == "video" else IMAGE_EXTS
    source, skipped = list_items(cfg.data, exts)
    if cfg.data_limit and source.num_rows > cfg.data_limit:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(source.num_rows, cfg.data_limit, replace=False))
        source = source.take(keep)
    targets = cfg.transfer_targets()
    if not targets:
        raise SourceError("no target dataset given (pass --target <labelled folder>, or targets.<name>=<folder>)")
    if cfg.pretrain.source == "labels" and source["label"].null_count:
        raise ConfigError(
            f"pretrain.source=labels needs a label for every source item, but {source['label'].null_count} "
            f"in {cfg.data} have none; put the images in one folder per class"
        )
    if cfg.cluster.k > source.num_rows:
        raise ConfigError(
            f"cluster.k={cfg.cluster.k} is larger than the {source.num_rows} {cfg.modality}s in {cfg.data}; "
            f"set cluster.k <= {source.num_rows}"
        )
    from cf_ray.models.weights import check_pretrained

    try:  # a run that has its pre-trained model no longer needs the weight file
        loaded = storage.exists(storage.join(cfg.run_dir, "models", "pretrained", "model.json"))
    except OSError:  # an unreachable run_dir is reported when the run starts
        loaded = False
    if not loaded:
        check_pretrained(cfg.pretrain, cfg.pretrain.train.model)  # the weights exist and fit, before Ray starts
    logger.info(f"inputs: {source.num_rows} source {cfg.modality}s ({skipped.num_rows} skipped)")
    inputs = {"source": (source, skipped)}
    for name, t in targets.items():
        train, test, skipped_t = load_target(t.path, cfg.probe.test_fraction, cfg.seed, exts, t.test_split)
        logger.info(
            f"inputs: target {name} ({t.path}): {train.num_rows} train / {test.num_rows} test "
            f"({skipped_t.num_rows} skipped); splits: {target_splits(t.path, t.test_split).note}"
        )
        inputs[names.dataset(name, "train")] = (train, skipped_t)
        inputs[names.dataset(name, "test")] = (test, skipped.schema.empty_table())
    return inputs


def check_cluster(cfg: JobConfig) -> None:
    """What the job asks of a local Ray it started, checked before any stage: Ray would wait forever for
    CPUs or GPUs a local machine does not have. (A cluster joined via RAY_ADDRESS may autoscale; not checked.)"""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    r, e, k = cfg.retrain, cfg.extract, cfg.cluster
    asks = [
        ("retrain", r.use_gpu, r.num_workers, r.cpus_per_worker, "num_workers", "cpus_per_worker"),
        # num_actors=0 (auto) sizes the pool to what the cluster has: at least one actor
        ("extract", e.use_gpu, max(1, e.num_actors), e.cpus_per_actor, "num_actors", "cpus_per_actor"),
        # k-means: one faiss task, or num_actors shard actors that must all be placed at once
        (
            "cluster",
            k.use_gpu,
            k.num_actors if k.backend == "ray" else 1,
            k.cpus_per_actor,
            "num_actors",
            "cpus_per_actor",
        ),
    ]
    if cfg.pretrain.source not in ("checkpoint", "torchvision"):
        t = cfg.pretrain.train
        asks.insert(
            0, ("pretrain.train", t.use_gpu, t.num_workers, t.cpus_per_worker, "num_workers", "cpus_per_worker")
        )
    for key, use_gpu, n, per, n_key, per_key in asks:
        if use_gpu == "yes" and n > gpus:
            raise ConfigError(
                f"{key}.use_gpu=yes asks for {n} GPU(s) but this machine's Ray has {gpus:g}; "
                f"set {key}.use_gpu=auto (GPU where present) or no"
            )
        if n * per > cpus:
            raise ConfigError(
                f"{key} asks for {n} x {per:g} CPUs but this machine's Ray has {cpus:g}; "
                f"lower {key}.{n_key} or {key}.{per_key} (or raise ray.num_cpus)"
            )


def open_job(cfg: JobConfig, list_inputs: bool = True, start_ray: bool = True) -> Job:
    """The one way into a run, for the whole job and for a single stage alike: inputs checked (before Ray),
    the run directory opened with its resolved config.yaml, Ray started or joined, the cluster checked."""
    from cf_ray import log
    from cf_ray.runtime import init_ray

    log.setup()
    inputs = check_inputs(cfg) if list_inputs else {}
    try:
        run = RunDir(cfg.run_dir)
        storage.write_bytes(run.path("config.yaml"), dump_config(cfg).encode())
    except OSError as e:
        raise ConfigError(
            f"run_dir {cfg.run_dir} is not writable ({e}); pass --run-dir <a writable path or URI>"
        ) from None
    if start_ray:
        init_ray(cfg.ray.num_cpus, cfg.ray.object_store_mb, cfg.ray.dashboard)
        check_cluster(cfg)
    return Job(cfg, run, Paths(run), inputs)


def run_job(cfg: JobConfig) -> dict:
    """Every stage of the job that is not done yet."""
    job = open_job(cfg)
    results = run_stages(job, stage_table(cfg))
    logger.info(f"report: {job.run.path('report.md')}")
    transfer = {t: results[names.transfer(t)]["transfer"] for t in cfg.transfer_targets()}
    return {"run_dir": job.run.root, "report": job.run.path("report.md"), "transfer": transfer}


def run_cli_stage(group: str, cfg: JobConfig) -> dict:
    """Redo the stages of one `cf-ray <stage>` name: forget them and what depends on them, then run them after
    whatever they need that is not done yet. {stage name: result}."""
    table = stage_table(cfg)
    chosen = [s.name for s in table if s.group == group]
    if not chosen:
        raise ConfigError(f"unknown stage {group!r}")
    job = open_job(cfg, list_inputs=group != "report", start_ray=group != "report")
    if group == "report":
        return run_stages(job, table, set(chosen))
    forget(job, table, dependents(table, chosen))
    results = run_stages(job, table, prerequisites(table, chosen))
    return {n: results[n] for n in chosen}


def report_title(cfg: JobConfig) -> str:
    return f"ClusterFit ({cfg.modality}s): {cfg.data}"


# --- the stages ------------------------------------------------------------------------------------------------------
def stage_items(job: Job, datasets: tuple[str, ...]) -> dict:
    """The listed items of ``datasets`` (and what listing skipped), for the stages after it to read."""
    for name in datasets:
        items, skipped = job.inputs[name]
        write_items(items, job.paths.items(name))
        job.run.record_errors(skipped, "list", name)
    return {name: job.inputs[name][0].num_rows for name in datasets}


def stage_pretrain(job: Job) -> dict:
    from cf_ray.models.checkpoint import build, save_backbone
    from cf_ray.train.loop import train_classifier

    cfg, paths = job.cfg, job.paths
    model_cfg = cfg.pretrain.train.model
    save_backbone(build(model_cfg, seed=cfg.seed), model_cfg, paths.model("random"))
    if cfg.pretrain.source in ("checkpoint", "torchvision"):  # published or given weights, never downloaded
        from cf_ray.models.weights import load_pretrained

        model, record = load_pretrained(cfg.pretrain, model_cfg)
        save_backbone(model, model_cfg, paths.model("pretrained"))
        return record
    items, task, classes, extra = pretrain_targets(cfg, read_items(paths.items("source")))
    res = train_classifier(
        cfg.pretrain.train, cfg.media, items, task, classes, paths.train, "pretrain", paths.model("pretrained")
    )
    job.run.record_errors(res["undecodable"], "decode", "source")
    return {
        "source": cfg.pretrain.source,
        "proxy": task,
        **extra,
        "history": res["history"],
        "items": res["rows"],
    }


def pretrain_targets(cfg: JobConfig, items: pa.Table) -> tuple[pa.Table, str, int, dict]:
    """(items with a target column, task, number of classes, what to record) for pre-training on the source."""
    from cf_ray.train.tasks import get_task

    if cfg.pretrain.source != "labels":
        task = get_task(cfg.pretrain.proxy)
        zeros = pa.array(np.zeros(items.num_rows, np.int64))
        return items.append_column("target", zeros), task.name, task.num_classes, {}
    classes = sorted(set(items["label"].to_pylist()))
    truth = np.array([classes.index(l) for l in items["label"].to_pylist()], np.int64)
    target = noisy_labels(truth, len(classes), cfg.pretrain.label_noise, cfg.seed)
    extra = {"classes": classes, "label_noise": cfg.pretrain.label_noise, "flipped": int((target != truth).sum())}
    return items.append_column("target", pa.array(target)), "labels", len(classes), extra


def noisy_labels(truth: np.ndarray, num_classes: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded ``fraction`` of the labels replaced by a different class, drawn uniformly."""
    rng = np.random.default_rng(seed)
    out = truth.copy()
    flip = rng.choice(len(truth), int(round(fraction * len(truth))), replace=False)
    out[flip] = (truth[flip] + rng.integers(1, num_classes, len(flip))) % num_classes
    return out


def stage_extract(job: Job, model: str, dataset: str) -> dict:
    paths = job.paths
    out = paths.features(model, dataset)
    res = run_extract(job.cfg.extract, job.cfg.media, paths.items(dataset), paths.model(model), out, pool=job.pool)
    fs, p = storage.resolve(storage.join(out, features.ERRORS))
    job.run.record_errors(pq.read_table(p, filesystem=fs), "decode", dataset)
    return res


def stage_cluster(job: Job) -> dict:
    paths = job.paths
    res = run_cluster(job.cfg.cluster, paths.features("pretrained", "source"), paths.cluster)
    return {**res, **cluster_quality(read_items(paths.items("source")), read_assignments(paths.cluster))}


def cluster_quality(items: pa.Table, assignments: pa.Table) -> dict:
    """NMI, ARI and purity of the clusters against the items' true labels, where they have any ({} otherwise).

    Source labels are never used for ClusterFit's training; where they exist they show cluster quality."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    if items["label"].null_count == items.num_rows:
        return {}
    labels = dict(zip(items["id"].to_pylist(), items["label"].to_pylist()))
    truth = np.unique([labels[i] for i in assignments["id"].to_pylist()], return_inverse=True)[1]
    pred = assignments["cluster"].to_numpy()
    c = int(truth.max()) + 1
    table = np.bincount(pred * c + truth, minlength=(int(pred.max()) + 1) * c).reshape(-1, c)  # cluster x class
    return {
        "nmi": float(normalized_mutual_info_score(truth, pred)),
        "ari": float(adjusted_rand_score(truth, pred)),
        "purity": float(table.max(1).sum() / len(pred)),
    }


def stage_retrain(job: Job) -> dict:
    from cf_ray.train.loop import CLIP_TARGETS, train_classifier

    cfg, paths = job.cfg, job.paths
    a = read_assignments(paths.cluster)
    items = read_items(paths.items("source")).join(a.select(["id", "cluster"]), "id", join_type="inner")
    items = items.sort_by("id").rename_columns([c if c != "cluster" else "target" for c in items.column_names])
    clips = read_clip_assignments(paths.cluster) if cfg.modality == "video" else None
    if clips is not None and cfg.retrain.clips == "extracted":
        items = with_clip_targets(items, clips)
    counts = np.bincount(items["target"].to_numpy(), minlength=cfg.cluster.k)
    res = train_classifier(
        cfg.retrain, cfg.media, items, "labels", cfg.cluster.k, paths.train, "retrain", paths.model("clusterfit")
    )
    out = {"history": res["history"], "items": res["rows"], "classes": int((counts > 0).sum()), "best": res["best"]}
    out["clip_targets"] = CLIP_TARGETS in items.column_names
    if cfg.retrain.measure_fit:
        out["fit"] = measure_fit(job, a, clips)
        logger.info(f"retrain: fits {100 * out['fit']['fit']:.1f}% of its pseudo-labels on the clustered views")
    return out


def with_clip_targets(items: pa.Table, clips: pa.Table) -> pa.Table:
    """``items`` with column clip_targets: each extracted clip's own cluster id (items without one are dropped)."""
    from cf_ray.train.loop import CLIP_TARGETS

    where = {k: i for i, k in enumerate(clips["id"].to_pylist())}
    keep = [i for i, k in enumerate(items["id"].to_pylist()) if k in where]
    items = items.take(keep)
    rows = [where[k] for k in items["id"].to_pylist()]
    return items.append_column(CLIP_TARGETS, clips["clusters"].take(rows))


def measure_fit(job: Job, assignments: pa.Table, clips: pa.Table | None) -> dict:
    """Pseudo-label fit of the retrained network on the clustered views (cf_ray.stages.fit)."""
    from cf_ray.stages.fit import LAYER, pseudo_label_fit

    cfg, paths = job.cfg, job.paths
    out = paths.features("clusterfit", "source")
    extract = cfg.extract.model_copy(update={"layers": [LAYER], "clip_features": clips is not None})
    run_extract(extract, cfg.media, paths.items("source"), paths.model("clusterfit"), out)
    return pseudo_label_fit(out, paths.model("clusterfit"), assignments, clips)


def stage_transfer(job: Job, name: str, target: TargetConfig) -> dict:
    """Linear probes per layer for every model on one target and, with probe.finetune, each model fine-tuned
    whole (key ``finetuned``)."""
    from cf_ray.stages.finetune import run_finetune

    cfg, paths = job.cfg, job.paths
    probe = cfg.probe.model_copy(update={"multi_label": target.multi_label})
    train, test = names.dataset(name, "train"), names.dataset(name, "test")
    out = {}
    for m in MODELS:
        out[m] = run_probe(probe, paths.features(m, train), paths.features(m, test))
        if cfg.probe.finetune:
            tuned = names.finetuned(m, name)
            out[m]["finetuned"] = run_finetune(
                cfg.probe.finetune_train,
                cfg.extract,
                cfg.media,
                paths.items(train),
                paths.items(test),
                paths.model(m),
                paths.model(tuned),
                paths.features(tuned, test),
                paths.train,
                f"finetune_{m}_{name}",
            )
        logger.info(
            f"transfer to {name}, {m}: "
            + ", ".join(f"{l} {100 * v['score']:.1f}" for l, v in out[m].items())
            + (" (mAP)" if probe.multi_label else " (top-1 %)")
        )
    return {"target": target.path, "split": target_splits(target.path, target.test_split).note, "transfer": out}
