"""What a file is: the sha256 that ties an exported file to its checkpoint (shared by export and the ONNX predictor),
and what a model or weights file that will not load holds, for its error line (checkpoints, ONNX files, encoder
weights)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


ONNX_SECOND_TAGS = (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42)  # ModelProto fields 2-8, as protobuf tags them
# torch.save's format before its zip archive (the packaged Lite weights use it): a pickle whose first object is
# this number
TORCH_LEGACY_HEAD = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def file_kind(path: Path) -> str | None:
    """What a model file's first bytes say it is: "empty", "zip" (torch.save's archive), "torch-legacy" (its older
    format), "onnx" (a protobuf ModelProto: field 1, ir_version, a small number, then one of fields 2-8, the next a
    serializer writes), or None."""
    try:
        with open(path, "rb") as file:
            head = file.read(len(TORCH_LEGACY_HEAD))
    except OSError:
        return None
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head == TORCH_LEGACY_HEAD:
        return "torch-legacy"
    if len(head) >= 3 and head[0] == 0x08 and 0 < head[1] < 0x80 and head[2] in ONNX_SECOND_TAGS:
        return "onnx"
    return None


def unreadable_reason(path: Path, error: Exception) -> str:
    """Why torch.load refused `path`, in words a user can act on (torch's own messages run to paragraphs)."""
    if isinstance(error, OSError):  # a file it may not read: the system's reason
        return error.strerror or str(error)
    kind, message = file_kind(path), str(error).strip()
    if kind == "empty":
        return "an empty file: a save or copy cut short?"
    if kind in ("zip", "torch-legacy") and "Unsupported global" in message:
        return ("it holds Python objects, such as a whole model, which are not loaded (they could run code); "
                "resunet's files hold tensors and settings only")
    if kind == "zip" and ("zip archive" in message or "central directory" in message):
        return "its zip archive is cut short or damaged: a save, copy or download cut short?"
    if kind == "torch-legacy" and "mmap" not in message:  # mmap: read whole, it loads
        return "cut short or damaged (torch.save's older format): a save, copy or download cut short?"
    if kind is None:
        return "not a file torch.save writes"
    return f"{type(error).__name__}: {message.splitlines()[0][:120]}" if message else type(error).__name__
