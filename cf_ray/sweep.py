"""Where does ClusterFit help? One pre-trained network, many ClusterFit settings, the paper's controls.

The sweep pre-trains (or reuses ``base_run``'s pre-training) and extracts the source features once, then
for every grid setting (K x layer clustered x retraining epochs x retrained model): k-means -> retrain ->
target features -> linear probes. The controls (longer pre-training, distillation) get the same number of
training epochs on the same source items. Every setting is one stage of the sweep's run directory and
runs in its own sub folder with its own stages, so a killed sweep resumes where it stopped.
"""

from __future__ import annotations

import itertools
import logging
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, PositiveInt, model_validator

from cf_ray import features, storage
from cf_ray.config import ConfigError, JobConfig, ModelConfig, _Strict, dump_config, load_config
from cf_ray.kmeans.core import l2_normalize
from cf_ray.media.items import read_items, write_items
from cf_ray.pipeline import (
    Job,
    Paths,
    check_inputs,
    cluster_quality,
    pretrain_targets,
    stage_extract,
    stage_items,
    stage_pretrain,
    stage_retrain,
)
from cf_ray.rundir import RunDir
from cf_ray.seeds import is_seeded_run
from cf_ray.sources import IMAGE_EXTS, VIDEO_EXTS, load_target, target_splits
from cf_ray.stages import names
from cf_ray.stages.cluster import read_assignments, run_cluster
from cf_ray.stages.extract import ExtractPool
from cf_ray.stages.probe import run_probe
from cf_ray.train.tasks import same_compute_epochs

logger = logging.getLogger(__name__)

FUSE = "fuse:"


class GridConfig(_Strict):
    """The ClusterFit settings: every combination of these."""

    k: list[PositiveInt] = Field([100], min_length=1, description="Numbers of clusters.")
    layer: list[str] = Field(
        ["res5"],
        min_length=1,
        description="Features clustered: a tap (res4), taps joined by + (res4+res5: each "
        "L2-normalised, concatenated), or fuse:<tap> (this tap of the pre-trained network and of fuse_run's, each "
        "L2-normalised, concatenated: the paper's multi-task variant).",
    )
    epochs: list[PositiveInt] = Field([10], min_length=1, description="Retraining epochs.")
    model: list[ModelConfig] = Field([], description="Retrained backbones; default: job.retrain.model.")


class ControlsConfig(_Strict):
    """The paper's controls, trained on the same source items for the same number of epochs as ClusterFit."""

    longer_pretrain: bool = Field(
        True, description="Continue the pre-training task from its last state (a new warm-up + cosine schedule)."
    )
    distill: bool = Field(
        True, description="Train a fresh network on the pre-trained network's soft outputs (its proxy or label head)."
    )
    epochs: int | None = Field(
        None,
        gt=0,
        description="Training epochs of each control; default: the same compute as the largest "
        "grid.epochs, i.e. as many images through the network, rounded up: for RotNet (4 rotations "
        "per image) ceil(epochs / 4).",
    )
    temperature: float = Field(1.0, gt=0, description="Distillation: softmax temperature of the teacher's logits.")


