"""Custom metrics (ray.util.metrics), exported by every node's metrics agent for Prometheus and the dashboard.

Ray prefixes the names with ``ray_`` and counters get ``_total``: e.g. ``ray_cf_ray_items_processed_total``.
Each stage records with one call; outside Ray (plain unit tests, a stage run alone without Ray) calls do nothing.
"""

from __future__ import annotations

import functools
import os

import ray

ITEMS_PROCESSED = "cf_ray_items_processed"
ITEMS_SKIPPED = "cf_ray_items_skipped"
KMEANS_OBJECTIVE = "cf_ray_kmeans_objective"
KMEANS_ITERATIONS = "cf_ray_kmeans_iterations"
TRAIN_LOSS = "cf_ray_train_loss"
TRAIN_ITEMS_PER_S = "cf_ray_train_items_per_second"
SERVE_REQUESTS = "cf_ray_serve_requests"
SERVE_LATENCY = "cf_ray_serve_request_latency_s"
SERVE_BATCH_SIZE = "cf_ray_serve_batch_size"

# (exported name, what it counts) for the report and docs
EXPORTED = {
    f"ray_{ITEMS_PROCESSED}_total": "inputs decoded and passed through a network, by stage (extract, pretrain, "
    "retrain)",
    f"ray_{ITEMS_SKIPPED}_total": "inputs skipped (undecodable), by stage",
    f"ray_{KMEANS_ITERATIONS}_total": "k-means iterations done",
    f"ray_{KMEANS_OBJECTIVE}": "k-means objective (sum of squared distances) of the latest iteration",
    f"ray_{TRAIN_LOSS}": "training loss of the latest epoch, by run (pretrain, retrain)",
    f"ray_{TRAIN_ITEMS_PER_S}": "training throughput of the latest epoch, by run",
}

# The online service's series (cf_ray.serve), next to Serve's own ray_serve_* series.
SERVE_EXPORTED = {
    f"ray_{SERVE_REQUESTS}_total": "HTTP requests answered by the ingress, by route and status code",
    f"ray_{SERVE_LATENCY}": "seconds from a request's arrival at the ingress to its answer, by route (histogram)",
    f"ray_{SERVE_BATCH_SIZE}": "inputs per forward pass of a model replica, by modality (histogram)",
}
LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


@functools.cache
def _metric(kind: str, name: str, tag: str):
    from ray.util import metrics

    cls = {"counter": metrics.Counter, "gauge": metrics.Gauge}[kind]
    return cls(name, description=EXPORTED.get(f"ray_{name}_total", EXPORTED.get(f"ray_{name}", "")), tag_keys=(tag,))


@functools.cache
def _histogram(name: str, boundaries: tuple[float, ...], tags: tuple[str, ...]):
    from ray.util import metrics

    return metrics.Histogram(
        name, description=SERVE_EXPORTED.get(f"ray_{name}", ""), boundaries=list(boundaries), tag_keys=tags
    )


@functools.cache
def _counter(name: str, tags: tuple[str, ...]):
    from ray.util import metrics

    return metrics.Counter(name, description=SERVE_EXPORTED.get(f"ray_{name}_total", ""), tag_keys=tags)


def _on() -> bool:
    return ray.is_initialized()


def items(stage: str, processed: int, skipped: int = 0) -> None:
    if _on():
        if processed:
            _metric("counter", ITEMS_PROCESSED, "stage").inc(processed, tags={"stage": stage})
        if skipped:
            _metric("counter", ITEMS_SKIPPED, "stage").inc(skipped, tags={"stage": stage})


def kmeans_iteration(objective: float, layer: str) -> None:
    if _on():
        _metric("gauge", KMEANS_OBJECTIVE, "layer").set(float(objective), tags={"layer": layer})
        _metric("counter", KMEANS_ITERATIONS, "layer").inc(1, tags={"layer": layer})


def train_epoch(run: str, loss: float, items_per_s: float, items: int) -> None:
    if _on():
        _metric("gauge", TRAIN_LOSS, "run").set(float(loss), tags={"run": run})
        _metric("gauge", TRAIN_ITEMS_PER_S, "run").set(float(items_per_s), tags={"run": run})
        _metric("counter", ITEMS_PROCESSED, "stage").inc(items, tags={"stage": run})


def serve_request(route: str, status: int, seconds: float) -> None:
    if _on():
        _counter(SERVE_REQUESTS, ("route", "status")).inc(1, tags={"route": route, "status": str(status)})
        _histogram(SERVE_LATENCY, tuple(LATENCY_BOUNDARIES_S), ("route",)).observe(seconds, tags={"route": route})


def serve_batch(modality: str, size: int) -> None:
    if _on():
        _histogram(SERVE_BATCH_SIZE, tuple(BATCH_BOUNDARIES), ("modality",)).observe(size, tags={"modality": modality})


def report_section() -> list[str]:
    """Markdown for the report: where this run could be watched, and the metric names to look for."""
    from cf_ray.runtime import dashboard_url

    url = dashboard_url()
    datasets = "the named datasets `extract_<model>_<dataset>` and `<pretrain|retrain>_train`"
    if url and os.environ.get("RAY_ADDRESS"):
        where = (
            f"Ray dashboard of this run: {url} (Jobs: the job log; Data: {datasets}; Metrics: the series below, with "
            "Prometheus/Grafana set up)."
        )
    elif url:
        where = (
            f"This run's local Ray had its dashboard at {url} while the job ran (Data: {datasets}; Train: the "
            "training runs). On a cluster (docs/cluster.md) the dashboard also keeps the job log and these series."
        )
    else:
        where = (
            "This run started a local Ray without a dashboard (ray.dashboard=false); on a cluster (docs/cluster.md) "
            "the dashboard shows the job log, the named datasets and these series live."
        )
    lines = ["## Monitoring", "", where, "", "| metric (Prometheus name) | what |", "|---|---|"]
    lines += [f"| `{name}` | {what} |" for name, what in EXPORTED.items()]
    return lines + ["", "Every node exports them at its `--metrics-export-port` (`/metrics`).", ""]
