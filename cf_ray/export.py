"""Export a run's model for use without cf_ray: ``torch.export`` (.pt2) or ONNX, plus a model card.

The exported graph takes the normalised float input the backbone takes (images ``(N, 3, S, S)``, video
clips ``(N, 3, T, S, S)``; N is dynamic) and returns one pooled embedding per tap, in ``layers`` order. Decoding,
``x/255``, mean/std and (video) the mean over a video's clips stay outside the graph; the card says how.
Every export is checked against the eager model on a fresh batch of another size; the card records the
maximum absolute difference.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time

import numpy as np

from cf_ray import storage
from cf_ray.api import ApiError, Model, load_model, read_run_config

log = logging.getLogger(__name__)

FORMATS = {"torch_export": "model.pt2", "onnx": "model.onnx"}
MAX_BATCH = 65536


def _wrapper(model: Model, layers: list[str]):
    import torch

    class Embeddings(torch.nn.Module):
        """The backbone's pooled taps as a tuple (graph exporters want tensors, not a dict)."""

        def __init__(self, backbone, layers):
            super().__init__()
            self.backbone, self.layers = backbone, list(layers)

        def forward(self, x):
            out = self.backbone.forward_features(x, self.layers)
            return tuple(out[l] for l in self.layers)

    return Embeddings(model.backbone, layers).eval()


def example_input(model: Model, batch: int, seed: int = 0):
    """A normalised input batch of the model's shape: decoded-looking uint8 noise through the run's normalisation."""
    import torch

    from cf_ray.media.decode import normalize

    spec = model.input_spec
    shape = (batch, spec["clip_len"], spec["size"], spec["size"], 3) if model.modality == "video" else None
    shape = shape or (batch, spec["size"], spec["size"], 3)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return normalize(pixels, model.mean, model.std).to(torch.float32)


def _export_torch(module, x, path: str, dynamic) -> None:
    import torch

    ep = torch.export.export(module, (x,), dynamic_shapes=dynamic)
    torch.export.save(ep, path)


def _export_onnx(module, x, path: str, dynamic, layers: list[str]) -> None:
    import torch

    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise ApiError("--format onnx needs the onnx and onnxscript packages: pip install 'cf_ray[export]'") from None
    torch.onnx.export(
        module,
        (x,),
        path,
        dynamo=True,
        input_names=["input"],
        output_names=list(layers),
        dynamic_shapes=dynamic,
        external_data=False,  # one self-contained file (a backbone is far below ONNX's 2 GB limit)
        verbose=False,
    )


def run_exported(path: str, fmt: str, x) -> list[np.ndarray]:
    """Outputs of an exported file on input ``x`` (a float tensor), loaded as a user would."""
    import torch

    if fmt == "torch_export":
        m = torch.export.load(path).module()
        with torch.inference_mode():
            return [o.numpy() for o in m(x)]
    import onnxruntime as ort

    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return list(s.run(None, {"input": x.numpy()}))


