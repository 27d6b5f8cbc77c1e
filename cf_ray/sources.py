"""Inputs: a folder of media files (class subfolders give labels) or a manifest (CSV/Parquet).

Every source becomes one Arrow table of (id, path, label); files that are skipped before decoding
(unsupported extension) come back in a second table of (id, path, error) so nothing is dropped silently.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cf_ray import storage
from cf_ray.media.items import ERRORS_SCHEMA

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")

ITEMS_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("label", pa.string())])


class SourceError(ValueError):
    """A data source that cannot be used; the message says what to change."""


def list_items(source: str, exts: tuple[str, ...] = IMAGE_EXTS) -> tuple[pa.Table, pa.Table]:
    """(items, skipped) for a folder or manifest. Raises SourceError for a missing or empty source."""
    if not source:
        raise SourceError("no data path given (pass --data <folder or manifest>)")
    if not storage.exists(source):
        raise SourceError(f"data path {source} does not exist")
    fs, root = storage.resolve(source)
    if fs.get_file_info(root).type == pafs.FileType.File:
        items, skipped = _from_manifest(source)
    else:
        items, skipped = _from_folder(fs, root, source, exts)
    if items.num_rows == 0:
        raise SourceError(f"{source} holds no usable files (looked for {', '.join(exts)}; skipped {skipped.num_rows})")
    return items, skipped


def _from_folder(fs: pafs.FileSystem, root: str, source: str, exts: tuple[str, ...]):
    found = _walk_local(root) if isinstance(fs, pafs.LocalFileSystem) else _walk_fs(fs, root, source)
    keep, skip = [], []
    for rel, full, problem in sorted(found):
        if posixpath.basename(rel).startswith("."):
            continue  # hidden files (.DS_Store, ._foo) are not data
        if problem:
            skip.append((rel, full, problem))
        elif rel.lower().endswith(exts):
            keep.append((rel, full))
        else:
            skip.append((rel, full, f"unsupported file type (expected one of {', '.join(exts)})"))
    # Labels come from the first folder level, only when every kept file sits in one.
    labelled = bool(keep) and all("/" in rel for rel, _ in keep)
    items = pa.table(
        {
            "id": [rel for rel, _ in keep],
            "path": [full for _, full in keep],
            "label": [rel.split("/", 1)[0] if labelled else None for rel, _ in keep],
        },
        schema=ITEMS_SCHEMA,
    )
    skipped = pa.table(
        {
            "id": [s[0] for s in skip],
            "path": [s[1] for s in skip],
            "stage": ["list"] * len(skip),
            "error": [s[2] for s in skip],
        },
        schema=ERRORS_SCHEMA,
    )
    return items, skipped


def _walk_fs(fs: pafs.FileSystem, root: str, source: str) -> list[tuple[str, str, str]]:
    """(id, path, problem) of every file under an object-store prefix (no links there)."""
    out = []
    for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if i.type == pafs.FileType.File:
            rel = i.path[len(root) :].lstrip("/")
            out.append((rel, source.rstrip("/") + "/" + rel, ""))
    return out


def _walk_local(root: str) -> list[tuple[str, str, str]]:
    """(id, path, problem) of every file under a local folder, following directory links once each.

    Problems (the entry is recorded as skipped, not dropped): a name that is not valid UTF-8 (Arrow strings
    cannot hold it), a directory link back into the tree (a loop), a link to nothing or a link loop.
    """
    out, seen = [], set()
    for top, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: a loop or a second path
            dirs.clear()
            rel = os.path.relpath(top, root).replace(os.sep, "/")
            out.append(
                (
                    _printable(rel),
                    _printable(top),
                    "folder reached again through a link (a loop or a second path "
                    "to it); listed once, not followed here",
                )
            )
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()  # a folder reachable twice is listed under the same name on every run
        for name in files + [d for d in dirs if not os.path.isdir(os.path.join(top, d))]:
            full = os.path.join(top, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if _printable(full) != full:
                out.append(
                    (_printable(rel), _printable(full), "file name is not valid UTF-8; rename the file to read it")
                )
            elif not os.path.exists(full):  # stat follows links: a dangling link or a link loop
                out.append((rel, full, "broken symbolic link or symlink loop"))
            elif os.path.isfile(full):
                out.append((rel, full, ""))
            else:
                out.append((rel, full, "not a regular file"))
    return out


def _printable(name: str) -> str:
    """A file name as valid UTF-8: undecodable bytes (held as surrogates by os) become \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _from_manifest(source: str):
    fs, p = storage.resolve(source)
    if source.lower().endswith(".parquet"):
        t = pq.read_table(p, filesystem=fs)
    elif source.lower().endswith(".csv"):
        with fs.open_input_stream(p) as f:
            t = pacsv.read_csv(f)
    else:
        raise SourceError(f"{source} is a file but not a manifest (.csv or .parquet); pass a folder or a manifest")
    if "path" not in t.column_names:
        raise SourceError(f"manifest {source} needs a 'path' column (has: {', '.join(t.column_names)})")
    base = posixpath.dirname(source) if storage.is_uri(source) else posixpath.dirname(p)
    paths = [
        x if (storage.is_uri(x) or x.startswith("/")) else storage.join(base, x)
        for x in t["path"].cast(pa.string()).to_pylist()
    ]
    ids = t["id"].cast(pa.string()).to_pylist() if "id" in t.column_names else t["path"].cast(pa.string()).to_pylist()
    labels = t["label"].cast(pa.string()).to_pylist() if "label" in t.column_names else [None] * len(paths)
    counts = pc.value_counts(pa.array(ids))
    dup_ids = [c["values"].as_py() for c in counts if c["counts"].as_py() > 1]
    if dup_ids:
        raise SourceError(f"manifest {source} has duplicate ids, e.g. {dup_ids[:3]}; ids must be unique")
    items = pa.table({"id": ids, "path": paths, "label": labels}, schema=ITEMS_SCHEMA)
    return items, ERRORS_SCHEMA.empty_table()


