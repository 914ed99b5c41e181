"""The decoded-image cache: built once, reused across runs, rebuilt when a source file changes."""

import errno
import fcntl
import gc
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from resunet.data.cache import CachedLoader, build_cache, cache_short_side
from resunet.data.dataset import open_dataset
from resunet.data.demo import make_demo_dataset


def test_cache_holds_decoded_pixels_and_is_reused_then_invalidated(tmp_path):
    make_demo_dataset(tmp_path / "data", train=5, val=1, size=48, seed=0)
    dataset = open_dataset(tmp_path / "data", "train")
    cache = build_cache(dataset, size=32, cache_dir=tmp_path / "cache")  # 48 > ceil(32 × 1.25) = 40: downscaled
    assert cache_short_side(32) == 40
    assert cache.images.shape == (5, 3, 40, 40) and isinstance(cache.images, np.memmap)  # planar
    assert cache.sizes.tolist() == [[40, 40]] * 5
    from PIL import Image

    expected = np.asarray(Image.fromarray(dataset.load(0).mask).resize((40, 40), Image.NEAREST))
    assert np.array_equal(cache.masks[0], expected)  # masks downscale with nearest neighbour: no invented labels
    again = build_cache(dataset, size=32, cache_dir=tmp_path / "cache")
    assert again.folder == cache.folder  # same key: reused, not rebuilt
    stamp = (cache.folder / "done").stat().st_mtime_ns
    assert (again.folder / "done").stat().st_mtime_ns == stamp
    # Touch one source image: the key changes and a new cache is built.
    path = dataset.image_paths[2]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    rebuilt = build_cache(open_dataset(tmp_path / "data", "train"), size=32, cache_dir=tmp_path / "cache")
    assert rebuilt.folder != cache.folder and (rebuilt.folder / "done").is_file()


