"""Typed configuration: defaults live here, YAML files and `key=value` overrides only change them.

Every stage receives only its own config. An unknown key or a wrong type is rejected, naming the key,
before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be run; the message says what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @model_validator(mode="before")
    @classmethod
    def _yaml_yes_no(cls, data):
        """YAML reads a bare yes/no as a boolean: give a field whose choices include 'yes' its word back."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and "yes" in getattr(field.annotation, "__args__", ()):
                    data = {**data, key: "yes" if value else "no"}
        return data


class ImageConfig(_Strict):
    """How an image file becomes a network input."""

    size: int = Field(32, gt=0, description="Side of the square crop fed to the network (pixels).")
    resize: int | None = Field(None, gt=0, description="Short side before the centre crop; default: size.")
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="Per-channel mean for normalisation.")
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="Per-channel std for normalisation.")


class VideoConfig(_Strict):
    """How a video file becomes clips: N clips of T frames every `stride` frames, short side resized, centre crop."""

    size: int = Field(112, gt=0, description="Side of the square crop (pixels); the paper uses 112.")
    resize: int | None = Field(None, gt=0, description="Short side before the crop; default: size.")
    clip_len: int = Field(16, gt=0, description="Frames per clip (T).")
    stride: int = Field(2, gt=0, description="Take every stride-th frame of the video's frame grid.")
    num_clips: int = Field(
        4, gt=0, description="Uniformly spaced clips per video for extraction; the video feature is their mean."
    )
    short: Literal["loop", "pad"] = Field(
        "loop", description="Videos shorter than a clip: loop them or repeat the last frame."
    )
    timeout_s: float = Field(
        60.0, gt=0, description="A decode that takes longer is abandoned and the video recorded as skipped."
    )
    mean: tuple[float, float, float] = Field((0.43216, 0.394666, 0.37645), description="Kinetics mean.")
    std: tuple[float, float, float] = Field((0.22803, 0.22145, 0.216989), description="Kinetics std.")


