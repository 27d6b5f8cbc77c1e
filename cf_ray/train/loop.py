"""Training a backbone + linear head with Ray Train: RotNet pre-training and ClusterFit retraining.

Both are classification over (input, target): RotNet's targets are the rotation of each image or clip
(each seen at 0/90/180/270 degrees), arrow-of-time's whether a clip plays forward or backward, ClusterFit's
the cluster ids. The loop is plain,
single-device PyTorch; Ray Train adds the workers, DDP, checkpoints and restarts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import ray
import torch
from torch import nn

from cf_ray import metrics as cf_metrics
from cf_ray import storage
from cf_ray.config import ImageConfig, TrainConfig, VideoConfig
from cf_ray.media.decode import decoder, normalize
from cf_ray.media.items import items_dataset
from cf_ray.runtime import step_settings, want_gpu, worker_threads
from cf_ray.train.sampling import balance_rates, uniform_over_classes
from cf_ray.train.tasks import Task, get_task

logger = logging.getLogger(__name__)

STATE = "state.pt"
HISTORY = "history.json"
HEAD = "head.pt"  # the classifier head, saved beside backbone.pt (fine-tuned models are evaluated with it)
CLIP_TARGETS = "clip_targets"  # optional items column: a target per extracted clip (train.clips=extracted)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4, crop: bool = True) -> torch.Tensor:
    """Random crop with reflection padding (with ``crop``) and horizontal flip, per sample, the same for every
    frame of a clip; x is (N,3,H,W) or (N,3,T,H,W)."""
    shape = x.shape
    n, h, w = shape[0], shape[-2], shape[-1]
    out = x.reshape(n, -1, h, w).clone()
    if crop:
        xp = nn.functional.pad(out, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        out = torch.stack([xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.reshape(shape)


def pick_clip(
    clips: np.ndarray, target: torch.Tensor, clip_targets: torch.Tensor | None, gen: torch.Generator
) -> tuple[np.ndarray, torch.Tensor]:
    """One clip per video from decoded (N, clips, T, H, W, 3) pixels, drawn per video; its target is that clip's
    own (``clip_targets``, (N, clips)) where given, else the video's. A single decoded clip is taken as is."""
    if clips.shape[1] == 1:
        return clips[:, 0], target if clip_targets is None else clip_targets[:, 0]
    j = torch.randint(0, clips.shape[1], (len(clips),), generator=gen)
    rows = torch.arange(len(clips))
    return clips[rows.numpy(), j.numpy()], target if clip_targets is None else clip_targets[rows, j]