def split_items(items: pa.Table, test_fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Deterministic, stratified split by a hash of the id (stable when files are added)."""
    import hashlib

    def bucket(i: str) -> float:
        return int.from_bytes(hashlib.sha1(f"{seed}:{i}".encode()).digest()[:8], "big") / 2**64

    is_test = pa.array([bucket(i) < test_fraction for i in items["id"].to_pylist()])
    return items.filter(pc.invert(is_test)), items.filter(is_test)


# Held-out split folder names next to train/: test/ (CIFAR style) or val/, validation/ (the ImageNet convention).
TEST_SPLITS = ("test", "val", "validation")


@dataclass(frozen=True)
class TargetSplits:
    """Where a target's train and test splits come from. ``test`` None: ``train`` (or the whole target when
    ``train`` is None too) is split by ``probe.test_fraction``. ``note`` says it in words for the log and report."""

    train: str | None
    test: str | None
    note: str


def target_splits(target: str, test_split: str = "auto") -> TargetSplits:
    """Find a target's splits: train/ next to one of test/, val/, validation/ (``test_split`` picks one when
    there are several; ``auto`` takes the only one), train/ alone, or one labelled folder/manifest."""
    if not target:
        raise SourceError("no target dataset given (pass --target <labelled folder>)")
    has_train = storage.exists(storage.join(target, "train"))
    held = [s for s in TEST_SPLITS if storage.exists(storage.join(target, s))]
    train = storage.join(target, "train")
    if test_split != "auto":
        if not has_train or test_split not in held:
            found = ", ".join(f"{s}/" for s in (["train"] if has_train else []) + held) or "neither"
            raise SourceError(
                f"test_split={test_split} (probe.test_split or targets.<name>.test_split) needs folders train/ and "
                f"{test_split}/ in target {target} "
                f"(it has {found}); set probe.test_split=auto or to a folder it has"
            )
        return TargetSplits(
            train,
            storage.join(target, test_split),
            f"train/ and {test_split}/; {test_split}/ picked by probe.test_split",
        )
    if has_train and len(held) > 1:
        raise SourceError(
            f"target {target} has {' and '.join(f'{s}/' for s in held)} next to train/; pick the test split with "
            f"probe.test_split={'|'.join(held)}"
        )
    if has_train and held:
        used = held[0]
        note = "train/ and test/" if used == "test" else f"train/ and {used}/; {used}/ used as the test split"
        return TargetSplits(train, storage.join(target, used), note)
    if held:
        raise SourceError(
            f"target {target} has {held[0]}/ but no train/ next to it; add train/ (one subfolder per class) "
            "or pass one labelled folder"
        )
    if has_train:
        return TargetSplits(train, None, "train/ only, split by probe.test_fraction")
    return TargetSplits(None, None, "one labelled set, split by probe.test_fraction")


def load_target(
    target: str, test_fraction: float, seed: int, exts=IMAGE_EXTS, test_split: str = "auto"
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(train, test, skipped) for a labelled target: a folder with train/ and test/ (or val/, validation/; see
    :func:`target_splits`), or one labelled source split deterministically by ``test_fraction``."""
    splits = target_splits(target, test_split)
    if splits.test is not None:
        train, s1 = list_items(splits.train, exts)
        test, s2 = list_items(splits.test, exts)
        skipped = pa.concat_tables([s1, s2])
    else:
        items, skipped = list_items(splits.train or target, exts)
        train, test = split_items(items, test_fraction, seed)
    log.info("target %s: %s", target, splits.note)
    for name, t in (("train", train), ("test", test)):
        if t["label"].null_count == t.num_rows:
            raise SourceError(
                f"target {target} ({name}) has no labels: put files in one folder per class, or give a label column"
            )
        if t.num_rows == 0:
            raise SourceError(f"target {target} has an empty {name} split")
    return train, test, skipped
