"""Online service throughput: N concurrent HTTP clients on loopback vs calling the same model in-process.

Both sides embed the same JPEG bytes with the same run's network: served, each request is one image through the
Ingress -> Decoder -> batched model deployments (cf_ray.serve); in-process, ``cf_ray.load_model(...).embed`` over
the same bytes in batches of the service's max batch size, with every core's torch threads. The load is bounded:
a fixed number of requests shared by the clients, then it stops. Prints the throughput ratio, client-side
p50/p99 latency and the mean batch size the model replica saw.

    python benchmarks/bench_serve.py                                  # resnet18 at 112 px, 16 clients, 256 requests
    python benchmarks/bench_serve.py --clients 1 --requests 64        # no concurrency: batches of 1
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # run_helpers.make_run: a run directory from the job's own stages
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402


def make_inputs(n: int, px: int) -> list[bytes]:
    from cf_ray.demo import SHAPES, make_image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        make_image(SHAPES[i % len(SHAPES)], px, rng).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def in_process(model, inputs: list[bytes], total: int, batch: int) -> float:
    """Images/s of ``model.embed`` (cf_ray.load_model) over ``total`` inputs (cycling), in batches of ``batch``."""
    items = [inputs[i % len(inputs)] for i in range(total)]
    t0 = time.perf_counter()
    model.embed(items, layer="res5", batch_size=batch)
    return total / (time.perf_counter() - t0)


async def load(url: str, inputs: list[bytes], total: int, clients: int) -> tuple[float, list[float], list[int]]:
    """(images/s, latencies in s, batch sizes) of ``total`` requests shared by ``clients`` concurrent clients."""
    import aiohttp

    todo = iter(range(total))
    lat, sizes, bad = [], [], []

    async def client(session):
        for i in todo:
            t0 = time.perf_counter()
            async with session.post(url, data=inputs[i % len(inputs)], headers={"Content-Type": "image/jpeg"}) as r:
                await r.read()
                if r.status != 200:
                    bad.append(r.status)
                    continue
                sizes.append(int(r.headers["x-cf-ray-batch-size"]))
            lat.append(time.perf_counter() - t0)

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        secs = time.perf_counter() - t0
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: statuses {sorted(set(bad))}")
    return total / secs, lat, sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--size", type=int, default=112, help="network input side (image.size)")
    p.add_argument("--input-px", type=int, default=160, help="side of the JPEGs sent")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--wait-s", type=float, default=0.01, help="batch_wait_timeout_s")
    p.add_argument("--cpus", type=int, default=2, help="the local Ray's CPUs (and the in-process torch threads)")
    p.add_argument("--model-cpus", type=float, default=1.0)
    p.add_argument("--decoder-cpus", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3, help="alternating in-process / served rounds (medians shown)")
    a = p.parse_args()

    import ray
    from ray import serve
    from run_helpers import make_run

    from cf_ray.config import ServeConfig
    from cf_ray.serve import build

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    extra = [f"retrain.model.arch={a.arch}", f"retrain.model.width={a.width}", f"image.size={a.size}"]
    if a.arch != "resnet_tiny":
        extra.append("retrain.model.stem=imagenet")
    run, _ = make_run(tmp, "image", extra=extra, cluster=False)
    inputs = make_inputs(64, a.input_px)
    print(
        f"{a.arch} width {a.width} at {a.size} px, {len(inputs)} distinct {a.input_px} px JPEGs, {os.cpu_count()} cores"
    )

    ray.init(address="local", num_cpus=a.cpus, object_store_memory=300 * 2**20, include_dashboard=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig.model_validate(
        {
            "run_dir": str(run),
            "which": "pretrained",
            "centroids": "none",
            "max_batch_size": a.max_batch,
            "batch_wait_timeout_s": a.wait_s,
            "model": {"num_cpus": a.model_cpus, "use_gpu": "no", "max_ongoing_requests": max(64, 4 * a.max_batch)},
            "decoder": {"num_cpus": a.decoder_cpus, "max_ongoing_requests": 16},
            "ingress": {"num_cpus": 0},
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(cfg), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/embed"

    import torch

    from cf_ray.api import load_model

    torch.set_num_threads(a.cpus)
    model = load_model(run, "pretrained", centroids="none")
    model.embed(inputs[: a.max_batch], layer="res5", batch_size=a.max_batch)  # warm-up
    bases, rates, lat, sizes = [], [], [], []
    try:
        asyncio.run(load(url, inputs, 2 * a.clients, a.clients))  # warm-up: connections, first batches
        for r in range(a.rounds):  # alternate, so a shared machine's load changes hit both sides alike
            bases.append(in_process(model, inputs, a.requests, a.max_batch))
            rate, l, s = asyncio.run(load(url, inputs, a.requests, a.clients))
            rates.append(rate)
            lat += l
            sizes += s
            print(f"round {r + 1}: in-process {bases[-1]:.1f} images/s, served {rate:.1f} images/s")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    base, rate = float(np.median(bases)), float(np.median(rates))
    p50, p99 = np.percentile(np.array(lat) * 1000, [50, 99])
    print(f"in-process embed (batch {a.max_batch}, {a.cpus} torch threads): {base:.1f} images/s (median)")
    print(
        f"served ({a.clients} clients x {a.requests} requests, model {a.model_cpus} CPU, decoder {a.decoder_cpus} "
        f"CPU): {rate:.1f} images/s (median), p50 {p50:.0f} ms, p99 {p99:.0f} ms, mean batch {np.mean(sizes):.2f} "
        f"(max {max(sizes)})"
    )
    print(f"ratio served / in-process: {rate / base:.2f}x")


if __name__ == "__main__":
    main()
