"""Download and prepare PASCAL VOC 2012 and SBD (the "train_aug" segmentation set).

Downloads are resumable (a ``.part`` file plus an HTTP ``Range`` request),
verified by md5 and moved into place atomically, so an interrupted run can
simply be started again. Extraction refuses archive members that would land
outside the target folder.

The URLs and md5 sums are those torchvision's ``VOCSegmentation`` and
``SBDataset`` use (torchvision 0.29: ``datasets/voc.py`` and ``datasets/sbd.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

# torchvision moved both downloads to these hosts: host.robots.ox.ac.uk is
# frequently down and www.eecs.berkeley.edu only redirects to www2.
VOC_URL = "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
SBD_URL = "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
SBD_MD5 = "82b4d87ceb2ed10f6038a1cba92111cb"

# (SBD train | SBD val | VOC train) - VOC val, with the official lists.
VOC_TRAIN_AUG_SIZE = 10582

VOID_LABEL = 255
NUM_CLASSES = 21  # background + 20 object classes

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0  # per socket operation, not for the whole transfer


class DownloadError(RuntimeError):
    """A download, checksum, extraction or dataset-layout problem (one-line message)."""


def _one_line(text: object) -> str:
    # Error reasons from sockets/servers may contain newlines; the brief is one line.
    return " ".join(str(text).split())


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in chunks (the VOC tar is 2 GB)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _content_range_start(value: str | None) -> int | None:
    """First byte offset from a ``Content-Range: bytes N-M/T`` header, else None."""
    match = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", value or "")
    return int(match.group(1)) if match else None


def _content_range_total(value: str | None) -> int | None:
    """Total size T from ``Content-Range: bytes */T`` (as sent with a 416), else None."""
    match = re.match(r"\s*bytes\s+[\d*-]+/(\d+)", value or "")
    return int(match.group(1)) if match else None


def _network_error(url: str, part: Path, reason: object) -> DownloadError:
    kept = part.stat().st_size if part.exists() else 0
    tail = (
        f"partial file {part} ({kept} bytes) is kept; run again to resume"
        if kept
        else "nothing was downloaded"
    )
    return DownloadError(f"download of {url} failed: {_one_line(reason)}; {tail}")


def _disk_error(part: Path, err: OSError) -> DownloadError:
    try:
        kept = part.stat().st_size
    except OSError:
        kept = 0
    tail = f"the {kept} bytes downloaded are kept and the same command resumes" if kept else "then run the same command"
    return DownloadError(f"cannot write {part} ({err.strerror or err}); free some space on that disk or make "
                         f"{part.parent} writable; {tail}")


def _fetch_to_part(url: str, part: Path, desc: str, progress: bool) -> None:
    """Append the missing bytes of ``url`` to ``part``; return when it is complete."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "resunet-download/1.0"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # Nothing left to send: the .part may already be whole (crash before rename).
            total = _content_range_total(err.headers.get("Content-Range"))
            err.close()
            if total == offset:
                return
            part.unlink()  # longer than the remote file: it cannot be a prefix of it
            return _fetch_to_part(url, part, desc, progress)
        raise _network_error(url, part, f"HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise _network_error(url, part, getattr(err, "reason", err)) from err

    with response:
        length = response.headers.get("Content-Length")
        resumed = (
            offset > 0
            and response.status == 206
            and _content_range_start(response.headers.get("Content-Range")) == offset
        )
        if offset and response.status == 206 and not resumed:
            # A partial answer from some other offset is of no use: fetch it whole.
            part.unlink()
            return _fetch_to_part(url, part, desc, progress)
        if offset and not resumed:
            # A plain 200: a server without ranges sends the whole file, longer than the part; a proxy's or mirror's
            # page sent in its place truncated the part (hours of a slow line) before its md5 failed and it went too.
            kind = response.headers.get_content_type()
            if kind == "text/html":
                what = f"{kind}, {int(length):,} bytes" if length is not None else kind
                raise _network_error(url, part, f"asked to go on from byte {offset:,}, the server sent something "
                                                f"else ({what}: a proxy's or login page?)")
            if length is not None and int(length) == offset:  # the part is whole (stopped during its md5): it decides
                return
        if not resumed:
            offset = 0  # server ignored the Range (plain 200): start over
        expected = offset + int(length) if length is not None else None
        received = offset
        try:
            fh = open(part, "ab" if resumed else "wb")
        except OSError as err:
            raise _disk_error(part, err) from None
        try:
            with fh, tqdm(
                total=expected,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=not progress,
            ) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    try:
                        fh.write(chunk)
                    except OSError as err:  # this machine's disk, not the network: say which, and what to do
                        raise _disk_error(part, err) from None
                    received += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            raise _network_error(url, part, err) from err
    # http.client returns b"" on an early close instead of raising, so compare sizes.
    if expected is not None and received != expected:
        raise _network_error(url, part, f"connection closed after {received} of {expected} bytes")


def download_url(url: str, dest: Path, md5: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (resumable, md5-checked, atomic) and return ``dest``.

    Bytes are streamed into ``dest + ".part"``; a later call continues it with a
    ``Range`` request. ``dest`` only ever appears complete and verified. An
    existing ``dest`` with the right md5 (or any existing ``dest`` when ``md5`` is
    None) is returned without touching the network.
    """
    dest = Path(dest)
    part = dest.with_suffix(dest.suffix + ".part")
    if dest.exists():
        actual = None if md5 is None else file_md5(dest)
        if actual == md5:
            part.unlink(missing_ok=True)  # an earlier try's, the file now complete beside it
            return dest
        # Not the file: most often a copy cut short (put there by hand on a machine without internet), whose bytes
        # are a prefix of the download. Continued as the partial file unless one is already there; said either way.
        if part.exists():
            dest.unlink()
            done = "deleted (a partial download is already beside it)"
        else:
            os.replace(dest, part)
            done = f"continued as a partial download ({part.name})"
        print(f"resunet: {dest}: md5 {actual}, not {md5}: not the file (a copy cut short?); {done}", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _fetch_to_part(url, part, dest.name, progress)
    if md5 is not None:
        actual = file_md5(part)
        if actual != md5:
            part.unlink()  # resuming a corrupt prefix would never succeed
            raise DownloadError(f"md5 mismatch for {dest.name} from {url}: expected {md5}, got {actual} (a proxy's or "
                                "login page instead of the file, or a damaged copy?); file deleted; run the same "
                                "command again to download it anew")
    os.replace(part, dest)  # atomic on one filesystem: no half-written dest
    return dest


def _check_member_fallback(member: tarfile.TarInfo, dest_dir: Path) -> None:
    # Only for Pythons without tarfile's "data" filter (< 3.10.12 / 3.11.4).
    root = dest_dir.resolve()
    target = (root / member.name).resolve()
    if os.path.isabs(member.name) or not target.is_relative_to(root):
        raise DownloadError(f"unsafe path in archive: {member.name!r}")
    if member.issym() or member.islnk():
        base = target.parent if member.issym() else root
        link = (base / member.linkname).resolve()
        if os.path.isabs(member.linkname) or not link.is_relative_to(root):
            raise DownloadError(f"unsafe link in archive: {member.name!r} -> {member.linkname!r}")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise DownloadError(f"unsupported member type in archive: {member.name!r}")


def extract(archive: Path, dest_dir: Path) -> None:
    """Extract a tar/tar.gz/tgz into ``dest_dir``, refusing members that escape it."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                # "data" rejects ../ paths, absolute paths, links out of dest_dir and device files.
                tar.extractall(dest_dir, filter="data")
            else:
                members = tar.getmembers()
                for member in members:
                    _check_member_fallback(member, dest_dir)
                tar.extractall(dest_dir, members=members)
    except tarfile.TarError as err:  # includes tarfile.FilterError
        linked = [entry for entry in dest_dir.iterdir() if entry.is_symlink()]
        if isinstance(err, tarfile.OutsideDestinationError) and linked:
            # The "data" filter does not extract through links, even the user's own (a VOCdevkit on another disk).
            raise DownloadError(f"cannot extract {archive}: {linked[0]} is a link (to {os.readlink(linked[0])}), and "
                                "extraction does not write through links; give --root the folder on the other disk "
                                "instead") from None
        raise DownloadError(f"cannot extract {archive}: {_one_line(err)}") from err
    except OSError as err:  # a full disk, a read-only folder: said in one line; a rerun extracts it again
        raise DownloadError(f"cannot extract {archive} into {dest_dir} ({err.strerror or err}); free some space or "
                            f"make it writable, then run the same command again (keep {archive.name}: it is "
                            "extracted again from it)") from None


def _require(base: Path, names: list[str], what: str) -> None:
    missing = [name for name in names if not (base / name).exists()]
    if missing:
        raise DownloadError(f"{what} at {base} is incomplete: missing {', '.join(missing)}; delete {base} and run the "
                            "same command again to download and extract it anew")


_VOC_REQUIRED = ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"]
_SBD_REQUIRED = ["img", "cls", "train.txt", "val.txt"]


# Written into the extracted folder once extraction has finished: a run killed (or out of space) mid-way leaves
# none, and the next run extracts again from the kept archive instead of taking a folder missing most files as done.
EXTRACTED_STAMP = ".resunet-extracted"


def _extracting_marker(root: Path, archive_name: str) -> Path:
    """Beside the archive while it is being extracted: a half-extracted folder whose archive was then deleted (to
    free the space the error asked for) is not taken for one extracted by hand."""
    return root / f".{archive_name}.extracting"


@contextlib.contextmanager
def _only_run(root: Path, name: str, doing: str, unwritable: str):
    """One run at a time on `name` in `root`, which another run is told it is `doing`: a second run resumed into the
    .part the first was still writing, the md5 failed and both lost the download; two builds of train_aug moved each
    other's masks away. `unwritable` begins the line for a `root` that cannot be written."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; runs are not guarded
        yield
        return
    path = root / f".{name}.lock"
    try:
        lock = open(path, "a")
    except OSError as err:
        raise DownloadError(f"{unwritable} ({err.strerror or err}); make it writable, then run the same command "
                            "again") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The run before ours removed the file it held as it ended (below): the lock we got is on that removed
            # file, which a third run would not see. Held, as far as this run can tell.
            if os.stat(path).st_ino != os.fstat(lock.fileno()).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):  # EWOULDBLOCK: held
            raise DownloadError(f"another resunet download is {doing}; let it finish (then this command has nothing "
                                "left to do)") from None
        except OSError:  # a file system without locks (NFS without its lock daemon): unguarded, as on Windows
            yield
            return
        try:
            yield
        finally:  # still held: a run that opens it now is told another holds it, and one after finds none
            with contextlib.suppress(OSError):  # another user's file in a shared folder: left, the work done
                path.unlink(missing_ok=True)


def _download_and_extract(root: Path, url: str, md5: str | None, archive_name: str, folder: Path,
                          required: list[str], what: str) -> Path:
    stamp = folder / EXTRACTED_STAMP
    if stamp.exists() or _extracted_by_hand(root, archive_name, folder):  # nothing to write (a read-only copy too)
        _require(folder, required, what)
        return folder
    made = [p for p in (root, *root.parents) if not p.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"--root {root}: cannot make the folder ({err.strerror or err})") from None
    try:
        return _fetch_and_extract(root, url, md5, archive_name, folder, required, what)
    except BaseException:
        _tidy_after_nothing(made)
        raise


def _extracted_by_hand(root: Path, archive_name: str, folder: Path) -> bool:
    """A folder there without its archive, and not left half-extracted by a run of ours (the marker): put there by
    hand, or by a version without stamps. A leftover .part beside it is an earlier try's, not a download to finish
    over it."""
    marker = _extracting_marker(root, archive_name)
    return folder.is_dir() and not (root / archive_name).exists() and not marker.exists()


def _tidy_after_nothing(made: list[Path]) -> None:
    """A run that failed before any byte was kept (no network, a 404) left the folders it made to hold it: removed,
    unless anything is there (another run's lock file, say)."""
    try:
        for folder in made:  # deepest first; rmdir refuses a folder that is not empty
            folder.rmdir()
    except OSError:
        pass


def _fetch_and_extract(root: Path, url: str, md5: str | None, archive_name: str, folder: Path,
                       required: list[str], what: str) -> Path:
    stamp = folder / EXTRACTED_STAMP
    archive_path = root / archive_name
    marker = _extracting_marker(root, archive_name)
    with _only_run(root, archive_name, f"fetching or extracting {root / archive_name}",
                   f"--root {root}: cannot write in it"):
        if stamp.exists():  # finished by the run this one waited for
            return folder
        if folder.is_dir() and not archive_path.exists() and marker.exists():
            raise DownloadError(f"{folder} was being extracted from {archive_name} when a run stopped, and "
                                f"{archive_name} is gone: delete {folder} and run the same command again (it "
                                f"downloads the archive anew), or put {archive_name} back in {root}")
        archive = download_url(url, archive_path, md5)
        marker.touch()
        extract(archive, root)
        _require(folder, required, f"extracted {what}")
        _flush_to_disk()
        stamp.touch()
        marker.unlink()
    return folder


def dataset_root(root: Path) -> Path:
    """The folder that holds VOCdevkit, also when given VOCdevkit or VOCdevkit/VOC2012 themselves (as train's
    --data-root takes them): the archive was downloaded again and extracted inside them, VOC2012/VOCdevkit/VOC2012."""
    full = Path(os.path.abspath(root))  # `--root .` inside VOC2012, `--root VOC2012` inside VOCdevkit
    if full.name == "VOC2012" and full.parent.name == "VOCdevkit":
        return full.parent.parent
    if full.name == "VOCdevkit" and (full / "VOC2012").is_dir():
        return full.parent
    return Path(root)


def download_voc2012(root: Path, url: str = VOC_URL, md5: str | None = VOC_MD5) -> Path:
    """Download and extract VOC 2012 trainval under ``root`` (see `dataset_root`); return
    ``root/VOCdevkit/VOC2012``."""
    root = dataset_root(root)
    return _download_and_extract(root, url, md5, "VOCtrainval_11-May-2012.tar", root / "VOCdevkit" / "VOC2012",
                                 _VOC_REQUIRED, "VOC2012")


def download_sbd(root: Path, url: str = SBD_URL, md5: str | None = SBD_MD5) -> Path:
    """Download and extract SBD under ``root`` (see `dataset_root`); return ``root/benchmark_RELEASE/dataset``."""
    root = dataset_root(root)
    return _download_and_extract(root, url, md5, "benchmark.tgz", root / "benchmark_RELEASE" / "dataset",
                                 _SBD_REQUIRED, "SBD")


def _read_ids(path: Path) -> set[str]:
    if not path.exists():
        raise DownloadError(f"split file not found: {path}")
    # a BOM (Notepad) is not part of the first name, as the training reader has it (voc.split_names)
    return {line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()}


def read_sbd_mat(path: Path) -> np.ndarray:
    """Class-index mask from an SBD ``cls/*.mat`` file, read as torchvision's SBDataset does."""
    from scipy.io import loadmat  # imported here: only this step needs scipy

    return np.asarray(loadmat(path)["GTcls"][0]["Segmentation"][0])


def _read_voc_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        # VOC masks are palette PNGs whose indices *are* the class ids; converting
        # to RGB or L would turn them into colours/luminance instead.
        if img.mode not in ("P", "L"):
            raise DownloadError(f"{path} has mode {img.mode}, expected a palette (P) class-index PNG")
        return np.array(img)


def _check_labels(mask: np.ndarray, source: Path) -> np.ndarray:
    values = np.unique(mask)
    bad = values[(values >= NUM_CLASSES) & (values != VOID_LABEL)]
    if mask.ndim != 2 or bad.size:
        raise DownloadError(f"{source} is not a 2-D class-index mask (values {values.tolist()[:8]})")
    return mask.astype(np.uint8)


def make_train_aug(voc_dir: Path, sbd_dataset_dir: Path) -> int:
    """Build VOC's 10,582-image "train_aug" split; return its number of images.

    Names are (SBD train | SBD val | VOC train) - VOC val. Masks go to
    ``voc_dir/SegmentationClassAug/NAME.png`` (mode "L", 0..20, 255 = void):
    VOC's own annotation where it has one (finer, and the usual convention),
    otherwise SBD's. The list goes to ``ImageSets/Segmentation/train_aug.txt``.
    Masks already written are kept, so an interrupted run can be resumed.
    """
    voc_dir, sbd_dir = Path(voc_dir), Path(sbd_dataset_dir)
    splits = voc_dir / "ImageSets" / "Segmentation"
    voc_train = _read_ids(splits / "train.txt")
    voc_val = _read_ids(splits / "val.txt")
    sbd_all = _read_ids(sbd_dir / "train.txt") | _read_ids(sbd_dir / "val.txt")
    names = sorted((sbd_all | voc_train) - voc_val)
    # Every name's photo, before any mask is written: a VOC-layout folder that is not VOC 2012 trainval (a dataset
    # of one's own at --root) gave a split of names without images, said ready.
    missing = [name for name in names if not (voc_dir / "JPEGImages" / f"{name}.jpg").is_file()]
    if missing:
        raise DownloadError(f"{voc_dir}: {len(missing)} of the {len(names)} train_aug images are not in JPEGImages "
                            f"(such as {missing[0]}.jpg); is it VOC 2012 trainval? Give download a --root of its "
                            "own")

    out_dir = voc_dir / "SegmentationClassAug"
    split_list, listed = splits / "train_aug.txt", "".join(f"{name}\n" for name in names)
    todo = [name for name in names if not (out_dir / f"{name}.png").exists()]
    if not todo and split_list.is_file() and split_list.read_text(encoding="utf-8") == listed:
        return len(names)  # built already: nothing written (the tree may be a read-only copy)
    with _only_run(voc_dir, "SegmentationClassAug", f"building train_aug in {voc_dir}",
                   f"cannot write in {voc_dir}, where train_aug is built"):
        _write_train_aug(voc_dir, sbd_dir, todo, out_dir)
        _flush_to_disk()
        with _writing(split_list):  # replaced whole: a reader never sees it half-written
            partial = split_list.with_name(f".{split_list.name}.tmp")
            partial.write_text(listed, encoding="utf-8")
            os.replace(partial, split_list)
    return len(names)


def _write_train_aug(voc_dir: Path, sbd_dir: Path, names: list[str], out_dir: Path) -> None:
    """The masks of `names` into `out_dir`: VOC's own annotation where it has one, else SBD's."""
    with _writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    for name in tqdm(names, desc="SegmentationClassAug", unit="mask"):
        out = out_dir / f"{name}.png"
        if out.exists():
            continue
        voc_png = voc_dir / "SegmentationClass" / f"{name}.png"
        sbd_mat = sbd_dir / "cls" / f"{name}.mat"
        if voc_png.exists():
            mask = _check_labels(_read_annotation(_read_voc_png, voc_png, voc_dir), voc_png)
        elif sbd_mat.exists():
            mask = _check_labels(_read_annotation(read_sbd_mat, sbd_mat, sbd_dir.parent), sbd_mat)
        else:
            raise DownloadError(f"no annotation for {name}: neither {voc_png} nor {sbd_mat} exists")
        tmp = out.with_suffix(".png.tmp")
        with _writing(out):
            Image.fromarray(mask).save(tmp, format="PNG")
            os.replace(tmp, out)  # a killed run never leaves a truncated PNG to be skipped later


def _flush_to_disk() -> None:
    """What was written is on disk before the stamp or list that says it is there: after a power cut ext4 and XFS
    can keep the stamp (or train_aug.txt) and give back empty files, which no later run looked at again (the stamp
    says done; an existing mask is skipped)."""
    sync = getattr(os, "sync", None)  # not on Windows
    if sync is not None:
        sync()


def _read_annotation(read, path: Path, extracted: Path) -> np.ndarray:
    """`read(path)`, a file it cannot read (cut short, or not what it should be) as one line saying what to do."""
    try:
        return read(path)
    except DownloadError:
        raise
    except Exception as err:  # PIL's and scipy's errors for a damaged file are of many kinds (OSError, ValueError, ...)
        raise DownloadError(f"{path}: cannot read it ({_one_line(err) or type(err).__name__}); the extracted folder is "
                            f"damaged: delete {extracted} and run the same command again") from None


@contextlib.contextmanager
def _writing(path: Path):
    """A write into the dataset's folder that fails (read-only, a full disk) as one line; masks written are kept."""
    try:
        yield
    except OSError as err:
        raise DownloadError(f"cannot write {path} ({err.strerror or err}); make {path.parent} writable or free some "
                            "space, then run the same command again (the masks written are kept)") from None
