"""Fail fast, in one line, when the Python running a job cannot import cf_ray's dependencies.

Standard library only: this runs before anything else of cf_ray is imported (jobs/*.py, `python -m cf_ray`).
The usual cause is `ray job submit` on a head started with another Python than the project's venv.
"""

from __future__ import annotations

import importlib.util
import sys

# Import names of the runtime dependencies in pyproject.toml.
REQUIRED = ("ray", "torch", "torchvision", "faiss", "pyarrow", "av", "numpy", "PIL", "pydantic", "yaml", "matplotlib")


def missing_modules(names: tuple[str, ...] = REQUIRED) -> list[str]:
    """The names this interpreter cannot find (found ones are not imported)."""
    out = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                out.append(name)
        except (ImportError, ValueError):
            out.append(name)
    return out


def require_environment(prog: str) -> None:
    """Exit with status 2 and a one-line message naming the interpreter and what it lacks."""
    missing = missing_modules()
    if missing:
        sys.stderr.write(
            f"error: {prog}: this Python ({sys.executable}) cannot import cf_ray's dependencies "
            f"({', '.join(missing)}); run it with the project's environment: .venv/bin/python {prog}, or activate "
            "the venv before `ray start` so `ray job submit` uses it (see docs/cluster.md)\n"
        )
        sys.exit(2)


def add_version_argument(parser) -> None:
    """``--version``: print :func:`cf_ray.version_line` unwrapped (argparse's own action wraps it) and exit."""
    import argparse

    from cf_ray import version_line

    class _Version(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(version_line())
            parser.exit()

    parser.add_argument(
        "--version", action=_Version, nargs=0, default=argparse.SUPPRESS, help="print the versions and exit"
    )
