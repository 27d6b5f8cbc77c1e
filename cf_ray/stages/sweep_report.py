"""The sweep's report: one table (every setting and control vs the pre-trained and random networks, with
cluster quality beside transfer) and one plot per target, from what the sweep's manifest recorded."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cf_ray import storage  # noqa: E402
from cf_ray.stages.report import _save, software_line, software_versions  # noqa: E402

CONTROL_LABELS = {"longer_pretrain": "control: longer pre-training", "distill": "control: distillation"}


def _label(r: dict) -> str:
    if r["kind"] == "clusterfit":
        m = r["model"]
        return f"ClusterFit K={r['k']} {r['layer']} {r['epochs']}ep {m['arch']} w{m['width']}"
    return f"{CONTROL_LABELS[r['kind']]} {r['epochs']}ep"


def _fmt(v, spec: str = ".3f") -> str:
    return "" if v is None else format(v, spec)


def sweep_table(refs: dict, rows: list[dict], target: str) -> list[str]:
    layers = list(refs["pretrained"][target])
    head = ["row", "NMI", "purity", "ARI", "imbalance", "train acc (own targets)", "train s"]
    metric = "mAP" if refs["pretrained"][target][layers[0]].get("metric") == "map" else "top-1"
    head += [f"{l} {metric}" for l in layers] + [f"{l} vs pre-trained" for l in layers]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    pre = {l: refs["pretrained"][target][l]["score"] for l in layers}
    for name in ("random", "pretrained"):
        top = [f"{100 * refs[name][target][l]['score']:.1f}" for l in layers]
        delta = [f"{100 * (refs[name][target][l]['score'] - pre[l]):+.1f}" for l in layers]
        label = "random init" if name == "random" else "pre-trained (start of ClusterFit)"
        lines.append("| " + " | ".join([label, "", "", "", "", "", ""] + top + delta) + " |")
    for r in rows:
        c = r.get("cluster", {})
        cells = [
            _label(r),
            _fmt(c.get("nmi")),
            _fmt(c.get("purity")),
            _fmt(c.get("ari")),
            _fmt(c.get("imbalance"), ".2f"),
            f"{100 * r['train_acc']:.1f}%",
            f"{r['train_seconds']:.0f}",
        ]
        cells += [f"{100 * r['transfer'][target][l]['score']:.1f}" for l in layers]
        cells += [
            f"**{d:+.1f}**" if d > 0 else f"{d:+.1f}"
            for d in (100 * (r["transfer"][target][l]["score"] - pre[l]) for l in layers)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_sweep(refs: dict, rows: list[dict], target: str, path: str) -> None:
    layers = list(refs["pretrained"][target])
    labels = [_label(r) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(3, len(rows)) * max(1, len(layers) / 2) + 1.2))
    h = 0.8 / len(layers)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, l in enumerate(layers):
        vals = [100 * r["transfer"][target][l]["score"] for r in rows]
        bars = ax.barh(np.arange(len(rows)) + j * h - 0.4 + h / 2, vals, h, color=colours[j], label=f"{l}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.axvline(
            100 * refs["pretrained"][target][l]["score"], color=colours[j], ls="--", lw=1.2, label=f"{l} pre-trained"
        )
        ax.axvline(100 * refs["random"][target][l]["score"], color=colours[j], ls=":", lw=1, label=f"{l} random init")
    ax.set_yticks(np.arange(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("linear probe score (%): top-1, or mAP for multi-label targets")
    ax.set_title(f"ClusterFit sweep, transfer to {target}")
    lo = min(100 * refs["random"][target][l]["score"] for l in layers)
    ax.set_xlim(max(0, lo - 10), None)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)


def write_sweep_report(sweep, row_stages: list[str]) -> dict:
    run = sweep.run
    stages = run.manifest()["stages"]
    results = {n: s.get("result", {}) for n, s in stages.items() if s.get("status") == "done"}
    refs = {
        m: {t: results.get(f"{m}_probe_{t}", {}).get("transfer") for t in sweep.targets}
        for m in ("random", "pretrained")
    }
    rows = [results[n] for n in row_stages if n in results]
    missing = [n for n in row_stages if n not in results]
    lines = [
        f"# ClusterFit sweep: {sweep.base_cfg.data}",
        "",
        software_line(),
        "",
        f"Run directory: `{run.root}`; pre-trained network: "
        f"`{sweep.base.root}` (pretrain.source={sweep.base_cfg.pretrain.source}"
        + (f", label_noise={sweep.base_cfg.pretrain.label_noise}" if sweep.base_cfg.pretrain.source == "labels" else "")
        + ").",
        "",
    ]
    src = results.get("cluster_source", {})
    if src:
        lines += [
            f"Clustered and trained on {src['items']} of the base's {src['of']} source items. Rows with a bold "
            "difference beat the pre-trained network at that layer. NMI / purity / ARI: clusters against the source's "
            "true labels (never used for training). Imbalance: faiss's factor (1 = equal cluster sizes).",
            "",
        ]
    plots = {}
    for t in sweep.targets:
        if not all(refs[m][t] for m in refs):
            lines += [f"Target {t}: the random / pre-trained probes have not finished.", ""]
            continue
        split = results.get("items_targets", {}).get(t, {}).get("split")
        lines += [
            f"## Transfer to {t}",
            "",
            "Linear-probe top-1 (%) (mAP for a multi-label target) on the target's test split"
            + (f" ({split})" if split else "")
            + ", frozen features:",
            "",
        ]
        lines += sweep_table(refs, rows, t) + [""]
        if rows:
            plot = run.path("plots", f"sweep_{t}.png")
            plot_sweep(refs, rows, t, plot)
            plots[t] = plot
            lines += [f"![sweep {t}](plots/sweep_{t}.png)", ""]
    if missing:
        lines += [
            "Not finished yet (rerun the same command to resume): " + ", ".join(f"`{m}`" for m in missing) + ".",
            "",
        ]
    lines += ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {n} | {s.get('status')} | {s.get('seconds', '')} |" for n, s in stages.items()]
    storage.write_json(
        run.path("sweep_results.json"),
        {"versions": software_versions(), "references": refs, "rows": rows, "missing": missing},
    )
    storage.write_bytes(run.path("report.md"), "\n".join(lines + [""]).encode())
    return {"report": run.path("report.md"), "rows": len(rows), "missing": missing, "plots": plots}
