"""Bytes in and out of the service: the bounded upload, the image inside it, and the three answer formats."""

from __future__ import annotations

import asyncio
import contextvars
import io
import logging
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image
from python_multipart.multipart import DEFAULT_MAX_HEADER_SIZE
from starlette.requests import Request

from ..data.classes import ClassInfo
from ..data.images import DataError, ImageHeader, ImageTooLargeError, read_header, read_image

# Bodies sent as these types are taken as the image file itself; `application/x-www-form-urlencoded` is what
# `curl --data-binary @photo.jpg` sends unless told otherwise.
RAW_TYPES = ("image/", "application/octet-stream", "application/x-www-form-urlencoded")
MAX_PART_HEADER_BYTES = DEFAULT_MAX_HEADER_SIZE  # python-multipart refuses a longer header line in a part
# A malformed form is answered 400 with the parser's reason in our one log line; python-multipart also logs it itself,
# a second, unformatted line: dropped while we parse a form, and only then (a level set process-wide silenced the
# forms of an app that mounts ours)
PARSING_OUR_FORM: contextvars.ContextVar[bool] = contextvars.ContextVar("resunet_parsing_form", default=False)
logging.getLogger("python_multipart.multipart").addFilter(lambda record: not PARSING_OUR_FORM.get())
# A body refused as too large is still read (and dropped) up to this much before the 413, as nginx lingers: a client
# that sends its whole body before reading the answer (Python's urllib, http.client) otherwise met a reset
# connection, never the 413. A larger body is not waited for.
DRAIN_BYTES = 64 * 2**20
# An upload must have sent this many bytes for every second past its first --body-timeout: the timeout alone is a gap
# between two chunks, and one byte every 25 s held a connection slot for a week per upload (1000 of them, every
# slot, for 40 bytes a second). 4 KiB/s is a 32 kbit/s link.
MIN_BODY_RATE = 4096


class RequestError(Exception):
    """A bad request: HTTP `status` and a one-line `message` for the JSON body {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class UploadBudget:
    """The bytes of the uploads being received or decoded, all requests together, at most `limit`: --max-bytes
    bounds one body, and 1000 connections each sending 20 MB held 20 GB (a helper, 2026-12-06). Taken before the
    body is read where its length is declared, as it arrives where not (`read_body`), so a refusal (503, the
    connection closed) never waits for the whole body. One upload alone is always let in. Used on the event loop
    only: no lock."""

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit, self.pending, self.retry_after_s = limit, 0, retry_after_s

    @contextmanager
    def holding(self) -> Iterator["HeldBytes"]:
        held = HeldBytes(self)
        try:
            yield held
        finally:
            held.release()


class HeldBytes:
    """One request's share of an `UploadBudget`."""

    def __init__(self, budget: UploadBudget) -> None:
        self.budget, self.size = budget, 0

    def take(self, size: int) -> None:
        budget, others = self.budget, self.budget.pending - self.size
        if others and budget.pending + size > budget.limit:
            raise RequestError(503, f"busy: {others:,} bytes of other uploads are being received or decoded "
                                    f"(--max-pending-bytes {budget.limit:,}); retry later",
                               {"Retry-After": str(budget.retry_after_s), "Connection": "close"})
        budget.pending += size
        self.size += size

    def release(self) -> None:
        """The upload's bytes are no longer held (decoded, or the request is over)."""
        self.budget.pending -= self.size
        self.size = 0


def printable_name(name: str, limit: int = 200) -> str:
    """A client's file name as it may appear in a one-line error and log: control characters (a line break would
    split the log line, or forge one) shown as '?', and at most `limit` characters."""
    name = "".join("?" if unicodedata.category(c).startswith("C") else c for c in name)
    return name if len(name) <= limit else name[: limit - 1] + "…"


