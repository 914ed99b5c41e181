"""Checkpoints: one self-describing dict, written atomically, loaded without executing code.

Everything in it is a tensor, number, string, list or dict, so `torch.load(weights_only=True)` reads it: a downloaded
checkpoint cannot run code. It carries the model's settings, the classes, the input size and the normalisation, so
`predict`, `evaluate` and `visualize` rebuild the model from the file alone.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .data.classes import ClassInfo
from .fingerprint import file_kind, unreadable_reason
from .model.unet import ModelConfig, ResNetUNet

FORMAT = "resunet-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """The file is not a usable checkpoint; the message is one line naming it."""


class UnsupportedOptionError(CheckpointError):
    """A readable model file that cannot run as asked (a TTA or window its end-to-end graph was not exported with): a
    usage error (exit 2 from `serve` too), not a bad file."""


def file_state(path: str | Path) -> tuple[int, int, int]:
    """What tells a file rewritten (a save renames a new file into place) from the one read: inode, size, time."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def rename_over(partial: Path, target: Path) -> None:
    """A finished file (`partial`, beside `target`) takes `target`'s name, keeping the permissions of the file it
    replaces."""
    if target.exists():
        shutil.copymode(target, partial)
    os.replace(partial, target)


# .NAME.tmpPID-RANDOM; before 2026-12-07 .NAME.tmpPID, which two containers sharing a volume could both take (each its
# own PID 1): their writes went into one file, renamed into place as a mix of both.
TEMPORARY_NAME = re.compile(r"\..+\.tmp(?P<pid>\d+)(-[0-9a-f]{8})?")


def temporary_path(path: Path) -> Path:
    """Where a file is written before it is renamed into place: hidden, beside it (so the rename stays on one
    filesystem), named by the writing process and a random part. `train` removes leftovers of this pattern from a
    run's folder."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")


def temporary_writer(path: Path) -> int | None:
    """The PID that wrote a file named as `temporary_path` names them; None for another name (a user's own
    .notes.tmpl)."""
    match = TEMPORARY_NAME.fullmatch(path.name)
    return int(match["pid"]) if match else None


def remove_quietly(path: Path) -> None:
    """Remove a temporary file if it can be: on a read-only folder it never was written, and the error that got us
    here is the one to report."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def interrupted(error: BaseException) -> bool:
    """Whether `error` came from an interrupt: torch's zip writer turns an exception raised in a file write (a
    signal handler's KeyboardInterrupt) into a RuntimeError whose context it is."""
    seen: BaseException | None = error
    for _ in range(8):  # a context chain is short; a cycle would not end
        if seen is None:
            return False
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False


def save_checkpoint(payload: dict, path: str | Path, advice: str = "free some space and try again") -> None:
    """Write to a temporary file, fsync, then rename: a crash at any moment leaves the old file or the new one.
    `advice` ends the one-line error when the write fails."""
    path = Path(os.path.realpath(path))  # through a symbolic link: the file it points to, not a copy in its place
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        rename_over(tmp, path)
    except (OSError, RuntimeError) as error:  # a full disk, a quota, a read-only or vanished folder
        # torch's zip writer reports a full disk as a RuntimeError ("unexpected pos ..."), not an OSError.
        remove_quietly(tmp)
        if interrupted(error):  # a second Ctrl-C or SIGTERM while writing: a stop, not a full disk
            raise KeyboardInterrupt from None
        reason = ((error.strerror or str(error)) if isinstance(error, OSError)
                  else "the write stopped short: a full disk?")
        previous = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise CheckpointError(f"{path}: could not save the checkpoint ({reason}); {previous}; {advice}") from None
    except BaseException:
        remove_quietly(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, tensors: bool = True) -> dict:
    """The checkpoint's payload, checked. tensors=False maps the file instead of reading it: for a caller that only
    wants the settings and descriptions (its tensors must then not be used)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.pt"))
        hint = f" (it holds {', '.join(found[:3])})" if found else ""
        raise CheckpointError(f"{path}: a folder, not a checkpoint file; give the .pt file itself{hint}")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix.lower() == ".onnx":  # predict and evaluate take these; training, calibration and export cannot
        raise CheckpointError(f"{path}: an exported ONNX model; this command needs the resunet checkpoint (.pt) "
                              "it was exported from")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=not tensors)
    except Exception as error:  # truncated zip, pickle of foreign objects, random bytes
        if file_kind(path) == "onnx":
            raise CheckpointError(f"{path}: an exported ONNX model, not a resunet checkpoint: predict, evaluate, "
                                  "visualize and serve take it named .onnx; train, calibrate and export need the .pt "
                                  "it was exported from") from None
        raise CheckpointError(f"{path}: not a readable resunet checkpoint ({unreadable_reason(path, error)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a resunet checkpoint")
    version = payload.get("version", 0)
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: not a resunet checkpoint (version {version!r})")
    if version > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version} is newer than this resunet")
    return payload


def checked_temperature(value: object, path: str | Path) -> float:
    """A stored temperature (`resunet calibrate`'s): a positive finite number. A negative one made the confidence the
    least likely class's probability and turned an ensemble's maps toward it; 0 or NaN made every probability NaN."""
    try:
        temperature = float(value)
    except (TypeError, ValueError):
        temperature = math.nan
    if not (math.isfinite(temperature) and temperature > 0):
        raise CheckpointError(f"{path}: temperature {value!r} is not a positive number; run resunet calibrate on it "
                              "again (or store 1.0)")
    return temperature


@contextmanager
def reading_description(path: str | Path) -> Iterator[None]:
    """Around reading a checkpoint's descriptions (model settings, classes, size, normalisation): one missing, or
    holding a setting this resunet does not know (a newer one's file: settings are added without a new VERSION), is
    one line naming the file, not a KeyError or TypeError traceback."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: holds a model description this resunet cannot read ({type(error).__name__}: "
                              f"{error}); made by another resunet version?") from None


def model_from_checkpoint(payload: dict, path: str | Path = "checkpoint") -> ResNetUNet:
    """Rebuild the architecture from the checkpoint's own description and load its weights."""
    # The random initialisation the weights replace draws from torch's generator: the caller's own, put back (a
    # seeded notebook drew otherwise after loading a model)
    with reading_description(path), torch.random.fork_rng(devices=[]):
        model = ResNetUNet.from_config(ModelConfig.from_dict(payload["model_config"]), encoder_weights=None)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise CheckpointError(f"{path}: weights do not fit the described model ({first})") from None
    return model


def checkpoint_classes(payload: dict) -> ClassInfo:
    return ClassInfo.from_dict(payload["classes"], distinct_colours=False)