def item_logits(model: nn.Module, x: torch.Tensor, group: int = 1) -> torch.Tensor:
    """Logits per item of inputs ``x`` that hold ``group`` consecutive inputs per item (an item's clips): their
    mean (the head is linear, so it is the head of the item's mean feature, as extraction computes it)."""
    logits = model(x)
    return logits if group == 1 else logits.view(-1, group, logits.shape[-1]).mean(1)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def param_digest(model: nn.Module) -> str:
    """SHA-1 of every parameter's bytes (not buffers: BatchNorm statistics are per rank until DDP broadcasts them)."""
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_optimizer(model: nn.Module, cfg: TrainConfig, peak_lr: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (VISSL's ClusterFit recipe) or AdamW; no weight decay on norms and biases."""
    params_bn = [p for p in model.parameters() if p.ndim <= 1]
    params_w = [p for p in model.parameters() if p.ndim > 1]
    groups = [{"params": params_w, "weight_decay": cfg.weight_decay}, {"params": params_bn, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=peak_lr)
    return torch.optim.SGD(groups, lr=peak_lr, momentum=cfg.momentum, nesterov=True)


def _gather(obj, world: int) -> list:
    """Every rank's ``obj`` on every rank (gloo/nccl process group of Ray Train)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


class _Epoch:
    """One epoch's running totals on one rank."""

    def __init__(self):
        self.t0, self.seen, self.loss_sum, self.correct, self.n_out = time.time(), 0, 0.0, 0, 0
        self.data_wait = 0.0  # seconds the loop waited for its next batch (input pipeline not keeping up)

    def timed(self, batches):
        it = iter(batches)
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            self.data_wait += time.perf_counter() - t
            if batch is None:
                return
            yield batch


@dataclasses.dataclass
class _Worker:
    """What one rank holds for the whole run (built once by ``_build``)."""

    config: dict
    cfg: TrainConfig
    media: ImageConfig | VideoConfig
    task: Task
    column: str  # "image" or "clips"
    rank: int
    world: int
    model: nn.Module  # DDP-wrapped where world > 1
    inner: nn.Module  # the Classifier itself
    device: torch.device
    fmt: torch.memory_format | None
    autocast: object
    opt: torch.optim.Optimizer
    loss_fn: nn.Module
    rates: torch.Tensor | None  # uniform sampling over classes
    steps_per_epoch: int
    peak_lr: float
    start_epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    resumed_from: int | None = None

    @property
    def name(self) -> str:
        return self.config["name"]


def _build(config: dict) -> _Worker:
    """Model, optimizer, loss and resume state of one rank."""
    import ray.train
    import ray.train.torch as rtt

    from cf_ray.models.checkpoint import build

    cfg = TrainConfig.model_validate(config["train"])
    media = (VideoConfig if config["modality"] == "video" else ImageConfig).model_validate(config["media"])
    task, class_weights = get_task(config["task"]), config.get("class_weights")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, config.get("threads") or int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # same initial weights on every rank; DDP also broadcasts them
    net = Classifier(build(cfg.model), config["num_classes"])
    if config.get("init_from"):  # start from a saved classifier (continued pre-training), head included
        net.load_state_dict(_load(config["init_from"])["model"])
    if config.get("init_backbone"):  # fine-tuning: start from a saved backbone folder (the head stays seeded-random)
        from cf_ray.models.checkpoint import load_state_dict

        net.backbone.load_state_dict(load_state_dict(storage.join(config["init_backbone"], "backbone.pt")))
    model = rtt.prepare_model(net)
    device = rtt.get_device()
    column = "clips" if config["modality"] == "video" else "image"
    fmt, autocast = step_settings(cfg.precision, cfg.channels_last, device.type, video=column == "clips")
    if fmt is not None:
        model = model.to(memory_format=fmt)
    peak_lr = cfg.lr * cfg.batch_size * world * task.views / 256  # scaled by the global batch of network inputs
    weight = torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights else None
    w = _Worker(
        config=config,
        cfg=cfg,
        media=media,
        task=task,
        column=column,
        rank=rank,
        world=world,
        model=model,
        inner=model.module if hasattr(model, "module") else model,
        device=device,
        fmt=fmt,
        autocast=autocast,
        opt=build_optimizer(model, cfg, peak_lr),
        loss_fn=nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing),
        rates=torch.tensor(config["draw_rates"], dtype=torch.float32) if config.get("draw_rates") else None,
        steps_per_epoch=max(1, math.ceil(config["rows"] / (cfg.batch_size * world))),
        peak_lr=peak_lr,
    )
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE), map_location=device, weights_only=True)
            w.history = json.load(open(os.path.join(d, HISTORY)))
        w.inner.load_state_dict(state["model"])
        w.opt.load_state_dict(state["opt"])
        w.start_epoch = w.resumed_from = state["epoch"] + 1
        if rank == 0:
            logger.info(f"resuming {w.name} after epoch {w.start_epoch} (from its last checkpoint)")
    return w


def _step(w: _Worker, batch: dict, step: int, gen: torch.Generator, ep: _Epoch) -> None:
    """One optimizer step on one batch of decoded items."""
    pixels, y = batch[w.column].numpy(), batch["target"]
    group = pixels.shape[1] if w.column == "clips" and w.cfg.clips == "all" else 1  # network inputs per item
    if group > 1:
        pixels = pixels.reshape(-1, *pixels.shape[2:])
    elif w.column == "clips":
        pixels, y = pick_clip(pixels, y, batch.get(CLIP_TARGETS), gen)
    x = normalize(pixels, w.media.mean, w.media.std)
    if w.cfg.augment != "none":
        x = augment(x, gen, crop=w.cfg.augment == "crop_flip")
    soft = y.is_floating_point()  # distillation: a probability vector per item (per view for multi-view tasks)
    x, y = w.task.batch(x, y.float() if soft else y.long(), gen)
    x, y = x.to(w.device, non_blocking=True), y.to(w.device, non_blocking=True)
    if w.fmt is not None:
        x = x.contiguous(memory_format=w.fmt)
    total = w.steps_per_epoch * w.cfg.epochs
    for g in w.opt.param_groups:
        g["lr"] = lr_at(min(step, total - 1), total, w.steps_per_epoch * w.cfg.warmup_epochs, w.peak_lr)
    with w.autocast():
        logits = item_logits(w.model, x, group)
        loss = w.loss_fn(logits.float(), y)
    w.opt.zero_grad(set_to_none=True)
    loss.backward()
    w.opt.step()
    ep.seen += len(batch["target"])
    ep.loss_sum += loss.detach().item() * len(y)
    ep.correct += int((logits.argmax(1) == (y.argmax(1) if soft else y)).sum())
    ep.n_out += len(y)


