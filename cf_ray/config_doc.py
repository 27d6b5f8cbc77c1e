"""Generate docs/config.md from the config models, so the reference cannot drift from the code.

python -m cf_ray.config_doc > docs/config.md
"""

from __future__ import annotations

from pydantic import BaseModel

from cf_ray.config import JobConfig, ServeConfig


def _type_name(ann) -> str:
    import typing

    if typing.get_origin(ann) is typing.Literal:
        return " / ".join(repr(a) for a in typing.get_args(ann))
    args = typing.get_args(ann)
    if type(None) in args and len(args) == 2:  # Optional[X], e.g. a Literal that may be left unset
        return _type_name(next(a for a in args if a is not type(None))) + " or None"
    name = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
    return name.replace(" | ", " or ").replace("|", " or ")


def _rows(model: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> list[str]:
    """One row per leaf key; ``defaults``: the section's default instance when its parent's factory sets values."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        key = f"{prefix}{name}"
        default = getattr(defaults, name) if defaults is not None else None
        if defaults is None:
            default = field.default_factory() if field.default_factory else field.default
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _rows(ann, key + ".", default if isinstance(default, BaseModel) else None)
            continue
        typ = _type_name(ann)
        shown = "required" if defaults is None and field.is_required() else f"`{default!r}`"
        rows.append(f"| `{key}` | {typ} | {shown} | {field.description or ''} |")
    return rows


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `cf_ray/config.py` by `python -m cf_ray.config_doc`; a test fails if this file is stale.",
        "Set values in a YAML file (`--config`) or as dotted overrides (`cluster.k=500`). Unknown keys and wrong",
        "types are rejected, naming the key, before any work starts.",
        "",
        "Seeds: `--seeds 0,1,2` (job and sweep) runs once per seed s in `<run_dir>/seed_<s>`, adding s to every",
        "`seed` key below (`seed`, `pretrain.train.seed`, `cluster.seed`, `retrain.seed`, `probe.seed`,",
        "`probe.finetune_train.seed`), then writes `<run_dir>/report_seeds.md` with mean ± sd over the seeds. See",
        "[reproducibility.md](reproducibility.md).",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        *_rows(JobConfig),
        "",
        "## The online service",
        "",
        "`serve run cf_ray.serve:app run_dir=runs/x [key=value ...]` (dotted keys for the sections, e.g.",
        "`model.max_replicas=4`), or `args:` of an application in a Serve config file (deploy/serve_config.yaml).",
        "See [serve.md](serve.md).",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        *_rows(ServeConfig),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