def test_a_mask_edited_with_its_size_and_modification_time_kept_rebuilds_the_cache(tmp_path):
    """cp -p, rsync -a, tar and unzip put a file's modification time back: a mask edited that way, of the same
    size, kept the cache, and training read the old mask without a word (a helper, 2026-12-06). Its change time
    tells."""
    from PIL import Image

    make_demo_dataset(tmp_path / "data", train=3, val=1, size=40, seed=1)
    dataset = open_dataset(tmp_path / "data", "train")
    mask = dataset.mask_paths[1]
    stored = Image.open(mask)
    stored.save(mask, compress_level=0)  # uncompressed: an edit keeps the file's size
    kept = mask.stat()
    cache = build_cache(dataset, size=32, cache_dir=tmp_path / "cache")
    edited = np.asarray(stored).copy()
    edited[edited == 0] = 1
    changed = stored.copy()  # its palette and other chunks kept
    changed.putdata(edited.flatten().tolist())
    changed.save(mask, compress_level=0)
    os.utime(mask, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert (mask.stat().st_size, mask.stat().st_mtime_ns) == (kept.st_size, kept.st_mtime_ns)
    rebuilt = build_cache(open_dataset(tmp_path / "data", "train"), size=32, cache_dir=tmp_path / "cache")
    assert rebuilt.folder != cache.folder and np.array_equal(rebuilt.masks[1][:40, :40], edited)


def test_a_damaged_cache_is_one_line_naming_its_folder(tmp_path):
    """A cache's arrays cut short or removed after it was built ended training with numpy's traceback ("mmap length
    is greater than file size") or a bare "[Errno 2]" (a helper, 2026-12-06)."""
    from resunet.data.images import DataError

    make_demo_dataset(tmp_path / "data", train=3, val=1, size=40, seed=1)
    dataset = open_dataset(tmp_path / "data", "train")
    folder = build_cache(dataset, size=32, cache_dir=tmp_path / "cache").folder
    images = (folder / "images.npy").read_bytes()
    for damage, why in ((lambda: (folder / "images.npy").write_bytes(images[:1000]), "mmap length is greater"),
                        (lambda: (folder / "sizes.npy").write_bytes(b"\x93NUMPY"), ""),
                        (lambda: (folder / "images.npy").unlink(), "No such file or directory")):
        damage()
        with pytest.raises(DataError, match=rf"^{folder}: this decoded-image cache is damaged \(.*{why}.*\); delete "
                                            r"the folder and run again \(it is rebuilt from the data\)$"):
            build_cache(dataset, size=32, cache_dir=tmp_path / "cache")


def test_small_images_are_stored_as_they_are(tmp_path):
    make_demo_dataset(tmp_path / "data", train=3, val=1, size=40, seed=1)
    dataset = open_dataset(tmp_path / "data", "train")
    cache = build_cache(dataset, size=64, cache_dir=tmp_path / "cache")
    sample = dataset.load(1)
    assert np.array_equal(cache.images[1], sample.image.transpose(2, 0, 1))
    assert np.array_equal(cache.masks[1], sample.mask)


def test_cached_loader_epochs_are_reproducible_and_sharded(tmp_path):
    make_demo_dataset(tmp_path / "data", train=8, val=1, size=32, seed=2)
    cache = build_cache(open_dataset(tmp_path / "data", "train"), size=32, cache_dir=tmp_path / "cache")
    def loader(rank=0, world=1):
        return CachedLoader(cache, 2, 32, (0.5, 2.0), (0.5,) * 3, (0.25,) * 3, 255, 0.2, torch.device("cpu"), seed=3,
                            rank=rank, world_size=world, crop=24)
    first = loader()
    first.set_epoch(4)
    batches = list(first)
    assert len(batches) == 4 and batches[0][0].shape == (2, 3, 24, 24) and batches[0][1].shape == (2, 24, 24)
    second = loader()
    second.set_epoch(4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, second))
    second.set_epoch(5)
    assert not torch.equal(next(iter(second))[0], batches[0][0])
    shards = [loader(rank, 2) for rank in (0, 1)]
    assert [len(s) for s in shards] == [2, 2]
    # Every process draws its own augmentation in every epoch: with the rank added to the epoch's seed unspread,
    # rank 31 drew in epoch 4 what rank 0 drew in epoch 5 (from 32 processes on; a helper, 2026-12-06). One image
    # copied 64 times: two batches are equal exactly when their draws are.
    for name in ("images", "masks"):
        copied = np.repeat(getattr(cache, name)[:1], 64, axis=0)
        setattr(cache, name, copied)
    cache.sizes = np.repeat(cache.sizes[:1], 64, axis=0)
    draws = {}
    for rank, epoch in ((0, 5), (31, 4), (0, 4)):
        shard = loader(rank, 32)
        shard.set_epoch(epoch)
        draws[rank, epoch] = next(iter(shard))[0]
    assert not torch.equal(draws[0, 5], draws[31, 4])
    assert not torch.equal(draws[0, 4], draws[31, 4])


def test_an_edited_classes_json_rebuilds_the_cache_of_rgb_masks(tmp_path):
    # With RGB masks the palette decides each pixel's class: the same files, another classes.json, other labels.
    import json

    from PIL import Image

    root = tmp_path / "data"
    for folder in ("images", "masks"):
        (root / "train" / folder).mkdir(parents=True)
    colours = np.zeros((16, 16, 3), np.uint8)
    colours[:, 8:] = (128, 0, 0)  # right half: the second palette colour
    Image.fromarray(colours).save(root / "train" / "masks" / "a.png")
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(root / "train" / "images" / "a.png")
    description = {"classes": ["bg", "a", "b"], "palette": [[0, 0, 0], [128, 0, 0], [0, 128, 0]]}
    (root / "classes.json").write_text(json.dumps(description))
    first = build_cache(open_dataset(root, "train"), size=16, cache_dir=tmp_path / "cache")
    assert set(np.unique(first.masks[0]).tolist()) == {0, 1}
    description["palette"] = [[0, 0, 0], [0, 128, 0], [128, 0, 0]]  # a and b swapped
    (root / "classes.json").write_text(json.dumps(description))
    second = build_cache(open_dataset(root, "train"), size=16, cache_dir=tmp_path / "cache")
    assert second.folder != first.folder and set(np.unique(second.masks[0]).tolist()) == {0, 2}