def _end_epoch(w: _Worker, epoch: int, ep: _Epoch) -> None:
    """Every rank's digest and count, the epoch's metrics, rank 0's checkpoint, and the report to Ray Train."""
    import ray.train

    secs = time.time() - ep.t0
    ranks = _gather({"digest": param_digest(w.inner), "seen": ep.seen}, w.world)
    seen = sum(r["seen"] for r in ranks)
    metrics = {
        "epoch": epoch + 1,
        "loss": ep.loss_sum / max(1, ep.n_out),
        "acc": ep.correct / max(1, ep.n_out),
        "items_per_s": seen / max(secs, 1e-9),
        "lr": w.opt.param_groups[0]["lr"],
        "seconds": secs,
        "data_wait_s": ep.data_wait,  # rank 0's
        "rank_digests": [r["digest"] for r in ranks],  # SHA-1 of each rank's parameters: equal under DDP
    }
    if epoch == w.start_epoch and w.resumed_from is not None:
        metrics["resumed_from_epoch"] = w.resumed_from  # the first epoch after a restart or a rerun
    w.history.append(metrics)
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if w.rank == 0:
            state = {"model": w.inner.state_dict(), "opt": w.opt.state_dict(), "epoch": epoch}
            torch.save(state, os.path.join(d, STATE))
            json.dump(w.history, open(os.path.join(d, HISTORY), "w"))
            checkpoint = ray.train.Checkpoint.from_directory(d)
            cf_metrics.train_epoch(w.name, metrics["loss"], metrics["items_per_s"], seen)
            logger.info(
                f"{w.name} epoch {epoch + 1}/{w.cfg.epochs}: loss {metrics['loss']:.4f} "
                f"acc {metrics['acc']:.3f} {metrics['items_per_s']:.0f} items/s"
            )
        ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    from cf_ray import log

    log.setup()
    w = _build(config)
    shard = ray.train.get_dataset_shard("train")
    step_hook, gen, cfg = config.get("step_hook"), torch.Generator(), w.cfg
    for epoch in range(w.start_epoch, cfg.epochs):
        gen.manual_seed(cfg.seed * 100003 + epoch * 1009 + w.rank)
        w.model.train()
        ep, last_print = _Epoch(), time.time()
        step = epoch * w.steps_per_epoch
        batches = shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            local_shuffle_buffer_size=cfg.batch_size * 4,
            local_shuffle_seed=cfg.seed + epoch,
            drop_last=False,
        )
        if w.rates is not None:
            batches = uniform_over_classes(batches, w.rates, gen, cfg.batch_size)
        # Uniform sampling gives ranks unequal numbers of batches; DDP's Join lets the early ones shadow the rest.
        uneven = w.model.join() if w.world > 1 and w.rates is not None else contextlib.nullcontext()
        with uneven:
            for batch in ep.timed(batches):
                _step(w, batch, step, gen, ep)
                step += 1
                if step_hook is not None:
                    step_hook(epoch + 1, step, w.rank)
                if w.rank == 0 and time.time() - last_print > 30:
                    last_print = time.time()
                    done = ep.seen * w.world
                    logger.info(
                        f"{w.name} epoch {epoch + 1}: ~{done}/{config['rows']} items, "
                        f"loss {ep.loss_sum / ep.n_out:.4f}, {done / (last_print - ep.t0):.0f} items/s"
                    )
        _end_epoch(w, epoch, ep)


def _load(uri: str) -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


def save_head(head: nn.Linear, model_uri: str) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in head.state_dict().items()}, buf)
    storage.write_bytes(storage.join(model_uri, HEAD), buf.getvalue())


def load_head(model_uri: str) -> nn.Linear:
    sd = torch.load(
        io.BytesIO(storage.read_bytes(storage.join(model_uri, HEAD))), map_location="cpu", weights_only=True
    )
    head = nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
    head.load_state_dict(sd)
    return head


