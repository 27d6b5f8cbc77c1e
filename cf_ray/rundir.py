"""The run directory: one place per output, a manifest of stages, the errors table.

A stage counts as done only when its manifest entry says so, and that is written after every output
of the stage is complete; a rerun skips done stages and redoes the rest.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from cf_ray import storage
from cf_ray.media.items import ERRORS_SCHEMA

logger = logging.getLogger(__name__)


@dataclass
class RunDir:
    root: str

    def __post_init__(self):
        self.root = storage.absolute(self.root)
        storage.makedirs(self.root)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # --- manifest of stages -------------------------------------------------------------------
    @property
    def manifest_path(self) -> str:
        return self.path("manifest.json")

    def manifest(self) -> dict:
        return storage.read_json(self.manifest_path) if storage.exists(self.manifest_path) else {"stages": {}}

    def _update(self, name: str, **fields) -> None:
        m = self.manifest()
        m["stages"].setdefault(name, {}).update(fields)
        storage.write_json(self.manifest_path, m)

    def is_done(self, name: str) -> bool:
        return self.manifest()["stages"].get(name, {}).get("status") == "done"

    def invalidate(self, names: list[str]) -> None:
        """Forget these stages, so the next run redoes them."""
        m = self.manifest()
        for n in names:
            m["stages"].pop(n, None)
        storage.write_json(self.manifest_path, m)

    def stage(self, name: str, fn: Callable[[], dict | None], force: bool = False) -> dict:
        """Run ``fn`` unless the stage is already done; returns its recorded outputs/metrics."""
        if self.is_done(name) and not force:
            logger.info(f"stage {name}: already done, skipping (delete its entry in {self.manifest_path} to redo)")
            return self.manifest()["stages"][name].get("result", {})
        logger.info(f"stage {name}: starting")
        t0 = time.time()
        self._update(name, status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        try:
            result = fn() or {}
        except BaseException as e:
            self._update(name, status="failed", error=f"{type(e).__name__}: {e}")
            raise
        secs = round(time.time() - t0, 1)
        self._update(name, status="done", seconds=secs, result=result)
        logger.info(f"stage {name}: done in {secs}s")
        return result

    # --- errors table (skipped inputs, with reasons) ------------------------------------------
    @property
    def errors_path(self) -> str:
        return self.path("errors.parquet")

    def errors(self) -> pa.Table:
        if not storage.exists(self.errors_path):
            return ERRORS_SCHEMA.empty_table()
        fs, p = storage.resolve(self.errors_path)
        return pq.read_table(p, filesystem=fs)

    def record_errors(self, table: pa.Table, stage: str, dataset: str) -> None:
        """Replace this (stage, dataset)'s rows in the errors table, so a rerun does not duplicate them."""
        if "stage" not in table.column_names:
            table = table.append_column("stage", pa.array([stage] * table.num_rows, pa.string()))
        table = table.select(["id", "path", "stage", "error"]).cast(ERRORS_SCHEMA)
        table = table.append_column("dataset", pa.array([dataset] * table.num_rows, pa.string()))
        old = self.errors()
        if "dataset" in old.column_names and old.num_rows:
            mask = [
                not (s == stage and d == dataset) for s, d in zip(old["stage"].to_pylist(), old["dataset"].to_pylist())
            ]
            old = old.filter(pa.array(mask))
        else:
            old = table.schema.empty_table()
        merged = pa.concat_tables([old.cast(table.schema), table])
        buf = io.BytesIO()
        pq.write_table(merged, buf)
        storage.write_bytes(self.errors_path, buf.getvalue())  # a kill mid-write leaves the old table whole
