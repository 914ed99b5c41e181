"""Tests for resunet.data.download against tiny archives served over local HTTP."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resunet.data.classes import VOC_INFO
import resunet.data.download as download_module
from resunet.data.download import (
    DownloadError,
    download_sbd,
    download_url,
    download_voc2012,
    extract,
    make_train_aug,
    read_sbd_mat,
)

scipy_io = pytest.importorskip("scipy.io")
scipy_sparse = pytest.importorskip("scipy.sparse")


# --------------------------------------------------------------------------- server


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=N-`` support and an optional dropped connection."""

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        page = srv.page_instead  # read once: a test may set it back while this thread still writes the last answer
        if page is not None:  # a proxy's login page, whatever was asked
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            srv.bytes_sent.append(len(page))
            self.wfile.write(page)
            return
        data = path.read_bytes()
        start = 0
        if rng and srv.honor_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:  # one-shot: simulate a dropped connection
            body, srv.cut_after = body[: srv.cut_after], None
            self.close_connection = True
        srv.bytes_sent.append(len(body))  # before the write: the client may finish reading before this thread resumes
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would swallow requests to 127.0.0.1.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ThreadingHTTPServer]:
    root = tmp_path / "srv"
    root.mkdir()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    srv.daemon_threads = True
    srv.root, srv.requests, srv.bytes_sent = root, [], []
    srv.cut_after, srv.honor_range, srv.page_instead = None, True, None
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


# --------------------------------------------------------------------------- fake data


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _palette() -> list[int]:
    return VOC_INFO.palette_bytes()  # only the shape matters here; the indices are what gets tested


def _save_voc_png(mask: np.ndarray, path: Path) -> None:
    img = Image.fromarray(mask.astype(np.uint8))
    img.putpalette(_palette())  # turns the "L" image into "P", indices unchanged
    assert img.mode == "P"
    img.save(path)


def _save_jpg(path: Path) -> None:
    Image.new("RGB", (8, 6), (120, 30, 200)).save(path)


H, W = 6, 8
VOC_TRAIN = ["2008_000001", "2008_000002"]
VOC_VAL = ["2008_000003", "2008_000004"]
SBD_TRAIN = ["2008_000002", "2008_000004", "2008_000005"]
SBD_VAL = ["2008_000006", "2008_000003"]
# (SBD train | SBD val | VOC train) - VOC val, by hand:
EXPECTED_TRAIN_AUG = ["2008_000001", "2008_000002", "2008_000005", "2008_000006"]


def voc_mask(name: str) -> np.ndarray:
    mask = np.full((H, W), int(name[-1]), np.uint8)  # class = last digit
    mask[0, :] = 255  # void border, as in VOC
    return mask


def sbd_mask(name: str) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[2:, 3:] = 10 + int(name[-1])  # differs from the VOC mask of the same image
    mask[0, 0] = 255
    return mask


def _tar_dir(src: Path, top: str, out: Path, mode: str) -> Path:
    with tarfile.open(out, mode) as tar:
        tar.add(src / top, arcname=top)
    return out


def build_voc_tar(work: Path, out: Path) -> Path:
    voc = work / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for name in VOC_TRAIN + VOC_VAL:
        _save_voc_png(voc_mask(name), voc / "SegmentationClass" / f"{name}.png")
    # The real archive's 17,125 photos include every SBD image, most without a VOC mask: train_aug reads them.
    for name in sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL)):
        _save_jpg(voc / "JPEGImages" / f"{name}.jpg")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(VOC_VAL) + "\n")
    return _tar_dir(work, "VOCdevkit", out, "w")


def write_sbd_mat(mask: np.ndarray, path: Path) -> None:
    # Same layout as SBD's cls/*.mat: a 1x1 struct GTcls with Boundaries (20x1 cell
    # of sparse matrices), Segmentation (uint8 HxW) and CategoriesPresent.
    boundaries = np.empty((20, 1), dtype=object)
    for i in range(20):
        boundaries[i, 0] = scipy_sparse.csc_matrix((H, W), dtype=bool)
    present = np.unique(mask[(mask > 0) & (mask < 255)]).astype(np.uint8).reshape(-1, 1)
    gtcls = {"Boundaries": boundaries, "Segmentation": mask, "CategoriesPresent": present}
    scipy_io.savemat(path, {"GTcls": gtcls})


