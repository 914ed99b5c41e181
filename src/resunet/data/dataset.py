"""One dataset type for every layout: a list of (image, mask) file pairs plus the classes they use.

`open_dataset(root, split)` looks at the folder and picks the layout: VOCdevkit (VOC 2012, optionally SBD train_aug)
or a folder dataset (`root/{train,val,test}/{images,masks}` or flat `root/{images,masks}`).
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .classes import ClassInfo, generic_info, load_classes_json
from .images import (DEFAULT_MAX_PIXELS, TURNED_MASK_HINT, DataError, check_mask_values, read_image, read_mask,
                     sides_swapped)


def worker_ignores_ctrl_c(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: Ctrl-C reaches every process of the terminal's group, and a scheduler's SIGTERM
    (`kill -- -PGID`) every process of the job; the workers leave both to the main process, which finishes its step
    and saves. A worker killed by one would take the next batch down, or leave half a batch in the queue the main
    process is reading (it then waits for ever). The workers end as DataLoader ends them (an end-of-data message),
    when the main process dies (`die_with_parent`), or at its exit (`_end_leftover_workers`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # also discards one that came while blocked (start_workers)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED_SIGNALS)
    die_with_parent()


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when the thread that forked it ends


def die_with_parent() -> None:
    """Linux: this process is killed when its parent dies. PyTorch's watchdog ends a worker's loop when its parent is
    gone, but the worker then waits to hand its queue's last batches to a pipe nobody reads: a trainer killed (-9,
    or by the OOM killer) while evaluation's workers held whole images left them for ever, 700 MB each, holding the
    decoded-image cache's lock, deaf to SIGTERM (a helper, 2026-12-06: 4 kills in 7)."""
    parent = multiprocessing.parent_process()
    if not sys.platform.startswith("linux") or parent is None:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    # It died before the call: nobody sends the signal (not "PID 1": in a container without an init, the trainer is
    # PID 1). Started by a forkserver (Python 3.14's default on Linux) the parent is the server: the trainer's life
    # is what counts (every worker ended at once there, and the run with them).
    if os.getppid() != parent.pid and not process_alive(parent.pid):
        os._exit(0)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (ended, not yet reaped: a trainer killed under a parent that polls) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    try:  # "pid (name) state ...": the name may hold spaces and brackets
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): alive, as kill said
        return True


WORKER_IGNORED_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def start_workers(loader: Iterable) -> Iterator:
    """`iter(loader)`, its worker processes (if any) forked with Ctrl-C and SIGTERM blocked. PyTorch's worker loop
    installs its own SIGTERM handler (print, then die) before our `worker_init_fn` ignores the signal: a group's
    SIGTERM landing in between killed a worker just started (1 run in 11 of test_faults' SIGTERM test here, which
    sends it as epoch 2's workers start), and the trainer printed a traceback. Blocked, the signal waits in the worker
    until `worker_ignores_ctrl_c` discards it; the main process gets its own when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        batches = iter(loader)
    else:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
        try:
            batches = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    _our_workers.update(getattr(batches, "_workers", ()))  # the processes `_end_leftover_workers` may kill
    return batches


@contextmanager
def worker_batches(loader: Iterable) -> Iterator[Iterator]:
    """`start_workers(loader)` for one pass, its worker processes ended when the pass leaves the `with`: at the end,
    at a stop or at an error. A pass left before the end keeps a live iterator; found later by the garbage collector
    (a traceback, or a library's cycle, holding the frame), it can be finalised after its own queues' pipes were
    closed: PyTorch's end message never reaches the workers, and its shutdown waits 5 s for each worker, then 5 s
    more after a SIGTERM they ignore (20 s inside an unrelated later call, with 2 workers)."""
    batches = start_workers(loader)
    try:
        yield batches
    finally:
        end = getattr(batches, "_shutdown_workers", None)  # what the iterator's own __del__ calls; no-op if ended
        if end is not None:
            end()


# The DataLoader workers start_workers started: only those are killed at exit (every daemonic child was: a program
# using resunet lost its own children's SIGTERM clean-up).
_our_workers: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _end_leftover_workers() -> None:
    """At the main process's exit multiprocessing ends its daemonic children (DataLoader workers a live iterator still
    holds) with SIGTERM and waits for them; ours ignore SIGTERM, so end them with SIGKILL first. Registered after
    multiprocessing's own exit function, so it runs before it. PyTorch's SIGCHLD handler would report each as a
    failed worker: nothing needs it any more."""
    children = [child for child in multiprocessing.active_children() if child.daemon and child in _our_workers]
    if children and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()


class UnexpectedClassesError(DataError):
    """The data's class count or ignore label is not the one expected; `finding` says so without where the
    expectation came from (a model's, or a flag's: the message names both)."""

    def __init__(self, finding: str, flag: str) -> None:
        super().__init__(f"{finding} ({flag})")  # a model's expectation is said by open_dataset_for_model
        self.finding = finding
        self.flag = flag


def check_expected_classes(info: ClassInfo, num_classes: int | None, ignore_index: int | None, source: str | Path,
                           has: str, ignores: str) -> None:
    """UnexpectedClassesError, one line naming `source`, when the data's class count or ignore label is not the one
    expected (a model's, or a flag's). `has` and `ignores` word it: "lists" / "ignore index" for a classes.json."""
    if num_classes is not None and num_classes != info.num_classes:
        raise UnexpectedClassesError(f"{source}: {has} {info.num_classes} classes, not the {num_classes} expected",
                                     "--num-classes")
    if ignore_index is not None and ignore_index != info.ignore_index:
        raise UnexpectedClassesError(f"{source}: {ignores} {info.ignore_index}, not the {ignore_index} expected",
                                     "--ignore-index")


def class_file_info(path: Path, num_classes: int | None, ignore_index: int | None) -> ClassInfo:
    """The classes a dataset's classes.json names, checked against those expected (`check_expected_classes`); an
    unreadable or malformed file is the user's, so one DataError line."""
    try:
        info = load_classes_json(path)
    except ValueError as error:
        raise DataError(str(error)) from None
    check_expected_classes(info, num_classes, ignore_index, path, "lists", "ignore index")
    return info