class SweepConfig(_Strict):
    """A ClusterFit sweep over one pre-trained network."""

    run_dir: str = Field("runs/sweep", description="Path or URI of the sweep's run directory.")
    job: JobConfig = Field(
        default_factory=JobConfig,
        description="The job: data, pretrain, extract, cluster (niter, seed), retrain, probe, ray.",
    )
    base_run: str | None = Field(
        None,
        description="A job run directory whose items, pretrain and extract_source stages are done: "
        "reused (its config.yaml's data, image and pretrain apply); none: run them here once.",
    )
    source_limit: int | None = Field(
        None, gt=0, description="Cluster and retrain on a seeded subset of this many source items; none: all."
    )
    target_train_limit: int | None = Field(
        None,
        gt=0,
        description="Train the probes on a seeded subset of this many target "
        "train items (the test split is always whole); none: all.",
    )
    grid: GridConfig = Field(default_factory=GridConfig)
    controls: ControlsConfig = Field(default_factory=ControlsConfig)
    fuse_run: str | None = Field(
        None,
        description="Another job run directory on the same source items (extract_source done), for fuse:<tap> layers.",
    )
    noise_levels: list[float] = Field(
        [],
        description="The label-noise curve (the paper's control experiment): the whole sweep once per level, with "
        "job.pretrain.label_noise set to it (job.pretrain.source=labels, no base_run), in <run_dir>/noise_<level>; "
        "then report_noise.md: each row's gain over the pre-trained network against the noise. Empty: one sweep.",
    )

    @model_validator(mode="after")
    def _fuse_needs_run(self) -> "SweepConfig":
        if any(l.startswith(FUSE) for l in self.grid.layer) and not self.fuse_run:
            raise ValueError("grid.layer has fuse:<tap> entries but fuse_run is not set")
        return self

    @model_validator(mode="after")
    def _noise_levels(self) -> "SweepConfig":
        if not self.noise_levels:
            return self
        if self.job.pretrain.source != "labels":
            raise ValueError("noise_levels needs job.pretrain.source=labels (pre-training on the noisy labels)")
        if self.base_run:
            raise ValueError("noise_levels pre-trains once per level: drop base_run")
        if any(not 0 <= n < 1 for n in self.noise_levels) or len(set(self.noise_levels)) != len(self.noise_levels):
            raise ValueError(f"noise_levels {self.noise_levels}: give distinct fractions in [0, 1), e.g. [0, 0.5]")
        return self


def setting_name(k: int, layer: str, epochs: int, model: ModelConfig) -> str:
    return f"k{k}_{re.sub('[^A-Za-z0-9]+', '-', layer)}_e{epochs}_{model.arch}-w{model.width}"


def settings(cfg: SweepConfig) -> list[dict]:
    models = cfg.grid.model or [cfg.job.retrain.model]
    return [
        {"name": setting_name(k, l, e, m), "k": k, "layer": l, "epochs": e, "model": m}
        for k, l, e, m in itertools.product(cfg.grid.k, cfg.grid.layer, cfg.grid.epochs, models)
    ]


class SubPaths(Paths):
    """A setting's own folder; items (targets and the clustered source subset) are the sweep's."""

    def __init__(self, run: RunDir, sweep: RunDir):
        super().__init__(run)
        self.sweep = sweep

    def items(self, name: str) -> str:
        return self.sweep.path("items", ("cluster_source" if name == "source" else name) + ".parquet")


