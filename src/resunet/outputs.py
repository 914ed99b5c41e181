"""Output paths checked before the work that fills them: a command that evaluates for an hour must not then fail to
write its answer, nor write it over its own inputs. Every failure is a DataError of one line naming the flag."""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .checkpoint import remove_quietly, rename_over, temporary_path
from .data.dataset import data_locations
from .data.images import DataError

try:
    import fcntl
except ImportError:  # Windows: folders are not locked
    fcntl = None

PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg")  # the figure formats written (matplotlib picks by suffix)
# Written into every file `resunet predict` makes (a PNG text chunk, a JPEG comment): a later run whose inputs take in
# an earlier --out (`predict 'photos/**/*' --out photos/masks`, run again) tells its results from photos.
PREDICTION_MARK = "resunet predict"


# This process's own open files by name: /dev/stdout, /dev/stderr, /dev/fd/N, /proc/self/fd/N.
DESCRIPTOR_NAME = re.compile(r"/dev/std(?P<std>out|err)|/dev/fd/(?P<fd>\d+)|/proc/self/fd/(?P<proc>\d+)")


def descriptor_of(path: str | Path) -> int | None:
    """The open descriptor a path names (`--json /dev/stdout`), written through, never replaced: redirected to a file
    (`> report.txt`, `>> all.jsonl`) its real path is that file, and a rename over it lost what the command had
    printed there (and everything before, with >>); for a user who is not root, /dev refused the rename outright."""
    match = DESCRIPTOR_NAME.fullmatch(os.path.normpath(str(path)))
    if match is None:
        return None
    return {"out": 1, "err": 2}[match["std"]] if match["std"] else int(match["fd"] or match["proc"])