@dataclass
class Sample:
    name: str
    image: np.ndarray  # H×W×3 uint8
    mask: np.ndarray  # H×W uint8


class PairedDataset(Dataset):
    """Image/mask file pairs. Without a transform, items are `Sample`s of raw uint8 arrays."""

    def __init__(
        self,
        image_paths: list[Path],
        mask_paths: list[Path],
        info: ClassInfo,
        transform: Callable | None = None,
        description: str = "",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        stored_ignore: int | None = None,
    ) -> None:
        """`max_pixels`: larger images or masks are refused from their header (DataError), before decoding.
        `stored_ignore`: the ignore label the mask files hold, where it is not `info`'s (data scored by a model
        trained with another): they are read with it, and their ignore pixels handed out as `info`'s."""
        if len(image_paths) != len(mask_paths):
            raise ValueError("image and mask lists differ in length")
        self.image_paths = list(image_paths)
        self.mask_paths = list(mask_paths)
        self.info = info
        self.transform = transform
        self.description = description
        self.max_pixels = max_pixels
        self.stored_ignore = stored_ignore

    def __len__(self) -> int:
        return len(self.image_paths)

    def names(self) -> list[str]:
        return [p.stem for p in self.image_paths]

    def named(self, index: int, error: Exception) -> DataError:
        """`error`, met with sample `index` after it was read (too large at the working size), naming its file."""
        return DataError(f"{self.image_paths[index]}: {error}")

    def load(self, index: int) -> Sample:
        image_path, mask_path = self.image_paths[index], self.mask_paths[index]
        image = read_image(image_path, self.max_pixels)
        stored = self.info if self.stored_ignore is None else replace(self.info, ignore_index=self.stored_ignore)
        mask = read_mask(mask_path, stored, self.max_pixels)
        if mask.shape != image.shape[:2]:
            # The data check's hint too: evaluate and visualize run no data check.
            turned = mask.shape == image.shape[1::-1] and sides_swapped(image_path)
            raise DataError(f"{mask_path}: mask is {mask.shape[1]}×{mask.shape[0]} but its image is "
                            f"{image.shape[1]}×{image.shape[0]}"
                            + (TURNED_MASK_HINT if turned else ""))
        check_mask_values(mask, stored, mask_path)
        if stored is not self.info:
            mask = np.where(mask == stored.ignore_index, np.uint8(self.info.ignore_index), mask)
        return Sample(image_path.stem, image, mask)

    def __getitem__(self, index: int):
        sample = self.load(index)
        if self.transform is None:
            return sample
        return self.transform(sample.image, sample.mask)

    def with_transform(self, transform: Callable | None) -> "PairedDataset":
        return PairedDataset(self.image_paths, self.mask_paths, self.info, transform, self.description,
                             self.max_pixels, self.stored_ignore)


