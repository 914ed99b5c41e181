"""Decode once, augment on the device: the fast training data path.

Each image is decoded once and stored, resized so its shorter side is `ceil(size × 1.25)` (just above the training
size; smaller images stay as they are), as planar uint8 (3×H×W) in a memory-mapped `.npy` canvas on disk, its mask
beside it. The cache is keyed by the source files' paths, sizes and modification times plus the cache size, so it is
reused across runs and rebuilt when any source file changes. Per epoch, `CachedLoader` draws each batch's indices
and hands them, with the memory maps, to `augment_batch`, which reads only the pixels each crop needs and scales,
crops, flips and jitters the batch on the training device.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

try:
    import fcntl
except ImportError:  # Windows: no locks (nor can a file mapped there be removed)
    fcntl = None

from .dataset import PairedDataset, process_alive
from .images import DataError, image_size, looked_at
from .transforms import augment_batch

# 2: images planar (N×3×H×W), so the resize reads whole rows of one channel; 3: masks read since negative values in
# 32-bit masks are refused (a format-2 cache may hold a -1 as 255, ignored, or a -2 as 254); 4: a 12-bit TIFF read
# on its own scale (format 3 held it near black), a turned TIFF's canvas sized as it is shown; 5: readers fixed since
# (an 8-bit grey or palette TIFF stored turned was scrambled, a dark 16-bit PGM read 257x too bright, a palette mask
# compacted by Pillow's GIF writer read its void as class m): a format-4 cache trained on the old pixels and labels
# while evaluation read the files anew
CACHE_FORMAT = 5
CACHE_HEADROOM = 1.25
CACHE_NAME = re.compile(r"[0-9a-f]{20}")  # cache_key's: a finished cache's folder (a build's is KEY.tmpPID-RANDOM)
# The random part: two builders with one process id (PID 1 in two containers sharing a cache volume) removed each
# other's build; builds named before it are KEY.tmpPID.
BUILD_NAME = re.compile(r"[0-9a-f]{20}\.tmp(?P<pid>\d+)(-[0-9a-f]{8})?")
BUILD_LOCK = "building"  # held (exclusive) by the process building the folder, for as long as it builds


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "resunet"


def cache_short_side(size: int) -> int:
    return math.ceil(size * CACHE_HEADROOM)


def cache_key(dataset: PairedDataset, short_side: int) -> str:
    # The classes too: with RGB masks the palette decides each pixel's class (an edited classes.json, same files).
    classes = json.dumps(dataset.info.to_dict(), sort_keys=True)
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{short_side}:{classes}".encode())
    for path in dataset.image_paths + dataset.mask_paths:
        stat, real = looked_at(path)
        # The change time too: a file edited and its modification time put back (cp -p, rsync -a, tar, unzip) kept
        # the same key, and training read the old masks from the cache without a word (a helper, 2026-12-06).
        digest.update(os.fsencode(f"{real}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}\n"))
    return digest.hexdigest()[:20]



def cache_identity(dataset: PairedDataset, short_side: int) -> str:
    """What a cache is a copy of, whatever the files hold: these files (by their real paths) read with these classes,
    at this size. A newer cache of the same identity makes an older one stale: a file edited, a format bump."""
    classes = json.dumps(dataset.info.to_dict(), sort_keys=True)  # flags or a classes.json: another reading
    # cache_key has looked at every file already (a loop or a dangling link is refused there)
    paths = "\n".join(str(path.resolve()) for path in dataset.image_paths + dataset.mask_paths)
    return hashlib.sha256(os.fsencode(f"{short_side}\n{classes}\n{paths}")).hexdigest()[:20]


# cache_canvas's answers by (cache_key, max_pixels): train asks up to three times at start-up (the early cache check,
# the data path's choice, the build), and a file changed in between changes the key.
_CANVASES: dict[tuple[str, int | None], tuple[list[tuple[int, int]], tuple[int, int]]] = {}


def cache_canvas(dataset: PairedDataset, short_side: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Each image's (height, width) in the cache, its shorter side at most `short_side`, and the canvas every one
    of them fits, padded. From the files' headers, once per dataset state in a process."""
    key = (cache_key(dataset, short_side), dataset.max_pixels)
    if key not in _CANVASES:
        sizes = []
        for path in dataset.image_paths:
            w, h = image_size(path, dataset.max_pixels)
            scale = min(1.0, short_side / min(h, w))
            sizes.append((max(1, round(h * scale)), max(1, round(w * scale))))
        _CANVASES[key] = sizes, (max(h for h, _ in sizes), max(w for _, w in sizes))
    return _CANVASES[key]


