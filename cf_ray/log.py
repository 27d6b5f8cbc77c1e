"""cf_ray's logging: stdlib ``logging`` under the ``cf_ray`` logger, one timestamped line per message on stdout.

Library modules take ``logger = logging.getLogger(__name__)``; entry points (the CLI, a Ray Train worker, an
extraction actor) call ``setup()`` once, since each Ray worker is a process of its own.
"""

from __future__ import annotations

import logging
import sys

ROOT = "cf_ray"
_FORMAT = "[cf_ray %(asctime)s] %(message)s"


def setup(level: int = logging.INFO) -> logging.Logger:
    """Send cf_ray's records of ``level`` and above to stdout (idempotent, per process)."""
    root = logging.getLogger(ROOT)
    root.setLevel(level)
    if not any(getattr(h, "_cf_ray", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._cf_ray = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False  # pytest and Ray install root handlers; print each record once
    return root