def ordered_ingest():
    """Ray Train's default ingest options, but blocks reach the workers in the dataset's order."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def training_dataset(
    items: pa.Table, media: ImageConfig | VideoConfig, seed: int, block_rows: int = 2048, clips: str = "random"
) -> tuple[ray.data.Dataset, pa.Table, int]:
    """(dataset of decoded inputs + target, rows that failed to decode, rows).

    Images are decoded once and materialised. Videos stream: each epoch decodes one random clip per
    video again (so clips differ between epochs), or with clips="extracted" / "all" the clips extraction takes
    (``media.num_clips``, uniformly spaced; the step draws one, see ``pick_clip``, or uses all); their undecodable files
    are recorded by extraction. An items column ``clip_targets`` travels with ``target``.
    """
    order = np.random.default_rng(seed).permutation(items.num_rows)  # avoid class-sorted blocks
    if isinstance(media, VideoConfig):
        block_rows = min(block_rows, 64)  # a video block is one decode task: small blocks decode in parallel
    ds = items_dataset(items.take(order), block_rows)
    # Blocks leave decode in item order, not in the order their tasks finish: the same seed then feeds training
    # the same sequence of items on every run (the datasets below share this context).
    ds.context.execution_options.preserve_order = True
    decode, kwargs, column = decoder(media)
    if isinstance(media, VideoConfig):
        if clips == "random":
            kwargs = {**kwargs, "num_clips": 1, "mode": "random", "seed": None}  # else the extracted clips
        ds = ds.map_batches(decode, fn_kwargs=kwargs, batch_size=16, batch_format="numpy")
        keep = [column, "target"] + ([CLIP_TARGETS] if CLIP_TARGETS in items.column_names else [])
        good = ds.filter(expr="error == ''").select_columns(keep)
        return good, pa.table({"id": [], "path": [], "error": []}), items.num_rows
    ds = ds.map_batches(decode, fn_kwargs=kwargs, batch_format="numpy").materialize()
    bad = ds.filter(expr="error != ''").select_columns(["id", "path", "error"]).to_arrow_refs()
    bad = pa.concat_tables([ray.get(r) for r in bad]) if bad else pa.table({"id": [], "path": [], "error": []})
    good = ds.filter(expr="error == ''").select_columns([column, "target"]).materialize()
    return good, bad, good.count()


def train_classifier(
    cfg: TrainConfig,
    media: ImageConfig | VideoConfig,
    items: pa.Table,
    task: str,
    num_classes: int,
    storage_path: str,
    name: str,
    model_uri: str,
    threads: int | None = None,
    step_hook=None,
    init_from: str | None = None,
    init_backbone: str | None = None,
) -> dict:
    """Train on ``items`` (id, path, target) and save the final backbone to ``model_uri``.

    task: rotation / arrow_of_time (proxy targets made on the fly) or labels (``target`` is the class; with
    cfg.sampling=uniform or cfg.class_weighted_loss the classes are balanced, empty ones ignored).
    A float ``target`` (a list per item) is a soft target for distillation: class probabilities, or for
    rotation 4x4 (per rotation of the item, the teacher's probabilities over the 4 rotations), flattened.
    init_from: a training state file (``state.pt`` of a checkpoint) to start from, head included.
    init_backbone: a saved backbone folder to start from (fine-tuning); the head is saved beside the backbone (head.pt).
    threads: torch threads per worker; default: cfg.torch_threads, or if 0 its share of a local Ray's CPUs (its
    cpus_per_worker on a cluster).
    step_hook(epoch, step, rank), if given, runs on every worker after each optimizer step (fault-injection
    tests use it). Returns {history, rows, undecodable, best}.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cf_ray.models.checkpoint import build, save_backbone

    if cfg.clips == "all" and task != "labels":
        raise ValueError(f"train.clips=all needs given targets (task labels), not the {task} proxy")
    balance = None
    if task == "labels" and (cfg.sampling == "uniform" or cfg.class_weighted_loss):
        balance = balance_rates(np.bincount(items["target"].to_numpy(), minlength=num_classes))
    ds, bad, rows = training_dataset(items, media, cfg.seed, clips=cfg.clips)
    ds.set_name(f"{name}_train")  # how the dashboard's Data view names it
    if rows == 0:
        raise ValueError(f"{name}: none of the {items.num_rows} training images could be decoded")
    gpu = want_gpu(cfg.use_gpu)
    if threads is None:
        threads = cfg.torch_threads or worker_threads(cfg.num_workers, cfg.cpus_per_worker)
    logger.info(
        f"{name}: {rows} items ({bad.num_rows} undecodable), task={task}, {num_classes} classes, "
        f"{cfg.num_workers} worker(s) on {'GPU' if gpu else 'CPU'}, {cfg.epochs} epochs"
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "media": media.model_dump(mode="json"),
            "task": task,
            "modality": "video" if isinstance(media, VideoConfig) else "image",
            "num_classes": num_classes,
            "class_weights": balance if cfg.class_weighted_loss else None,
            "draw_rates": balance if cfg.sampling == "uniform" else None,
            "rows": rows,
            "name": name,
            "threads": threads,
            "step_hook": step_hook,
            "init_from": init_from,
            "init_backbone": storage.absolute(init_backbone) if init_backbone else None,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage.absolute(storage_path),
            # Ray keeps the num_to_keep best by the score and always the latest (the resume point).
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute="acc", checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": ds},
        dataset_config=ordered_ingest(),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=True)
        history = json.load(open(os.path.join(d, HISTORY)))
    model = Classifier(build(cfg.model), num_classes)
    model.load_state_dict(state["model"])
    save_backbone(model.backbone, cfg.model, model_uri)
    save_head(model.head, model_uri)
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1]["acc"])
    best = {"epoch": best_metrics["epoch"], "acc": best_metrics["acc"], "checkpoint": best_ckpt.path}
    return {"history": history, "rows": rows, "undecodable": bad, "best": best}