class FolderLock:
    """An exclusive lock on a folder (flock on the folder itself: no file left in it) for as long as a command
    writes there: two trainings in one run folder replaced each other's checkpoints and metrics epoch by epoch, and a
    calibrate put an older model back over a newer best.pt. `held` is False where another process holds it; where
    there are no locks (Windows, NFS without its lock daemon) it is taken as held, the folder unguarded."""

    def __init__(self, folder: str | Path) -> None:
        self.descriptor: int | None = None
        self.held = True
        if fcntl is None:
            return
        try:
            descriptor = os.open(folder, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.held = False
            os.close(descriptor)
        except OSError:
            os.close(descriptor)
        else:
            self.descriptor = descriptor

    def close(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_stream(path: str | Path) -> bool:
    """A descriptor (`/dev/stdout`, `/dev/fd/3`), device or pipe: written through (`replace_file`), so a second
    write adds to the first instead of replacing it."""
    return descriptor_of(path) is not None or (Path(path).exists() and not Path(path).is_file())


def write_through(descriptor: int, save: Callable[[Path], None]) -> None:
    """`save(where)` to a temporary file, then its bytes appended to `descriptor` after what Python has printed."""
    with tempfile.TemporaryDirectory(prefix="resunet-output-") as folder:
        where = Path(folder) / "output"
        save(where)
        data = memoryview(where.read_bytes())
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    while data:
        data = data[os.write(descriptor, data):]


def names_a_folder(path: str | Path) -> bool:
    """A name with a final slash, which Path() drops: "--json report/" wrote a file named report."""
    return str(path).endswith(("/", os.sep))


def check_output_files(outputs: Iterable[tuple[str, str | Path | None]], inputs: Iterable[str | Path] = (),
                       suffixes: dict[str, tuple[str, ...]] | None = None,
                       data_root: str | Path | None = None) -> None:
    """`outputs`: (flag, path) pairs, None for an output not asked for. Each must be a writable file name (a missing
    folder must be one that can be made; it is made when the file is written), with one of `suffixes[flag]` if given,
    different from the others and from every `inputs` file (the model, the dataset's files). With `data_root`, none
    may go over the dataset's classes.json or into the folders any of its splits is read from."""
    given = [(flag, Path(path)) for flag, path in outputs if path]
    for flag, path in outputs:
        if path and names_a_folder(path):
            raise DataError(f"{flag} {path}: is a folder; give a file name")
    data_folders, data_files = data_locations(data_root) if data_root is not None else ([], [])
    read = {resolved(p) for p in (*inputs, *data_files)}
    seen: dict[Path, str] = {}
    for flag, path in given:
        allowed = (suffixes or {}).get(flag)
        if allowed and path.suffix.lower() not in allowed:
            raise DataError(f"{flag} {path}: name a {'/'.join(allowed)} file")
        if path.is_dir():
            raise DataError(f"{flag} {path}: is a folder; give a file name")
        target = resolved(path)
        if target in read:
            raise DataError(f"{flag} {path}: is one of this command's inputs; writing there would destroy it")
        check_folder_apart(flag, path, data_folders, target.parent)  # a link's target's folder: written through it
        if target in seen:
            raise DataError(f"{flag} {path}: also given to {seen[target]}; one file cannot hold both")
        seen[target] = flag
        if (descriptor := descriptor_of(path)) is not None:
            try:
                os.fstat(descriptor)
            except OSError:  # /dev/fd/7 with no descriptor 7 open: found after the work
                raise DataError(f"{flag} {path}: descriptor {descriptor} is not open") from None
            continue  # written through
        if path.exists() and not path.is_file():  # a device or pipe (/dev/null): written as it is
            continue
        check_writable_folder(flag, path, path.parent)
        if path.exists():
            try:  # appending nothing: refused for a read-only or immutable file, changes nothing otherwise
                with open(path, "ab"):
                    pass
            except OSError as error:
                raise DataError(f"{flag} {path}: cannot be written ({error.strerror or error})") from None


def check_output_folder(flag: str, folder: str | Path) -> None:
    """A folder the command will write files into: it, or the folder it would be made in, is tried."""
    check_writable_folder(flag, Path(folder), Path(folder))


def check_folder_apart(flag: str, path: str | Path, data_folders: Iterable[str | Path],
                       folder: str | Path | None = None) -> None:
    """DataError when `folder` (by default `path` itself), which the command writes into, is one of `data_folders`
    (those a dataset's images or masks are read from) or inside one: what it writes would be read as data next
    time, or replace some."""
    read = enclosing(resolved(path if folder is None else folder), data_folders)
    if read is not None:
        raise DataError(f"{flag} {path}: inside {read}, a folder the dataset is read from (its files would be "
                        "taken for data, or replaced); write outside the data's folders")


def data_folder_around(folder: str | Path) -> Path | None:
    """The dataset folder (a split's images or masks, VOC's) that `folder` is or lies in, looking for a dataset at
    each of its parents: predict has no --data-root, and its --out there adds files the dataset then reads."""
    target = resolved(folder)
    return next((found for root in (target, *target.parents)
                 if (found := enclosing(target, data_locations(root)[0])) is not None), None)


def enclosing(target: Path, folders: Iterable[str | Path]) -> Path | None:
    """The one of `folders` (resolved) that the resolved folder `target` is, or lies inside; None if none."""
    return next((folder for folder in {resolved(f) for f in folders}
                 if target == folder or folder in target.parents), None)


def check_writable_folder(flag: str, path: Path, folder: Path) -> None:
    """Made by nothing here: a command refused later (a model that does not load, a dataset that does not open)
    leaves no empty folder behind. A missing folder is tried through the nearest one that exists."""
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DataError(f"{flag} {path}: {blocking} is a file, not a folder")
    dangling = next((p for p in (folder, *folder.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:
        # mkdir would only say "File exists" about a link whose target is missing
        raise DataError(f"{flag} {path}: {dangling} is a link to {os.readlink(dangling)}, which does not exist")
    nearest = next((p for p in (folder, *folder.parents) if p.exists()), folder)  # '.' or '/' ends the parents
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as error:
        raise DataError(f"{flag} {path}: cannot write in {folder} ({error.strerror or error})") from None


def make_folders(folder: Path) -> list[Path]:
    """`folder` and its missing parents made; the ones made, deepest first, for `remove_empty_folders`."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty_folders(folders: list[Path]) -> None:
    """Undo `make_folders` for a command that failed: the folders it made, while they are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # something was written there after all
            return


def replace_file(path: str | Path, save: Callable[[Path], None]) -> None:
    """`save(where)` writes the file's content at `where`, a file beside `path` that is then renamed over it (keeping
    its permissions): a write cut short (a kill, Ctrl-C, a full disk) leaves the old file or none, never half of one.
    Through a link, the file it points to; a device or pipe (/dev/stdout) is written directly. A failure raises, the
    partial file removed."""
    if (descriptor := descriptor_of(path)) is not None:
        write_through(descriptor, save)
        return
    if Path(path).exists() and not Path(path).is_file():
        # Not through its resolved path: /dev/stdout's is /proc/PID/fd/pipe:[N] when it is a pipe, which is no file.
        save(Path(path))
        return
    target = resolved(path)
    target.parent.mkdir(parents=True, exist_ok=True)  # checked by check_output_files, made only now
    partial = temporary_path(target)
    try:
        save(partial)
        rename_over(partial, target)
    except BaseException:
        remove_quietly(partial)
        raise


def replace_text(path: str | Path, text: str) -> None:
    replace_file(path, lambda where: where.write_text(text))


def write_output(path: str | Path, text: str) -> None:
    """`replace_text`, a failure as one DataError line naming the file."""
    try:
        replace_text(path, text)
    except OSError as error:
        raise DataError(f"{path}: could not write it ({error.strerror or error})") from None


# A write refused for one of these reasons is refused for every later file too.
WHOLE_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


class DiskError(DataError):
    """A write the disk refused (full, over quota, read-only), not the one file: every later write would fail."""


def save_whole(path: str | Path, save: Callable[[Path], None]) -> None:
    """`replace_file` for pictures: `save(where)` is PIL's save or matplotlib's savefig, given the format (`where` has
    no image suffix). So `predict --skip-existing` can trust every file it finds. An earlier file that is read-only
    is refused, not replaced; a failure is one DataError line naming the file (a DiskError if no file would do)."""
    try:
        if (target := resolved(path)).is_file() and not os.access(target, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied")
        replace_file(path, save)
    except OSError as error:
        kind = DiskError if error.errno in WHOLE_DISK_ERRNOS else DataError
        raise kind(f"{path}: could not write it ({error.strerror or error})") from None


def subplots(rows: int, columns: int, figsize: tuple[float, float], **options) -> tuple:
    """A figure of its own with its axes, drawn to files only: not pyplot's, whose backend (a notebook's inline one)
    importing resunet switched to Agg for good, and whose current figure a train() in another thread could take."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(rows, columns, **options)


def save_figure(figure, path: str | Path, dpi: int) -> None:
    save_whole(path, lambda where: figure.savefig(where, dpi=dpi, format=Path(path).suffix[1:].lower()))


def resolved(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


def prediction_save_options(kind: str) -> dict:
    """PIL save options for a file of `resunet predict`: "overlay" (JPEG) or a class or confidence map (PNG), marked
    as a result."""
    if kind == "overlay":
        return {"format": "JPEG", "quality": 90, "comment": PREDICTION_MARK}
    from PIL.PngImagePlugin import PngInfo

    text = PngInfo()
    text.add_text("Software", PREDICTION_MARK)
    return {"format": "PNG", "pnginfo": text}


def is_prediction(path: str | Path) -> bool:
    """Whether `resunet predict` wrote this file (its mark, read from the header)."""
    from PIL import Image

    try:
        with Image.open(path, formats=("PNG", "JPEG")) as image:
            mark = image.info.get("Software") if image.format == "PNG" else image.info.get("comment")
    except Exception:  # not a PNG or JPEG, or unreadable: an input like any other, reported when it is read
        return False
    return mark in (PREDICTION_MARK, PREDICTION_MARK.encode())
