"""Paths and URIs (local, s3://, gs://...) through pyarrow.fs, so every stage reads and writes both."""

from __future__ import annotations

import functools
import json
import os
import posixpath
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


# Credentials and endpoint come from the environment (instance profile, AWS_* variables, gcloud defaults);
# the endpoint and key id are part of the cache key so a changed environment gets a new filesystem.
_CREDENTIAL_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE")


@functools.lru_cache(maxsize=32)
def _bucket_filesystem(bucket_uri: str, _env: tuple) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(bucket_uri)[0]


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        u = urlsplit(path)
        if u.scheme in ("s3", "gs", "gcs") and not u.query:
            # from_uri asks S3 for the bucket's region on every call: once per bucket is enough (decode reads
            # every image through here).
            env = tuple(os.environ.get(k, "") for k in _CREDENTIAL_ENV)
            return _bucket_filesystem(f"{u.scheme}://{u.netloc}", env), (u.netloc + u.path).rstrip("/")
        return pafs.FileSystem.from_uri(path)
    if path.startswith("file://"):
        path = path[len("file://") :]
    return pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())


def absolute(path: str) -> str:
    """A path other processes (Ray workers change directory) can use."""
    return path if is_uri(path) else resolve(path)[1]


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else str(Path(base, *parts))


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write whole-file; local writes go through a temporary name so a reader never sees half a file."""
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = p + ".tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, p)
    else:  # object stores make a PUT visible atomically
        with fs.open_output_stream(p) as f:
            f.write(data)


def read_json(path: str):
    return json.loads(read_bytes(path))


def write_json(path: str, obj) -> None:
    write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


def delete_dir(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


# --- done markers: an output folder is complete only once its marker exists (written last) ---------------
SUCCESS = "_SUCCESS.json"


class IncompleteOutputError(RuntimeError):
    """An output folder without its done marker: it was interrupted, or is still being written."""


def is_complete(uri: str) -> bool:
    return exists(join(uri, SUCCESS))


def mark_complete(uri: str, info: dict) -> None:
    write_json(join(uri, SUCCESS), info)


def read_marker(uri: str) -> dict:
    return read_json(join(uri, SUCCESS))


def require_complete(uri: str, what: str = "its extraction") -> None:
    if not is_complete(uri):
        raise IncompleteOutputError(f"{uri} has no {SUCCESS}: {what} did not finish; rerun the job to resume it")
