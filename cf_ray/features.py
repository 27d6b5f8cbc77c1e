"""The one owner of feature folders: how extracted features are laid out, written, resumed and read.

A feature folder holds ``part-<hash of its ids>.parquet`` files, each committed whole (temporary name, then
rename), plus ``_SUCCESS.json`` (written last: the folder is complete only with it) and ``_errors.parquet``
(the rows that could not be decoded). One row per input: id, path, label, error ('' when fine) and one
fixed-size float32 list column ``feat_<tap>`` per feature tap (null where the input failed); for video,
optionally ``clipfeat_<tap>`` with every clip's feature. Every reader and writer goes through this module.
"""

from __future__ import annotations

import hashlib
import io
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cf_ray import storage
from cf_ray.storage import SUCCESS, IncompleteOutputError, require_complete  # noqa: F401  (re-exported)

ERRORS = "_errors.parquet"


def column(layer: str) -> str:
    return f"feat_{layer}"


def clip_column(layer: str) -> str:
    """The per-clip features of a video (extract.clip_features): clips x dim per row."""
    return f"clipfeat_{layer}"


# --- writing ---------------------------------------------------------------------------------------------------
def feature_column(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    """(n_ok, d) features for the rows where ok -> a length-n fixed-size-list column, null elsewhere."""
    n, d = len(ok), values.shape[1]
    full = np.zeros((n, d), dtype=np.float32)
    full[ok] = values
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), d, mask=pa.array(~ok))


def clip_feature_column(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    """(n_ok, clips, d) per-clip features -> a column of fixed-size lists of per-clip feature lists."""
    n, c, d = len(ok), values.shape[1], values.shape[2]
    full = np.zeros((n, c, d), dtype=np.float32)
    full[ok] = values
    inner = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), d)
    return pa.FixedSizeListArray.from_arrays(inner, c, mask=pa.array(~ok))


def feature_table(ids, paths, labels, errors, feats: dict[str, np.ndarray], ok: np.ndarray | None = None) -> pa.Table:
    """Rows in the folder's schema; ``feats`` maps a tap to (n_ok, d) (or (n_ok, clips, d) for per-clip columns,
    key ``clip:<tap>``) features of the rows where ``ok``."""
    ok = np.array([e == "" for e in errors], dtype=bool) if ok is None else ok
    cols = {
        "id": pa.array(list(ids), pa.string()),
        "path": pa.array(list(paths), pa.string()),
        "label": pa.array([None if v is None else str(v) for v in labels], pa.string()),
        "error": pa.array(list(errors), pa.string()),
    }
    for key, values in feats.items():
        if key.startswith("clip:"):
            cols[clip_column(key[5:])] = clip_feature_column(values, ok)
        else:
            cols[column(key)] = feature_column(values, ok)
    return pa.table(cols)


def write_part(uri: str, table: pa.Table) -> str:
    """Commit ``table`` as one part file named by a hash of its ids: a retried writer rewrites the same name."""
    digest = hashlib.sha1("\n".join(table["id"].to_pylist()).encode()).hexdigest()[:16]
    buf = io.BytesIO()
    pq.write_table(table, buf)
    path = storage.join(uri, f"part-{digest}.parquet")
    storage.write_bytes(path, buf.getvalue())  # tmp + rename
    return path


def finish(uri: str, info: dict) -> dict:
    """Write the errors table and the done marker (last). Returns the folder's row counts merged into ``info``."""
    meta = read_table(uri, ["id", "path", "error"], ok_only=False, require_done=False)
    bad = meta.filter(pc.not_equal(meta["error"], ""))
    buf = io.BytesIO()
    pq.write_table(bad, buf)
    storage.write_bytes(storage.join(uri, ERRORS), buf.getvalue())
    info = {"rows": meta.num_rows, "ok": meta.num_rows - bad.num_rows, "skipped": bad.num_rows, **info}
    storage.mark_complete(uri, info)
    return info


def write_folder(uri: str, table: pa.Table, info: dict) -> dict:
    """A whole feature folder from one table (e.g. features computed on the driver)."""
    storage.delete_dir(uri)
    write_part(uri, table)
    return finish(uri, info)


# --- resuming --------------------------------------------------------------------------------------------------
def part_files(uri: str) -> list[str]:
    """Committed part files of a folder (temporaries end in .tmp; names starting with '_' or '.' are metadata)."""
    fs, p = storage.resolve(uri)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p))
    return sorted(
        storage.join(uri, i.base_name)
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.startswith("part-") and i.base_name.endswith(".parquet")
    )


def committed_ids(uri: str, wanted: set[str]) -> set[str]:
    """Ids already in ``uri``'s committed parts; deletes temporaries, unreadable parts, and parts that overlap
    an earlier part or hold ids not wanted (left by a retried task or an older item list)."""
    fs, p = storage.resolve(uri)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return set()
    for i in fs.get_file_info(pafs.FileSelector(p)):
        if i.base_name.endswith(".tmp"):
            fs.delete_file(i.path)
    done: set[str] = set()
    for f in part_files(uri):
        ffs, fp = storage.resolve(f)
        try:
            ids = pq.read_table(fp, filesystem=ffs, columns=["id"])["id"].to_pylist()
        except (OSError, pa.ArrowInvalid):
            ids = None
        if ids is None or len(set(ids)) != len(ids) or not done.isdisjoint(ids) or not wanted.issuperset(ids):
            ffs.delete_file(fp)
            continue
        done.update(ids)
    return done


# --- reading ---------------------------------------------------------------------------------------------------
def dataset(uri: str, require_done: bool = True) -> pads.Dataset:
    """The folder's committed parts as one ``pyarrow.dataset`` (column selection and filters are pushed down)."""
    if require_done:
        require_complete(uri)
    files = part_files(uri)
    if not files:
        raise FileNotFoundError(f"no feature Parquet files in {uri}")
    fs, _ = storage.resolve(uri)
    return pads.dataset([storage.resolve(f)[1] for f in files], filesystem=fs, format="parquet")


def read_table(uri: str, columns: Iterable[str], ok_only: bool = True, require_done: bool = True) -> pa.Table:
    """The given columns, of the rows that decoded fine (``ok_only``) or of every row."""
    flt = pads.field("error") == "" if ok_only else None
    return dataset(uri, require_done).to_table(columns=list(columns), filter=flt)


def read_features(uri: str, layer: str, with_labels: bool = False):
    """(ids, features float32 (n, d)[, labels]) of the rows that decoded fine, from a complete folder."""
    t = read_table(uri, ["id", column(layer)] + (["label"] if with_labels else []))
    col = t[column(layer)].combine_chunks()
    if t.num_rows == 0:
        feats = np.zeros((0, col.type.list_size), np.float32)
    else:
        feats = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
    ids = t["id"].to_pylist()
    feats = feats.astype(np.float32, copy=False)
    return (ids, feats, t["label"].to_pylist()) if with_labels else (ids, feats)


def dim(uri: str, layer: str) -> int:
    return dataset(uri, require_done=False).schema.field(column(layer)).type.list_size
