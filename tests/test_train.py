"""Ray Train training on tiny real images: checkpoints, resume, 2 DDP workers, a killed worker."""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

# Hooks defined here travel to the Ray Train workers by value (tests/ is not importable there).
import ray.cloudpickle  # noqa: E402
import torch

from cf_ray.config import ImageConfig, ModelConfig, TrainConfig
from cf_ray.demo import make_image_demo
from cf_ray.models.checkpoint import build, load_backbone
from cf_ray.sources import list_items
from cf_ray.train.loop import Classifier, param_digest, train_classifier

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FailOnce:
    """Step hook: in ``epoch`` on ``rank``, fail once (``exit``: the worker process dies; ``raise``: an error).

    It first waits until the controller has registered a checkpoint (its snapshot file exists): Ray Train
    collects reports on its 2-s health-check poll, and a crash within those 2 s of a report would lose
    it, which real epochs (minutes) never see but these 0.2-s ones would."""

    def __init__(self, marker: Path, epoch: int, how: str, run_dir: Path, rank: int = 0):
        self.marker, self.epoch, self.how, self.rank = str(marker), epoch, how, rank
        self.snapshot = str(run_dir / "checkpoint_manager_snapshot.json")

    def __call__(self, epoch: int, step: int, rank: int) -> None:
        if epoch == self.epoch and rank == self.rank and not os.path.exists(self.marker):
            deadline = time.time() + 60
            while not os.path.exists(self.snapshot) and time.time() < deadline:
                time.sleep(0.2)
            Path(self.marker).write_text(f"failed in epoch {epoch} step {step}")
            if self.how == "exit":
                os._exit(1)
            raise RuntimeError("injected failure")


@pytest.fixture(scope="module")
def labelled_items(tmp_path_factory):
    """60 real 16x16 JPEGs of 6 shape classes, target = class index."""
    data = make_image_demo(tmp_path_factory.mktemp("train") / "data", n_per_class=10, size=16)
    items, _ = list_items(str(data))
    classes = sorted(set(items["label"].to_pylist()))
    return items.append_column("target", pa.array([classes.index(l) for l in items["label"].to_pylist()], pa.int64()))


def _kw(items, tmp_path, name, **extra):
    return dict(
        media=ImageConfig(size=16),
        items=items,
        task="labels",
        num_classes=6,
        storage_path=str(tmp_path / "train"),
        name=name,
        model_uri=str(tmp_path / name / "model"),
        **extra,
    )


def test_resumed_run_ends_like_an_uninterrupted_one(ray_session, labelled_items, tmp_path):
    cfg = TrainConfig(model=ModelConfig(width=8), epochs=2, batch_size=16, warmup_epochs=0, keep_checkpoints=1, seed=3)
    full = train_classifier(cfg, **_kw(labelled_items, tmp_path, "full"))
    assert [h["epoch"] for h in full["history"]] == [1, 2] and full["rows"] == 60
    assert all("resumed_from_epoch" not in h for h in full["history"])

    # The same job fails in epoch 2 (no retries left), then is rerun with the same name: it resumes after epoch 1.
    marker = tmp_path / "failed"
    with pytest.raises(Exception, match="injected failure"):
        train_classifier(
            cfg.model_copy(update={"max_failures": 0}),
            **_kw(labelled_items, tmp_path, "cut", step_hook=FailOnce(marker, 2, "raise", tmp_path / "train" / "cut")),
        )
    assert marker.exists()
    resumed = train_classifier(cfg, **_kw(labelled_items, tmp_path, "cut"))
    h, f = resumed["history"], full["history"]
    assert [x["epoch"] for x in h] == [1, 2] and h[1]["resumed_from_epoch"] == 1
    assert h[0]["rank_digests"] == f[0]["rank_digests"]  # same seed, same data order: bit-identical epoch 1
    assert h[1]["loss"] == pytest.approx(f[1]["loss"], rel=1e-3) and h[1]["acc"] == pytest.approx(f[1]["acc"], abs=0.02)

    # The saved backbone is the last epoch's weights; the run keeps the best and the latest checkpoints only.
    model, mcfg = load_backbone(str(tmp_path / "cut" / "model"))
    assert mcfg.width == 8
    ref = Classifier(model, 6)
    assert param_digest(ref.backbone) == param_digest(load_backbone(str(tmp_path / "full" / "model"))[0])
    run = tmp_path / "train" / "cut"
    assert json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    kept = sorted(p.name for p in run.glob("checkpoint_*"))
    assert 1 <= len(kept) <= 2, kept
    assert resumed["best"]["acc"] == max(x["acc"] for x in h)


def test_two_workers_stay_in_sync_and_survive_a_killed_worker(ray_session, labelled_items, tmp_path):
    # Heavily imbalanced labels + uniform sampling: ranks get unequal numbers of batches (DDP Join).
    t = labelled_items["target"].to_numpy().copy()
    t[t < 4] = 0
    items = labelled_items.set_column(labelled_items.schema.get_field_index("target"), "target", pa.array(t))
    cfg = TrainConfig(
        model=ModelConfig(width=8),
        epochs=3,
        batch_size=8,
        warmup_epochs=0,
        num_workers=2,
        cpus_per_worker=0.5,
        max_failures=1,
        sampling="uniform",
        seed=1,
    )
    marker = tmp_path / "killed"
    res = train_classifier(
        cfg, **_kw(items, tmp_path, "ddp", step_hook=FailOnce(marker, 2, "exit", tmp_path / "train" / "ddp", rank=1))
    )
    assert marker.exists(), "the worker was never killed"
    h = res["history"]
    assert [x["epoch"] for x in h] == [1, 2, 3]
    assert h[1]["resumed_from_epoch"] == 1  # epoch 2 restarted from the epoch-1 checkpoint on a new worker group
    torch.manual_seed(cfg.seed)
    init = param_digest(Classifier(build(cfg.model), 6))
    for x in h:
        assert len(x["rank_digests"]) == 2 and x["rank_digests"][0] == x["rank_digests"][1], x["rank_digests"]
        assert x["rank_digests"][0] != init
    assert len({x["rank_digests"][0] for x in h}) == 3  # the weights moved every epoch
    saved, _ = load_backbone(str(tmp_path / "ddp" / "model"))
    assert np.isfinite(h[-1]["loss"]) and h[-1]["items_per_s"] > 0
    assert all(torch.isfinite(p).all() for p in saved.parameters())
