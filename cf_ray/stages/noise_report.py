"""The label-noise curve's report: per target and layer, each row's gain over the pre-trained network (paired by
seed) at every noise level, the change of that gain from the lowest to the highest level, and one plot."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cf_ray import storage  # noqa: E402
from cf_ray.noise_curve import noise_dir  # noqa: E402
from cf_ray.stages.report import _save  # noqa: E402
from cf_ray.stages.seeds_report import fmt, paired, read_seeds, summarize_sweep, write_seeds_report  # noqa: E402

REFERENCES = ("random", "pretrained")


def summarize_noise(per_level: dict[float, dict[int, dict]]) -> dict:
    """From {level: {seed: sweep_results.json}}: per target, every row's scores and gain over pre-trained at each
    level (mean ± sd over the seeds that finished it), and per row and layer the trend: gain at the highest level
    minus gain at the lowest, paired by seed (seed s uses the same items and initial weights at every level)."""
    levels = sorted(per_level)
    targets: dict[str, dict] = {}
    for level in levels:
        summary = summarize_sweep(per_level[level])
        for t, res in summary["targets"].items():
            out = targets.setdefault(t, {"layers": res["layers"], "rows": {}, "versus": {}})
            for name, row in res["rows"].items():
                out["rows"].setdefault(name, {})[level] = {
                    "seeds": row["seeds"],
                    "scores": row["scores"],
                    "gain": None if name == "pretrained" else row["vs_pretrained"],
                }
                for c, diff in row.get("vs_controls", {}).items():
                    out["versus"].setdefault(f"{name} - {c}", {})[level] = diff
    for out in targets.values():
        out["trend"] = {}
        for name, by_level in out["rows"].items():
            have = [lv for lv in levels if lv in by_level]
            if name == "pretrained" or len(have) < 2:
                continue
            lo, hi = by_level[have[0]], by_level[have[-1]]
            out["trend"][name] = {l: paired(*_aligned(hi, lo, "gain", l)) for l in out["layers"]}
    return {"levels": levels, "targets": targets}


def _aligned(a: dict, b: dict, key: str, layer: str) -> tuple[list[float], list[float]]:
    """Two rows' per-seed ``key`` values ("scores" or "gain") at one layer, over the seeds both finished, in seed
    order: the two sides of a paired difference."""
    common = sorted(set(a["seeds"]) & set(b["seeds"]))
    pick = lambda r: [r[key][layer]["values"][r["seeds"].index(s)] for s in common]  # noqa: E731
    return pick(a), pick(b)


def noise_lines(summary: dict, plots: dict[str, str], levels: list[float]) -> list[str]:
    """The tables, one column per noise level asked for (empty where no seed has finished it)."""
    cols = [f"noise {lv:g}" for lv in levels]
    lines = []
    for t, res in summary["targets"].items():
        layers, rows = res["layers"], res["rows"]
        lines += [
            f"## Transfer to {t}",
            "",
            "Linear-probe score (%) of the two reference networks, mean ± sd over the seeds:",
            "",
            "| network | layer | " + " | ".join(cols) + " |",
            "|---|---|" + "---|" * len(cols),
        ]
        for name in REFERENCES:
            for l in layers:
                cells = [fmt(rows[name][lv]["scores"][l]) if lv in rows.get(name, {}) else "" for lv in levels]
                lines.append(f"| {name} | {l} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Gain over the pre-trained network of the same seed and noise (points), mean ± sd of the paired "
            "differences; the last column is the gain at the highest noise minus the gain at the lowest, paired by "
            "seed (> 0: the gain grows with the noise, as the paper reports).",
            "",
            "| row | layer | " + " | ".join(cols) + " | highest - lowest noise |",
            "|---|---|" + "---|" * (len(cols) + 1),
        ]
        for name, by_level in rows.items():
            if name in REFERENCES:
                continue
            for l in layers:
                cells = [fmt(by_level[lv]["gain"][l], signed=True) if lv in by_level else "" for lv in levels]
                trend = res["trend"].get(name)
                cells.append(fmt(trend[l], signed=True) if trend else "")
                lines.append(f"| {name} | {l} | " + " | ".join(cells) + " |")
        if res["versus"]:
            lines += [
                "",
                "ClusterFit minus each same-compute control (points), paired by seed (> 0: ClusterFit transfers better "
                "than spending its compute on more pre-training or on distillation):",
                "",
                "| comparison | layer | " + " | ".join(cols) + " |",
                "|---|---|" + "---|" * len(cols),
            ]
            for name, by_level in res["versus"].items():
                for l in layers:
                    cells = [fmt(by_level[lv][l], signed=True) if lv in by_level else "" for lv in levels]
                    lines.append(f"| {name} | {l} | " + " | ".join(cells) + " |")
        lines += ["", f"![{t}]({plots[t]})", ""]
    return lines


def plot_noise(res: dict, levels: list[float], title: str, path: str) -> None:
    """Top: the reference and row scores against the noise; bottom: each row's gain over pre-trained."""
    layers, rows = res["layers"], res["rows"]
    colour = {name: f"C{i % 10}" for i, name in enumerate(rows)}  # one colour per row in both panels
    fig, axes = plt.subplots(2, len(layers), figsize=(4.5 * len(layers), 7), squeeze=False, sharex=True)
    for j, l in enumerate(layers):
        top, bottom = axes[0][j], axes[1][j]
        for name, by_level in rows.items():
            xs = [lv for lv in levels if lv in by_level]
            ys = [100 * by_level[lv]["scores"][l]["mean"] for lv in xs]
            err = [100 * (by_level[lv]["scores"][l]["sd"] or 0) for lv in xs]
            style = "--" if name in REFERENCES else "-"
            top.errorbar(xs, ys, yerr=err, fmt=style + "o", capsize=3, label=name, markersize=4, color=colour[name])
            if name not in REFERENCES:
                gains = [100 * by_level[lv]["gain"][l]["mean"] for lv in xs]
                gerr = [100 * (by_level[lv]["gain"][l]["sd"] or 0) for lv in xs]
                bottom.errorbar(xs, gains, yerr=gerr, fmt="-o", capsize=3, markersize=4, color=colour[name])
        bottom.axhline(0, color="grey", linewidth=1)
        top.set_title(f"{title}, {l}")
        top.set_ylabel("probe score (%)")
        bottom.set_ylabel("gain over pre-trained (points)")
        bottom.set_xlabel("label noise in pre-training")
    axes[0][0].legend(fontsize=7)
    _save(fig, path)


def write_noise_report(
    root: str, levels: list[float], seeds: list[int], command: str = "", report_only: bool = False
) -> dict:
    """report_noise.md, noise.json and plots/noise_<target>.png in ``root`` from every
    ``root/noise_<level>/seed_<s>/sweep_results.json`` that exists."""
    per_level, missing = {}, []
    for level in levels:
        found, lacking = read_seeds(noise_dir(root, level), seeds, "sweep_results.json")
        missing += [f"noise {level:g} seed {s}" for s in lacking]
        if found:
            per_level[level] = found
    summary = summarize_noise(per_level)
    summary["seeds"], summary["missing"] = seeds, missing
    plots = {}
    for t, res in summary["targets"].items():
        plots[t] = f"plots/noise_{t}.png"
        plot_noise(res, summary["levels"], t, storage.join(root, plots[t]))
    body = noise_lines(summary, plots, sorted(levels))
    title, what, layout = "The label-noise curve", "sweep per noise level and", "noise_<level>/seed_<s>/"
    return write_seeds_report(root, title, what, body, summary, command, report_only, layout, name="noise")