def test_a_cache_dir_that_cannot_be_written_is_one_data_error_line(tmp_path):
    """build_cache itself (the API, benchmark) refuses an unwritable folder in one line, not with an OSError."""
    import pytest

    from resunet.data.images import DataError

    make_demo_dataset(tmp_path / "data", train=3, val=1, size=48, seed=0)
    (tmp_path / "afile").write_text("mine")
    for where in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(DataError) as caught:
            build_cache(open_dataset(tmp_path / "data", "train"), size=32, cache_dir=where)
        assert str(caught.value) == (f"--cache-dir {where}: cannot write the decoded-image cache ({tmp_path / 'afile'} "
                                     "is a file, not a folder); give a writable --cache-dir")
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_full_disk_is_one_line_with_the_size_needed_and_no_leftovers(tmp_path, monkeypatch):
    """The cache's blocks are reserved before a pixel is written: on a full disk the memory-mapped writes killed the
    process with SIGBUS, without a word, leaving the half-built folder (seen on a 2 MB tmpfs)."""
    import errno

    import pytest

    import resunet.data.cache as cache_module
    from resunet.data.images import DataError

    make_demo_dataset(tmp_path / "data", train=3, val=1, size=48, seed=0)
    reserved = []

    def full_disk(fd, offset, length):
        reserved.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cache_module.os, "posix_fallocate", full_disk)
    with pytest.raises(DataError) as caught:
        build_cache(open_dataset(tmp_path / "data", "train"), size=32, cache_dir=tmp_path / "cache")
    # Size 32 caches at short side 40: three 40×40 images (3 bytes a pixel) and masks (1) = 19,200 bytes → 19 KB.
    assert str(caught.value) == (f"--cache-dir {tmp_path / 'cache'}: no room for the decoded-image cache (it needs "
                                 "19 KB); free some space or give a --cache-dir on another disk")
    assert reserved[0] >= 3 * 3 * 40 * 40  # the whole of images.npy, reserved at once
    assert list((tmp_path / "cache").iterdir()) == []  # no half-built folder left
    monkeypatch.undo()
    built = build_cache(open_dataset(tmp_path / "data", "train"), size=32, cache_dir=tmp_path / "cache")
    assert len(built) == 3 and built.images.shape[0] == 3


def test_an_unwritable_default_cache_folder_is_not_called_a_flag(tmp_path, monkeypatch):
    """No --cache-dir given: the line names the default folder as such, not as a `--cache-dir` the user never typed."""
    import pytest

    from resunet.data.images import DataError

    make_demo_dataset(tmp_path / "data", train=3, val=1, size=48, seed=0)
    (tmp_path / "afile").write_text("mine")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "afile"))
    with pytest.raises(DataError) as caught:
        build_cache(open_dataset(tmp_path / "data", "train"), size=32)
    assert str(caught.value) == (f"the default cache folder {tmp_path / 'afile' / 'resunet'}: cannot write the "
                                 f"decoded-image cache ({tmp_path / 'afile'} is a file, not a folder); give a writable "
                                 "--cache-dir")


def test_cache_bytes_is_the_built_size_for_portrait_and_landscape_photos(tmp_path, monkeypatch):
    # The first image alone was the estimate: a landscape photo first, then portraits, made a square canvas about
    # twice the estimate, and --data-path auto could build a cache far above its limit.
    from types import SimpleNamespace

    from PIL import Image

    from resunet import train
    from resunet.data.cache import cache_bytes

    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (tmp_path / "data" / split / sub).mkdir(parents=True)
    for i, (h, w) in enumerate([(40, 80), (80, 40), (90, 45)]):  # size 32: shorter sides above 40 are scaled to 40
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "data" / "train" / "images" / f"{i}.png")
        Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / "data" / "train" / "masks" / f"{i}.png")
    dataset = open_dataset(tmp_path / "data", "train", num_classes=2)
    needed = cache_bytes(dataset, 32)
    assert needed == 4 * 3 * 80 * 80  # canvas: the landscape's width by the portraits' height
    cache = build_cache(dataset, size=32, cache_dir=tmp_path / "cache")
    assert cache.images.shape == (3, 3, 80, 80) and cache.images.nbytes + cache.masks.nbytes == needed
    monkeypatch.setattr(train, "CACHE_LIMIT_BYTES", needed - 1)  # above the old estimate of 53,760 bytes
    assert train.choose_data_path(SimpleNamespace(data_path="auto", size=32, cache_dir=None), dataset) == "simple"
    monkeypatch.setattr(train, "CACHE_LIMIT_BYTES", needed + 1)
    assert train.choose_data_path(SimpleNamespace(data_path="auto", size=32, cache_dir=None), dataset) == "cached"
    # The headers are read once per dataset state (a PNG's EXIF lookup decodes it), and not at all once it is built.
    import resunet.data.cache as cache_module

    monkeypatch.setattr(cache_module, "image_size", lambda *args: pytest.fail("headers read again"))
    assert cache_bytes(dataset, 32) == needed and cache_bytes(dataset, 32, tmp_path / "cache") == needed


