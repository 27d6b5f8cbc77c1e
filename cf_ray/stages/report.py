"""Report: metrics.json + report.md with plots, from what the other stages left in the run directory."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cf_ray import storage  # noqa: E402
from cf_ray.metrics import report_section as monitoring_section  # noqa: E402
from cf_ray.rundir import RunDir  # noqa: E402
from cf_ray.stages import names  # noqa: E402


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def plot_cluster_sizes(sizes: list[int], path: str) -> None:
    s = np.sort(np.asarray(sizes))[::-1]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(np.arange(len(s)), s, width=1.0, color="#4878d0")
    ax.set_xlabel("cluster (sorted by size)")
    ax.set_ylabel("items")
    ax.set_title(f"Cluster sizes (K={len(s)}, empty={int((s == 0).sum())})")
    _save(fig, path)


def _score(v: dict) -> float:
    """The headline number of a probe or fine-tune: top-1, or mAP for multi-label targets (older runs: top1)."""
    return v["score"] if "score" in v else v["top1"]


def _metric_name(transfer: dict) -> str:
    first = next(iter(next(iter(transfer.values())).values()))
    return "mAP" if first.get("metric") == "map" else "top-1"


def transfer_plot_name(target: str) -> str:
    """The default target (named 'target') keeps the plain name."""
    return "transfer.png" if target == "target" else f"transfer_{target}.png"


def plot_transfer(transfer: dict, path: str) -> None:
    models = list(transfer)
    layers = list(next(iter(transfer.values())))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    w = 0.8 / len(models)
    for i, m in enumerate(models):
        vals = [100 * _score(transfer[m][l]) for l in layers]
        bars = ax.bar(np.arange(len(layers)) + i * w - 0.4 + w / 2, vals, w, label=m)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(np.arange(len(layers)), layers)
    ax.set_ylabel(f"{_metric_name(transfer)} (%)")
    ax.set_title(
        "Transfer: linear probes on frozen features (and fine-tuning)"
        if "finetuned" in layers
        else "Transfer: linear probes on frozen features"
    )
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_training(histories: dict[str, list[dict]], path: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for name, h in histories.items():
        ep = [r["epoch"] for r in h]
        axes[0].plot(ep, [r["loss"] for r in h], marker="o", label=name)
        axes[1].plot(ep, [100 * r["acc"] for r in h], marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="loss", title="Training loss")
    axes[1].set(xlabel="epoch", ylabel="train accuracy (%)", title="Training accuracy (own targets)")
    axes[0].legend(fontsize=8)
    _save(fig, path)


def _table(transfer: dict) -> list[str]:
    models = list(transfer)
    layers = list(next(iter(transfer.values())))
    lines = ["| layer | " + " | ".join(models) + " | ClusterFit - pre-trained |", "|---" * (len(models) + 2) + "|"]
    for l in layers:
        row = [f"{100 * _score(transfer[m][l]):.1f}" for m in models]
        delta = ""
        if "pretrained" in transfer and "clusterfit" in transfer:
            delta = f"{100 * (_score(transfer['clusterfit'][l]) - _score(transfer['pretrained'][l])):+.1f}"
        lines.append(f"| {l} | " + " | ".join(row) + f" | {delta} |")
    return lines


EPOCH_COLUMNS = ("epoch", "loss", "acc", "items_per_s", "seconds", "resumed_from_epoch")


def _epoch_table(name: str, history: list[dict]) -> list[str]:
    """Per-epoch loss, accuracy and throughput of one Ray Train run (as reported every epoch)."""
    lines = [
        f"{name} per epoch:",
        "",
        "| epoch | loss | accuracy (%) | items/s | seconds | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in history:
        note = f"resumed from the epoch-{r['resumed_from_epoch']} checkpoint" if r.get("resumed_from_epoch") else ""
        lines.append(
            f"| {r['epoch']} | {r['loss']:.4f} | {100 * r['acc']:.1f} | {r['items_per_s']:.0f} | "
            f"{r.get('seconds', 0):.1f} | {note} |"
        )
    return lines + [""]


def _verdict(transfer: dict, results: dict) -> str:
    """One plain sentence: did ClusterFit help, and if not, the likely reason the run shows."""
    if not {"pretrained", "clusterfit"} <= set(transfer):
        return ""
    deltas = {l: _score(transfer["clusterfit"][l]) - _score(transfer["pretrained"][l]) for l in transfer["pretrained"]}
    wins = [l for l, d in deltas.items() if d > 0]
    best = max(deltas, key=deltas.get)
    last = list(deltas)[-1]
    cf, pre = (100 * _score(transfer[m][last]) for m in ("clusterfit", "pretrained"))
    text = (
        f"Last layer, where the paper expects the gain: ClusterFit {last} {cf:.1f} vs pre-trained {last} {pre:.1f} "
        f"({100 * deltas[last]:+.1f} points). "
        f"ClusterFit beats the pre-trained network on {len(wins)} of {len(deltas)} layers "
        f"(best {best}: {100 * deltas[best]:+.1f} points)."
    )
    cluster = results.get("cluster", {})
    hist = results.get("retrain", {}).get("history") or []
    if len(wins) < len(deltas):
        hints = []
        if "nmi" in cluster and cluster["nmi"] < 0.2:
            hints.append(
                f"the clusters agree little with the source's own labels (NMI {cluster['nmi']:.2f}), so the "
                "pseudo-labels carry little of what the target asks for; try another layer (cluster.layer), K, or PCA"
            )
        retrain = results.get("retrain", {})
        measured = retrain.get("fit", {})  # on the clustered views (retrain.measure_fit)
        own = "clip_fit" if retrain.get("clip_targets") and "clip_fit" in measured else "fit"  # per-clip targets
        fit, where = (measured[own], "on the clustered views") if own in measured else (None, "in training")
        fit = hist[-1]["acc"] if fit is None and hist else fit
        if hist and fit < 0.5:
            hints.append(
                f"the retrained network fits only {100 * fit:.0f}% of its own pseudo-labels ({where}); "
                "more retrain.epochs or a wider retrain.model may help"
            )
        if hints:
            text += " Likely reasons: " + "; ".join(hints) + "."
    if "random" in transfer:
        weak = [l for l in deltas if _score(transfer["pretrained"][l]) <= _score(transfer["random"][l])]
        if len(weak) * 2 > len(deltas):
            text += (
                " Note: the pre-trained network itself is no better than a random one on "
                f"{len(weak)} of {len(deltas)} layers, so its proxy task taught it little about this target."
            )
    return text


def software_versions() -> dict[str, str]:
    """cf_ray's version and its main dependencies' (Ray, torch, faiss, pyarrow, PyAV), as installed here."""
    from cf_ray import __version__, dependency_versions

    return {"cf_ray": __version__, **dependency_versions()}


def software_line() -> str:
    """The line at the top of every report: which cf_ray and dependencies wrote it."""
    v = software_versions()
    return f"cf_ray {v.pop('cf_ray')}; " + ", ".join(f"{k} {x}" for k, x in v.items()) + "."


def seed_lines(run: RunDir) -> list[str]:
    """Which seed this run is, and that one run's differences are only as good as the spread between seeds."""
    import yaml

    if not storage.exists(run.path("config.yaml")):
        return []
    seed = (yaml.safe_load(storage.read_bytes(run.path("config.yaml"))) or {}).get("seed", 0)
    return [
        f"One run, seed {seed}. Runs that differ only in their seed can differ by several points on small "
        "targets, so a difference here means little on its own: `--seeds 0,1,2` gives mean ± sd over seeds and "
        "marks the differences that exceed twice the sd of the paired differences (docs/reproducibility.md).",
        "",
    ]