def export_model(
    run_dir: str,
    fmt: str = "torch_export",
    out: str | None = None,
    which: str = "clusterfit",
    layers: list[str] | None = None,
    check_batch: int = 3,
) -> dict:
    """Write ``<out>/model.pt2`` (or ``model.onnx``), ``model_card.json`` and ``MODEL_CARD.md``; returns the card.
    ``out`` defaults to ``<run>/export/<which>_<fmt>``."""
    import torch

    if fmt not in FORMATS:
        raise ApiError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    model = load_model(run_dir, which=which, centroids="none")
    layers = list(layers or model.taps)
    for l in layers:
        model.check_layer(l)
    out = out or storage.join(model.run_dir, "export", f"{which}_{fmt}")
    module = _wrapper(model, layers)
    x = example_input(model, 2)
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:  # exporters write local files; then copied to out (path or URI)
        local = os.path.join(tmp, FORMATS[fmt])
        with torch.no_grad():
            if fmt == "torch_export":
                _export_torch(module, x, local, dynamic)
            else:
                _export_onnx(module, x, local, dynamic, layers)
        secs = time.time() - t0
        check = example_input(model, check_batch, seed=1)  # another batch size: the batch dimension is dynamic
        with torch.inference_mode():
            eager = [o.numpy() for o in module(check)]
        got = run_exported(local, fmt, check)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(got, eager))
        data = open(local, "rb").read()
    storage.write_bytes(storage.join(out, FORMATS[fmt]), data)
    card = model_card(model, fmt, layers, FORMATS[fmt], hashlib.sha256(data).hexdigest(), len(data))
    card["check"] = {
        "input_batch": check_batch,
        "max_abs_diff_vs_eager": diff,
        "runtime": "torch.export.load" if fmt == "torch_export" else "onnxruntime (CPU)",
    }
    card["export_seconds"] = round(secs, 2)
    storage.write_json(storage.join(out, "model_card.json"), card)
    storage.write_bytes(storage.join(out, "MODEL_CARD.md"), card_markdown(card).encode())
    log.info("exported %s (%s) to %s; max abs diff vs eager %.3g", which, fmt, out, diff)
    return {**card, "out": out}


def _training(run_dir: str, which: str, cfg: dict) -> dict:
    """What the model was trained on and how, from the run's config and manifest."""
    manifest_uri = storage.join(run_dir, "manifest.json")
    stages = storage.read_json(manifest_uri).get("stages", {}) if storage.exists(manifest_uri) else {}
    items = stages.get("items", {}).get("result", {}).get("source")
    out = {"data": cfg.get("data"), "data_limit": cfg.get("data_limit"), "source_items": items}
    if which == "clusterfit":
        r = stages.get("retrain", {}).get("result", {})
        out["how"] = (
            "ClusterFit: trained from scratch to predict the run's k-means pseudo-labels of the pre-trained "
            "model's features"
        )
        out["cluster"] = cfg.get("cluster")
        out["train"] = cfg.get("retrain")
        out["last_epoch"] = (r.get("history") or [None])[-1]
    elif which == "pretrained":
        p = cfg.get("pretrain") or {}
        r = stages.get("pretrain", {}).get("result", {})
        out["how"] = f"pre-training: source={p.get('source')}, proxy={p.get('proxy')}"
        out["train"] = p
        out["last_epoch"] = (r.get("history") or [None])[-1]
    else:
        out["how"] = "random initialisation (the transfer floor)"
    return out


def _transfer(run_dir: str, which: str) -> dict:
    """{target: {layer: score}} and the metric per target, from the run's metrics.json (empty before the report)."""
    uri = storage.join(run_dir, "metrics.json")
    if not storage.exists(uri):
        return {}
    m = storage.read_json(uri)
    out = {}
    for target, by_model in (m.get("transfer") or {}).items():
        out[target] = {
            "metric": (m.get("transfer_metric") or {}).get(target, "top-1"),
            "scores": by_model.get(which, {}),
            "all_models": by_model,
        }
    return out


def model_card(model: Model, fmt: str, layers: list[str], file: str, sha256: str, size: int) -> dict:
    from cf_ray import __version__

    cfg = read_run_config(model.run_dir)
    n_params = sum(int(p.numel()) for p in model.backbone.parameters())
    outputs = {l: ["N", model.taps[l]] for l in layers}
    return {
        "name": f"cf_ray {model.which} {model.arch}",
        "cf_ray_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "format": fmt,
        "file": file,
        "sha256": sha256,
        "bytes": size,
        "run_dir": model.run_dir,
        "model": model.which,
        "weights_sha1": model.weights_sha1,
        "architecture": {**model.model_config.model_dump(mode="json"), "parameters": n_params},
        "modality": model.modality,
        "input": {**model.input_spec, "name": "input", "dtype": "float32", "dynamic_axes": ["batch (dim 0)"]},
        "normalization": {"scale": "x/255", "mean": list(model.mean), "std": list(model.std)},
        "taps": model.taps,
        "outputs": outputs,
        "training": _training(model.run_dir, model.which, cfg),
        "transfer": _transfer(model.run_dir, model.which),
    }


