"""Training tasks: how a batch of (inputs, targets) becomes what the network sees and must predict.

One registry holds them all. ``labels`` trains on given targets (class labels, ClusterFit's cluster ids, or a
teacher's soft targets); the self-supervised pre-training proxies make their targets on the fly. A task knows
its classes, how many network inputs it makes of one item (``views``: RotNet's 4 rotations; the same-compute
controls and the learning-rate scaling count them), its modalities, and the soft targets a teacher gives it
(distillation). A new proxy is one ``register_task(Task(...))`` here plus its name in
``PretrainConfig.proxy`` (cf_ray/config.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Task:
    name: str
    num_classes: int | None  # None: given by the data (labels, clusters)
    views: int  # network inputs made of one item
    modalities: tuple[str, ...]
    make_inputs: Callable[[torch.Tensor, torch.Tensor, torch.Generator], Batch]  # (x, hard y, gen) -> (x', y')

    def batch(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Batch:
        """Network inputs and targets for items ``x`` with targets ``y``: class indices, or soft targets (float,
        ``views * classes`` values per item, view-major) from ``teacher_targets``."""
        if not y.is_floating_point():
            return self.make_inputs(x, y, gen)
        x2, _ = self.make_inputs(x, torch.zeros(len(x), dtype=torch.long), gen)
        classes = y.shape[1] // self.views
        return x2, torch.cat(list(y.view(len(y), self.views, classes).unbind(1)))

    def teacher_targets(self, teacher: Callable, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """The teacher's softmax(logits / temperature) for every view of every item of ``x`` (un-augmented,
        deterministic views), as (items, views * classes), view-major: ``batch`` reads it back."""
        if self.views == 1:
            return torch.softmax(teacher(x) / temperature, 1)
        xv, _ = self.make_inputs(x, torch.zeros(len(x), dtype=torch.long), None)
        p = torch.softmax(teacher(xv) / temperature, 1)
        return p.view(self.views, len(x), -1).transpose(0, 1).reshape(len(x), -1)


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown training task {name!r}; registered: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def same_compute_epochs(epochs: int, task: str) -> int:
    """Epochs of ``task`` that put as many images through the network as ``epochs`` one-view epochs (ClusterFit
    retraining), rounded up in the task's favour: a RotNet epoch shows every image 4 times."""
    return math.ceil(epochs / get_task(task).views)


def proxy_tasks() -> list[str]:
    """The self-supervised pre-training proxies (every task that makes its own targets)."""
    return sorted(n for n, t in TASKS.items() if t.num_classes is not None)


def rotate4(x: torch.Tensor, y: torch.Tensor | None = None, gen=None) -> Batch:
    """RotNet input: each image (or every frame of each clip) at 0, 90, 180, 270 degrees, targets 0..3."""
    xs = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
    ys = torch.arange(4).repeat_interleave(len(x))
    return xs, ys


def arrow_of_time(x: torch.Tensor, y: torch.Tensor | None = None, gen: torch.Generator | None = None) -> Batch:
    """Arrow-of-time input: each clip (N,3,T,H,W) played forward (target 0) or backward (target 1).
    Without a generator (teacher targets) every clip plays forward."""
    backward = torch.rand(len(x), generator=gen) < 0.5 if gen is not None else torch.zeros(len(x), dtype=torch.bool)
    x = x.clone()
    x[backward] = x[backward].flip(2)
    return x, backward.long()


register_task(Task("labels", None, 1, ("image", "video"), lambda x, y, gen: (x, y)))
register_task(Task("rotation", 4, 4, ("image", "video"), rotate4))
register_task(Task("arrow_of_time", 2, 1, ("video",), arrow_of_time))