def open_dataset(
    root: str | Path,
    split: str,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> PairedDataset:
    """Find the layout under `root` and return the split. Raises DataError with one line if it cannot."""
    from . import folder, voc  # local: both modules import this one

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root is not a folder")
    voc_dir = voc.find_voc_dir(root)
    if voc_dir is not None:
        dataset = voc.voc_dataset(voc_dir, split, voc.voc_classes(voc_dir, num_classes, ignore_index))
    else:
        dataset = folder.folder_dataset(root, split, num_classes, ignore_index)
    dataset.max_pixels = max_pixels
    return dataset


def data_locations(root: str | Path) -> tuple[list[Path], list[Path]]:
    """(folders, files) a dataset under `root` is read from, every split's, not only the one a command reads: a
    file written into one of the folders would be read as data (or replace some), and the files (its classes.json)
    are read by every command. What no command's output may go in or over. Empty where `root` holds no dataset."""
    from . import folder, voc  # local: both modules import this one

    root = Path(root)
    try:
        voc_dir = voc.find_voc_dir(root) if root.is_dir() else None
    except OSError:  # a folder this user cannot enter (predict's --out looks at every parent, /root among them)
        return [], []
    if voc_dir is not None:
        folders = [voc_dir / name for name in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets")]
        files = [path] if (path := voc.voc_class_file(voc_dir)) is not None else []
    else:
        splits = [root / name for name in folder.split_folders(root)] + [root]
        folders = [split / part for split in splits for part in ("images", "masks")]
        files = [root / "classes.json"]
    return [f for f in folders if f.is_dir()], [f for f in files if f.is_file()]


def open_dataset_for_model(root: str | Path, split: str, model_classes: ClassInfo,
                           max_pixels: int | None = DEFAULT_MAX_PIXELS) -> PairedDataset:
    """The split labelled as a trained model labels, for the commands that score, calibrate or draw it. A dataset that
    names its classes (VOC's, a classes.json) must name the model's, in its order (letter case and surrounding spaces
    aside; its colours may differ: they only say how its own masks are drawn): another order scored every class as
    another, without a word. One that does not (a folder without classes.json) is read with the model's classes, so
    masks drawn in the model's colours are read as its classes; a model trained without names takes the data's.
    Its own ignore label may differ from the model's (CamVid's 11, VOC's 255): its ignore pixels are handed out as
    the model's, so the scores skip them."""
    try:
        dataset = open_dataset(root, split, model_classes.num_classes, model_classes.ignore_index, max_pixels)
    except UnexpectedClassesError as error:
        if error.flag != "--ignore-index":  # these commands have no --num-classes
            raise DataError(f"{error.finding} (the model's)") from None
        # The class count was checked first, and matched: opened again without the ignore label, nothing else differs.
        dataset = open_dataset(root, split, model_classes.num_classes, None, max_pixels)
        dataset.stored_ignore = dataset.info.ignore_index
        dataset.info = replace(dataset.info, ignore_index=model_classes.ignore_index)
    unnamed = generic_info(model_classes.num_classes, model_classes.ignore_index)
    if dataset.info == unnamed:
        dataset.info = model_classes
        return dataset
    if model_classes == unnamed:  # a model trained without class names: the dataset's own are all there is to go by
        return dataset
    ours, theirs = ([name.strip().casefold() for name in info.names] for info in (model_classes, dataset.info))
    if ours != theirs:
        first = next(f"class {i}: {a!r} → {b!r}" for i, (a, b, x, y) in
                     enumerate(zip(model_classes.names, dataset.info.names, ours, theirs)) if x != y)
        what = "the same classes in another order" if sorted(ours) == sorted(theirs) else "other class names"
        raise DataError(f"{dataset.description}: its classes are not the model's ({what}; {first}), so its masks "
                        "would be scored as other classes; use data labelled as the model was trained (the same "
                        "classes.json)")
    return dataset
