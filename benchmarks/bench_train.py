"""Training throughput: cf_ray's Ray Train loop (1 and 2 workers) vs a hand-written plain PyTorch loop.

All three train the same Classifier (backbone + linear head) on the same decoded images with the same
batch size, optimizer (SGD, cosine lr), augmentation (cf_ray.train.loop.augment) and torch threads per
process. The steady-state figure is the median items/s over epochs 2.. (epoch 1 warms up); Ray's start-up
(Ray Data decode + worker group + process group, everything in trainer.fit that is not an epoch) is
reported beside it, and so is the share of steady epochs rank 0 waited for its next batch. Each round
runs plain / ray x1 / ray x2 in a rotating order so machine noise hits all alike; medians
and the load average are printed. The plain loop runs as a Ray task, i.e. in a worker process at Ray's
worker niceness (15) like the Ray Train workers; --plain-in-driver runs it in this process (niceness 0),
which on a loaded machine gives it many times their CPU share.

    python benchmarks/bench_train.py                                  # 2400 generated 32px images
    python benchmarks/bench_train.py --data ../shared/data/cifar10/train --limit 3000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402


def load_items(data: str | None, n: int, size: int, seed: int) -> pa.Table:
    from cf_ray.demo import make_image_demo
    from cf_ray.sources import list_items

    if data is None:
        data = make_image_demo(
            os.path.join(tempfile.mkdtemp(prefix="bench_train_"), "data"), n_per_class=n // 6, size=size
        )
    items, _ = list_items(str(data))
    if items.num_rows > n:
        items = items.take(np.sort(np.random.default_rng(seed).choice(items.num_rows, n, replace=False)))
    classes = sorted(set(items["label"].to_pylist()))
    return items.append_column("target", pa.array([classes.index(l) for l in items["label"].to_pylist()], pa.int64()))


def plain_loop(items: pa.Table, cfg, media, num_classes: int, threads: int) -> list[dict]:
    """The baseline: images decoded once into memory, then a textbook epoch loop; returns per-epoch items/s."""
    from cf_ray.media.decode import normalize
    from cf_ray.media.image import decode_images
    from cf_ray.models.checkpoint import build
    from cf_ray.train.loop import Classifier, augment, build_optimizer, lr_at

    torch.set_num_threads(threads)
    dec = decode_images({"path": np.array(items["path"].to_pylist(), dtype=object)}, media.size)
    pixels, targets = dec["image"], torch.from_numpy(items["target"].to_numpy())
    torch.manual_seed(cfg.seed)
    model = Classifier(build(cfg.model), num_classes)
    peak_lr = cfg.lr * cfg.batch_size / 256
    opt = build_optimizer(model, cfg, peak_lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    steps_per_epoch = -(-len(pixels) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    gen, rng, step, history = torch.Generator().manual_seed(cfg.seed), np.random.default_rng(cfg.seed), 0, []
    for epoch in range(cfg.epochs):
        model.train()
        t0, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        perm = rng.permutation(len(pixels))
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            x = augment(normalize(pixels[idx], media.mean, media.std), gen)
            y = targets[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, steps_per_epoch * cfg.warmup_epochs, peak_lr)
            logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
        secs = time.time() - t0
        history.append(
            {
                "epoch": epoch + 1,
                "loss": loss_sum / seen,
                "acc": correct / seen,
                "items_per_s": seen / secs,
                "seconds": secs,
            }
        )
    return history


def ray_train(
    items: pa.Table, cfg, media, num_classes: int, threads: int, workers: int, root: str
) -> tuple[list[dict], float]:
    """(per-epoch history, start-up seconds) of cf_ray's train_classifier with ``workers`` Ray Train workers."""
    from cf_ray.train.loop import train_classifier

    c = cfg.model_copy(update={"num_workers": workers, "cpus_per_worker": 0.5 if workers > 1 else 1.0})
    name = f"w{workers}_{time.time_ns()}"
    t0 = time.time()
    res = train_classifier(
        c,
        media,
        items,
        "labels",
        num_classes,
        os.path.join(root, "train"),
        name,
        os.path.join(root, name),
        threads=threads,
    )
    wall = time.time() - t0
    return res["history"], wall - sum(h["seconds"] for h in res["history"])