def touch_later(path) -> None:
    """A file edited (the same bytes, a newer time): a new cache key."""
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))


def test_a_rebuilt_cache_removes_the_stale_copy_of_its_files_and_no_other(tmp_path, monkeypatch):
    data, cache_dir = tmp_path / "data", tmp_path / "cache"
    make_demo_dataset(data, train=4, val=2, size=48, seed=0)
    make_demo_dataset(tmp_path / "copy", train=4, val=2, size=48, seed=0)
    train_set = open_dataset(data, "train")
    old = build_cache(train_set, size=32, cache_dir=cache_dir)
    old_folder = old.folder
    kept = [build_cache(train_set, size=24, cache_dir=cache_dir),  # another size
            build_cache(open_dataset(data, "val"), size=32, cache_dir=cache_dir),  # another split
            build_cache(open_dataset(tmp_path / "copy", "train"), size=32, cache_dir=cache_dir)]  # same pictures
    assert old.replaced == [] and all(cache.replaced == [] for cache in kept)
    building = cache_dir / f"{old_folder.name}.tmp99999"  # another process's build: done, not yet renamed
    shutil.copytree(old_folder, building)
    build_lock = open(building / "building", "wb")  # held while it builds, as build_cache holds it
    fcntl.flock(build_lock, fcntl.LOCK_EX)
    unreadable = cache_dir / ("0" * 20)
    unreadable.mkdir()
    (unreadable / "done").touch()
    (unreadable / "meta.json").write_text("{")
    old_bytes = sum(path.stat().st_size for path in old_folder.iterdir())

    mask = train_set.mask_paths[1]
    touch_later(mask)
    in_use = build_cache(open_dataset(data, "train"), size=32, cache_dir=cache_dir)
    assert in_use.folder != old_folder and in_use.replaced == [] and old_folder.is_dir()  # `old` still reads it
    del old  # the run that read it has ended
    touch_later(mask)
    new = build_cache(open_dataset(data, "train"), size=32, cache_dir=cache_dir)
    assert new.replaced == [(old_folder, old_bytes)] and old_bytes > 4 * 3 * 40 * 40 and not old_folder.exists()
    assert in_use.folder.is_dir()  # still read by `in_use`
    assert all(cache.folder.is_dir() for cache in kept) and building.is_dir() and unreadable.is_dir()

    # The same files named by a relative path: the same copy, replaced again.
    monkeypatch.chdir(tmp_path)
    in_use_folder, new_folder = in_use.folder, new.folder
    del in_use, new
    touch_later(mask)
    newer = build_cache(open_dataset("data", "train"), size=32, cache_dir=cache_dir)
    assert sorted(folder for folder, _ in newer.replaced) == sorted([in_use_folder, new_folder])
    assert build_cache(open_dataset("data", "train"), size=32, cache_dir=cache_dir).replaced == []  # reused


def test_the_same_files_read_with_other_classes_keep_their_caches(tmp_path):
    from test_data import make_folder_dataset

    make_folder_dataset(tmp_path / "data", splits=("train",))
    three = build_cache(open_dataset(tmp_path / "data", "train", num_classes=3), size=16, cache_dir=tmp_path / "c")
    four = build_cache(open_dataset(tmp_path / "data", "train", num_classes=4), size=16, cache_dir=tmp_path / "c")
    assert four.folder != three.folder and four.replaced == []
    del three, four  # neither in use: each would go only as the stale copy of its own reading
    touch_later(tmp_path / "data" / "train" / "masks" / "0.png")
    again = build_cache(open_dataset(tmp_path / "data", "train", num_classes=4), size=16, cache_dir=tmp_path / "c")
    assert len(again.replaced) == 1 and len([p for p in (tmp_path / "c").iterdir() if (p / "done").exists()]) == 2