class Sweep:
    """The sweep's run directory, its base (pre-trained network + source features) and its targets."""

    def __init__(self, cfg: SweepConfig):
        self.cfg = cfg
        self.targets = cfg.job.transfer_targets()  # name -> TargetConfig (path, multi_label)
        try:
            self.run = RunDir(cfg.run_dir)
            storage.write_bytes(self.run.path("sweep.yaml"), dump_config(cfg).encode())
        except OSError as e:
            raise ConfigError(
                f"run_dir {cfg.run_dir} is not writable ({e}); pass --run-dir <a writable path>"
            ) from None
        self.paths = Paths(self.run)
        for what, path in (("base_run", cfg.base_run), ("fuse_run", cfg.fuse_run)):
            if path and is_seeded_run(path):
                raise ConfigError(
                    f"{what} {path} holds one run per seed (seed_0, ...): run the sweep with --seeds (seed s then "
                    f"uses {path}/seed_<s>), or set {what}={path}/seed_0"
                )
        if cfg.base_run:
            self.base = RunDir(cfg.base_run)
            missing = [s for s in ("items", "pretrain", "extract_source") if not self.base.is_done(s)]
            if missing:
                raise ConfigError(
                    f"base_run {cfg.base_run} has not finished {missing}; run the job there first or drop base_run"
                )
            self.base_cfg = load_config(JobConfig, self.base.path("config.yaml"))
            if self.base_cfg.media != cfg.job.media:
                raise ConfigError(
                    f"job.{cfg.job.modality} differs from base_run's; the sweep must decode as the base did"
                )
        else:
            self.base, self.base_cfg = self.run, cfg.job
        self.base_paths = Paths(self.base)
        # One set of extraction actors for every extraction of the sweep (each would otherwise start its own, a
        # fixed cost per network and split); closed while anything else needs the CPUs/GPUs (see _without_pool).
        self.pool = ExtractPool(cfg.job.extract)

    def _without_pool(self, fn):
        """``fn`` as a stage body that first frees the extraction actors' CPUs/GPUs (for training, k-means)."""

        def body():
            self.pool.close()
            return fn()

        return body

    @property
    def extensions(self) -> tuple[str, ...]:
        return VIDEO_EXTS if self.cfg.job.modality == "video" else IMAGE_EXTS

    # --- once per sweep -----------------------------------------------------------------------
    def prepare(self) -> None:
        from cf_ray.runtime import init_ray

        cfg, run = self.cfg, self.run
        exts = self.extensions
        job = Job(cfg.job, run, self.paths, pool=self.pool)
        if cfg.base_run is None:
            check = cfg.job.model_copy(deep=True)
            check.cluster.k = max(cfg.grid.k)  # the largest K is checked against the source size
            job.inputs = check_inputs(check)
            run.stage("items", lambda: stage_items(job, ("source",)))
        run.stage("items_targets", lambda: self._write_targets(exts))
        init_ray(cfg.job.ray.num_cpus, cfg.job.ray.object_store_mb, cfg.job.ray.dashboard)
        if cfg.base_run is None:
            run.stage("pretrain", self._without_pool(lambda: stage_pretrain(job)))
            run.stage("extract_source", lambda: stage_extract(job, "pretrained", "source"))
        run.stage("cluster_source", self._write_cluster_source)
        for layer in sorted({s["layer"] for s in settings(cfg)}):
            run.stage(f"cluster_input_{layer}", lambda layer=layer: self._write_cluster_input(layer))
        for m in ("random", "pretrained"):
            self.evaluate(run, self._reference_paths(m), m, stage_prefix=f"{m}_")

    def _write_targets(self, exts) -> dict:
        out = {}
        for t, target in self.targets.items():
            path = target.path
            train, test, skipped = load_target(
                path, self.cfg.job.probe.test_fraction, self.cfg.job.seed, exts, target.test_split
            )
            train = seeded_subset(train, self.cfg.target_train_limit, self.cfg.job.seed)
            write_items(train, self.paths.items(names.dataset(t, "train")))
            write_items(test, self.paths.items(names.dataset(t, "test")))
            self.run.record_errors(skipped, "list", t)
            out[t] = {"path": path, "train": train.num_rows, "test": test.num_rows, "skipped": skipped.num_rows}
            out[t]["split"] = target_splits(path, target.test_split).note
        return out

    def _write_cluster_source(self) -> dict:
        """The source items that are clustered and trained on: all the base's, or a seeded subset."""
        everything = read_items(self.base_paths.items("source"))
        items = seeded_subset(everything, self.cfg.source_limit, self.cfg.job.seed)
        write_items(items, self.run.path("items", "cluster_source.parquet"))
        return {"items": items.num_rows, "of": everything.num_rows}

    def cluster_input(self, layer: str) -> str:
        return self.run.path("features", "cluster_input", re.sub("[^A-Za-z0-9]+", "-", layer))

    def _write_cluster_input(self, layer: str) -> dict:
        """Features of the clustered items for one grid layer, as one ``feat_input`` column (what k-means reads)."""
        source = read_items(self.run.path("items", "cluster_source.parquet"))
        paths_of = dict(zip(source["id"].to_pylist(), source["path"].to_pylist()))
        parts = []
        for spec in layer.split("+"):
            if spec.startswith(FUSE):
                uri, tap = Paths(RunDir(self.cfg.fuse_run)).features("pretrained", "source"), spec[len(FUSE) :]
                parts += [(self.base_paths.features("pretrained", "source"), tap), (uri, tap)]
            else:
                parts.append((self.base_paths.features("pretrained", "source"), spec))
        tables = []
        for uri, tap in parts:
            ids, x, labels = features.read_features(uri, tap, with_labels=True)
            x = l2_normalize(x) if len(parts) > 1 else x  # k-means L2-normalises the joined vector again
            tables.append({i: (v, lab) for i, v, lab in zip(ids, x, labels) if i in paths_of})
        ids = sorted(set.intersection(*[set(t) for t in tables]))
        if not ids:
            raise ConfigError(f"no source item has features for every part of layer {layer!r}")
        x = np.concatenate([np.stack([t[i][0] for i in ids]) for t in tables], axis=1).astype(np.float32)
        table = features.feature_table(
            ids, [paths_of[i] for i in ids], [tables[0][i][1] for i in ids], [""] * len(ids), {"input": x}
        )
        features.write_folder(self.cluster_input(layer), table, {"dim": int(x.shape[1])})
        return {"rows": len(ids), "dim": int(x.shape[1]), "parts": [t for _, t in parts]}

    def _reference_paths(self, model: str) -> SubPaths:
        """Random and pre-trained networks live in the base; their target features in the sweep."""
        paths = SubPaths(self.run, self.run)
        paths.model = lambda name: self.base_paths.model(name)  # type: ignore[method-assign]
        return paths

    # --- per model: target features and probes ------------------------------------------------
    def evaluate(self, run: RunDir, paths: Paths, model: str, stage_prefix: str = "") -> dict:
        job = Job(self.cfg.job, run, paths, pool=self.pool)
        out = {}
        for t, target in self.targets.items():
            for split in names.SPLITS:
                d = names.dataset(t, split)
                run.stage(f"{stage_prefix}extract_{d}", lambda d=d: stage_extract(job, model, d))
            probe = self.cfg.job.probe.model_copy(update={"multi_label": target.multi_label})
            train, test = (
                paths.features(model, names.dataset(t, "train")),
                paths.features(model, names.dataset(t, "test")),
            )
            out[t] = run.stage(
                f"{stage_prefix}probe_{t}", lambda p=probe, a=train, b=test: {"transfer": run_probe(p, a, b)}
            )["transfer"]
            logger.info(
                f"transfer {model} -> {t}: " + ", ".join(f"{l} {100 * v['score']:.1f}%" for l, v in out[t].items())
            )
        return out

    # --- ClusterFit settings and controls -----------------------------------------------------
    def run_setting(self, s: dict) -> dict:
        sub = RunDir(self.run.path("settings", s["name"]))
        paths = SubPaths(sub, self.run)
        job = self.cfg.job.model_copy(deep=True)
        job.cluster.k = s["k"]
        job.retrain = job.retrain.model_copy(update={"epochs": s["epochs"], "model": s["model"]})
        items = read_items(paths.items("source"))

        def cluster() -> dict:
            res = run_cluster(
                job.cluster.model_copy(update={"layer": "input"}), self.cluster_input(s["layer"]), paths.cluster
            )
            return {**res, **cluster_quality(items, read_assignments(paths.cluster))}

        clusters = sub.stage("cluster", self._without_pool(cluster))
        retrain = sub.stage("retrain", self._without_pool(lambda: stage_retrain(Job(job, sub, paths))))
        transfer = self.evaluate(sub, paths, "clusterfit")
        return {
            "kind": "clusterfit",
            **{k: v for k, v in s.items() if k != "model"},
            "model": s["model"].model_dump(),
            "cluster": clusters,
            "train_acc": retrain["history"][-1]["acc"],
            "train_seconds": sum(h["seconds"] for h in retrain["history"]),
            "transfer": transfer,
        }

    def control_epochs(self) -> list[int]:
        """One control budget per retraining budget in the grid, each the same compute: as many images through the
        network, rounded up (in the control's favour). A RotNet epoch shows every image 4 times (its rotations), a
        retraining epoch once."""
        if self.cfg.controls.epochs:
            return [self.cfg.controls.epochs]
        pre = self.base_cfg.pretrain
        task = "labels" if pre.source == "labels" else pre.proxy
        return sorted({same_compute_epochs(e, task) for e in self.cfg.grid.epochs})

    def run_control(self, name: str, epochs: int) -> dict:
        from cf_ray.stages.controls import latest_state, load_teacher, soft_targets
        from cf_ray.train.loop import train_classifier

        sub = RunDir(self.run.path("controls", f"{name}_e{epochs}"))
        paths = SubPaths(sub, self.run)
        base = self.base_cfg
        train_cfg = base.pretrain.train.model_copy(update={"epochs": epochs})
        state = latest_state(self.base_paths.train + "/pretrain")
        keep = read_items(paths.items("source"))["id"]
        # Targets over every base item first, so noisy labels are the very ones pre-training saw.
        items, task, classes, _ = pretrain_targets(base, read_items(self.base_paths.items("source")))
        items = items.filter(pc.is_in(items["id"], keep))

        def train() -> dict:
            if name == "longer_pretrain":
                res = train_classifier(
                    train_cfg,
                    base.media,
                    items,
                    task,
                    classes,
                    paths.train,
                    name,
                    paths.model("clusterfit"),
                    init_from=state,
                )
            else:
                if base.modality != "image":
                    raise ConfigError("the distillation control supports images only")
                teacher = load_teacher(state, base.pretrain.train.model, classes)
                soft = soft_targets(
                    teacher, items.drop_columns(["target"]), base.media, task, self.cfg.controls.temperature
                )
                res = train_classifier(
                    train_cfg,
                    base.media,
                    soft,
                    task,
                    classes,
                    paths.train,
                    name,
                    paths.model("clusterfit"),
                )
            return {"history": res["history"], "items": res["rows"], "from_state": state}

        trained = sub.stage("train", self._without_pool(train))
        transfer = self.evaluate(sub, paths, "clusterfit")
        return {
            "kind": name,
            "name": name,
            "epochs": epochs,
            "task": task,
            "model": train_cfg.model.model_dump(),
            "train_acc": trained["history"][-1]["acc"],
            "train_seconds": sum(h["seconds"] for h in trained["history"]),
            "transfer": transfer,
        }