def multipart_boundary(content_type: str) -> bytes:
    """The boundary a multipart Content-Type names (b"" if none)."""
    boundary = next((p.split("=", 1)[1].strip().strip('"') for p in content_type.split(";")[1:]
                     if p.strip().lower().startswith("boundary=")), "")
    return boundary.encode("latin-1", "replace")


def longest_part_header(body: bytes, content_type: str) -> int:
    """The longest header line of any part of a multipart body (a part's lines before its first blank one)."""
    boundary = multipart_boundary(content_type)
    longest = 0
    for part in body.split(b"--" + boundary)[1:] if boundary else []:
        headers = part.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        longest = max([longest] + [len(line) for line in headers])
    return longest


class BodyClock:
    """When the next chunk of a body must have come: `timeout_s` after the last one (a stalled client would hold its
    connection for ever), and soon enough for MIN_BODY_RATE bytes for every second past the first `timeout_s`. No
    limit when `timeout_s` is None."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s, self.loop = timeout_s, asyncio.get_running_loop()
        self.started = self.last = self.loop.time()
        self.size = 0

    async def next_chunk(self, stream) -> bytes:
        """The next chunk; StopAsyncIteration at the end, RequestError 408 when it comes too late."""
        wait, stalled = None, True
        if self.timeout_s is not None:  # the rate's deadline moves on with every byte that comes
            gap_ends = self.last + self.timeout_s
            rate_ends = self.started + self.timeout_s + self.size / MIN_BODY_RATE
            wait, stalled = max(min(gap_ends, rate_ends) - self.loop.time(), 0), gap_ends <= rate_ends
        try:
            chunk = await asyncio.wait_for(anext(stream), wait)
        except asyncio.TimeoutError:
            # A few bytes, then nothing: the two deadlines fall within a millisecond of each other, and which came
            # first depended on when the bytes arrived (a test's 408 read either way). Silent about the whole
            # timeout is a stall, whichever it was.
            if stalled or self.loop.time() - self.last >= 0.9 * self.timeout_s:
                message = f"the upload stalled: no byte for {self.timeout_s:g} s after {self.size:,} bytes"
            else:
                message = (f"the upload is too slow: {self.size:,} bytes in {self.loop.time() - self.started:.0f} s "
                           f"(after the first {self.timeout_s:g} s, at least {MIN_BODY_RATE:,} bytes/s)")
            raise RequestError(408, message, {"Connection": "close"}) from None  # its unread rest must not hold it
        self.size, self.last = self.size + len(chunk), self.loop.time()
        return chunk


async def read_body(request: Request, max_bytes: int, timeout_s: float | None = None,
                    held: HeldBytes | None = None) -> bytes:
    """The whole request body, refused with 413 as soon as it passes `max_bytes` (declared or streamed), and with
    408 when it comes too slowly (`BodyClock`). Its bytes are taken from `held`'s budget: a declared length at once,
    before any byte is read (first come, first served: taken chunk by chunk, uploads arriving together each took a
    share, filled the budget and were all refused, though each fitted alone), a chunked body as it arrives."""
    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.isdigit() else None
    if declared is not None and declared > max_bytes:
        await refuse_unread(request, timeout_s, RequestError(
            413, f"request body of {declared:,} bytes is over the limit of {max_bytes:,} bytes"))
    if held is not None and declared:
        try:
            held.take(declared)
        except RequestError as refusal:
            await refuse_unread(request, timeout_s, refusal)
    stream, clock = request.stream(), BodyClock(timeout_s)
    chunks = []
    while True:
        try:
            chunk = await clock.next_chunk(stream)
        except StopAsyncIteration:
            break
        try:
            if clock.size > max_bytes:
                raise RequestError(413, f"request body is over the limit of {max_bytes:,} bytes")
            if held is not None and clock.size > held.size:  # past what was declared (or nothing was)
                held.take(clock.size - held.size)
        except RequestError as refusal:  # the rest read and dropped first, as refuse_unread does
            if held is not None:
                held.release()  # dropped: its bytes must not refuse the uploads still running
            await discard(stream, clock, DRAIN_BYTES - clock.size)
            refusal.headers.setdefault("Connection", "close")
            raise
        chunks.append(chunk)
    return b"".join(chunks)


async def refuse_unread(request: Request, timeout_s: float | None, error: RequestError) -> None:
    """Raise `error` (the connection then closed) for a body not to be kept, once it is read and dropped, if small
    enough: a client that sends all of its body before reading the answer otherwise met a reset connection."""
    declared = request.headers.get("content-length")
    # A client that waits for "100 Continue" (curl past 1 MiB) reads the answer instead and sends nothing: reading
    # would ask it for the body.
    if ((declared is None or not declared.isdigit() or int(declared) <= DRAIN_BYTES)
            and request.headers.get("expect", "").lower() != "100-continue"):
        await discard(request.stream(), BodyClock(timeout_s), DRAIN_BYTES)
    error.headers.setdefault("Connection", "close")
    raise error


async def discard(stream, clock: BodyClock, most: int) -> None:
    """Read the rest of a refused body and drop it: up to `most` bytes, while it keeps coming as fast as a body must
    (a drain at one byte a minute held the connection for ever); then the refusal is answered. A client gone
    meanwhile (or a body the protocol refused and answered itself) is ClientDisconnect: no refusal is answered or
    logged for it."""
    dropped = 0
    try:
        while dropped < most:
            dropped += len(await clock.next_chunk(stream))
    except (StopAsyncIteration, RequestError):
        pass


async def upload_bytes(request: Request, max_bytes: int, timeout_s: float | None = None,
                       held: HeldBytes | None = None) -> tuple[bytes, str]:
    """The image file of a request: the multipart form field `file`, or the raw body. Returns (bytes, a name)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = not content_type or content_type.startswith(RAW_TYPES)
    if not raw and content_type != "multipart/form-data":  # judged first: the body is dropped as it comes, not kept
        await refuse_unread(request, timeout_s, RequestError(
            415, f"unsupported content type '{printable_name(content_type, 100)}': send an image file (raw body "
                 "with an image/* or application/octet-stream type) or a multipart form with field 'file'"))
    body = await read_body(request, max_bytes, timeout_s, held)
    if content_type == "multipart/form-data":
        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        ours = PARSING_OUR_FORM.set(True)
        try:
            form = await Request(request.scope, replay).form()
        except Exception as error:  # a malformed multipart body
            longest = longest_part_header(body, request.headers.get("content-type", ""))
            if longest > MAX_PART_HEADER_BYTES:  # the parser's own message only says "Invalid multipart data"
                raise RequestError(400, f"multipart part header of {longest:,} bytes is over the parser's limit of "
                                        f"{MAX_PART_HEADER_BYTES:,} (a very long file name?): rename the file, or "
                                        "send the image as the raw body") from None
            raise RequestError(400, f"malformed multipart body ({error})") from None
        finally:
            PARSING_OUR_FORM.reset(ours)
        files = form.getlist("file")
        if len(files) > 1:  # the last one was answered, the others dropped without a word
            raise RequestError(400, f"multipart upload with {len(files)} parts named 'file': send one image a request")
        upload = files[0] if files else None
        if upload is None or isinstance(upload, str):
            boundary = multipart_boundary(request.headers.get("content-type", ""))
            if boundary and b"--" + boundary in body and b"--" + boundary + b"--" not in body:
                # the parser drops a part left unfinished without a word: the file was there, cut short
                raise RequestError(400, "multipart body ends before its closing boundary: the upload was cut short "
                                        "(by the client or a proxy?)")
            raise RequestError(400, "multipart upload without a file in the form field 'file'")
        data = await upload.read()
        name = printable_name(upload.filename or "upload")
        if not data:  # named, as every other unreadable upload ("empty body" named the form)
            raise RequestError(400, f"{name}: an empty file (0 bytes): no image received")
    else:
        data, name = body, "request body"
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
