"""Several seeds of one job or sweep: mean ± sd of every score, and paired differences with a significance mark.

A difference (e.g. ClusterFit minus pre-trained at one layer) is taken per seed, since both come from the same
seed's run, and is marked significant only when |mean| > 2 x the sample sd of those per-seed differences
(``SIGNIFICANCE_RULE``). With fewer than two seeds there is no sd and nothing is marked.
"""

from __future__ import annotations

import math

from cf_ray import storage
from cf_ray.stages.report import software_line, software_versions

SIGNIFICANCE_RULE = (
    "A difference is marked significant (`*`) only when |mean of the per-seed differences| > 2 x their sample sd "
    "(ddof=1); with fewer than 2 seeds nothing is marked."
)
# (minuend, subtrahend) of the paired differences a job's seeds summary shows, per target and layer.
JOB_COMPARISONS = (("clusterfit", "pretrained"), ("pretrained", "random"))


def mean_sd(values: list[float]) -> dict:
    """{values, n, mean, sd}: sd is the sample sd (ddof=1), None below two values."""
    n = len(values)
    mean = sum(values) / n if n else None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"values": list(values), "n": n, "mean": mean, "sd": sd}


def paired(a: list[float], b: list[float]) -> dict:
    """mean ± sd of the per-seed differences a - b, and whether it passes the significance rule."""
    if len(a) != len(b):
        raise ValueError(f"paired differences need as many values on each side ({len(a)} vs {len(b)})")
    out = mean_sd([x - y for x, y in zip(a, b)])
    out["significant"] = out["sd"] is not None and abs(out["mean"]) > 2 * out["sd"]
    return out


def fmt(stat: dict, scale: float = 100.0, signed: bool = False, digits: int = 1) -> str:
    """'53.9 ± 1.2' (points) from a mean_sd / paired dict; '*' after a significant difference."""
    if stat is None or stat["mean"] is None:
        return ""
    spec = f"{'+' if signed else ''}.{digits}f"
    text = format(scale * stat["mean"], spec)
    if stat["sd"] is not None:
        text += f" ± {scale * stat['sd']:.{digits}f}"
    return text + (" *" if stat.get("significant") else "")


# --- a job's seeds -----------------------------------------------------------------------------------------------
def summarize_job(per_seed: dict[int, dict]) -> dict:
    """From each seed's metrics.json ({transfer: {target: {model: {layer: score}}}, ...}): per target, mean ± sd of
    every model x layer over the seeds, and the paired differences of JOB_COMPARISONS. Only seeds with
    transfer results for a target count for it."""
    seeds = sorted(per_seed)
    targets: dict[str, dict] = {}
    names = []
    for s in seeds:
        names += [t for t in per_seed[s].get("transfer", {}) if t not in names]
    for t in names:
        have = [s for s in seeds if t in per_seed[s].get("transfer", {})]
        runs = [per_seed[s]["transfer"][t] for s in have]
        models = list(runs[0])
        layers = list(runs[0][models[0]])
        scores = {m: {l: mean_sd([r[m][l] for r in runs]) for l in layers} for m in models}
        diffs = {
            f"{a} - {b}": {l: paired([r[a][l] for r in runs], [r[b][l] for r in runs]) for l in layers}
            for a, b in JOB_COMPARISONS
            if a in models and b in models
        }
        metric = per_seed[have[0]].get("transfer_metric", {}).get(t, "top-1")
        targets[t] = {"seeds": have, "metric": metric, "scores": scores, "differences": diffs}
    cluster = {}
    for key in ("nmi", "objective", "imbalance"):
        vals = [per_seed[s]["cluster"][key] for s in seeds if per_seed[s].get("cluster", {}).get(key) is not None]
        if vals:
            cluster[key] = mean_sd(vals)
    return {"seeds": seeds, "rule": SIGNIFICANCE_RULE, "targets": targets, "cluster": cluster}