def seeded_subset(items: pa.Table, n: int | None, seed: int) -> pa.Table:
    if not n or items.num_rows <= n:
        return items
    return items.take(np.sort(np.random.default_rng(seed).choice(items.num_rows, n, replace=False)))


CONTROLS = ("longer_pretrain", "distill")


def controls(sweep: Sweep) -> list[tuple[str, str, int]]:
    """(stage, control, epochs) of every control the sweep's config asks for."""
    return [
        (f"control_{c}_e{e}", c, e) for e in sweep.control_epochs() for c in CONTROLS if getattr(sweep.cfg.controls, c)
    ]


def row_names(sweep: Sweep) -> list[str]:
    """The manifest stages that hold table rows, in table order: this config's settings and controls, then any
    other ones done earlier in the same run directory (a sweep directory accumulates)."""
    rows = [f"setting_{s['name']}" for s in settings(sweep.cfg)] + [stage for stage, _, _ in controls(sweep)]
    done = [
        n
        for n, st in sweep.run.manifest()["stages"].items()
        if n.startswith(("setting_", "control_")) and st.get("status") == "done" and n not in rows
    ]
    return rows + done


def run_sweep(cfg: SweepConfig, report_only: bool = False) -> dict:
    from cf_ray.stages.sweep_report import write_sweep_report

    sweep = Sweep(cfg)
    if not report_only:
        try:
            sweep.prepare()
            grid = settings(cfg)
            # The first setting, then the controls, then the rest: a sweep stopped early still has its baselines.
            for s in grid[:1]:
                sweep.run.stage(f"setting_{s['name']}", lambda s=s: sweep.run_setting(s))
            for stage, c, e in controls(sweep):
                sweep.run.stage(stage, lambda c=c, e=e: sweep.run_control(c, e))
            for s in grid[1:]:
                sweep.run.stage(f"setting_{s['name']}", lambda s=s: sweep.run_setting(s))
        finally:
            sweep.pool.close()
    report = sweep.run.stage("report", lambda: write_sweep_report(sweep, row_names(sweep)), force=True)
    logger.info(f"sweep report: {report['report']}")
    return {"run_dir": sweep.run.root, **report}


def load_sweep_config(path: str | None, overrides: list[str]) -> SweepConfig:
    cfg = load_config(SweepConfig, path, overrides)
    if not cfg.base_run and not cfg.job.data:
        raise ConfigError("no source data: set job.data=<images> (or base_run=<a finished job run directory>)")
    if not cfg.job.transfer_targets():
        raise ConfigError("no transfer target: set job.target=<labelled folder> or job.targets.<name>=<folder>")
    for path in [cfg.base_run, cfg.fuse_run]:
        if path and not os.path.exists(os.path.join(path, "manifest.json")) and "://" not in path:
            if is_seeded_run(path):
                continue  # per-seed runs: run_sweep_seeds picks <path>/seed_<s>, run_sweep refuses it
            raise ConfigError(f"{path} is not a run directory (no manifest.json)")
    return cfg
