"""The ClusterFit job (images or video): source -> pretrain -> extract -> k-means -> retrain -> transfer -> report.

Each step is a stage of the run directory: done stages are skipped on a rerun, so a killed job resumes.
All input checks happen before Ray starts.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cf_ray import storage
from cf_ray.config import ConfigError, JobConfig, TargetConfig, dump_config
from cf_ray.rundir import RunDir, log
from cf_ray.sources import IMAGE_EXTS, VIDEO_EXTS, SourceError, list_items, load_target
from cf_ray.stages.cluster import read_assignments, run_cluster
from cf_ray.stages.extract import read_items, run_extract, write_items
from cf_ray.stages.probe import run_probe
from cf_ray.stages.report import run_report

MODELS = ("random", "pretrained", "clusterfit")  # transfer compares these; random init is the floor
SPLITS = ("train", "test")  # of every transfer target; its datasets are named <target>_<split>


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


def transfer_stages(target: str) -> list[str]:
    """A target's stages: its items, its splits' features for every model, then its probes (and fine-tuning)."""
    return [f"items_{target}"] + [f"extract_{m}_{target}_{s}" for m in MODELS for s in SPLITS] + [f"transfer_{target}"]


def stage_order(cfg: JobConfig) -> list[str]:
    return [
        "items",
        "pretrain",
        "extract_source",
        "cluster",
        "retrain",
        *[s for t in cfg.transfer_targets() for s in transfer_stages(t)],
        "report",
    ]


def finetuned(model: str, target: str) -> str:
    """Name of ``model`` fine-tuned on ``target`` (its folder under models/ and features/)."""
    return f"finetuned_{model}_{target}"


def stage_outputs(paths: Paths, name: str) -> list[str]:
    if name == "pretrain":
        return [paths.model("random"), paths.model("pretrained"), storage.join(paths.train, "pretrain")]
    if name == "extract_source":
        return [paths.features("pretrained", "source")]
    if name == "cluster":
        return [paths.cluster]
    if name == "retrain":
        return [paths.model("clusterfit"), storage.join(paths.train, "retrain")]
    if name.startswith("transfer_"):
        t = name[len("transfer_") :]
        return [
            p
            for m in MODELS
            for p in (
                paths.model(finetuned(m, t)),
                paths.features(finetuned(m, t), f"{t}_test"),
                storage.join(paths.train, f"finetune_{m}_{t}"),
            )
        ]
    if name.startswith("extract_"):
        m, d = name[len("extract_") :].split("_", 1)
        return [paths.features(m, d)]
    return []


def redo_from(cfg: JobConfig, run: RunDir, paths: Paths, name: str) -> None:
    """Delete the outputs of stage ``name`` and of every later stage, and forget them in the manifest."""
    order = stage_order(cfg)
    later = order[order.index(name) :]
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
    log(f"inputs: {source.num_rows} source {cfg.modality}s ({skipped.num_rows} skipped)")
    inputs = {"source": (source, skipped)}
    for name, t in targets.items():
        train, test, skipped_t = load_target(t.path, cfg.probe.test_fraction, cfg.seed, exts)
        log(
            f"inputs: target {name} ({t.path}): {train.num_rows} train / {test.num_rows} test "
            f"({skipped_t.num_rows} skipped)"
        )
        inputs[f"{name}_train"], inputs[f"{name}_test"] = (train, skipped_t), (test, skipped.schema.empty_table())
    return inputs


def check_cluster(cfg: JobConfig) -> None:
    """What the job asks of a local Ray it started, checked before any stage: Ray would wait forever for
    CPUs or GPUs a local machine does not have. (A cluster joined via RAY_ADDRESS may autoscale; not checked.)"""
    import os

    import ray

    if os.environ.get("RAY_ADDRESS"):
        return
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    asks = [
        (
            "retrain",
            cfg.retrain.use_gpu,
            cfg.retrain.num_workers,
            cfg.retrain.cpus_per_worker,
            "num_workers",
            "cpus_per_worker",
        ),
        (
            "extract",
            cfg.extract.use_gpu,
            cfg.extract.num_actors,
            cfg.extract.cpus_per_actor,
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


def stage_items(run: RunDir, paths: Paths, inputs: dict, names: tuple[str, ...] = ("source",)) -> dict:
    """The listed items of the datasets ``names`` (and what listing skipped), for the stages after it to read."""
    inputs = {n: inputs[n] for n in names}
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
    items, task, classes, extra = pretrain_targets(cfg, read_items(paths.items("source")))
    res = train_classifier(
        cfg.pretrain.train,
        cfg.media,
        items,
        task,
        classes,
        paths.train,
        "pretrain",
        paths.model("pretrained"),
        threads=_threads(cfg),
    )
    run.record_errors(res["undecodable"], "decode", "source")
    return {"source": cfg.pretrain.source, "proxy": task, **extra, "history": res["history"], "items": res["rows"]}


def pretrain_targets(cfg: JobConfig, items: pa.Table) -> tuple[pa.Table, str, int, dict]:
    """(items with a target column, task, number of classes, what to record) for pre-training on the source."""
    from cf_ray.train.loop import PROXY_TASKS

    if cfg.pretrain.source != "labels":
        return (
            items.append_column("target", pa.array(np.zeros(items.num_rows, np.int64))),
            cfg.pretrain.proxy,
            PROXY_TASKS[cfg.pretrain.proxy],
            {},
        )
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
    res = run_cluster(cfg.cluster, paths.features("pretrained", "source"), paths.cluster)
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
    table = np.bincount(pred * c + truth, minlength=(int(pred.max()) + 1) * c).reshape(-1, c)  # cluster x class counts
    return {
        "nmi": float(normalized_mutual_info_score(truth, pred)),
        "ari": float(adjusted_rand_score(truth, pred)),
        "purity": float(table.max(1).sum() / len(pred)),
    }


def stage_retrain(cfg: JobConfig, run: RunDir, paths: Paths) -> dict:
    from cf_ray.train.loop import train_classifier

    a = read_assignments(paths.cluster)
    items = read_items(paths.items("source")).join(a.select(["id", "cluster"]), "id", join_type="inner")
    items = items.sort_by("id").rename_columns([c if c != "cluster" else "target" for c in items.column_names])
    counts = np.bincount(items["target"].to_numpy(), minlength=cfg.cluster.k)
    res = train_classifier(
        cfg.retrain,
        cfg.media,
        items,
        "labels",
        cfg.cluster.k,
        paths.train,
        "retrain",
        paths.model("clusterfit"),
        threads=_threads(cfg),
    )
    return {"history": res["history"], "items": res["rows"], "classes": int((counts > 0).sum()), "best": res["best"]}


def stage_transfer(cfg: JobConfig, paths: Paths, name: str, target: TargetConfig) -> dict:
    """Linear probes per layer for every model on one target and, with probe.finetune, each model fine-tuned
    whole (key ``finetuned``)."""
    from cf_ray.stages.finetune import run_finetune

    probe = cfg.probe.model_copy(update={"multi_label": target.multi_label})
    train, test = f"{name}_train", f"{name}_test"
    out = {}
    for m in MODELS:
        out[m] = run_probe(probe, paths.features(m, train), paths.features(m, test))
        if cfg.probe.finetune:
            out[m]["finetuned"] = run_finetune(
                cfg.probe.finetune_train,
                cfg.extract,
                cfg.media,
                paths.items(train),
                paths.items(test),
                paths.model(m),
                paths.model(finetuned(m, name)),
                paths.features(finetuned(m, name), test),
                paths.train,
                f"finetune_{m}_{name}",
                threads=_threads(cfg),
            )
        log(
            f"transfer to {name}, {m}: "
            + ", ".join(f"{l} {100 * v['score']:.1f}" for l, v in out[m].items())
            + (" (mAP)" if probe.multi_label else " (top-1 %)")
        )
    return {"target": target.path, "transfer": out}


def run_transfer(cfg: JobConfig, run: RunDir, paths: Paths, inputs: dict) -> dict:
    """Every target's stages in order: {target name: {model: {layer: probe result}}}. A target added to a
    finished run gets only its own stages."""
    out = {}
    for name, target in cfg.transfer_targets().items():
        run.stage(f"items_{name}", lambda n=name: stage_items(run, paths, inputs, tuple(f"{n}_{s}" for s in SPLITS)))
        for m in MODELS:
            for s in SPLITS:
                run.stage(f"extract_{m}_{name}_{s}", lambda m=m, d=f"{name}_{s}": stage_extract(cfg, run, paths, m, d))
        out[name] = run.stage(f"transfer_{name}", lambda n=name, t=target: stage_transfer(cfg, paths, n, t))["transfer"]
    return out


def report_title(cfg: JobConfig) -> str:
    return f"ClusterFit ({cfg.modality}s): {cfg.data}"


def run_job(cfg: JobConfig) -> dict:
    from cf_ray.runtime import init_ray

    inputs = check_inputs(cfg)
    try:
        run = RunDir(cfg.run_dir)
        storage.write_bytes(run.path("config.yaml"), dump_config(cfg).encode())
    except OSError as e:
        raise ConfigError(
            f"run_dir {cfg.run_dir} is not writable ({e}); pass --run-dir <a writable path or URI>"
        ) from None
    paths = Paths(run)
    init_ray(cfg.ray.num_cpus, cfg.ray.object_store_mb)
    check_cluster(cfg)
    run.stage("items", lambda: stage_items(run, paths, inputs))
    run.stage("pretrain", lambda: stage_pretrain(cfg, run, paths))
    run.stage("extract_source", lambda: stage_extract(cfg, run, paths, "pretrained", "source"))
    run.stage("cluster", lambda: stage_cluster(cfg, paths))
    run.stage("retrain", lambda: stage_retrain(cfg, run, paths))
    transfer = run_transfer(cfg, run, paths, inputs)
    run.stage("report", lambda: run_report(run.root, report_title(cfg)), force=True)
    log(f"report: {run.path('report.md')}")
    return {"run_dir": run.root, "report": run.path("report.md"), "transfer": transfer}
