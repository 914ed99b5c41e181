"""Bytes in and out of the service: the bounded upload, the image inside it, and the three answer formats."""

from __future__ import annotations

import asyncio
import io
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image
from python_multipart.multipart import DEFAULT_MAX_HEADER_SIZE
from starlette.requests import ClientDisconnect, Request

from ..data.classes import ClassInfo
from ..data.images import DataError, ImageHeader, ImageTooLargeError, read_header, read_image

# Bodies sent as these types are taken as the image file itself; `application/x-www-form-urlencoded` is what
# `curl --data-binary @photo.jpg` sends unless told otherwise.
RAW_TYPES = ("image/", "application/octet-stream", "application/x-www-form-urlencoded")
MAX_PART_HEADER_BYTES = DEFAULT_MAX_HEADER_SIZE  # python-multipart refuses a longer header line in a part
# A body refused as too large is still read (and dropped) up to this much before the 413, as nginx lingers: a client
# that sends its whole body before reading the answer (Python's urllib, http.client) otherwise met a reset
# connection, never the 413. A larger body is not waited for.
DRAIN_BYTES = 64 * 2**20


class RequestError(Exception):
    """A bad request: HTTP `status` and a one-line `message` for the JSON body {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def printable_name(name: str, limit: int = 200) -> str:
    """A client's file name as it may appear in a one-line error and log: control characters (a line break would
    split the log line, or forge one) shown as '?', and at most `limit` characters."""
    name = "".join("?" if unicodedata.category(c).startswith("C") else c for c in name)
    return name if len(name) <= limit else name[: limit - 1] + "…"


def longest_part_header(body: bytes, content_type: str) -> int:
    """The longest header line of any part of a multipart body (a part's lines before its first blank one)."""
    boundary = next((p.split("=", 1)[1].strip().strip('"') for p in content_type.split(";")[1:]
                     if p.strip().lower().startswith("boundary=")), "")
    longest = 0
    for part in body.split(b"--" + boundary.encode("latin-1", "replace"))[1:] if boundary else []:
        headers = part.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        longest = max([longest] + [len(line) for line in headers])
    return longest


async def read_body(request: Request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """The whole request body, refused with 413 as soon as it passes `max_bytes` (declared or streamed), and with
    408 when no byte of it arrives for `timeout_s` seconds (a stalled client would hold its connection for ever)."""
    declared = request.headers.get("content-length")
    stream = request.stream()
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        # A client that waits for "100 Continue" (curl past 1 MiB) reads the 413 instead and sends nothing: reading
        # would ask it for the body.
        if int(declared) <= DRAIN_BYTES and request.headers.get("expect", "").lower() != "100-continue":
            await discard(stream, timeout_s)
        raise RequestError(413, f"request body of {int(declared):,} bytes is over the limit of {max_bytes:,} bytes",
                           {"Connection": "close"})
    chunks, size = [], 0
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), timeout_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise RequestError(408, f"the upload stalled: no byte for {timeout_s:g} s after {size:,} bytes",
                               {"Connection": "close"}) from None  # its unread rest must not hold the connection
        size += len(chunk)
        if size > max_bytes:
            await discard(stream, timeout_s, DRAIN_BYTES - size)
            raise RequestError(413, f"request body is over the limit of {max_bytes:,} bytes", {"Connection": "close"})
        chunks.append(chunk)
    return b"".join(chunks)


async def discard(stream, timeout_s: float | None, most: int = DRAIN_BYTES) -> None:
    """Read the rest of a refused body and drop it: up to `most` bytes, while it keeps coming."""
    dropped = 0
    try:
        while dropped < most:
            dropped += len(await asyncio.wait_for(anext(stream), timeout_s))
    except (StopAsyncIteration, asyncio.TimeoutError, ClientDisconnect):
        pass


async def upload_bytes(request: Request, max_bytes: int, timeout_s: float | None = None) -> tuple[bytes, str]:
    """The image file of a request: the multipart form field `file`, or the raw body. Returns (bytes, a name)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, max_bytes, timeout_s)
    if content_type == "multipart/form-data":
        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form()
        except Exception as error:  # a malformed multipart body
            longest = longest_part_header(body, request.headers.get("content-type", ""))
            if longest > MAX_PART_HEADER_BYTES:  # the parser's own message only says "Invalid multipart data"
                raise RequestError(400, f"multipart part header of {longest:,} bytes is over the parser's limit of "
                                        f"{MAX_PART_HEADER_BYTES:,} (a very long file name?): rename the file, or "
                                        "send the image as the raw body") from None
            raise RequestError(400, f"malformed multipart body ({error})") from None
        files = form.getlist("file")
        if len(files) > 1:  # the last one was answered, the others dropped without a word
            raise RequestError(400, f"multipart upload with {len(files)} parts named 'file': send one image a request")
        upload = files[0] if files else None
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "multipart upload without a file in the form field 'file'")
        data = await upload.read()
        name = printable_name(upload.filename or "upload")
    elif not content_type or content_type.startswith(RAW_TYPES):
        data, name = body, "request body"
    else:
        raise RequestError(415, f"unsupported content type '{content_type}': send an image file (raw body with an "
                                "image/* or application/octet-stream type) or a multipart form with field 'file'")
    if not data:
        raise RequestError(400, "empty body: no image received")
    return data, name


@contextmanager
def as_request_errors() -> Iterator[None]:
    """An unusable upload as its HTTP error: 413 for too many pixels (from the header), 400 for anything unreadable."""
    try:
        yield
    except ImageTooLargeError as error:
        raise RequestError(413, str(error)) from None
    except DataError as error:
        raise RequestError(400, str(error)) from None


def upload_header(data: bytes, name: str, max_pixels: int | None) -> ImageHeader:
    """The upload's size as shown, format and EXIF orientation, from its header alone."""
    with as_request_errors():
        return read_header(data, max_pixels, name=name)


def decode_image(data: bytes, name: str, max_pixels: int | None) -> np.ndarray:
    """H×W×3 uint8, read exactly as `resunet predict` reads files (its size checked from the header first)."""
    with as_request_errors():
        return read_image(data, max_pixels, name=name)


def png_bytes(image: Image.Image) -> bytes:
    """An image (the class map from `Predictor.colorize`: what `resunet predict` writes) as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def class_summary(mask: np.ndarray, info: ClassInfo) -> list[dict]:
    """The classes present in `mask`: id, name, colour, pixel count and share of the image."""
    counts = np.bincount(mask.ravel(), minlength=info.num_classes)
    total = mask.size
    return [{"id": int(c), "name": info.names[c], "color": list(info.palette[c]), "pixels": int(counts[c]),
             "fraction": float(counts[c]) / total}
            for c in np.flatnonzero(counts) if c < info.num_classes]


def rle_encode(binary: np.ndarray) -> dict:
    """COCO's uncompressed run-length encoding of a 2-D boolean mask: column-major (Fortran) order, the counts
    alternate runs of 0 and 1 starting with 0 (a mask whose first pixel is set starts with a zero-length run)."""
    height, width = binary.shape
    flat = np.asarray(binary, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size])))
    counts = runs.tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)
    return {"size": [height, width], "counts": counts}


def rle_classes(mask: np.ndarray, info: ClassInfo) -> list[dict]:
    return [{**entry, "rle": rle_encode(mask == entry["id"])} for entry in class_summary(mask, info)]