def job_lines(summary: dict) -> list[str]:
    lines = []
    for t, res in summary["targets"].items():
        scores, diffs = res["scores"], res["differences"]
        layers = list(next(iter(scores.values())))
        head = ["layer", *scores, *diffs]
        lines += [
            f"## Transfer to {t}",
            "",
            f"{res['metric']} (%) of the linear probes, mean ± sd over seeds {', '.join(map(str, res['seeds']))}; "
            "differences are paired by seed (points).",
            "",
            "| " + " | ".join(head) + " |",
            "|---" * len(head) + "|",
        ]
        for l in layers:
            cells = [fmt(scores[m][l]) for m in scores] + [fmt(diffs[d][l], signed=True) for d in diffs]
            lines.append(f"| {l} | " + " | ".join(cells) + " |")
        lines.append("")
        gain = diffs.get("clusterfit - pretrained", {}).get(layers[-1])
        if gain:
            verdict = "beyond" if gain["significant"] else "not beyond"
            lines += [
                f"Last layer, where the paper expects the gain: ClusterFit {layers[-1]} "
                f"{fmt(scores['clusterfit'][layers[-1]])} vs pre-trained {fmt(scores['pretrained'][layers[-1]])}, "
                f"paired difference {fmt(gain, signed=True)} points: {verdict} the seed-to-seed spread.",
                "",
            ]
        lines += per_seed_lines(scores, diffs, res["seeds"])
    return lines