def steady(history: list[dict]) -> float:
    return float(np.median([h["items_per_s"] for h in history[1:]] or [history[0]["items_per_s"]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="image folder (class subfolders); default: generated shapes")
    ap.add_argument("--limit", type=int, default=2400, help="images (a seeded subset of --data)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--width", type=int, default=16, help="resnet_tiny width")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (each Ray worker and the plain loop)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all cores)")
    ap.add_argument("--plain-in-driver", action="store_true", help="run the plain loop in this process (niceness 0)")
    args = ap.parse_args()

    import ray

    from cf_ray.config import ImageConfig, ModelConfig, TrainConfig
    from cf_ray.runtime import init_ray

    items = load_items(args.data, args.limit, args.size, seed=0)
    num_classes = len(set(items["target"].to_pylist()))
    media = ImageConfig(size=args.size)
    cfg = TrainConfig(
        model=ModelConfig(width=args.width),
        epochs=args.epochs,
        batch_size=args.batch_size,
        warmup_epochs=0,
        use_gpu="no",
        keep_checkpoints=1,
    )
    load_before = os.getloadavg()
    t0 = time.time()
    init_ray(args.num_cpus, 1024)
    ray_init = time.time() - t0
    root = tempfile.mkdtemp(prefix="bench_train_runs_")
    # Ray starts its workers at niceness 15 (RAY_worker_niceness); on a loaded machine a nice-0 driver would
    # get many times their CPU share, so the plain loop runs in a Ray worker process too (no Ray Data/Train in it).
    plain_task = ray.remote(num_cpus=1)(plain_loop)
    rows = {"plain": [], "ray_1w": [], "ray_2w": []}
    startup = {"ray_1w": [], "ray_2w": []}
    wait = {"ray_1w": [], "ray_2w": []}  # share of steady epochs rank 0 spent waiting for its next batch
    for r in range(args.rounds):
        for kind in list(rows)[r % 3 :] + list(rows)[: r % 3]:  # rotate the order so no path always runs first
            if kind == "plain":
                h = (
                    ray.get(plain_task.remote(items, cfg, media, num_classes, args.threads))
                    if not args.plain_in_driver
                    else plain_loop(items, cfg, media, num_classes, args.threads)
                )
                rows[kind].append(steady(h))
                continue
            h, s = ray_train(items, cfg, media, num_classes, args.threads, int(kind[4]), root)
            rows[kind].append(steady(h))
            startup[kind].append(s)
            wait[kind].append(sum(x["data_wait_s"] for x in h[1:]) / sum(x["seconds"] for x in h[1:]))
        print(
            f"round {r + 1}: "
            + ", ".join(f"{k} {v[-1]:.0f} items/s" for k, v in rows.items())
            + f"; start-up 1w {startup['ray_1w'][-1]:.1f}s, 2w {startup['ray_2w'][-1]:.1f}s; data wait 1w "
            f"{100 * wait['ray_1w'][-1]:.0f}%, 2w {100 * wait['ray_2w'][-1]:.0f}%; load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    med = {k: float(np.median(v)) for k, v in rows.items()}
    out = {
        "items": items.num_rows,
        "size": args.size,
        "width": args.width,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "threads": args.threads,
        "rounds": args.rounds,
        "plain_in_driver": args.plain_in_driver,
        "ray_init_s": round(ray_init, 1),
        "median_items_per_s": {k: round(v, 1) for k, v in med.items()},
        "median_startup_s": {k: round(float(np.median(v)), 1) for k, v in startup.items()},
        "median_data_wait_share": {k: round(float(np.median(v)), 3) for k, v in wait.items()},
        "ray_1w_vs_plain": round(med["ray_1w"] / med["plain"], 3),
        "ray_2w_vs_1w": round(med["ray_2w"] / med["ray_1w"], 3),
        "per_round": rows,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(out, indent=1))
    print(
        f"Ray Train 1 worker / plain PyTorch: {out['ray_1w_vs_plain']:.2f}x; 2 workers / 1 worker: "
        f"{out['ray_2w_vs_1w']:.2f}x"
    )


if __name__ == "__main__":
    main()