def canvas_bytes(count: int, canvas: tuple[int, int]) -> int:
    """`count` images on the canvas: 3 bytes a pixel, and 1 for the mask."""
    return 4 * count * canvas[0] * canvas[1]


def cache_bytes(dataset: PairedDataset, size: int, cache_dir: Path | None = None) -> int:
    """The cache's size on disk: a built one's arrays, else `cache_canvas`'s. It was estimated from the first image
    alone, so a mix of portrait and landscape photos (canvas: the longer side squared) came to about twice the
    estimate, and --data-path auto could build a cache far above its limit."""
    folder = cache_folder(dataset, size, cache_dir)
    if (folder / "done").is_file():
        built = DecodedCache(folder)
        return built.images.size + built.masks.size
    sizes, canvas = cache_canvas(dataset, cache_short_side(size))
    return canvas_bytes(len(sizes), canvas)


class DecodedCache:
    """The memory-mapped arrays: images N×3×H×W, masks N×H×W, sizes N×2 (valid height, width)."""

    def __init__(self, folder: Path, replaced: list[tuple[Path, int]] | None = None,
                 abandoned: list[tuple[Path, int]] | None = None) -> None:
        self.folder = folder
        self.replaced = replaced or []  # (folder, bytes) of the stale copies removed when this one was built
        self.abandoned = abandoned or []  # (folder, bytes) of killed builds' half-built folders removed then
        # A shared lock while this process reads the folder: remove_stale_caches leaves a cache in use alone (on a
        # network disk too, where maps of files removed by another host fail).
        self._in_use = open(folder / "done", "rb")
        lock_where_supported(self._in_use, exclusive=False)
        # Copy-on-write maps: readable as ordinary writable arrays (for torch.from_numpy), never written back.
        try:
            self.images = np.load(folder / "images.npy", mmap_mode="c")
            self.masks = np.load(folder / "masks.npy", mmap_mode="c")
            self.sizes = np.load(folder / "sizes.npy")
            if not len(self.images) == len(self.masks) == len(self.sizes):
                raise ValueError(f"{len(self.images)} images, {len(self.masks)} masks, {len(self.sizes)} sizes")
        except (OSError, ValueError, EOFError) as error:  # a file cut short or removed since it was built
            self._in_use.close()
            why = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise DataError(f"{folder}: this decoded-image cache is damaged ({why}); delete the folder and run "
                            "again (it is rebuilt from the data)") from None

    def __len__(self) -> int:
        return len(self.sizes)

    def close(self) -> None:
        """Done reading: a later build may remove this copy once it is stale (the maps stay valid here)."""
        self._in_use.close()