def build_sbd_tgz(work: Path, out: Path) -> Path:
    ds = work / "benchmark_RELEASE" / "dataset"
    (ds / "img").mkdir(parents=True)
    (ds / "cls").mkdir()
    for name in sorted(set(SBD_TRAIN + SBD_VAL)):
        _save_jpg(ds / "img" / f"{name}.jpg")
        write_sbd_mat(sbd_mask(name), ds / "cls" / f"{name}.mat")
    (ds / "train.txt").write_text("\n".join(SBD_TRAIN) + "\n")
    (ds / "val.txt").write_text("\n".join(SBD_VAL) + "\n")
    return _tar_dir(work, "benchmark_RELEASE", out, "w:gz")


@pytest.fixture
def voc_tar(server: ThreadingHTTPServer, tmp_path: Path) -> tuple[str, str, Path]:
    path = build_voc_tar(tmp_path / "voc_build", server.root / "VOCtrainval_11-May-2012.tar")
    return f"{server.url}/{path.name}", md5_of(path), path


@pytest.fixture
def big_file(server: ThreadingHTTPServer) -> tuple[str, str, int]:
    data = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    (server.root / "blob.bin").write_bytes(data)
    return f"{server.url}/blob.bin", hashlib.md5(data).hexdigest(), len(data)


# --------------------------------------------------------------------------- download_url


def test_download_voc_extract_and_md5(voc_tar, server, tmp_path: Path, monkeypatch) -> None:
    url, md5, _ = voc_tar
    root = tmp_path / "data"
    voc_dir = download_voc2012(root, url=url, md5=md5)
    assert voc_dir == root / "VOCdevkit" / "VOC2012"
    assert md5_of(root / "VOCtrainval_11-May-2012.tar") == md5
    assert not (root / "VOCtrainval_11-May-2012.tar.part").exists()
    assert sorted(p.stem for p in (voc_dir / "JPEGImages").iterdir()) == sorted({*VOC_TRAIN, *VOC_VAL, *SBD_TRAIN,
                                                                                 *SBD_VAL})
    assert (voc_dir / "ImageSets/Segmentation/val.txt").read_text().split() == VOC_VAL
    assert len(server.requests) == 1
    # Idempotent: already extracted, so no request at all.
    assert download_voc2012(root, url=url, md5=md5) == voc_dir
    assert len(server.requests) == 1
    # --root given the dataset's own folders, as train's --data-root takes them: the same dataset, no download (it
    # was downloaded again and extracted inside them).
    assert download_voc2012(voc_dir, url=url, md5=md5) == voc_dir
    assert download_voc2012(root / "VOCdevkit", url=url, md5=md5) == voc_dir
    cwd = os.getcwd()
    try:  # given relative, from inside them
        os.chdir(voc_dir)
        assert download_voc2012(Path("."), url=url, md5=md5).resolve() == voc_dir.resolve()
        os.chdir(root / "VOCdevkit")
        assert download_voc2012(Path("VOC2012"), url=url, md5=md5).resolve() == voc_dir.resolve()
    finally:
        os.chdir(cwd)
    assert len(server.requests) == 1 and not (voc_dir / "VOCdevkit").exists()
    # Each run removes its lock file as it ends (it was left in the root after every run, a helper, 2026-12-07).
    assert sorted(p.name for p in root.iterdir()) == ["VOCdevkit", "VOCtrainval_11-May-2012.tar"]
    # A tree extracted by hand is checked, nothing written: a read-only copy was refused ("cannot write in it", for
    # its lock file), and an earlier try's .part beside it was taken for a download to finish over it.
    by_hand = tmp_path / "by-hand"
    shutil.copytree(root / "VOCdevkit", by_hand / "VOCdevkit")
    (by_hand / "VOCdevkit" / "VOC2012" / EXTRACTED).unlink()
    (by_hand / "VOCtrainval_11-May-2012.tar.part").write_bytes(b"an earlier try")

    def no_writes(*args, **kwargs):
        raise DownloadError("cannot write in it (Read-only file system)")
    with monkeypatch.context() as read_only:
        read_only.setattr(download_module, "_only_run", no_writes)
        assert download_voc2012(by_hand, url=url, md5=md5) == by_hand / "VOCdevkit" / "VOC2012"
    assert len(server.requests) == 1
    assert sorted(p.name for p in by_hand.iterdir()) == ["VOCdevkit", "VOCtrainval_11-May-2012.tar.part"]
    # An archive verified beside an earlier try's .part: the .part is removed (it was left).
    (root / "VOCdevkit" / "VOC2012" / EXTRACTED).unlink()
    shutil.rmtree(root / "VOCdevkit")
    (root / "VOCtrainval_11-May-2012.tar.part").write_bytes(b"an earlier try")
    assert download_voc2012(root, url=url, md5=md5) == voc_dir and len(server.requests) == 1
    assert sorted(p.name for p in root.iterdir()) == ["VOCdevkit", "VOCtrainval_11-May-2012.tar"]


