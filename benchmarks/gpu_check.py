"""One-shot GPU check of cf_ray: every GPU code path once, timed against a baseline, in one table.

    deploy/install.sh --gpu --venv .venv-gpu        # the project's own install (faiss-gpu, torch on CUDA 12)
    .venv-gpu/bin/python benchmarks/gpu_check.py     # <= 8 min on one H200 + 16 cores; writes docs/benchmarks/gpu.md
    python benchmarks/gpu_check.py --dry-run         # the same code at tiny sizes on CPU (tests/test_gpu_check.py)

Parts (each in its own try/except: a failure is a FAILED row with its error, the other parts still run; a part that
would not fit in what is left of --budget-s is SKIPPED):
  a) faiss k-means on the GPU, 1M x 256 -> K=16000 (VISSL's ImageNet K), 20 iterations: time per iteration and
     objective; then GPU vs CPU faiss on a subsample (same init, same points per centroid): time ratio, objective.
  b) extraction through run_extract (Ray Data + actor pool -> Parquet) with bf16 + channels_last, ResNet-50 at 224 px
     on JPEGs and R(2+1)D-18 at 112 px on MP4s, vs a plain PyTorch loop (DataLoader workers, fp32) on the same GPU.
  c) one Ray Train epoch of r2plus1d_18 on 1 GPU with NCCL, bf16 and channels_last_3d (the backend, dtype and memory
     format are read inside the worker).
  d) the video demo (jobs/clusterfit_video.py --demo) end to end with every stage on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402

FULL = {
    "km": {"n": 1_000_000, "d": 256, "k": 16_000, "niter": 20, "sub_n": 100_000, "sub_niter": 5},
    "img": {"arch": "resnet50", "n": 3072, "size": 224, "resize": 256, "batch": 256, "workers": 8},
    "vid": {"arch": "r2plus1d_18", "n": 192, "size": 112, "clip_len": 16, "num_clips": 2, "batch": 16, "workers": 8},
    "train": {"arch": "r2plus1d_18", "n": 384, "batch": 32, "classes": 4},
    "demo": {"n_unlabelled": 150, "n_train": 30, "n_test": 30, "overrides": []},
    "object_store_mb": 8192,
    "budget_s": 450,  # 8 min less start-up and the table
}
DRY = {
    "km": {"n": 3000, "d": 16, "k": 30, "niter": 3, "sub_n": 1000, "sub_niter": 2},
    "img": {"arch": "resnet_tiny", "n": 16, "size": 32, "resize": 36, "batch": 8, "workers": 0},
    "vid": {"arch": "r2plus1d_tiny", "n": 6, "size": 16, "clip_len": 4, "num_clips": 1, "batch": 3, "workers": 0},
    "train": {"arch": "r2plus1d_tiny", "n": 8, "batch": 4, "classes": 2},
    "demo": {
        "n_unlabelled": 2,
        "n_train": 2,
        "n_test": 2,
        "overrides": ["pretrain.train.epochs=1", "retrain.epochs=1", "cluster.k=3", "video.num_clips=1"],
    },
    "object_store_mb": 300,
    "budget_s": 240,
}
MIN_S = {"a": 40, "b": 60, "c": 40, "d": 90}  # a part starts only with this much of the budget left (full run)


@dataclass
class Check:
    dry: bool
    sizes: dict
    work: Path
    budget_s: float
    t0: float = field(default_factory=time.time)
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    @property
    def use_gpu(self) -> str:
        return "no" if self.dry else "yes"

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def row(self, part: str, what: str, value: str, baseline: str = "", ratio: str = "") -> None:
        self.rows.append((part, what, value, baseline, ratio))
        print(f"  {part} | {what} | {value} | {baseline} | {ratio}", flush=True)


class PartTimeout(Exception):
    pass


_fired: list[float] = []  # set when a deadline fired (the exception may surface wrapped, e.g. inside a C call)


@contextlib.contextmanager
def deadline(seconds: float):
    """SIGALRM after ``seconds``: a part that overruns raises PartTimeout where it is (the table still gets written)."""

    def fire(signum, frame):
        _fired.append(seconds)
        raise PartTimeout(f"stopped after {seconds:.0f} s (time budget)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- environment ----------------------------------------------------------------------------------------------------


def environment(c: Check) -> list[str]:
    import faiss
    import ray
    import torch

    from cf_ray.kmeans.device import faiss_has_gpu

    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        smi = ""
    return [
        f"- GPU (nvidia-smi): {smi or 'none'}",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}), "
        f"faiss {faiss.__version__} ({'GPU' if faiss_has_gpu(faiss) else 'no GPU'}), ray {ray.__version__}",
        f"- {os.cpu_count()} CPU cores, Python {platform.python_version()}, {platform.platform()}",
        f"- mode: {'dry run (tiny sizes, CPU)' if c.dry else 'full'}; budget {c.budget_s:.0f} s",
    ]


# --- a) faiss k-means -----------------------------------------------------------------------------------------------


def blobs(n: int, d: int, centers: int, seed: int) -> np.ndarray:
    """n x d float32 rows around ``centers`` Gaussian centres (clustered, like pooled features), L2-normalised."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, d), dtype=np.float32)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x *= 0.5
    x += means[rng.integers(0, centers, n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def part_kmeans(c: Check) -> None:
    from cf_ray.kmeans.device import faiss_has_gpu, import_faiss

    faiss = import_faiss()
    s = c.sizes["km"]
    gpu = not c.dry
    if gpu and not faiss_has_gpu(faiss):
        raise RuntimeError("this faiss has no GPU support or sees no GPU (install with deploy/install.sh --gpu)")
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t = time.time()
    x = blobs(s["n"], s["d"], max(2, s["k"] // 4), seed=0)
    c.row("a", f"data: {s['n']} x {s['d']} float32 made", f"{time.time() - t:.1f} s")

    km = faiss.Kmeans(s["d"], s["k"], niter=s["niter"], seed=1234, gpu=gpu, verbose=False)
    t = time.time()
    km.train(x)
    wall = time.time() - t
    obj = km.iteration_stats[-1]["obj"]
    c.row(
        "a",
        f"k-means {s['n']} x {s['d']} -> K={s['k']}, {s['niter']} it, on {c.device}",
        f"{wall / s['niter']:.3f} s/it ({wall:.1f} s), obj {obj:.6g}",
    )

    # GPU vs CPU on a subsample, same points per centroid and the same initial centroids
    n, k = s["sub_n"], max(2, round(s["k"] * s["sub_n"] / s["n"]))
    xs = x[np.random.default_rng(1).choice(len(x), n, replace=False)]
    init = xs[np.random.default_rng(2).choice(n, k, replace=False)].copy()
    out = {}
    for dev in (["cuda"] if gpu else []) + ["cpu"]:
        km = faiss.Kmeans(s["d"], k, niter=s["sub_niter"], gpu=dev == "cuda", verbose=False)
        t = time.time()
        km.train(xs, init_centroids=init)
        out[dev] = ((time.time() - t) / s["sub_niter"], km.iteration_stats[-1]["obj"])
    g = out.get("cuda", out["cpu"])
    cpu = out["cpu"]
    c.row(
        "a",
        f"subsample {n} x {s['d']} -> K={k}, {s['sub_niter']} it: s/it, {c.device} vs CPU faiss "
        f"({os.cpu_count()} threads)",
        f"{g[0]:.4f}",
        f"{cpu[0]:.4f}",
        f"{cpu[0] / g[0]:.1f}x",
    )
    c.row(
        "a",
        "subsample: final objective (same init), relative difference",
        f"{g[1]:.6g}",
        f"{cpu[1]:.6g}",
        f"{abs(g[1] - cpu[1]) / max(abs(cpu[1]), 1e-30):.1e}",
    )


# --- b) extraction --------------------------------------------------------------------------------------------------


def make_images(root: Path, n: int, side: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:side, 0:side]
    for i in range(n):
        base = (np.sin(xx / (5 + i % 7)) + np.cos(yy / (3 + i % 5))) * 60 + 128
        img = np.clip(base[..., None] + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i:05d}.jpg", quality=90)
    return root


def make_videos(root: Path, n: int, size: int, frames: int, classes: int = 1) -> Path:
    """MP4s of a moving pattern (H.264, short side ``size`` + 16), in ``classes`` subfolders c0, c1, ..."""
    from cf_ray.demo_video import write_video

    h = size + 16
    w = (h * 4 // 3) // 2 * 2
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        speed = 1 + i % classes
        clip = [
            np.clip(
                (np.sin((xx + speed * t) / 6.0) * 80 + 128)[..., None] + rng.normal(0, 10, (h, w, 3)), 0, 255
            ).astype(np.uint8)
            for t in range(frames)
        ]
        write_video(d / f"{i:05d}.mp4", clip)
    return root


def plain_extract(paths: list[str], arch: str, media, batch: int, workers: int, device: str) -> float:
    """items/s of the baseline: a DataLoader with ``workers`` processes and the model in fp32 on ``device``."""
    import torch

    from cf_ray.config import ModelConfig, VideoConfig
    from cf_ray.media.decode import normalize
    from cf_ray.models.checkpoint import build

    video = isinstance(media, VideoConfig)

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with open(paths[i], "rb") as f:
                data = f.read()
            if video:
                from cf_ray.media.video import decode_clips

                x = decode_clips(
                    data, media.num_clips, media.clip_len, media.stride, media.size, media.resize, media.short
                )
            else:
                from cf_ray.media.image import decode_image

                x = decode_image(data, media.size, media.resize)
            return torch.from_numpy(np.array(x))  # a writable copy

    t = time.time()
    model = build(ModelConfig(arch=arch), seed=0).eval().to(device)
    loader = torch.utils.data.DataLoader(Files(), batch_size=batch, num_workers=workers)
    feats = []
    with torch.inference_mode():
        for x in loader:
            x = x.numpy()
            if video:
                x = x.reshape(-1, *x.shape[2:])  # (videos * clips, T, H, W, 3)
            out = model.forward_features(normalize(x, media.mean, media.std, device), ["res5"])
            feats.append(out["res5"].float().cpu().numpy())
    if device == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.time() - t)


def cf_ray_extract(c: Check, name: str, items, arch: str, media, batch: int, block_rows: int) -> float:
    """items/s of run_extract (includes actor start-up, model load and the Parquet write)."""
    from cf_ray.config import ExtractConfig, ModelConfig
    from cf_ray.media.items import write_items
    from cf_ray.models.checkpoint import build, save_backbone
    from cf_ray.stages.extract import run_extract

    work = c.work / f"extract_{name}"
    write_items(items, str(work / "items.parquet"))
    mcfg = ModelConfig(arch=arch)
    save_backbone(build(mcfg, seed=0), mcfg, str(work / "model"))
    cfg = ExtractConfig(
        layers=["res5"],
        batch_size=batch,
        block_rows=block_rows,
        num_actors=1,
        cpus_per_actor=1,
        torch_threads=1 if c.dry else 4,
        use_gpu=c.use_gpu,
        precision="bf16",
        channels_last="yes",
    )
    t = time.time()
    res = run_extract(cfg, media, str(work / "items.parquet"), str(work / "model"), str(work / "feat"))
    if res["ok"] != items.num_rows:
        raise RuntimeError(f"run_extract extracted {res['ok']} of {items.num_rows} items")
    return items.num_rows / (time.time() - t)


def part_extract(c: Check) -> None:
    from cf_ray.config import ImageConfig, VideoConfig
    from cf_ray.sources import IMAGE_EXTS, VIDEO_EXTS, list_items

    s = c.sizes["img"]
    t = time.time()
    items = list_items(str(make_images(c.work / "images", s["n"], s["resize"])), IMAGE_EXTS)[0]
    c.row("b", f"data: {s['n']} JPEGs {s['resize']} px made", f"{time.time() - t:.1f} s")
    media = ImageConfig(size=s["size"], resize=s["resize"])
    ours = cf_ray_extract(c, "img", items, s["arch"], media, s["batch"], s["batch"])
    plain = plain_extract(items["path"].to_pylist(), s["arch"], media, s["batch"], s["workers"], c.device)
    c.row(
        "b",
        f"{s['arch']} {s['size']} px images/s: run_extract bf16+channels_last vs plain loop fp32 "
        f"({s['workers']} workers)",
        f"{ours:.1f}",
        f"{plain:.1f}",
        f"{ours / plain:.2f}x",
    )

    v = c.sizes["vid"]
    frames = v["clip_len"] * 2 + 4
    t = time.time()
    items = list_items(str(make_videos(c.work / "videos", v["n"], v["size"], frames)), VIDEO_EXTS)[0]
    c.row("b", f"data: {v['n']} MP4s of {frames} frames made", f"{time.time() - t:.1f} s")
    media = VideoConfig(size=v["size"], clip_len=v["clip_len"], stride=2, num_clips=v["num_clips"])
    ours = cf_ray_extract(c, "vid", items, v["arch"], media, v["batch"], v["batch"] * 2)
    plain = plain_extract(items["path"].to_pylist(), v["arch"], media, v["batch"], v["workers"], c.device)
    c.row(
        "b",
        f"{v['arch']} {v['size']} px videos/s ({v['num_clips']} x {v['clip_len']}-frame clips): run_extract "
        f"bf16+channels_last_3d vs plain loop fp32 ({v['workers']} workers)",
        f"{ours:.1f}",
        f"{plain:.1f}",
        f"{ours / plain:.2f}x",
    )


# --- c) one Ray Train epoch -----------------------------------------------------------------------------------------


def _probe_worker(probe_file: str):
    """A step hook that records, once, what the worker really ran with: its process group backend and device."""

    def hook(epoch, step, rank):
        if step != 1 or os.path.exists(probe_file):
            return
        import torch
        import torch.distributed as dist

        info = {
            "backend": dist.get_backend() if dist.is_initialized() else "none",
            "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        }
        with open(probe_file, "w") as f:
            json.dump(info, f)

    return hook


def part_train(c: Check) -> None:
    import pyarrow as pa

    from cf_ray.config import ModelConfig, TrainConfig, VideoConfig
    from cf_ray.sources import VIDEO_EXTS, list_items
    from cf_ray.train.loop import train_classifier

    s, v = c.sizes["train"], c.sizes["vid"]
    root = make_videos(c.work / "train_videos", s["n"], v["size"], v["clip_len"] * 2 + 4, classes=s["classes"])
    items = list_items(str(root), VIDEO_EXTS)[0]
    target = [int(Path(p).parent.name[1:]) for p in items["path"].to_pylist()]  # folder c<i> -> class i
    items = pa.table({"id": items["id"], "path": items["path"], "target": pa.array(target, pa.int64())})
    cfg = TrainConfig(
        model=ModelConfig(arch=s["arch"]),
        epochs=1,
        batch_size=s["batch"],
        num_workers=1,
        cpus_per_worker=1 if c.dry else 8,
        use_gpu=c.use_gpu,
        precision="bf16",
        channels_last="yes",
        warmup_epochs=0,
    )
    media = VideoConfig(size=v["size"], clip_len=v["clip_len"], stride=2, num_clips=1)
    probe = str(c.work / "train_probe.json")
    t = time.time()
    res = train_classifier(
        cfg,
        media,
        items,
        "labels",
        s["classes"],
        str(c.work / "train"),
        "gpu_check",
        str(c.work / "train_model"),
        step_hook=_probe_worker(probe),
    )
    wall = time.time() - t
    h = res["history"][-1]
    info = json.load(open(probe)) if os.path.exists(probe) else {}
    c.row(
        "c",
        f"Ray Train 1 epoch {s['arch']} {v['size']} px x {v['clip_len']} frames, {len(items)} clips, batch "
        f"{s['batch']}, 1 worker on {info.get('device', '?')}",
        f"{h['items_per_s']:.1f} clips/s, loss {h['loss']:.3f}",
        f"wall {wall:.1f} s incl. start-up",
    )
    c.row(
        "c",
        "inside the worker: torch.distributed backend (bf16 autocast + channels_last_3d as configured)",
        info.get("backend", "?"),
        "nccl expected on GPU" if not c.dry else "gloo on CPU",
    )


# --- d) the video demo ----------------------------------------------------------------------------------------------


def demo_config(c: Check, data, target):
    """The packaged video_demo.yaml with every stage on the GPU (use_gpu=yes; precision and channels_last stay auto,
    i.e. bf16 and channels_last_3d on the GPU)."""
    from cf_ray.config import JobConfig, load_config

    gpu = [f"{k}.use_gpu={c.use_gpu}" for k in ("pretrain.train", "extract", "cluster", "retrain")]
    return load_config(
        JobConfig,
        "video_demo.yaml",  # a bare name: the packaged config
        [f"data={data}", f"target={target}", f"run_dir={c.work / 'demo_run'}", *gpu, *c.sizes["demo"]["overrides"]],
    )


def part_demo(c: Check) -> None:
    from cf_ray.demo_video import make_video_demo_splits
    from cf_ray.pipeline import run_job

    s = c.sizes["demo"]
    t = time.time()
    data, target = make_video_demo_splits(
        c.work / "demo_videos", n_unlabelled=s["n_unlabelled"], n_train=s["n_train"], n_test=s["n_test"]
    )
    gen = time.time() - t
    cfg = demo_config(c, data, target)
    t = time.time()
    res = run_job(cfg)
    wall = time.time() - t
    stats = json.load(open(c.work / "demo_run" / "cluster" / "stats.json"))
    if not os.path.exists(res["report"]):
        raise RuntimeError(f"the demo wrote no report at {res['report']}")
    c.row(
        "d",
        f"video demo end to end, every stage use_gpu={c.use_gpu} (data made in {gen:.0f} s); report written",
        f"{wall:.1f} s",
        f"k-means on {stats.get('device')}",
    )


# --- the table ------------------------------------------------------------------------------------------------------


PARTS = {"a": ("faiss k-means", part_kmeans), "b": ("extraction", part_extract), "c": ("Ray Train epoch", part_train)}
PARTS["d"] = ("video demo", part_demo)


def ensure_ray(c: Check) -> None:
    """A local Ray with every core and the GPU, started by the first part that needs it (a failed start fails that
    part, and the next part tries again)."""
    from cf_ray.runtime import init_ray

    init_ray(num_cpus=os.cpu_count(), object_store_mb=c.sizes["object_store_mb"])


def run(c: Check, parts: str) -> None:
    for key in parts:
        name, fn = PARTS[key]
        need = 0 if c.dry else MIN_S[key]
        if c.left() < need:
            c.row(key, f"{name}: SKIPPED", f"only {c.left():.0f} s of the budget left, needs ~{need} s")
            continue
        t = time.time()
        print(f"[{key}] {name} ({c.left():.0f} s of the budget left)", flush=True)
        try:
            with deadline(max(5, c.left())):
                if key in "bcd":  # (a) is faiss alone; the others run through Ray
                    ensure_ray(c)
                fn(c)
        except Exception as e:  # noqa: BLE001  (one part's failure must not lose the others)
            traceback.print_exc()
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300].replace("|", "/")
            if _fired:
                msg = f"stopped by the time budget after {_fired.pop():.0f} s ({msg})"
            c.row(key, f"{name}: FAILED", msg)
        print(f"[{key}] {time.time() - t:.1f} s", flush=True)


def table(c: Check, env: list[str]) -> str:
    lines = [
        "# GPU check (benchmarks/gpu_check.py)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - c.t0:.0f} s in all.",
        "",
        *env,
        "",
        "| part | what | cf_ray / GPU | baseline | ratio |",
        "|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in c.rows],
        "",
        "Baselines: (a) CPU faiss with every core on the same subsample and initial centroids; (b) a plain PyTorch",
        "loop (DataLoader with the workers shown, fp32, default memory format) on the same device, timed like",
        "run_extract from model load to the last batch; run_extract also writes Parquet. (c) and (d) have no",
        "baseline: they show that the path runs on the GPU and how fast.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the code, measures nothing")
    ap.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'ab'")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting parts after this many seconds")
    ap.add_argument("--out", default=None, help="markdown table (default: docs/benchmarks/gpu.md; dry run: none)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    sizes = DRY if args.dry_run else FULL
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible; use --dry-run to check the code on CPU", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        c = Check(args.dry_run, sizes, Path(args.work or tmp), args.budget_s or sizes["budget_s"])
        c.work.mkdir(parents=True, exist_ok=True)
        env = environment(c)
        print("\n".join(env), flush=True)
        run(c, args.parts)
        text = table(c, env)
    print(text)
    out = args.out or (None if args.dry_run else str(ROOT / "docs" / "benchmarks" / "gpu.md"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"gpu_check: table written to {out}")
    failed = sum("FAILED" in r[1] for r in c.rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