def _scaled(sample, short_side: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = sample.mask.shape
    scale = short_side / min(h, w)
    if scale >= 1:
        return sample.image, sample.mask
    new_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.asarray(Image.fromarray(sample.image).resize(new_size, Image.BILINEAR, reducing_gap=None))
    mask = np.asarray(Image.fromarray(sample.mask).resize(new_size, Image.NEAREST))
    return image, mask


def cache_folder(dataset: PairedDataset, size: int, cache_dir: Path | None = None) -> Path:
    """Where `build_cache` keeps (or will keep) this dataset's decoded images at this training size."""
    return (cache_dir or default_cache_dir()) / cache_key(dataset, cache_short_side(size))


def cache_write_error(root: Path, error: OSError, given: bool = True, needed: int | None = None) -> DataError:
    """`given`: the folder came from --cache-dir; else it is the default one, which the line must not pass off as a
    flag the user typed. `needed`: the cache's size in bytes, said when the disk is full."""
    reason = error.strerror or str(error)
    if isinstance(error, (FileExistsError, NotADirectoryError)):  # "File exists" would not say which file
        blocking = next((path for path in (root, *root.parents) if path.exists() and not path.is_dir()), None)
        reason = f"{blocking} is a file, not a folder" if blocking is not None else reason
    where = f"--cache-dir {root}" if given else f"the default cache folder {root}"
    if error.errno == errno.ENOSPC and needed is not None:
        size = f"{needed / 2**20:.0f} MB" if needed >= 2**20 else f"{-(-needed // 1024)} KB"
        return DataError(f"{where}: no room for the decoded-image cache (it needs {size}); free some space or give "
                         "a --cache-dir on another disk")
    return DataError(f"{where}: cannot write the decoded-image cache ({reason}); give a writable --cache-dir")


def reserved_memmap(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A uint8 .npy memmap whose disk blocks are all reserved now. open_memmap's file is sparse: a page written
    later to a full disk kills the process with SIGBUS (no message, the build's temporary folder left behind); a
    reservation that does not fit is an OSError (ENOSPC) here instead."""
    array = np.lib.format.open_memmap(path, "w+", np.uint8, shape)
    reserve = getattr(os, "posix_fallocate", None)  # not on macOS or Windows (an AttributeError traceback there)
    if reserve is None:
        return array
    with open(path, "r+b") as file:
        try:
            reserve(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem that cannot reserve: as before
                raise
    return array


def check_cache_writable(dataset: PairedDataset, size: int, cache_dir: Path | None = None) -> None:
    """Raise DataError (one line naming the folder) if this dataset's cache is not built yet and cannot be written:
    called before a run folder is made or an image decoded. A cache already built needs no write (it may be on a
    read-only disk)."""
    folder = cache_folder(dataset, size, cache_dir)
    if (folder / "done").is_file():
        return
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # What the build does first: a folder of its own beside the final one (a file can be writable in a folder
        # where a new entry cannot be made, e.g. an immutable one).
        Path(tempfile.mkdtemp(prefix=f"{folder.name}.probe", dir=folder.parent)).rmdir()
    except OSError as error:
        raise cache_write_error(folder.parent, error, cache_dir is not None) from None


def build_cache(dataset: PairedDataset, size: int, cache_dir: Path | None = None, workers: int = 2,
                remove_stale: bool = True) -> DecodedCache:
    """Return the cache for this dataset and training size, building it if absent or stale; a build first removes
    the stale copies of the same files (`remove_stale`: one process per machine asks). A cache folder that cannot be
    written raises DataError (one line)."""
    short_side = cache_short_side(size)
    folder = cache_folder(dataset, size, cache_dir)
    if (folder / "done").is_file():
        return DecodedCache(folder)
    sizes, canvas = cache_canvas(dataset, short_side)  # headers only
    needed = canvas_bytes(len(sizes), canvas)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.mkdir(parents=True)
    except OSError as error:  # a read-only folder, a file in the way: one line, not a traceback
        raise cache_write_error(folder.parent, error, cache_dir is not None) from None
    building = open(tmp / BUILD_LOCK, "wb")
    with building:
        lock_where_supported(building, exclusive=True)
        # Before the build, so a disk that held the old copy has room for the new one.
        identity = cache_identity(dataset, short_side)  # every file's real path: once, for the removal and meta.json
        replaced = remove_stale_caches(folder, identity) if remove_stale else []
        abandoned = remove_abandoned_builds(folder.parent, tmp) if remove_stale else []
        try:
            _fill_cache(dataset, short_side, canvas, tmp, workers, identity)
            (tmp / BUILD_LOCK).unlink()
        except BaseException as error:  # a bad image, Ctrl-C, a write that fails part-way: no half-built folder left
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(error, OSError):  # reading errors are DataErrors already: an OSError here is a write's
                raise cache_write_error(folder.parent, error, cache_dir is not None, needed) from None
            raise
        try:
            tmp.rename(folder)  # atomic: a half-built cache is never seen as done
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return DecodedCache(folder, replaced, abandoned)


def remove_abandoned_builds(parent: Path, own: Path | None = None) -> list[tuple[Path, int]]:
    """Remove the half-built caches (KEY.tmpPID-RANDOM, other than `own`) whose build was killed where it could
    not clean up (SIGKILL, an out-of-memory kill, a SIGTERM before training's handler): each held a whole cache's
    reserved blocks, and each retry left another. A build holds its folder's lock while it runs (on any host sharing
    the folder); a folder without the lock file (made before it, or its first instant) is left while its process id
    lives here."""
    removed = []
    try:
        builds = [(path, int(match["pid"])) for path in parent.iterdir() if (match := BUILD_NAME.fullmatch(path.name))]
    except OSError:
        return removed
    for build, pid in builds:
        if build == own:
            continue
        try:
            # Open for writing: on NFS an exclusive lock needs it (EBADF for a file open to read: nothing was removed)
            with open(build / BUILD_LOCK, "r+b") as lock:
                if fcntl is None:
                    continue
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while its build runs
                size = remove_folder(build)
        except FileNotFoundError:
            if process_alive(pid):
                continue
            try:
                size = remove_folder(build)
            except OSError:
                continue
        except OSError:  # its build still runs, or no lock can be taken here
            continue
        removed.append((build, size))
    return removed


def lock_where_supported(file, exclusive: bool) -> None:
    """flock `file`, waiting for it; skipped where there are no locks: Windows (no fcntl), a file system without them
    (NFS without its lock daemon: ENOLCK), where the cache is then built and read unguarded."""
    if fcntl is None:
        return
    try:
        fcntl.flock(file, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    except OSError:
        pass


def remove_folder(folder: Path) -> int:
    """Remove a cache folder (flat: its files); the bytes it held."""
    size = sum(path.stat().st_size for path in folder.iterdir())
    shutil.rmtree(folder)
    return size


def remove_stale_caches(folder: Path, identity: str) -> list[tuple[Path, int]]:
    """Remove the finished caches beside `folder` that copy the same files with the same classes at the same size:
    each edit of a mask would otherwise leave a whole copy of the decoded images behind (gigabytes for SBD). Left
    alone: a cache a process is reading (its lock), folders being built, other sizes, splits, datasets or classes,
    caches built before identities were recorded, and whatever cannot be read or removed. Returns what was removed,
    with its size in bytes."""
    removed = []
    try:
        others = [path for path in folder.parent.iterdir() if CACHE_NAME.fullmatch(path.name) and path != folder]
    except OSError:
        return removed
    for other in others:
        try:
            if json.loads((other / "meta.json").read_text()).get("identity") != identity:
                continue
            with open(other / "done", "r+b") as done:  # for writing: NFS's exclusive locks need it
                if fcntl is not None:
                    fcntl.flock(done, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while a process reads it
                size = remove_folder(other)
        except (OSError, ValueError, AttributeError):
            continue
        removed.append((other, size))
    return removed


def _fill_cache(dataset: PairedDataset, short_side: int, canvas: tuple[int, int], tmp: Path, workers: int,
                identity: str) -> None:
    canvas_h, canvas_w = canvas
    n = len(dataset)
    images = reserved_memmap(tmp / "images.npy", (n, 3, canvas_h, canvas_w))
    masks = reserved_memmap(tmp / "masks.npy", (n, canvas_h, canvas_w))
    masks[:] = dataset.info.ignore_index
    true_sizes = np.zeros((n, 2), dtype=np.int64)

    def fill(index: int) -> None:
        image, mask = _scaled(dataset.load(index), short_side)
        h, w = mask.shape
        images[index, :, :h, :w] = image.transpose(2, 0, 1)
        masks[index, :h, :w] = mask
        true_sizes[index] = (h, w)

    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without the GIL
        list(pool.map(fill, range(n)))
    images.flush()
    masks.flush()
    np.save(tmp / "sizes.npy", true_sizes)
    (tmp / "meta.json").write_text(json.dumps({"format": CACHE_FORMAT, "short_side": short_side, "count": n,
                                               "source": dataset.description,
                                               "identity": identity}))
    (tmp / "done").touch()
    del images, masks


class CachedLoader:
    """Yields augmented (images, masks) batches for one epoch; the order and augmentation depend only on
    (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(
        self,
        cache: DecodedCache,
        batch_size: int,
        size: int,
        scales: tuple[float, float],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        ignore_index: int,
        jitter: float,
        device: torch.device,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        crop: int | None = None,
    ) -> None:
        self.cache = cache
        self.batch_size = batch_size
        self.augment = dict(size=size, scales=scales, mean=mean, std=std, ignore_index=ignore_index, jitter=jitter,
                            crop=crop)
        self.device = device
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.cache) // self.world_size) // self.batch_size  # drop_last: no BatchNorm on 1 sample

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(len(self.cache), generator=generator)
        order = order[: len(order) // self.world_size * self.world_size][self.rank :: self.world_size]
        # The rank spread far apart (as train's seeds): with "+ rank", rank r in epoch e drew what rank r - 31 drew in
        # epoch e + 1 from 32 processes on. Rank 0's draws are as before.
        aug_generator = torch.Generator().manual_seed((self.seed * 100003 + self.epoch) * 31 + self.rank * 1_000_003)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = np.sort(order[start : start + self.batch_size].numpy())  # sorted reads are kinder to the disk
            sizes = torch.from_numpy(self.cache.sizes[index])
            yield augment_batch(self.cache.images, self.cache.masks, index, sizes, generator=aug_generator,
                                device=self.device, **self.augment)