def per_seed_lines(scores: dict, diffs: dict, seeds: list[int]) -> list[str]:
    """The raw per-seed values behind the means (one row per model/difference and layer)."""
    lines = ["Per seed:", "", "| | layer | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines.append("|---|---|" + "---|" * len(seeds))
    for name, table in [*scores.items(), *diffs.items()]:
        spec = "+.1f" if name in diffs else ".1f"
        for l, stat in table.items():
            lines.append(f"| {name} | {l} | " + " | ".join(format(100 * v, spec) for v in stat["values"]) + " |")
    return lines + [""]


def read_seeds(root: str, seeds: list[int], name: str) -> tuple[dict[int, dict], list[int]]:
    """({seed: the JSON ``root/seed_<s>/<name>``} for the seeds that have it, the seeds that do not)."""
    per_seed, missing = {}, []
    for s in seeds:
        path = storage.join(root, f"seed_{s}", name)
        if storage.exists(path):
            per_seed[s] = storage.read_json(path)
        else:
            missing.append(s)
    return per_seed, missing


def commands_behind(root: str, name: str, command: str, report_only: bool = False) -> list[str]:
    """The commands that made the runs in ``root``, in order: those its <name>.json records, then ``command``
    unless it only rewrites reports or is there already. A directory accumulates (a sweep with another grid adds
    its rows), so the report has to name every command behind its numbers, not just the last one."""
    path = storage.join(root, f"{name}.json")
    before = storage.read_json(path) if storage.exists(path) else {}
    commands = list(before.get("commands") or ([before["command"]] if before.get("command") else []))
    if command and not report_only and command not in commands:
        commands.append(command)
    return commands


def write_seeds_report(
    root: str,
    title: str,
    what: str,
    body: list[str],
    summary: dict,
    command: str = "",
    report_only: bool = False,
    layout: str = "seed_<s>/",
    name: str = "seeds",
) -> dict:
    """report_<name>.md (title, versions, where the runs are, the commands, the rule, ``body``, missing seeds) and
    <name>.json (``summary`` with versions and commands) in ``root``. ``command`` joins the commands already
    recorded there (``commands_behind``)."""
    commands = commands_behind(root, name, command, report_only)
    lines = [
        f"# {title}",
        "",
        software_line(),
        "",
        f"Run directory: `{root}`; one {what} per seed in `{layout}` (each with its own report.md). "
        "Seed s adds s to every seed field of the config (docs/reproducibility.md).",
        "",
    ]
    if commands:
        intro = "Reproduce:" if len(commands) == 1 else "Reproduce (in this order; each command adds its rows):"
        lines += [intro, "", "```bash", *commands, "```", ""]
    lines += [SIGNIFICANCE_RULE, ""] + body
    if summary["missing"]:
        missing = ", ".join(map(str, summary["missing"]))
        lines += [f"Seeds without results yet (rerun the same command): {missing}.", ""]
    summary["versions"], summary["commands"] = software_versions(), list(commands)
    report, data = storage.join(root, f"report_{name}.md"), storage.join(root, f"{name}.json")
    storage.write_json(data, summary)
    storage.write_bytes(report, "\n".join(lines).encode())
    return {"report": report, "summary": data}


def write_job_seeds_report(root: str, seeds: list[int], command: str = "", report_only: bool = False) -> dict:
    """report_seeds.md and seeds.json in ``root`` from the metrics.json of each ``root/seed_<s>`` that has one."""
    per_seed, missing = read_seeds(root, seeds, "metrics.json")
    summary = summarize_job(per_seed)
    summary["missing"] = missing
    body = job_lines(summary)
    if summary["cluster"]:
        body += ["## Clusters", "", "| | mean ± sd | per seed |", "|---|---|---|"]
        for key, stat in summary["cluster"].items():
            body.append(
                f"| {key} | {stat['mean']:.4g} ± {stat['sd'] or 0:.2g} | "
                + ", ".join(f"{v:.4g}" for v in stat["values"])
                + " |"
            )
        body.append("")
    return write_seeds_report(root, "ClusterFit over seeds", "run", body, summary, command, report_only)


# --- a sweep's seeds ---------------------------------------------------------------------------------------------
def summarize_sweep(per_seed: dict[int, dict]) -> dict:
    """From each seed's sweep_results.json: per target, the random / pre-trained references and every row (a
    ClusterFit setting or control, by its label) as mean ± sd per layer, and each row minus pre-trained, paired by
    seed. A row counts over the seeds that finished it."""
    from cf_ray.stages.sweep_report import _label

    seeds = sorted(per_seed)
    targets: dict[str, dict] = {}
    for s in seeds:
        for t, ref in (per_seed[s].get("references", {}).get("pretrained") or {}).items():
            if ref:
                targets.setdefault(t, {"layers": list(ref), "rows": {}})
    for t, out in targets.items():
        layers = out["layers"]
        refs = {
            s: per_seed[s]["references"]
            for s in seeds
            if all((per_seed[s]["references"].get(m) or {}).get(t) for m in ("random", "pretrained"))
        }
        rows = {m: {s: {l: refs[s][m][t][l]["score"] for l in layers} for s in refs} for m in ("random", "pretrained")}
        meta = {}
        for s in refs:
            for r in per_seed[s].get("rows", []):
                if t in r.get("transfer", {}):
                    rows.setdefault(_label(r), {})[s] = {l: r["transfer"][t][l]["score"] for l in layers}
                    meta[_label(r)] = r
        for name, by_seed in rows.items():
            have = sorted(by_seed)
            out["rows"][name] = {
                "seeds": have,
                "scores": {l: mean_sd([by_seed[s][l] for s in have]) for l in layers},
                "vs_pretrained": {
                    l: paired([by_seed[s][l] for s in have], [rows["pretrained"][s][l] for s in have]) for l in layers
                },
            }
        for name, r in meta.items():
            if r["kind"] != "clusterfit":
                continue
            vs = out["rows"][name]["vs_controls"] = {}
            for c, m in meta.items():
                if same_compute(r, m):
                    both = sorted(set(rows[name]) & set(rows[c]))
                    vs[c] = {l: paired([rows[name][s][l] for s in both], [rows[c][s][l] for s in both]) for l in layers}
    return {"seeds": seeds, "rule": SIGNIFICANCE_RULE, "targets": targets, "fit": summarize_fit(per_seed)}


def summarize_fit(per_seed: dict[int, dict]) -> dict:
    """Per sweep row (by label): mean ± sd over the seeds of its clusters' NMI and purity against the source labels
    (where known) and of the trained network's accuracy on its own targets, the figure that tracks transfer."""
    from cf_ray.stages.sweep_report import _label

    values: dict[str, dict[str, list[float]]] = {}
    for s in sorted(per_seed):
        for r in per_seed[s].get("rows", []):
            row = values.setdefault(_label(r), {"nmi": [], "purity": [], "train_acc": []})
            cluster = r.get("cluster", {})
            found = {"nmi": cluster.get("nmi"), "purity": cluster.get("purity"), "train_acc": r.get("train_acc")}
            for key, v in found.items():
                if v is not None:
                    row[key].append(v)
    fit = {name: {k: mean_sd(v) for k, v in row.items() if v} for name, row in values.items()}
    return {name: stats for name, stats in fit.items() if stats}


def same_compute(setting: dict, control: dict) -> bool:
    """Whether ``control`` (a sweep row) is the same-compute match of ClusterFit ``setting``: the same network, as
    many images through it, a control epoch of a multi-view task (RotNet: 4 rotations) counting as that many views
    (Sweep.control_epochs). A wider retrained network (grid.model) has no same-compute control."""
    from cf_ray.train.tasks import same_compute_epochs

    if control["kind"] == "clusterfit" or "task" not in control:
        return False
    same_net = all(setting.get("model", {}).get(f) == control.get("model", {}).get(f) for f in ("arch", "width"))
    return same_net and same_compute_epochs(setting["epochs"], control["task"]) == control["epochs"]


def sweep_lines(summary: dict) -> list[str]:
    lines = []
    for t, res in summary["targets"].items():
        layers = res["layers"]
        head = ["row", "seeds", *layers, *[f"{l} vs pre-trained" for l in layers]]
        lines += [
            f"## Transfer to {t}",
            "",
            "Linear-probe score (%), mean ± sd over the seeds; `vs pre-trained`: the row minus the same seed's "
            "pre-trained network (points), mean ± sd of the paired differences.",
            "",
            "| " + " | ".join(head) + " |",
            "|---" * len(head) + "|",
        ]
        for name, row in res["rows"].items():
            cells = [name, str(len(row["seeds"]))] + [fmt(row["scores"][l]) for l in layers]
            cells += ["" if name == "pretrained" else fmt(row["vs_pretrained"][l], signed=True) for l in layers]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        pairs = [(name, c, d) for name, row in res["rows"].items() for c, d in row.get("vs_controls", {}).items()]
        if pairs:
            lines += [
                "ClusterFit against its same-compute controls (the paper's claim that the gain is not just extra "
                "training): the setting minus the control trained for as many images through the network, paired "
                "by seed (points).",
                "",
                "| ClusterFit setting | control | seeds | " + " | ".join(layers) + " |",
                "|---" * (3 + len(layers)) + "|",
            ]
            for name, c, d in pairs:
                cells = [name, c, str(d[layers[0]]["n"])] + [fmt(d[l], signed=True) for l in layers]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    if summary.get("fit"):
        lines += [
            "## Clusters and fit",
            "",
            "NMI and purity of the clusters against the source's labels (where it has them); train acc: the "
            "trained network's accuracy on its own targets (pseudo-labels, or the control's task) at its last "
            "epoch. Mean ± sd over the seeds.",
            "",
            "| row | seeds | NMI | purity | train acc (%) |",
            "|---|---|---|---|---|",
        ]
        for name, fit in summary["fit"].items():
            n = max(stat["n"] for stat in fit.values())
            cells = [fmt(fit.get(k), scale=1, digits=3) for k in ("nmi", "purity")] + [fmt(fit.get("train_acc"))]
            lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write_sweep_seeds_report(root: str, seeds: list[int], command: str = "", report_only: bool = False) -> dict:
    """report_seeds.md and seeds.json in ``root`` from each ``root/seed_<s>/sweep_results.json``."""
    per_seed, missing = read_seeds(root, seeds, "sweep_results.json")
    summary = summarize_sweep(per_seed)
    summary["missing"] = missing
    lines = sweep_lines(summary)
    return write_seeds_report(root, "ClusterFit sweep over seeds", "sweep", lines, summary, command, report_only)
