"""An HTTP request -> one input (its kind and its bytes, or an allowed URI), or an HttpError naming the reason.

Accepted bodies: the raw file with ``Content-Type: image/...`` or ``video/...``; ``multipart/form-data`` with one
file part (its own content type, else its file name's extension, says the kind); ``application/json``
``{"uri": "s3://..."}`` only when the server allows URIs and the URI starts with an allowed prefix. Nothing is
ever unpickled: bodies are bytes handed to the image/video decoders, or JSON.
"""

from __future__ import annotations

import json
import mimetypes
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.requests import Request

KINDS = ("image", "video")
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg"}


class HttpError(Exception):
    """A request the service refuses: ``status`` (4xx/5xx) and a one-line ``reason`` that says what to do."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class Payload:
    kind: str  # image | video
    data: bytes | None = None  # the file's bytes, or None for a URI input
    uri: str | None = None


def kind_of(content_type: str | None, filename: str | None = None) -> str | None:
    """image / video from a MIME type (parameters ignored), else from a file name's extension; None if neither."""
    ct = (content_type or "").split(";")[0].strip().lower()
    major = ct.split("/")[0]
    if major in KINDS:
        return major
    if filename:
        guess = (mimetypes.guess_type(filename)[0] or "").split("/")[0]
        if guess in KINDS:
            return guess
        if any(filename.lower().endswith(e) for e in VIDEO_EXTENSIONS):
            return "video"
    return None


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise HttpError(413, f"body larger than the {limit} byte limit (serve.max_body_mb); send a smaller file")
        yield chunk


def _check_length(request: Request, limit: int) -> None:
    n = request.headers.get("content-length")
    if n is None:
        return
    try:
        size = int(n)
    except ValueError:
        raise HttpError(400, f"Content-Length {n!r} is not a number") from None
    if size > limit:
        raise HttpError(
            413, f"body of {size} bytes is larger than the {limit} byte limit (serve.max_body_mb); send a smaller file"
        )
    if size == 0:
        raise HttpError(400, 'empty body: send an image or a video (raw bytes, multipart, or {"uri": ...} JSON)')


async def read_payload(
    request: Request, max_bytes: int, allow_uris: bool = False, uri_prefixes: tuple[str, ...] = ()
) -> Payload:
    """The request's one input, checked for size, content type and (for URIs) the allow-list."""
    _check_length(request, max_bytes)
    ct = request.headers.get("content-type", "")
    base = ct.split(";")[0].strip().lower()
    if base == "multipart/form-data":
        return await _multipart(request, max_bytes)
    if base == "application/json":
        return _uri(await _body(request, max_bytes), allow_uris, uri_prefixes)
    kind = kind_of(ct)
    if kind is None:
        raise HttpError(
            415,
            f"unsupported Content-Type {ct or '(none)'!r}: send image/<format> or video/<format> bytes, "
            'multipart/form-data with one file, or application/json {"uri": ...}',
        )
    return Payload(kind, data=await _body(request, max_bytes))


async def _body(request: Request, max_bytes: int) -> bytes:
    data = b"".join([c async for c in _limited(request.stream(), max_bytes)])
    if not data:
        raise HttpError(400, 'empty body: send an image or a video (raw bytes, multipart, or {"uri": ...} JSON)')
    return data


async def _multipart(request: Request, max_bytes: int) -> Payload:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    parser = MultiPartParser(request.headers, _limited(request.stream(), max_bytes), max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise HttpError(400, f"malformed multipart body: {e}") from None
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise HttpError(400, "multipart body without a file part: send the file as e.g. -F file=@photo.jpg")
        f = files[0]
        data = await f.read()
        if not data:
            raise HttpError(400, f"empty file part {f.filename or ''!r}".replace(" ''", ""))
        kind = kind_of(f.content_type, f.filename)
        if kind is None:
            raise HttpError(
                415,
                f"file part {f.filename!r} of type {f.content_type!r} is neither an image nor a video: "
                "set its type (curl -F 'file=@x;type=image/jpeg') or an image/video file extension",
            )
        return Payload(kind, data=data)
    finally:
        await form.close()


def _uri(body: bytes, allow_uris: bool, prefixes: tuple[str, ...]) -> Payload:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HttpError(400, f"invalid JSON body: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("uri"), str) or not doc["uri"]:
        raise HttpError(400, 'a JSON body is {"uri": "<path or URI>"} (with "kind": "image"|"video" if unclear)')
    uri = doc["uri"]
    if not allow_uris:
        raise HttpError(
            403, "URI inputs are disabled on this server (serve.allow_uris=false): send the file's bytes instead"
        )
    if ".." in uri.replace("\\", "/").split("/") or not any(uri.startswith(p) for p in prefixes):
        allowed = ", ".join(prefixes) or "none configured"
        raise HttpError(403, f"URI {uri!r} is outside the allowed prefixes ({allowed}; serve.uri_prefixes)")
    kind = doc.get("kind") or kind_of(None, uri)
    if kind not in KINDS:
        raise HttpError(415, f'cannot tell whether {uri!r} is an image or a video: add "kind": "image"|"video"')
    return Payload(kind, uri=uri)