def card_markdown(card: dict) -> str:
    a, i, n = card["architecture"], card["input"], card["normalization"]
    video = card["modality"] == "video"
    shape = "(N, 3, T, S, S)" if video else "(N, 3, S, S)"
    load = (
        "```python\nimport torch\nm = torch.export.load('model.pt2').module()\n"
        "embeddings = m(x)  # tuple, in `outputs` order\n```"
        if card["format"] == "torch_export"
        else "```python\nimport onnxruntime as ort\ns = ort.InferenceSession('model.onnx')\n"
        "embeddings = s.run(None, {'input': x.numpy()})\n```"
    )
    lines = [
        f"# {card['name']}",
        "",
        f"Exported by cf_ray {card['cf_ray_version']} on {card['created']} from `{card['run_dir']}` "
        f"({card['format']}, `{card['file']}`, sha256 `{card['sha256'][:16]}...`).",
        "",
        "## Architecture",
        "",
        f"`{a['arch']}`, width {a['width']}, {a['stem']} stem, {a['parameters']:,} parameters "
        "(backbone only, no head).",
        "",
        "## Input",
        "",
        f"- one tensor `input` {shape} float32, RGB, batch dimension dynamic;",
        f"- S = {i['size']} (short side resized to {i['resize']}, centre crop)"
        + (f", T = {i['clip_len']} frames taken every {i['stride']} frames" if video else ""),
        f"- normalisation: `(x / 255 - mean) / std`, mean {n['mean']}, std {n['std']}.",
    ]
    if video:
        lines.append(
            f"- a video's embedding in cf_ray is the mean over {i['num_clips']} uniformly spaced clips: "
            "run each clip and average."
        )
    lines += [
        "",
        "## Outputs",
        "",
        "| output | shape | tap |",
        "|---|---|---|",
        *[f"| {l} | (N, {d}) | globally average-pooled output of stage {l} |" for l, (_, d) in card["outputs"].items()],
        "",
        "Load and run:",
        "",
        load,
        "",
        "## Training",
        "",
        f"{card['training']['how']}. Data: `{card['training']['data']}`"
        + (f" ({card['training']['source_items']} items)" if card["training"].get("source_items") else "")
        + ". Configuration: `model_card.json` (`training`), the run's `config.yaml`.",
        "",
        "## Transfer (linear probes on frozen features)",
        "",
    ]
    if not card["transfer"]:
        lines.append("No transfer results in the run yet (its report stage has not run).")
    for target, t in card["transfer"].items():
        models = list(t["all_models"])
        layer_names = list(next(iter(t["all_models"].values())))
        lines += [
            f"Target `{target}`, {t['metric']} (%):",
            "",
            "| model | " + " | ".join(layer_names) + " |",
            "|---|" + "---|" * len(layer_names),
        ]
        for m in models:
            name = f"**{m}** (this model)" if m == card["model"] else m
            lines.append(
                f"| {name} | "
                + " | ".join(f"{100 * float(t['all_models'][m].get(l, float('nan'))):.1f}" for l in layer_names)
                + " |"
            )
        lines.append("")
    c = card.get("check", {})
    lines += [
        "",
        "## Check",
        "",
        f"Exported vs eager PyTorch on a batch of {c.get('input_batch')} ({c.get('runtime')}): "
        f"max abs difference {c.get('max_abs_diff_vs_eager', float('nan')):.3g}.",
        "",
    ]
    return "\n".join(lines)


def read_card(out: str) -> dict:
    return json.loads(io.BytesIO(storage.read_bytes(storage.join(out, "model_card.json"))).read())