class ModelConfig(_Strict):
    """A backbone from the registry (see `cf_ray.models.list_backbones()`).

    width, stem and midplanes left unset (none) take the architecture's own values, so a name means the published
    network (resnet50 is torchvision's ResNet-50, r2plus1d_18 torchvision's R(2+1)D-18); they are filled in on
    validation, so a saved model.json and a run's config.yaml record the values used."""

    arch: str = Field(
        "resnet_tiny",
        description="Registered backbone name: resnet_tiny, resnet18, resnet50 (images); r2plus1d_tiny, r2plus1d_18, "
        "r2plus1d_34, r2plus1d_34_vmz, r3d_18, mc3_18, r2plus1d_50 (video).",
    )
    width: int | None = Field(
        None,
        gt=0,
        description="Base width (channels of res2); none: the architecture's own (16 for the *_tiny nets, 64 for the "
        "others).",
    )
    stem: Literal["cifar", "imagenet"] | None = Field(
        None,
        description="cifar: 3x3 conv, no max-pool (small images); imagenet: 7x7/2 (+ max-pool for images); none: the "
        "architecture's own (cifar for the *_tiny nets, imagenet for the others).",
    )
    midplanes: Literal["torchvision", "vmz"] | None = Field(
        None,
        description="R(2+1)D-tiny/18/34 only: inner width of the (2+1)D convs, torchvision's M(in, out) once per "
        "block or vmz's per conv (Caffe2 VMZ / IG-65M); none: the architecture's own (vmz for r2plus1d_34_vmz, "
        "torchvision for the others).",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from cf_ray.models import list_backbones

        if v not in list_backbones():
            raise ValueError(f"unknown backbone {v!r}; registered: {', '.join(list_backbones())}")
        return v

    @model_validator(mode="after")
    def _arch_defaults(self) -> "ModelConfig":
        """Unset settings take the architecture's own; a setting the architecture does not have is rejected."""
        from cf_ray.models import arch_defaults

        own = arch_defaults(self.arch)
        for key in ("width", "stem", "midplanes"):
            if getattr(self, key) is None:
                if key in own:
                    object.__setattr__(self, key, own[key])  # not setattr: that would validate again
            elif key not in own:
                raise ValueError(f"{key} does not apply to {self.arch} (its settings: {', '.join(own)})")
        return self


class TrainConfig(_Strict):
    """A Ray Train classification run: RotNet pre-training or ClusterFit retraining."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=0, description="Per-worker batch size.")
    lr: float = Field(0.1, gt=0, description="Peak learning rate for a global batch of 256 (scaled linearly).")
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd",
        description="sgd: SGD with Nesterov momentum; adamw: AdamW, same peak-lr rule (on CPU budgets SGD leaves the "
        "tiny "
        "video nets at chance on the arrow-of-time proxy; AdamW does not).",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (optimizer=sgd).")
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    sampling: Literal["natural", "uniform"] = Field(
        "natural",
        description="Retraining on cluster ids: natural: every item once per epoch; uniform: every non-empty cluster "
        "equally likely (DeepCluster's UnifLabelSampler, drawn on each worker's stream; empty clusters ignored).",
    )
    class_weighted_loss: bool = Field(
        False,
        description="Retraining on cluster ids: weight the cross-entropy by inverse cluster size (the loss-side "
        "equivalent of sampling=uniform; the old key balanced_sampling sets this).",
    )
    clips: Literal["random", "extracted", "all"] = Field(
        "random",
        description="Video: random: one clip at a random position per video and epoch; extracted: one of the "
        "video.num_clips uniformly spaced clips that extraction (and so the clustering) saw, drawn per video and "
        "step, with that clip's own cluster id where the clustering assigned clips (extract.clip_features); all: "
        "every extracted clip, the video's logits the mean over them (the view a video's feature and so its cluster "
        "id come from; num_clips times the compute per video; targets given, not a proxy's).",
    )
    augment: Literal["crop_flip", "flip", "none"] = Field(
        "crop_flip",
        description="Training augmentation, per item (the same for every frame of a clip): crop_flip: random crop "
        "of the 4-pixel reflection-padded input and horizontal flip; flip: the flip only; none.",
    )
    measure_fit: bool = Field(
        False,
        description="Retraining on cluster ids: afterwards, how many items (and clips) the network assigns to their "
        "own cluster when it sees the views that were clustered, un-augmented (one extraction pass over the source; "
        "the training accuracy is measured on augmented views and a changing model).",
    )
    num_workers: int = Field(1, gt=0, description="Ray Train workers.")
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int = Field(
        0,
        ge=0,
        description="Torch threads per worker; 0: its share of a local Ray's CPUs, or cpus_per_worker on a joined "
        "cluster (ray job submit). Set it to get the same numbers from a local run and a submitted one: other "
        "thread counts sum in another order (docs/reproducibility.md).",
    )
    use_gpu: Literal["auto", "yes", "no"] = Field(
        "auto", description="auto: a GPU per worker when the cluster has GPUs."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="bf16: forward pass under bfloat16 autocast (the loss "
        "and the weights stay float32); auto: bf16 on GPU, fp32 on CPU.",
    )
    channels_last: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="Channels-last memory format for weights and inputs "
        "(channels_last_3d for video); auto: on GPU only.",
    )
    max_failures: int = Field(2, ge=-1, description="Worker failures tolerated (restart from the last checkpoint).")
    keep_checkpoints: int = Field(
        2,
        gt=0,
        description="Checkpoints kept under the storage path: this many with the best training accuracy, plus always "
        "the latest (the resume point).",
    )
    seed: int = Field(
        0,
        description="Initial weights, augmentation and the shuffle of items; --seeds s adds s.",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_balanced_sampling(cls, data):
        """Configs written before `sampling` existed: balanced_sampling meant loss weights."""
        if isinstance(data, dict) and "balanced_sampling" in data:
            data = dict(data)
            data.setdefault("class_weighted_loss", data.pop("balanced_sampling"))
        return data


class PretrainConfig(_Strict):
    """Where the pre-trained network comes from."""

    source: Literal["rotnet", "labels", "checkpoint", "torchvision"] = Field(
        "rotnet",
        description="rotnet: self-supervised pre-training here (task: pretrain.proxy); labels: weakly supervised "
        "pre-training on the source's class-folder labels (the only mode that reads them), "
        "pretrain.label_noise of them "
        "flipped; checkpoint: a weight file (pretrain.checkpoint, layout pretrain.checkpoint_format); torchvision: "
        "torchvision's published weights for pretrain.train.model.arch (resnet18, resnet50, r2plus1d_18, r3d_18, "
        "mc3_18) from the local torch hub cache ($TORCH_HOME/hub/checkpoints); never downloaded.",
    )
    label_noise: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="source=labels: this fraction of the source labels, drawn with seed, is replaced by a "
        "different class drawn uniformly (the weakly supervised setting).",
    )
    proxy: Literal["rotation", "arrow_of_time"] = Field(
        "rotation",
        description="Self-supervised task for source=rotnet: rotation (RotNet; 3D RotNet on clips) or arrow_of_time "
        "(video: forward vs backward).",
    )
    checkpoint: str | None = Field(
        None,
        description="source=checkpoint: path or URI of the weight file (a bare file name is also looked up in the "
        "torch hub cache's checkpoints folder).",
    )
    checkpoint_format: Literal["auto", "torchvision", "pytorchvideo", "vmz"] = Field(
        "auto",
        description="source=checkpoint: the file's layout. torchvision: a torchvision/cf_ray state_dict (any "
        "backbone); pytorchvideo: pytorchvideo's r2plus1d_r50 checkpoint (model_state, blocks.N; arch r2plus1d_50); "
        "vmz: a VMZ / IG-65M R(2+1)D-34 .pth (Caffe2 mid-planes; arch r2plus1d_34_vmz); auto: told from its keys.",
    )
    weights: str = Field(
        "DEFAULT",
        description="source=torchvision: torchvision's weights name, e.g. IMAGENET1K_V1 (resnet50's older recipe); "
        "DEFAULT: torchvision's default (IMAGENET1K_V2 for resnet50, KINETICS400_V1 for the video nets).",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _checkpoint_given(self) -> "PretrainConfig":
        if self.source == "checkpoint" and not self.checkpoint:
            raise ValueError("pretrain.source=checkpoint needs pretrain.checkpoint=<path to state_dict>")
        if self.label_noise and self.source != "labels":
            raise ValueError("pretrain.label_noise applies only to pretrain.source=labels")
        return self


class ExtractConfig(_Strict):
    """Ray Data feature extraction into Parquet."""

    layers: list[str] = Field(
        ["res3", "res4", "res5"], min_length=1, description="Feature taps, globally average-pooled."
    )
    batch_size: int = Field(256, gt=0)
    block_rows: int = Field(2048, gt=0, description="Rows per Ray Data block (and per output file).")
    num_actors: int = Field(
        0,
        ge=0,
        description="Actor pool size; 0 (auto): one actor per GPU where the cluster has GPUs, else as many as "
        "its CPUs take (one CPU left for decode tasks when decode=tasks).",
    )
    cpus_per_actor: float = Field(1.0, gt=0)
    decode: Literal["auto", "actors", "tasks"] = Field(
        "auto",
        description="Where inputs are decoded: actors = in each extraction actor (a thread decodes the next batch "
        "while the network runs); tasks = Ray Data tasks on any node's CPUs feed decoded pixels to the actors; "
        "auto: actors on CPU, tasks on GPU.",
    )
    torch_threads: int = Field(0, ge=0, description="intra-op threads per actor; 0 = cpus_per_actor.")
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="bf16: forward passes under bfloat16 autocast "
        "(features are written as float32); auto: bf16 on GPU, fp32 on CPU.",
    )
    channels_last: Literal["auto", "yes", "no"] = Field(
        "auto", description="Channels-last weights and inputs (channels_last_3d for video); auto: on GPU only."
    )
    clip_features: bool = Field(
        False,
        description="Video: also keep every clip's feature (clipfeat_<tap>, clips x dim per video) next to "
        "the per-video mean (feat_<tap>).",
    )


class ClusterConfig(_Strict):
    """k-means over extracted features."""

    k: int = Field(100, gt=0, description="Number of clusters (VISSL's ImageNet default is 16000).")
    layer: str = Field("res5", description="Which extracted feature column to cluster.")
    niter: int = Field(20, gt=0)
    seed: int = Field(1234, description="k-means initialisation and sampling; --seeds s adds s.")
    l2_normalize: bool = True
    pca_dim: int | None = Field(
        None, gt=0, description="PCA-whiten to this many dims after L2 (VISSL order); none: off."
    )
    max_points_per_centroid: int = Field(
        10_000_000,
        gt=0,
        description="Train on at most k times this many rows (a seeded sample, as faiss does), then assign every row; "
        "large = use all rows.",
    )
    backend: Literal["faiss", "ray"] = Field(
        "faiss",
        description="faiss: faiss.Kmeans on all rows in one Ray task (not in the driver); ray: rows sharded over "
        "Ray actors (cf_ray.kmeans.distributed).",
    )
    use_gpu: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="One GPU for the faiss task / each shard actor: auto where the cluster has GPUs now, yes (asks "
        "the autoscaler), no. faiss runs on it only if that node's faiss build has GPU support (else on its CPU); "
        "stats.json records the device.",
    )
    num_actors: int = Field(2, gt=0, description="backend=ray: shard actors (at most one per feature file).")
    cpus_per_actor: float = Field(
        1, gt=0, description="CPUs of the faiss task (backend=faiss) or of each shard actor (ray); also faiss threads."
    )
    tol: float = Field(
        0.0, ge=0, description="backend=ray: stop when the objective changes by less than this fraction; 0: run niter."
    )
    init: Literal["random", "kmeans++"] = Field(
        "random", description="backend=ray: k seeded random rows, or k-means++ on a seeded sample of 20*k rows."
    )
    spherical: bool = Field(
        False, description="backend=ray: inner-product assignment and unit-norm centroids (faiss spherical)."
    )


class ProbeConfig(_Strict):
    """Linear probes on frozen features (transfer)."""

    layers: list[str] = Field(["res3", "res4", "res5"], min_length=1)
    weight_decays: list[float] = Field(
        [1e-5, 1e-4, 1e-3, 1e-2], min_length=1, description="Grid; the best on a held-out part of train is kept."
    )
    epochs: int = Field(100, gt=0, description="Full-batch L-BFGS steps.")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.3, gt=0, lt=1, description="Used only when the target has no test split.")
    test_split: Literal["auto", "test", "val", "validation"] = Field(
        "auto",
        description="Which folder next to the target's train/ is its test split; auto: the only one of test/, val/, "
        "validation/ (a target with several is rejected until this picks one). Per target: "
        "targets.<name>.test_split.",
    )
    multi_label: bool = Field(
        False,
        description="The target's items carry several labels (label column 'a|b', see label_sep): "
        "one-vs-rest probes scored by mAP (the paper's VOC07 setting) instead of top-1.",
    )
    label_sep: str = Field("|", min_length=1, description="Separator of the labels of one item (multi_label).")
    finetune: bool = Field(
        False,
        description="Also fine-tune each whole network (random, pretrained, clusterfit) on the target's "
        "train split as a Ray Train job and report its test top-1 next to the probes (single-label targets).",
    )
    finetune_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=5, lr=0.02, warmup_epochs=0),
        description="The fine-tuning run (finetune=true); its model section is ignored: each backbone keeps its own.",
    )
    seed: int = Field(
        0, description="The held-out part of train that picks the weight decay, and the probes' init; --seeds s adds s."
    )

    @model_validator(mode="after")
    def _finetune_single_label(self) -> "ProbeConfig":
        if self.finetune and self.multi_label:
            raise ValueError(
                "probe.finetune supports single-label targets only; set probe.finetune=false for multi_label"
            )
        return self


class IndexConfig(_Strict):
    """Nearest-neighbour index over embeddings (`cf-ray index`), built with faiss as a Ray task."""

    kind: Literal["auto", "flat", "ivf", "ivfpq"] = Field(
        "auto",
        description="flat: exact search; ivf: inverted lists (IVF-Flat); ivfpq: IVF with product-quantised vectors; "
        "auto: flat up to flat_max rows, ivf up to pq_min, ivfpq above.",
    )
    flat_max: int = Field(100_000, gt=0, description="auto: exact (flat) search up to this many rows.")
    pq_min: int = Field(2_000_000, gt=0, description="auto: IVF-PQ from this many rows on (memory: pq_m bytes a row).")
    metric: Literal["cosine", "l2"] = Field(
        "cosine", description="cosine: L2-normalise, then inner product (higher = closer); l2: squared L2 distance."
    )
    nlist: int | None = Field(
        None, gt=0, description="IVF lists; default 4*sqrt(rows), at most rows/39 (faiss's minimum training rows)."
    )
    nprobe: int = Field(32, gt=0, description="IVF lists visited per query (recall against speed).")
    pq_m: int = Field(16, gt=0, description="IVF-PQ sub-quantisers (bytes per vector); must divide the dimension.")
    pq_nbits: int = Field(8, gt=0, le=16, description="Bits per sub-quantiser code.")
    train_size: int = Field(
        256_000, gt=0, description="IVF: rows (a seeded sample) its coarse k-means and PQ codebooks train on."
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs of the Ray task that builds the index (and faiss's threads).")
    use_gpu: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="Build on a GPU where the cluster has one and faiss has GPU support (stored as a CPU index).",
    )
    seed: int = 0


class RayConfig(_Strict):
    """A local Ray started by the job (ignored when RAY_ADDRESS points at a cluster)."""

    num_cpus: int | None = Field(None, gt=0, description="default: all cores")
    object_store_mb: int = Field(1024, gt=50)
    dashboard: bool = Field(
        True, description="Start the local Ray's dashboard (127.0.0.1, 8265 or the next free port); false: none."
    )


class TargetConfig(_Strict):
    """One labelled transfer target."""

    path: str = Field(
        ...,
        min_length=1,
        description="A folder with train/ and test/ (or val/, validation/), or one labelled folder/manifest (split "
        "deterministically).",
    )
    multi_label: bool | None = Field(
        None, description="Several labels per item, scored by mAP; default: probe.multi_label."
    )
    test_split: Literal["auto", "test", "val", "validation"] | None = Field(
        None, description="The folder next to train/ to test on; default: probe.test_split."
    )


TARGET_NAME = r"^[A-Za-z][A-Za-z0-9_-]*$"


class JobConfig(_Strict):
    """The whole ClusterFit job, for images or video."""

    modality: Literal["image", "video"] = Field(
        "image", description="video: inputs are video files and backbones default to r2plus1d_tiny."
    )
    run_dir: str = Field("runs/image", description="Path or URI of the run directory.")
    data: str = Field(
        "", description="Images to pre-train and cluster on (folder or manifest); labels, if any, are ignored."
    )
    data_limit: int | None = Field(
        None, gt=0, description="Use a seeded random subset of this many source items (VISSL's DATA_LIMIT); none: all."
    )
    target: str = Field(
        "",
        description="Labelled target for transfer: a folder with train/ and test/ (or val/, validation/; see "
        "probe.test_split), or one labelled folder/manifest "
        "(split deterministically).",
    )
    targets: dict[str, TargetConfig] = Field(
        {},
        description="More transfer targets in the same job, name -> folder (or -> {path, multi_label, test_split}), "
        "e.g. targets.flowers=../shared/data/flowers; each gets its own probes, table and plot. "
        "`target`, if set, is the one named 'target'.",
    )
    seed: int = Field(
        0,
        description="The random-init network, the data_limit subset, the train/test split of a target without one, "
        "label noise. --seeds 0,1,2 runs the job once per seed s in <run_dir>/seed_<s>, adding s to this and every "
        "other seed field (docs/reproducibility.md).",
    )
    image: ImageConfig = Field(default_factory=ImageConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    retrain: TrainConfig = Field(default_factory=TrainConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    index: IndexConfig = Field(default_factory=IndexConfig, description="`cf-ray index`: the search index.")
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="before")
    @classmethod
    def _video_model_defaults(cls, data):
        """For video, backbones not named explicitly default to the CPU-sized R(2+1)D."""
        if isinstance(data, dict) and data.get("modality") == "video":
            for path in (("pretrain", "train", "model"), ("retrain", "model")):
                node = data
                for k in path:
                    node = node.setdefault(k, {}) if isinstance(node, dict) else {}
                if isinstance(node, dict):
                    node.setdefault("arch", "r2plus1d_tiny")
        return data

    @field_validator("targets", mode="before")
    @classmethod
    def _target_paths(cls, value):
        """``name: path`` is short for ``name: {path: path}``."""
        if isinstance(value, dict):
            return {k: {"path": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _target_names(self) -> "JobConfig":
        import re

        bad = [n for n in self.targets if not re.match(TARGET_NAME, n)]
        if bad:
            raise ValueError(f"target names {bad} must start with a letter and hold only letters, digits, _ and -")
        if self.target and "target" in self.targets:
            raise ValueError("both target and targets.target are set; give the second target another name")
        multi = [n for n, t in self.transfer_targets().items() if t.multi_label]
        if self.probe.finetune and multi:
            raise ValueError(f"probe.finetune supports single-label targets only, but {multi} are multi_label")
        return self

    def transfer_targets(self) -> dict[str, TargetConfig]:
        """Every transfer target by name, with multi_label resolved: `target` first (as 'target'), then `targets`."""
        named = ({"target": TargetConfig(path=self.target)} if self.target else {}) | self.targets
        return {
            n: t.model_copy(
                update={
                    "multi_label": self.probe.multi_label if t.multi_label is None else t.multi_label,
                    "test_split": t.test_split or self.probe.test_split,
                }
            )
            for n, t in named.items()
        }

    @property
    def media(self) -> "ImageConfig | VideoConfig":
        return self.video if self.modality == "video" else self.image

    @model_validator(mode="after")
    def _models_match_modality(self) -> "JobConfig":
        from cf_ray.models import backbone_modality

        for key, m in (("pretrain.train.model", self.pretrain.train.model), ("retrain.model", self.retrain.model)):
            kind = backbone_modality(m.arch)
            if kind != self.modality:
                raise ValueError(f"{key}.arch={m.arch} is a {kind} backbone but modality={self.modality}")
        return self

    @model_validator(mode="after")
    def _proxy_fits_modality(self) -> "JobConfig":
        if self.pretrain.proxy == "arrow_of_time" and self.modality != "video":
            raise ValueError("pretrain.proxy=arrow_of_time needs modality=video (images have no time)")
        return self

    @model_validator(mode="after")
    def _layers_extracted(self) -> "JobConfig":
        missing = [l for l in [self.cluster.layer, *self.probe.layers] if l not in self.extract.layers]
        if missing:
            raise ValueError(
                f"layers {missing} are used by cluster/probe but not in extract.layers={self.extract.layers}"
            )
        return self


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. cluster.k=500)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote it or fix it") from None
    return key.strip().split("."), value


def _set(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {k} is not a section")
    node[keys[-1]] = value


def packaged_configs() -> list[str]:
    """Names of the configs shipped inside the package (cf_ray/configs/*.yaml)."""
    from importlib.resources import files

    return sorted(p.name for p in files("cf_ray").joinpath("configs").iterdir() if p.name.endswith(".yaml"))


def packaged_config(name: str) -> str:
    """Path of a config shipped in the package, e.g. ``packaged_config("image_demo.yaml")``."""
    from importlib.resources import files

    if name not in packaged_configs():
        raise ConfigError(f"no packaged config {name!r}; there are: {', '.join(packaged_configs())}")
    return str(files("cf_ray").joinpath("configs", name))


def read_config_file(path: str | Path) -> tuple[str, str]:
    """(name for messages, text) of a config: a file, or else, for a bare name (no folder in it) such as
    ``image_demo.yaml`` or ``image_demo``, the config of that name shipped in the package."""
    from importlib.resources import files

    p = Path(path)
    if not p.is_file():
        name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
        shipped = packaged_configs()
        if p.exists():
            raise ConfigError(f"config file {p} is not a file")
        if str(path) != p.name or name not in shipped:
            moved = " (configs/ moved into the package: pass the bare name)" if p.parent.name == "configs" else ""
            raise ConfigError(
                f"config file {p} does not exist{moved}; a bare name picks a packaged config: {', '.join(shipped)}"
            )
        source = files("cf_ray").joinpath("configs", name)
        return str(source), source.read_text(encoding="utf-8")
    try:
        return str(p), p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read ({e.strerror})") from None


def _where(name: str, mark) -> str:
    return f"{name}:{mark.line + 1}:{mark.column + 1}"


def parse_yaml(text: str, name: str) -> tuple[Any, dict[tuple, tuple]]:
    """(data, {key path: (key mark, value mark)}) of a YAML document. Syntax errors and duplicate keys raise a
    one-line ConfigError naming ``name``, line and column."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = _where(name, mark) if mark is not None else name
        problem = " ".join(str(e.problem or e.context or "cannot parse").split())
        context = ""
        if e.context and e.problem and e.context_mark is not None:
            context = f" ({' '.join(e.context.split())} at {e.context_mark.line + 1}:{e.context_mark.column + 1})"
        hint = "; indent with spaces, YAML does not allow tabs" if "\\t" in problem else ""
        raise ConfigError(f"{where}: YAML syntax error: {problem}{context}{hint}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: YAML error: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()
    marks: dict[tuple, tuple] = {}

    def walk(n, path: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
                    continue
                key = path + (k.value,)
                if key in marks:
                    first = marks[key][0]
                    raise ConfigError(
                        f"{_where(name, k.start_mark)}: duplicate key {'.'.join(key)} (first at line "
                        f"{first.line + 1}); YAML would keep only the last"
                    )
                marks[key] = (k.start_mark, v.start_mark)
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                marks[path + (str(i),)] = (v.start_mark, v.start_mark)
                walk(v, path + (str(i),))

    walk(node, ())
    return data, marks


def load_config(cls: type[BaseModel], path: str | Path | None = None, overrides: list[str] = ()) -> BaseModel:
    """Defaults <- YAML file <- dotted overrides. Raises a one-line ConfigError naming the bad key and where it
    was set: the file with line and column, or the override."""
    tree: dict = {}
    name, marks = "", {}
    if path:
        name, text = read_config_file(path)
        tree, marks = parse_yaml(text, name)
        tree = {} if tree is None else tree
        if not isinstance(tree, dict):
            raise ConfigError(f"{name}:1:1: a config file must hold a mapping (key: value) at the top level")
    set_by: dict[tuple, str] = {}
    for item in overrides:
        keys, value = parse_override(item)
        _set(tree, keys, value)
        set_by[tuple(keys)] = item
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(str(x) for x in err["loc"])
            key = ".".join(loc) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else " ".join(err["msg"].split())
            where = ""
            for n in range(len(loc), 0, -1):
                if loc[:n] in set_by:
                    where = f"override {set_by[loc[:n]]}: "
                    break
                if loc[:n] in marks:
                    key_mark, value_mark = marks[loc[:n]]
                    use_key = err["type"] == "extra_forbidden" or n < len(loc)
                    where = _where(name, key_mark if use_key else value_mark) + ": "
                    break
            problems.append(f"{where}{key}: {msg}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def load_section(
    cls: type[BaseModel], section: str, base: dict | None, overrides: Iterable[str] = (), fixed: dict | None = None
) -> BaseModel:
    """One section's config (e.g. ``extract`` or ``index``) from ``base`` (a run's saved values) and
    ``<section>.<key>=<value>`` overrides; ``fixed`` keys win. Raises ConfigError naming the bad key."""
    tree = dict(base or {})
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] != section or len(keys) != 2:
            raise ConfigError(f"this command takes {section}.<key>=<value> overrides only, not {item!r}")
        tree[keys[1]] = value
    try:
        return cls.model_validate({**tree, **(fixed or {})})
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{section}.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- online service (cf_ray.serve)


class ReplicaConfig(_Strict):
    """One Ray Serve deployment: what each replica reserves and how many replicas run."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica (also the model's torch threads).")
    use_gpu: Literal["auto", "yes", "no"] = Field(
        "no",
        description="A GPU per replica: yes; auto: only when the cluster has GPUs when the app is built; "
        "no. Only the model deployment runs on a GPU.",
    )
    min_replicas: int = Field(1, ge=0, description="Autoscaling floor (0: scale to zero, cold starts).")
    max_replicas: int = Field(1, gt=0, description="Autoscaling ceiling; the cluster autoscaler must supply nodes.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Autoscaling target: queued + running requests per replica."
    )
    max_ongoing_requests: int = Field(
        32, gt=0, description="Requests one replica takes at once (the model's must exceed max_batch_size)."
    )

    @model_validator(mode="after")
    def _min_le_max(self) -> "ReplicaConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}")
        return self


class ServeConfig(_Strict):
    """The online service: `serve run cf_ray.serve:app run_dir=runs/x [key=value ...]`."""

    run_dir: str = Field(..., min_length=1, description="Run directory (path or URI) whose model is served.")
    more_run_dirs: list[str] = Field(
        [],
        description="Runs of the other modality served by the same ingress (one image run and one video run at most); "
        "each request goes to the model of its input's kind.",
    )
    which: Literal["clusterfit", "pretrained"] = Field("clusterfit", description="Which network of the run to serve.")
    centroids: Literal["auto", "run", "own", "none"] = Field(
        "auto",
        description="Centroids for /v1/assign (cf_ray.load_model): run: the run's k-means (pre-trained features); "
        "own: a k-means of the served network's own features (cf-ray embed builds it); auto: whichever fits.",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Forward passes under bf16 autocast (auto: on GPU) or fp32; embeddings are float32."
    )
    layer: str | None = Field(None, description="Default tap for /v1/embed; none: the run's cluster.layer.")
    index: str | None = Field(
        None,
        description="A faiss index folder (cf-ray index) for /v1/search; none: an exact index over the run's "
        "extracted features of the served network, built when the model replica starts.",
    )
    max_body_mb: float = Field(20.0, gt=0, description="Largest request body; a bigger one gets 413.")
    max_video_s: float = Field(60.0, gt=0, description="Longest video accepted; a longer one gets 422.")
    request_timeout_s: float = Field(
        30.0, gt=0, description="A request not answered by then gets 504 and is cancelled (a client may ask for less)."
    )
    allow_uris: bool = Field(
        False, description='Accept {"uri": ...} JSON bodies read by the replica; default: bytes only.'
    )
    uri_prefixes: list[str] = Field(
        [], description="allow_uris: the only URI prefixes read (e.g. s3://bucket/public/); empty: none."
    )
    max_k: int = Field(100, gt=0, description="Most neighbours /v1/search returns.")
    max_batch_size: int = Field(16, gt=0, description="Model deployment: @serve.batch max batch size.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="Model deployment: how long a batch waits for more items after its first."
    )
    model: ReplicaConfig = Field(
        default_factory=lambda: ReplicaConfig(use_gpu="auto", max_ongoing_requests=64),
        description="The model deployment (@serve.batch; a GPU per replica with use_gpu).",
    )
    decoder: ReplicaConfig = Field(
        default_factory=lambda: ReplicaConfig(num_cpus=0.5, max_ongoing_requests=8),
        description="The decoding deployment (CPU only; decodes run in threads, so a replica may use more than its "
        "reservation).",
    )
    ingress: ReplicaConfig = Field(
        default_factory=lambda: ReplicaConfig(num_cpus=0, max_ongoing_requests=256, target_ongoing_requests=64),
        description="The HTTP ingress (FastAPI; waits on the others, little CPU of its own).",
    )

    @model_validator(mode="before")
    @classmethod
    def _dotted_keys(cls, data):
        """`serve run` passes flat strings: `model.max_replicas=4` becomes nested and YAML-typed, as in jobs."""
        if isinstance(data, dict) and any("." in str(k) for k in data):
            tree: dict = {}
            for k, v in data.items():
                keys = str(k).split(".")
                _set(tree, keys, yaml.safe_load(v) if isinstance(v, str) and len(keys) > 1 else v)
            data = tree
        return data

    @field_validator("more_run_dirs", "uri_prefixes", mode="before")
    @classmethod
    def _yaml_list(cls, value):
        """`serve run ... more_run_dirs=[runs/v]` arrives as a string."""
        return yaml.safe_load(value) if isinstance(value, str) and value.startswith("[") else value

    @model_validator(mode="after")
    def _batches_can_fill(self) -> "ServeConfig":
        if self.model.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"model.max_ongoing_requests={self.model.max_ongoing_requests} is below max_batch_size="
                f"{self.max_batch_size}: batches could never fill; raise model.max_ongoing_requests"
            )
        if self.decoder.use_gpu != "no" or self.ingress.use_gpu != "no":
            raise ValueError("only the model deployment runs on a GPU: set decoder.use_gpu=no and ingress.use_gpu=no")
        return self