def test_train_says_which_stale_cache_it_removed(tmp_path, capsys):
    from dataclasses import replace

    from resunet.train import train

    from conftest import tiny_config

    make_demo_dataset(tmp_path / "data", train=8, val=2, size=48, seed=0)
    config = tiny_config(tmp_path / "data", tmp_path / "first", epochs=1, data_path="cached")
    gc.disable()  # the run lets its cache go when it ends, not when the collector finds its objects
    try:
        train(config)
        assert "resunet: removed" not in capsys.readouterr().out
        (first,) = [folder for folder in (tmp_path / "cache").iterdir() if (folder / "done").is_file()]
        with open(first / "done", "rb") as done:
            fcntl.flock(done, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no process reads it now
    finally:
        gc.enable()
    touch_later(open_dataset(tmp_path / "data", "train").mask_paths[0])
    train(replace(config, out=str(tmp_path / "second")))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resunet: removed")]
    assert len(lines) == 1 and lines[0].startswith("resunet: removed 1 stale decoded-image cache(s) of these files at "
                                                   f"this size (") and f"MB: {first}), built before" in lines[0]
    assert not first.exists()


def test_a_run_that_fails_mid_way_lets_its_cache_go(tmp_path, monkeypatch):
    import resunet.train
    from resunet.train import train

    from conftest import tiny_config

    make_demo_dataset(tmp_path / "data", train=8, val=2, size=48, seed=0)
    monkeypatch.setattr(resunet.train, "evaluate_dataset", lambda *args, **kwargs: 1 / 0)
    gc.disable()
    try:
        with pytest.raises(ZeroDivisionError) as failed:  # kept, as a notebook keeps the last traceback, which
            train(tiny_config(tmp_path / "data", tmp_path / "run", epochs=1, data_path="cached"))  # holds the run
        assert failed.traceback
        (cache,) = [folder for folder in (tmp_path / "cache").iterdir() if (folder / "done").is_file()]
        with open(cache / "done", "rb") as done:
            fcntl.flock(done, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        gc.enable()


def test_a_build_killed_part_way_leaves_a_folder_the_next_build_removes(tmp_path):
    """A build killed where it cannot clean up (SIGKILL, an out-of-memory kill) left KEY.tmpPID, holding the whole
    cache's reserved blocks, for good: each retry left another (a helper, 2026-12-06). The next build removes the
    folders of builds that are not running (a running one holds its lock) and says so."""
    data, cache_dir = tmp_path / "data", tmp_path / "cache"
    make_demo_dataset(data, train=4, val=2, size=48, seed=0)
    killed = subprocess.run([sys.executable, "-c", f"""
import os, signal
from pathlib import Path
import resunet.data.cache as cache
from resunet.data.dataset import open_dataset

def killed_part_way(dataset, short_side, canvas, tmp, *args):
    (tmp / "images.npy").write_bytes(bytes(1_000_000))
    os.kill(os.getpid(), signal.SIGKILL)

cache._fill_cache = killed_part_way
cache.build_cache(open_dataset({str(data)!r}, "val"), size=32, cache_dir=Path({str(cache_dir)!r}))
"""], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    left, = cache_dir.iterdir()
    assert ".tmp" in left.name and (left / "building").is_file() and (left / "images.npy").is_file()
    older = cache_dir / ("a" * 20 + f".tmp{killed_pid()}")  # a build from before the lock file: its process is gone
    older.mkdir()
    (older / "images.npy").write_bytes(bytes(1000))
    alive = cache_dir / ("b" * 20 + f".tmp{os.getppid()}")  # no lock file, its process alive: left alone
    alive.mkdir()
    cache = build_cache(open_dataset(data, "train"), size=32, cache_dir=cache_dir)
    assert sorted(cache.abandoned) == sorted([(left, 1_000_000), (older, 1000)]) and cache.replaced == []
    assert not left.exists() and not older.exists() and alive.is_dir() and (cache.folder / "done").is_file()
    assert not (cache.folder / "building").exists()


def killed_pid() -> int:
    """The id of a process that has ended."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(ended.stdout)


def test_a_file_system_without_locks_builds_and_reads_the_cache(tmp_path, monkeypatch):
    """NFS without its lock daemon refuses every flock (ENOLCK): the reader's shared lock ended train in a
    traceback after the whole build, and every later run at once (a helper, 2026-12-06). Read unguarded there."""
    import errno

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    make_demo_dataset(tmp_path / "data", train=4, val=2, size=48, seed=0)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    built = build_cache(open_dataset(tmp_path / "data", "train"), size=32, cache_dir=tmp_path / "cache")
    again = build_cache(open_dataset(tmp_path / "data", "train"), size=32, cache_dir=tmp_path / "cache")
    assert again.folder == built.folder and len(again) == 4 and np.array_equal(again.masks, built.masks)


def test_a_build_by_another_process_of_the_same_id_is_left_alone(tmp_path):
    """Two containers sharing a cache volume, each trainer PID 1: the second build removed the first's folder
    (KEY.tmpPID, the same name) without looking at its lock, and the first then renamed the second's half-filled
    folder into place (a helper's review, 2026-12-07). A build's folder is KEY.tmpPID-RANDOM now."""
    from resunet.data.cache import cache_folder

    make_demo_dataset(tmp_path / "data", train=4, val=2, size=48, seed=0)
    dataset, cache_dir = open_dataset(tmp_path / "data", "train"), tmp_path / "cache"
    other = cache_dir / f"{cache_folder(dataset, 32, cache_dir).name}.tmp{os.getpid()}"
    other.mkdir(parents=True)
    (other / "images.npy").write_bytes(b"half written")
    with open(other / "building", "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # its build is running
        cache = build_cache(dataset, size=32, cache_dir=cache_dir)
    assert (other / "images.npy").read_bytes() == b"half written" and cache.abandoned == []
    assert (cache.folder / "done").is_file() and cache.images.shape[0] == 4


def test_stale_copies_and_killed_builds_are_removed_where_exclusive_locks_need_a_writable_file(tmp_path, monkeypatch):
    """On NFS (a cluster's home folder) an exclusive lock on a file open only to read is refused (EBADF): every stale
    copy and every killed build was passed over without a word, and each mask edit left a whole decoded copy behind
    (a helper's review, 2026-12-07). NFS's rule is played here by flock itself."""
    import resunet.data.cache as cache_module

    real_flock = fcntl.flock

    def nfs_flock(file, operation):
        descriptor = file if isinstance(file, int) else file.fileno()
        if operation & fcntl.LOCK_EX and fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_flock(file, operation)

    data, cache_dir = tmp_path / "data", tmp_path / "cache"
    make_demo_dataset(data, train=4, val=2, size=48, seed=0)
    old = build_cache(open_dataset(data, "train"), size=32, cache_dir=cache_dir)
    old_folder = old.folder
    del old
    killed = cache_dir / ("c" * 20 + ".tmp99999-0123abcd")  # a build killed part-way: its lock file, not held
    killed.mkdir()
    (killed / "building").touch()
    (killed / "images.npy").write_bytes(bytes(1000))
    touch_later(open_dataset(data, "train").mask_paths[0])
    monkeypatch.setattr(cache_module.fcntl, "flock", nfs_flock)
    new = build_cache(open_dataset(data, "train"), size=32, cache_dir=cache_dir)
    assert [folder for folder, _ in new.replaced] == [old_folder] and not old_folder.exists()
    assert new.abandoned == [(killed, 1000)] and not killed.exists()


def test_the_cache_is_built_where_blocks_cannot_be_reserved_ahead(tmp_path, monkeypatch):
    """macOS and Windows have no posix_fallocate: the cached data path (the default under 20 GiB) stopped with an
    AttributeError traceback there (a helper's review, 2026-12-07). Built as on a file system that cannot reserve."""
    make_demo_dataset(tmp_path / "data", train=3, val=1, size=48, seed=0)
    monkeypatch.delattr(os, "posix_fallocate")
    cache = build_cache(open_dataset(tmp_path / "data", "train"), size=32, cache_dir=tmp_path / "cache")
    assert (cache.folder / "done").is_file() and cache.images.shape[0] == 3 and cache.masks.any()