def test_an_extraction_cut_short_is_redone_from_the_kept_archive(voc_tar, server, tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    """A run killed (or out of space) while extracting left most masks missing; the next run printed "ready"."""
    import errno

    from resunet.cli import main

    url, md5, _ = voc_tar
    root = tmp_path / "data"
    real_extractall = tarfile.TarFile.extractall

    def full_disk(self, *args, **kwargs):
        real_extractall(self, *args, **kwargs)  # every file written, then the disk is "full" for the last one
        (root / "VOCdevkit/VOC2012/SegmentationClass" / f"{VOC_VAL[0]}.png").unlink()
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tarfile.TarFile, "extractall", full_disk)
    with pytest.raises(DownloadError, match=r"^cannot extract .*VOCtrainval_11-May-2012\.tar into .*data \(No space "
                                            r"left on device\); free some space or make it writable, then run the "
                                            r"same command again \(keep VOCtrainval_11-May-2012\.tar: it is "
                                            r"extracted again from it\)$"):
        download_voc2012(root, url=url, md5=md5)
    monkeypatch.undo()
    voc_dir = download_voc2012(root, url=url, md5=md5)  # extracted again: the archive was kept and verified
    assert (voc_dir / "SegmentationClass" / f"{VOC_VAL[0]}.png").is_file() and len(server.requests) == 1
    # Finished once: later runs read nothing (no md5 of the archive either).
    monkeypatch.setattr("resunet.data.download.file_md5", lambda path: pytest.fail("checked the archive again"))
    assert download_voc2012(root, url=url, md5=md5) == voc_dir
    # A --root that cannot be a folder is one line, not a traceback.
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    assert main(["download", "voc", "--root", str(tmp_path / "afile" / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resunet download: error: --root ") and "\n" not in err and "afile" in err


def test_wrong_md5_raises_and_leaves_no_file(big_file, tmp_path: Path) -> None:
    url, md5, _ = big_file
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError) as info:
        download_url(url, dest, md5="0" * 32, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "blob.bin" in msg and "0" * 32 in msg and md5 in msg
    assert not dest.exists()
    assert not dest.with_suffix(".bin.part").exists()


def test_dropped_connection_then_resume(big_file, server, tmp_path: Path) -> None:
    url, md5, total = big_file
    dest = tmp_path / "blob.bin"
    part = tmp_path / "blob.bin.part"
    server.cut_after = 100_000
    with pytest.raises(DownloadError) as info:
        download_url(url, dest, md5=md5, progress=False)
    assert "\n" not in str(info.value) and url in str(info.value) and "resume" in str(info.value)
    assert not dest.exists()
    assert part.stat().st_size == 100_000

    assert download_url(url, dest, md5=md5, progress=False) == dest
    assert server.requests[-1][1] == "bytes=100000-"
    assert server.bytes_sent[-1] == total - 100_000 < total
    assert md5_of(dest) == md5
    assert not part.exists()


def test_server_ignoring_range_restarts(big_file, server, tmp_path: Path) -> None:
    url, md5, total = big_file
    dest = tmp_path / "blob.bin"
    server.cut_after = 50_000
    with pytest.raises(DownloadError):
        download_url(url, dest, md5=md5, progress=False)
    server.honor_range = False  # answers 200 with the whole file
    download_url(url, dest, md5=md5, progress=False)
    assert server.requests[-1][1] == "bytes=50000-"
    assert server.bytes_sent[-1] == total
    assert md5_of(dest) == md5


def test_a_page_sent_in_answer_to_a_resume_keeps_the_partial_file(big_file, server, tmp_path: Path) -> None:
    # A proxy's or mirror's page (200, text/html) in answer to the Range request truncated the partial file before
    # its md5 failed and it was deleted: the bytes already fetched were lost, though the error before had said they
    # were kept (a helper's review, 2026-12-07).
    url, md5, total = big_file
    dest, part = tmp_path / "blob.bin", tmp_path / "blob.bin.part"
    server.cut_after = 100_000
    with pytest.raises(DownloadError):
        download_url(url, dest, md5=md5, progress=False)
    server.page_instead = b"<html>log in to the proxy</html>"
    with pytest.raises(DownloadError) as info:
        download_url(url, dest, md5=md5, progress=False)
    assert str(info.value) == (f"download of {url} failed: asked to go on from byte 100,000, the server sent something "
                               f"else (text/html, 32 bytes: a proxy's or login page?); partial file {part} (100000 "
                               "bytes) is kept; run again to resume")
    assert part.stat().st_size == 100_000
    server.page_instead = None
    assert download_url(url, dest, md5=md5, progress=False) == dest and md5_of(dest) == md5
    assert server.bytes_sent[-1] == total - 100_000


def test_a_whole_part_from_a_server_that_ignores_ranges_is_checked_not_refused(big_file, server,
                                                                               tmp_path: Path) -> None:
    # Stopped during its md5 (or a whole copy put there by hand): a server that ignores Range answers 200 with the
    # part's own length. Refused as "something else" on every run, the download never finished (a review of this
    # session's change, 2026-12-07); the md5 decides, as after a 416.
    url, md5, total = big_file
    dest, part = tmp_path / "blob.bin", tmp_path / "blob.bin.part"
    part.write_bytes((server.root / "blob.bin").read_bytes())
    server.honor_range = False
    assert download_url(url, dest, md5=md5, progress=False) == dest and md5_of(dest) == md5 and not part.exists()
    assert server.requests[-1][1] == f"bytes={total}-"


def test_complete_part_from_crash_before_rename(big_file, server, tmp_path: Path) -> None:
    url, md5, total = big_file
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes((server.root / "blob.bin").read_bytes())
    download_url(url, dest, md5=md5, progress=False)  # server answers 416
    assert md5_of(dest) == md5


def test_existing_valid_file_makes_no_request(big_file, server, tmp_path: Path) -> None:
    url, md5, _ = big_file
    dest = tmp_path / "blob.bin"
    dest.write_bytes((server.root / "blob.bin").read_bytes())
    assert download_url(url, dest, md5=md5, progress=False) == dest
    assert server.requests == []


def test_unreachable_url_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as sock:  # grab a free port, then close it: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/VOCtrainval_11-May-2012.tar"
    with pytest.raises(DownloadError) as info:
        download_url(url, tmp_path / "x.tar", progress=False)
    msg = str(info.value)
    assert "\n" not in msg and url in msg
    assert not (tmp_path / "x.tar").exists()


def test_a_download_that_got_nothing_leaves_nothing(tmp_path: Path) -> None:
    """No network: `resunet download voc --root /tmp/x` said "nothing was downloaded" and left /tmp/x holding its
    lock file (a helper, 2026-12-06). The folders it made are gone again; one that was there stays."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/VOCtrainval_11-May-2012.tar"
    with pytest.raises(DownloadError, match="nothing was downloaded"):
        download_voc2012(tmp_path / "new" / "data", url=url)
    assert not (tmp_path / "new").exists()
    with pytest.raises(DownloadError, match="nothing was downloaded"):
        download_voc2012(tmp_path, url=url)
    assert list(tmp_path.iterdir()) == []


def test_http_404_is_download_error(server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="404"):
        download_url(f"{server.url}/missing.tar", tmp_path / "missing.tar", progress=False)


# --------------------------------------------------------------------------- extract


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("evil", ["../evil.txt", "link"])
def test_extract_blocks_path_traversal(tmp_path: Path, evil: str) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        _add_bytes(tar, "ok.txt", b"fine")
        if evil == "link":  # a symlink pointing out of dest, then a write through it
            info = tarfile.TarInfo("link")
            info.type, info.linkname = tarfile.SYMTYPE, ".."
            tar.addfile(info)
            _add_bytes(tar, "link/evil.txt", b"pwned")
        else:
            _add_bytes(tar, evil, b"pwned")
    dest = tmp_path / "out"
    with pytest.raises(DownloadError):
        extract(archive, dest)
    assert not (tmp_path / "evil.txt").exists()


# --------------------------------------------------------------------------- SBD + train_aug


def test_sbd_mat_layout_matches_torchvision(tmp_path: Path) -> None:
    mask = sbd_mask("2008_000005")
    write_sbd_mat(mask, tmp_path / "a.mat")
    np.testing.assert_array_equal(read_sbd_mat(tmp_path / "a.mat"), mask)
    # Exactly torchvision's SBDataset._get_segmentation_target expression:
    mat = scipy_io.loadmat(tmp_path / "a.mat")
    target = Image.fromarray(mat["GTcls"][0]["Segmentation"][0])
    np.testing.assert_array_equal(np.array(target), mask)
    assert mat["GTcls"][0]["Boundaries"][0][3][0].toarray().shape == (H, W)


def test_fake_sbd_readable_by_torchvision_sbdataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("torchvision.datasets")
    build_sbd_tgz(tmp_path / "sbd_build", tmp_path / "benchmark.tgz")
    ds_dir = tmp_path / "sbd_build" / "benchmark_RELEASE" / "dataset"
    ds = datasets.SBDataset(str(ds_dir), image_set="train", mode="segmentation")
    for i, name in enumerate(SBD_TRAIN):
        _, target = ds[i]
        np.testing.assert_array_equal(np.array(target), sbd_mask(name))
        np.testing.assert_array_equal(read_sbd_mat(ds_dir / "cls" / f"{name}.mat"), np.array(target))


def voc_and_sbd(voc_tar, server, tmp_path: Path) -> tuple[Path, Path]:
    """VOC and SBD downloaded from the local server into tmp_path/data: (VOC2012 folder, SBD dataset folder)."""
    voc_url, voc_md5, _ = voc_tar
    sbd = build_sbd_tgz(tmp_path / "sbd_build", server.root / "benchmark.tgz")
    root = tmp_path / "data"
    voc_dir = download_voc2012(root, url=voc_url, md5=voc_md5)
    return voc_dir, download_sbd(root, url=f"{server.url}/benchmark.tgz", md5=md5_of(sbd))


def test_make_train_aug(voc_tar, server, tmp_path: Path) -> None:
    voc_dir, sbd_dir = voc_and_sbd(voc_tar, server, tmp_path)
    assert sbd_dir == tmp_path / "data" / "benchmark_RELEASE" / "dataset"

    assert make_train_aug(voc_dir, sbd_dir) == len(EXPECTED_TRAIN_AUG)
    listed = (voc_dir / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    assert listed == EXPECTED_TRAIN_AUG  # sorted, VOC val excluded even where SBD has it
    aug = voc_dir / "SegmentationClassAug"
    assert sorted(p.stem for p in aug.glob("*.png")) == EXPECTED_TRAIN_AUG

    def load(name: str) -> np.ndarray:
        with Image.open(aug / f"{name}.png") as img:
            assert img.mode == "L"
            return np.array(img)

    for name in ("2008_000005", "2008_000006"):  # SBD only: the .mat's values, 255 kept
        np.testing.assert_array_equal(load(name), sbd_mask(name))
    for name in ("2008_000001", "2008_000002"):  # VOC train (000002 is in SBD too): VOC wins
        np.testing.assert_array_equal(load(name), voc_mask(name))
    assert (load("2008_000001") == 255).sum() == W

    # Idempotent: existing PNGs are not rewritten.
    stamp = os.stat(aug / "2008_000005.png").st_mtime_ns
    (aug / "2008_000006.png").unlink()
    assert make_train_aug(voc_dir, sbd_dir) == len(EXPECTED_TRAIN_AUG)
    assert os.stat(aug / "2008_000005.png").st_mtime_ns == stamp
    np.testing.assert_array_equal(load("2008_000006"), sbd_mask("2008_000006"))

    # Built already: nothing is written (train_aug.txt was rewritten by every run, so a read-only copy of a built
    # tree was refused, and a reader could find the list half-written), nor waited for.
    import fcntl

    listing = voc_dir / "ImageSets/Segmentation/train_aug.txt"
    before = os.stat(listing)
    with open(voc_dir / ".SegmentationClassAug.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another run building it holds it
        assert make_train_aug(voc_dir, sbd_dir) == len(EXPECTED_TRAIN_AUG)
        assert (os.stat(listing).st_mtime_ns, os.stat(listing).st_ino) == (before.st_mtime_ns, before.st_ino)
        # With masks to write, a second build at once is refused: two moved each other's masks away, and the one
        # that lost said to make the folder writable.
        (aug / "2008_000006.png").unlink()
        with pytest.raises(DownloadError, match=f"^another resunet download is building train_aug in {voc_dir}; let "
                                                "it finish"):
            make_train_aug(voc_dir, sbd_dir)
    (voc_dir / ".SegmentationClassAug.lock").unlink()
    assert make_train_aug(voc_dir, sbd_dir) == len(EXPECTED_TRAIN_AUG)
    assert (aug / "2008_000006.png").is_file() and listing.read_text().split() == EXPECTED_TRAIN_AUG
    assert not list(voc_dir.glob(".*.lock")) and not list(listing.parent.glob(".*"))
    # A tree it cannot write in (its lock file cannot be made) is named as the place train_aug is built, not --root.
    (aug / "2008_000006.png").unlink()
    (voc_dir / ".SegmentationClassAug.lock").mkdir()  # as a read-only folder refuses it (root writes anywhere)
    with pytest.raises(DownloadError, match=f"^cannot write in {voc_dir}, where train_aug is built \\(Is a directory"
                                            "\\); make it writable, then run the same command again$"):
        make_train_aug(voc_dir, sbd_dir)


# --------------------------------------------------------------------------- runs stopped, disks, hands


def test_a_half_extracted_folder_whose_archive_was_deleted_is_not_ready(voc_tar, server, tmp_path: Path,
                                                                          monkeypatch) -> None:
    """Extraction stopped by a full disk says "free some space"; the 2 GB archive beside it is the obvious thing to
    delete, and the next run took the half-extracted folder for one extracted by hand: "VOC 2012 ready"."""
    url, md5, _ = voc_tar
    root = tmp_path / "data"

    def stopped(self, *args, **kwargs):
        (root / "VOCdevkit/VOC2012/JPEGImages").mkdir(parents=True)  # the first members only
        raise KeyboardInterrupt
    monkeypatch.setattr(tarfile.TarFile, "extractall", stopped)
    with pytest.raises(KeyboardInterrupt):
        download_voc2012(root, url=url, md5=md5)
    monkeypatch.undo()
    archive = root / "VOCtrainval_11-May-2012.tar"
    kept = archive.read_bytes()
    archive.unlink()
    with pytest.raises(DownloadError, match=r"VOC2012 was being extracted from VOCtrainval_11-May-2012.tar when a run "
                                            r"stopped, and VOCtrainval_11-May-2012.tar is gone: delete .*VOC2012 and "
                                            r"run the same command again"):
        download_voc2012(root, url=url, md5=md5)
    archive.write_bytes(kept)  # or put it back
    voc_dir = download_voc2012(root, url=url, md5=md5)
    assert (voc_dir / "SegmentationClass" / f"{VOC_VAL[0]}.png").is_file() and len(server.requests) == 1
    assert not (root / ".VOCtrainval_11-May-2012.tar.extracting").exists()
    # A folder extracted by hand (no archive ever here) is still taken as it is.
    hand = tmp_path / "hand"
    (hand / "VOCdevkit").mkdir(parents=True)
    (voc_dir.parent.parent / "VOCdevkit" / "VOC2012").rename(hand / "VOCdevkit" / "VOC2012")
    assert download_voc2012(hand, url=url, md5=md5) == hand / "VOCdevkit" / "VOC2012"


def test_a_copy_cut_short_put_there_by_hand_is_resumed_not_silently_deleted(big_file, server, tmp_path: Path,
                                                                            capsys) -> None:
    url, md5, total = big_file
    dest = tmp_path / "blob.bin"
    dest.write_bytes((server.root / "blob.bin").read_bytes()[:120_000])
    assert download_url(url, dest, md5=md5, progress=False) == dest and md5_of(dest) == md5
    assert server.requests == [("/blob.bin", "bytes=120000-")]
    err = capsys.readouterr().err
    assert err.startswith(f"resunet: {dest}: md5 ") and "continued as a partial download (blob.bin.part)" in err
    # Not a prefix of the file: the download fails its md5, says where from and what to do.
    dest.write_bytes(b"<html>login</html>")
    with pytest.raises(DownloadError, match=f"^md5 mismatch for blob.bin from {url}: .*; file deleted; run the same "
                                            "command again to download it anew$"):
        download_url(url, dest, md5=md5, progress=False)
    assert not dest.exists() and not (tmp_path / "blob.bin.part").exists()


def test_a_second_run_on_the_same_root_is_refused_while_the_first_holds_it(voc_tar, tmp_path: Path) -> None:
    """The second resumed into the .part the first was writing: the md5 failed, the file was deleted, both lost it."""
    import fcntl

    url, md5, _ = voc_tar
    root = tmp_path / "data"
    root.mkdir()
    with open(root / ".VOCtrainval_11-May-2012.tar.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the first run holds it
        with pytest.raises(DownloadError, match="^another resunet download is fetching or extracting "):
            download_voc2012(root, url=url, md5=md5)
        assert (root / ".VOCtrainval_11-May-2012.tar.lock").is_file()  # the first run's lock is left alone
    assert not list(root.glob("VOC*"))
    assert (download_voc2012(root, url=url, md5=md5) / EXTRACTED).is_file()


EXTRACTED = ".resunet-extracted"


def test_a_file_system_without_locks_downloads_unguarded(voc_tar, tmp_path: Path, monkeypatch) -> None:
    """NFS without its lock daemon refuses every flock (ENOLCK): it was said to be "another resunet download", and
    the download refused for good (a helper, 2026-12-06)."""
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    url, md5, _ = voc_tar
    assert (download_voc2012(tmp_path / "data", url=url, md5=md5) / EXTRACTED).is_file()




def test_a_full_disk_while_downloading_is_said_to_be_the_disk(big_file, tmp_path: Path) -> None:
    # It was "download of URL failed: [Errno 28] No space left on device": the network was blamed.
    url, md5, _ = big_file
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(DownloadError, match=r"^cannot write .*blob.bin.part \(No space left on device\); free some "
                                            r"space on that disk or make .* writable; then run the same command$"):
        download_url(url, dest, md5=md5, progress=False)
    (tmp_path / "blob.bin.part").unlink()
    (tmp_path / "blob.bin.part").mkdir()  # cannot be opened for writing
    with pytest.raises(DownloadError, match=r"^cannot write .*blob.bin.part \(Is a directory\)"):
        download_url(url, dest, md5=md5, progress=False)


def test_a_vocdevkit_linked_to_another_disk_gets_a_way_out(voc_tar, tmp_path: Path) -> None:
    url, md5, _ = voc_tar
    root, elsewhere = tmp_path / "data", tmp_path / "big" / "VOCdevkit"
    elsewhere.mkdir(parents=True)
    root.mkdir()
    (root / "VOCdevkit").symlink_to(elsewhere)
    with pytest.raises(DownloadError, match=r"VOCdevkit is a link \(to .*big/VOCdevkit\), and extraction does not "
                                            r"write through links; give --root the folder on the other disk instead$"):
        download_voc2012(root, url=url, md5=md5)


def test_train_aug_reads_split_files_saved_with_a_byte_order_mark(voc_tar, server, tmp_path: Path) -> None:
    """Found by a helper: the training reader strips a BOM (Notepad) from VOC's split files, make_train_aug did not,
    so its first name carried U+FEFF: a train.txt so saved was refused as "not VOC 2012 trainval", a val.txt so
    saved let its first image into train_aug."""
    voc_dir, sbd_dir = voc_and_sbd(voc_tar, server, tmp_path)
    for name in ("train.txt", "val.txt"):
        split = voc_dir / "ImageSets" / "Segmentation" / name
        split.write_text("\ufeff" + split.read_text(), encoding="utf-8")
    assert make_train_aug(voc_dir, sbd_dir) == len(EXPECTED_TRAIN_AUG)
    assert (voc_dir / "ImageSets/Segmentation/train_aug.txt").read_text().split() == EXPECTED_TRAIN_AUG


def test_train_aug_refuses_a_voc_folder_without_its_images(voc_tar, server, tmp_path: Path) -> None:
    """A VOC-layout folder that is not VOC 2012 trainval at --root: train_aug named images it does not have, and
    was said ready."""
    voc_dir, sbd_dir = voc_and_sbd(voc_tar, server, tmp_path)
    (voc_dir / "JPEGImages" / "2008_000005.jpg").unlink()  # an SBD-only name
    with pytest.raises(DownloadError, match=f"^{voc_dir}: 1 of the {len(EXPECTED_TRAIN_AUG)} train_aug images are not "
                                            "in JPEGImages \\(such as 2008_000005.jpg\\); is it VOC 2012 trainval"):
        make_train_aug(voc_dir, sbd_dir)
    assert not (voc_dir / "SegmentationClassAug").exists()
    assert not (voc_dir / "ImageSets" / "Segmentation" / "train_aug.txt").exists()


def test_train_aug_from_damaged_or_unwritable_files_is_one_line(voc_tar, server, tmp_path: Path) -> None:
    """A truncated .mat or PNG (a half-extracted tree, a copy by hand) or a folder it cannot write: tracebacks."""
    voc_dir, sbd_dir = voc_and_sbd(voc_tar, server, tmp_path)
    mat = sbd_dir / "cls" / "2008_000005.mat"
    mat.write_bytes(mat.read_bytes()[:200])
    with pytest.raises(DownloadError, match=f"^{mat}: cannot read it \\(.*\\); the extracted folder is damaged: delete "
                                            f"{sbd_dir.parent} and run the same command again$"):
        make_train_aug(voc_dir, sbd_dir)
    png = voc_dir / "SegmentationClass" / f"{VOC_TRAIN[0]}.png"
    png.write_bytes(png.read_bytes()[:60])
    (voc_dir / "SegmentationClassAug" / f"{VOC_TRAIN[0]}.png").unlink()
    with pytest.raises(DownloadError, match=f"^{png}: cannot read it "):
        make_train_aug(voc_dir, sbd_dir)
    (voc_dir / "SegmentationClassAug").rename(tmp_path / "aside")
    (voc_dir / "SegmentationClassAug").write_text("a file in the way")
    with pytest.raises(DownloadError, match="^cannot write .*SegmentationClassAug \\(File exists\\); make .* writable"):
        make_train_aug(voc_dir, sbd_dir)


def test_ctrl_c_says_what_is_kept_and_how_to_go_on(tmp_path: Path, monkeypatch, capsys) -> None:
    from resunet.cli import main
    from resunet.data import download

    def interrupted(root):
        raise KeyboardInterrupt
    monkeypatch.setattr(download, "download_voc2012", interrupted)
    assert main(["download", "voc", "--root", str(tmp_path)]) == 130
    assert capsys.readouterr().err == ("resunet download: interrupted; what was done is kept (a download as its .part "
                                       "file, the masks written): the same command goes on from there\n")


def test_a_root_under_a_folder_this_user_cannot_enter_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    # `resunet download voc --root /root/data` as another user: Path.exists raised PermissionError (Python 3.11-3.13
    # re-raise it), a traceback (a helper's review, 2026-12-07). Root enters any folder: the refusal is played here.
    import pathlib

    from resunet.cli import main

    closed, real_exists = tmp_path / "closed", pathlib.Path.exists

    def exists(path, *args, **kwargs):
        if str(path).startswith(str(closed) + "/"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_exists(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "exists", exists)
    assert main(["download", "voc", "--root", str(closed / "data")]) == 2
    assert capsys.readouterr().err.strip() == (f"resunet download: error: --root {closed / 'data'}: cannot use "
                                               f"{closed / 'data'} (Permission denied); give a folder of your own")


def test_what_was_written_is_on_disk_before_the_stamp_or_list_that_says_so(voc_tar, server, tmp_path: Path,
                                                                          monkeypatch) -> None:
    # A power cut just after a download finished could leave the extraction stamp (or train_aug.txt) with empty
    # files under it: later runs said "ready" and skipped every empty mask (a helper's review, 2026-12-07).
    seen = []
    monkeypatch.setattr(os, "sync", lambda: seen.append(sorted(p.name for p in tmp_path.rglob("*")
                                                               if p.name in (".resunet-extracted", "train_aug.txt"))))
    voc_dir, sbd_dir = voc_and_sbd(voc_tar, server, tmp_path)
    make_train_aug(voc_dir, sbd_dir)
    # each sync came before its stamp or list: the VOC stamp, then SBD's, then train_aug.txt
    assert seen == [[], [".resunet-extracted"], [".resunet-extracted", ".resunet-extracted"]]
    assert (voc_dir / "ImageSets/Segmentation/train_aug.txt").is_file()