def run_report(run_dir: str, title: str = "ClusterFit run", targets: list[str] | None = None) -> dict:
    """Report of the run; ``targets``: the transfer targets to show (default: every one the run has done)."""
    run = RunDir(run_dir)
    manifest = run.manifest()
    results = {name: st.get("result", {}) for name, st in manifest["stages"].items()}
    metrics = {
        "stages": {n: {"status": s.get("status"), "seconds": s.get("seconds")} for n, s in manifest["stages"].items()}
    }
    metrics["versions"] = software_versions()
    lines = [f"# {title}", "", software_line(), "", f"Run directory: `{run.root}`", ""]
    lines += seed_lines(run)

    if targets is None:
        targets = [n[len(names.TRANSFER) :] for n in results if n.startswith(names.TRANSFER)]
    targets = {t: results[names.transfer(t)] for t in targets if results.get(names.transfer(t), {}).get("transfer")}
    if targets:
        metrics["transfer"], metrics["transfer_metric"] = {}, {}
    for name, res in targets.items():
        transfer = res["transfer"]
        metric, plot = _metric_name(transfer), transfer_plot_name(name)
        metrics["transfer"][name] = {m: {l: _score(v) for l, v in t.items()} for m, t in transfer.items()}
        metrics["transfer_metric"][name] = metric
        plot_transfer(transfer, run.path("plots", plot))
        lines += [
            f"## Transfer to {name} (headline)" if len(targets) > 1 else "## Transfer (headline)",
            "",
            f"{metric} (%) on the test split of `{res.get('target', name)}`"
            + (f" ({res['split']})" if res.get("split") else "")
            + ": linear probes on frozen features per layer"
            + (
                "; `finetuned`: the whole network fine-tuned on the target's train split."
                if any("finetuned" in t for t in transfer.values())
                else "."
            ),
            "",
        ]
        lines += _table(transfer) + ["", _verdict(transfer, results), "", f"![transfer to {name}](plots/{plot})", ""]

    stats_path = run.path("cluster", "stats.json")
    if storage.exists(stats_path):
        stats = storage.read_json(stats_path)
        metrics["cluster"] = {
            k: stats.get(k)
            for k in ("n", "d", "k", "objective", "imbalance", "empty", "min_size", "max_size", "backend", "device")
        }
        if "nmi" in results.get("cluster", {}):
            metrics["cluster"]["nmi"] = results["cluster"]["nmi"]
        plot_cluster_sizes(stats["sizes"], run.path("plots", "cluster_sizes.png"))
        lines += [
            "## Clusters",
            "",
            f"K={stats['k']} on `{stats.get('layer')}` features of {stats['n']} items (d={stats['d']}): "
            f"objective {stats['objective']:.4g}, imbalance factor {stats['imbalance']:.3f} (1 = balanced), "
            f"sizes {stats['min_size']}..{stats['max_size']}, empty {stats['empty']}."
            + (f" k-means ran on {stats['device']} (backend {stats.get('backend')})." if stats.get("device") else "")
            + (f" Note: {stats['device_note']}." if stats.get("device_note") else "")
            + (
                f" Clips assigned one by one: {100 * stats['clip_agreement']:.1f}% share their video's cluster."
                if "clip_agreement" in stats
                else ""
            )
            + (
                f" NMI against the source's own labels: {metrics['cluster']['nmi']:.3f}."
                if "nmi" in metrics["cluster"]
                else ""
            ),
            "",
            "![cluster sizes](plots/cluster_sizes.png)",
            "",
        ]

    histories = {n: results[n]["history"] for n in ("pretrain", "retrain") if results.get(n, {}).get("history")}
    if histories:
        metrics["training"] = {n: h[-1] for n, h in histories.items()}
        plot_training(histories, run.path("plots", "training.png"))
        lines += [
            "## Training",
            "",
            "pretrain = the pre-trained network (the self-supervised proxy in pretrain.proxy, unless a "
            "checkpoint was given); "
            "retrain = the ClusterFit network on the cluster ids.",
            "",
            "![training](plots/training.png)",
            "",
        ]
        for n, h in histories.items():
            last = h[-1]
            lines.append(
                f"- {n}: {len(h)} epochs, final loss {last['loss']:.3f}, accuracy {100 * last['acc']:.1f}%, "
                f"{last['items_per_s']:.0f} items/s"
            )
        fit = results.get("retrain", {}).get("fit")
        if fit:
            metrics["pseudo_label_fit"] = fit
            lines.append(
                f"- retrain, pseudo-label fit on the clustered views (un-augmented): {100 * fit['fit']:.1f}% of items"
                + (
                    f", {100 * fit['clip_fit']:.1f}% of clips (each against its own cluster)"
                    if "clip_fit" in fit
                    else ""
                )
            )
        lines.append("")
        for n, h in histories.items():
            lines += _epoch_table(n, h)
        metrics["training_history"] = {
            n: [{k: r.get(k) for k in EPOCH_COLUMNS} for r in h] for n, h in histories.items()
        }

    errors = run.errors()
    metrics["skipped_inputs"] = errors.num_rows
    lines += ["## Skipped inputs", ""]
    if errors.num_rows:
        lines += [
            f"{errors.num_rows} inputs were skipped; all are listed with their reason in `errors.parquet`. First ones:",
            "",
            "| dataset | path | reason |",
            "|---|---|---|",
        ]
        for r in errors.slice(0, 20).to_pylist():
            lines.append(f"| {r.get('dataset', '')} | {r['path']} | {r['error'][:120]} |")
    else:
        lines.append("None: every input was decoded.")
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for n, s in manifest["stages"].items():
        lines.append(f"| {n} | {s.get('status')} | {s.get('seconds', '')} |")
    lines += ["", "Resolved configuration: `config.yaml`. Machine-readable results: `metrics.json`.", ""]
    lines += monitoring_section()
    storage.write_json(run.path("metrics.json"), metrics)
    storage.write_bytes(run.path("report.md"), "\n".join(lines).encode())
    return {"report": run.path("report.md"), "metrics": run.path("metrics.json")}
