"""No input crashes a command: a generated corpus of broken and oversized files, fed to every command that reads
files. Each gets one line naming the file and the problem (no traceback); `predict` goes on with the others."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resunet.cli import main
from resunet.data.demo import make_sample


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def declared_png(width: int, height: int, colour_type: int = 2) -> bytes:
    """A tiny PNG whose header declares width × height pixels: a decompression bomb when both are large."""
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b""))
            + png_chunk(b"IEND", b""))


def good_pair(seed: int) -> tuple[bytes, bytes]:
    image, mask = make_sample(np.random.default_rng(seed), 32)
    image_bytes, mask_bytes = io.BytesIO(), io.BytesIO()
    image.save(image_bytes, format="PNG")
    mask.save(mask_bytes, format="PNG")
    return image_bytes.getvalue(), mask_bytes.getvalue()


def bad_files() -> dict[str, tuple[bytes, str]]:
    """kind → (file bytes, words the one-line message must contain)."""
    image, _ = good_pair(99)
    return {
        "empty": (b"", "not a readable"),
        "truncated": (image[: len(image) // 2], "truncated"),
        "text": (b"this is not an image\n" * 20, "not a readable"),
        "random": (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not a readable"),
        "bomb": (declared_png(40_000, 40_000), "over the limit"),
    }


def make_dataset(root: Path, bad: bytes | None = None, bad_as: str = "image", count: int = 3) -> Path:
    """root/{train,val}/{images,masks}: `count` good pairs per split; with `bad`, val's pair `bad_0` has the bad file as
    its image or its mask."""
    for split in ("train", "val"):
        for folder in ("images", "masks"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = good_pair(i + (0 if split == "train" else 50))
            (root / split / "images" / f"{split}_{i}.png").write_bytes(image)
            (root / split / "masks" / f"{split}_{i}.png").write_bytes(mask)
    if bad is not None:
        image, mask = good_pair(77)
        image, mask = (bad, mask) if bad_as == "image" else (image, bad)
        (root / "val" / "images" / "bad_0.png").write_bytes(image)
        (root / "val" / "masks" / "bad_0.png").write_bytes(mask)
    return root


def one_error_line(capsys, command: str, bad_name: str, words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"resunet {command}: error: ") and bad_name in lines[0] and words in lines[0], err


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> str:
    return str(trained_run / "best.pt")


def test_predict_reports_each_bad_file_in_one_line_and_predicts_the_rest(checkpoint, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        (folder / f"good_{i}.png").write_bytes(good_pair(i)[0])
    corpus = bad_files()
    for kind, (data, _) in corpus.items():
        (folder / f"{kind}.png").write_bytes(data)
    assert main(["predict", checkpoint, str(folder), "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == len(corpus), lines
    for kind, (_, words) in corpus.items():
        line = next(line for line in lines if f"{kind}.png" in line)
        assert line.startswith("resunet predict: ") and words in line, line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good_0.png", "good_1.png"]
    assert f"wrote 2 prediction(s) to {tmp_path / 'out'}; {len(corpus)} input(s) failed" in captured.out


def test_predict_max_pixels_is_a_flag(checkpoint, tmp_path, capsys):
    image = tmp_path / "photo.png"
    image.write_bytes(good_pair(1)[0])  # 32×32 = 1024 pixels
    assert main(["predict", checkpoint, str(image), "--out", str(tmp_path / "out"), "--max-pixels", "1000"]) == 1
    assert "photo.png: image of 32×32 = 1,024 pixels is over the limit of 1,000" in capsys.readouterr().err
    assert main(["predict", checkpoint, str(image), "--out", str(tmp_path / "out"), "--max-pixels", "1024"]) == 0


@pytest.mark.parametrize("bad_as", ["image", "mask"])
@pytest.mark.parametrize("kind", list(bad_files()))
def test_evaluate_and_visualize_name_the_bad_file(checkpoint, tmp_path, capsys, kind, bad_as):
    data, words = bad_files()[kind]
    root = make_dataset(tmp_path / "data", data, bad_as)
    # Two loader workers for one case: an error raised in a worker process must still come out as one line.
    workers = "2" if (kind, bad_as) == ("truncated", "mask") else "0"
    assert main(["evaluate", checkpoint, "--data-root", str(root), "--workers", workers]) == 2
    one_error_line(capsys, "evaluate", str(Path("val") / f"{bad_as}s" / "bad_0.png"), words)
    assert main(["visualize", checkpoint, "--data-root", str(root), "--count", "4",
                 "--out", str(tmp_path / "grid.png")]) == 2
    one_error_line(capsys, "visualize", "bad_0.png", words)
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("data_path", ["cached", "simple"])
@pytest.mark.parametrize("kind", ["truncated", "bomb"])
def test_train_names_the_bad_file(tmp_path, capsys, kind, data_path):
    data, words = bad_files()[kind]
    root = make_dataset(tmp_path / "data", data, "image")
    shutil.move(root / "val" / "images" / "bad_0.png", root / "train" / "images" / "bad_0.png")
    shutil.move(root / "val" / "masks" / "bad_0.png", root / "train" / "masks" / "bad_0.png")
    args = ["train", "--data-root", str(root), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2",
            "--size", "32", "--no-pretrained", "--workers", "0", "--no-progress", "--num-classes", "21",
            "--cache-dir", str(tmp_path / "cache"), "--data-path", data_path, "--encoder", "resnet18"]
    assert main(args) == 2
    one_error_line(capsys, "train", str(Path("train") / "images" / "bad_0.png"), words)


def test_a_cut_short_file_of_a_format_we_read_is_called_damaged_not_an_unknown_format():
    """A truncated LZW TIFF (its directory at the end) or AVIF failed PIL's identification and was "not an image
    format we know": users went looking for a format the README lists as read (a helper's audit, 2026-12-07)."""
    from resunet.data.images import DataError, read_image

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    for fmt, options, name in (("TIFF", {"compression": "tiff_lzw"}, "TIFF"), ("AVIF", {}, "AVIF"),
                               ("GIF", {}, "GIF")):
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt, **options)
        cut = buffer.getvalue()[:40]  # the signature and little else
        with pytest.raises(DataError, match=rf"^photo: not a readable image \({name} by its first bytes, but its "
                                            r"header cannot be read: damaged or cut short\?\)$"):
            read_image(cut, name="photo")
    with pytest.raises(DataError, match=r"^photo: not a readable image \(not an image format we know\)$"):
        read_image(b"II" + b"\x00" * 40, name="photo")  # two bytes alike are no signature
    # Cut past the header: PIL's decoders said "could not create decoder object" (WebP), "Truncated File Read" (JPEG)
    for fmt, name in (("WEBP", "WebP"), ("JPEG", "JPEG")):
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt)
        data = buffer.getvalue()
        with pytest.raises(DataError, match=rf"^photo: not a readable image \({name} whose data cannot be decoded: "
                                            r"damaged or cut short\?\)$"):
            read_image(data[:len(data) // 5], name="photo")
    # Damaged inside its strips, an LZW TIFF was "not a readable image (decoder error -2)" (a helper's audit, 12-07)
    buffer = io.BytesIO()
    picture.save(buffer, format="TIFF", compression="tiff_lzw")
    damaged = bytearray(buffer.getvalue())
    damaged[len(damaged) // 2:len(damaged) // 2 + 64] = b"\xff" * 64
    with pytest.raises(DataError, match=r"^photo: not a readable image \(TIFF whose data cannot be decoded: damaged or "
                                        r"cut short\?\)$"):
        read_image(bytes(damaged), name="photo")


def test_a_bomb_mask_is_refused_from_its_header(tmp_path):
    from resunet.data.classes import generic_info
    from resunet.data.images import ImageTooLargeError, read_mask

    path = tmp_path / "mask.png"
    path.write_bytes(declared_png(30_000, 30_000, colour_type=0))  # 900 million grey pixels, 60 bytes
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        read_mask(path, generic_info(3))
    os.remove(path)


def test_max_pixels_can_be_raised_past_pils_own_ceiling(tmp_path):
    # PIL refuses more than 2 × its MAX_IMAGE_PIXELS (179 MP) in Image.open, before our check: a genuine 13600×13600
    # aerial photo was refused whatever --max-pixels said, and the line named no width and height.
    from PIL import Image

    from resunet.data.classes import generic_info
    from resunet.data.images import ImageTooLargeError, image_size, read_mask

    path = tmp_path / "aerial.png"
    Image.new("1", (13_600, 13_600)).save(path)  # 185 million pixels, a 1-bit PNG of a few kB
    assert 13_600 ** 2 > 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError) as caught:
        image_size(path)
    assert str(caught.value) == (f"{path}: image of 13600×13600 = 184,960,000 pixels is over the limit of 64,000,000 "
                                 "(--max-pixels; a decompression bomb?)")
    assert image_size(path, max_pixels=200_000_000) == (13_600, 13_600)
    assert image_size(path, max_pixels=None) == (13_600, 13_600)
    mask = read_mask(path, generic_info(2), max_pixels=190_000_000)  # decoded: 185 MB of class ids
    assert mask.shape == (13_600, 13_600) and not mask.any()
    del mask
    with pytest.raises(ImageTooLargeError, match="over the limit of 180,000,000"):
        read_mask(path, generic_info(2), max_pixels=180_000_000)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's own ceiling is left as it was, for everyone else


def test_predict_reports_a_symlink_loop_and_an_unreadable_folder_and_predicts_the_rest(checkpoint, tmp_path,
                                                                                         capsys, monkeypatch):
    """A symlink loop among the inputs raised RuntimeError from Path.resolve() before any image was predicted; a
    folder without read permission raised PermissionError. (Root reads any folder: its refusal is simulated.)"""
    folder, locked = tmp_path / "in", tmp_path / "locked"
    folder.mkdir()
    locked.mkdir()
    (folder / "good.png").write_bytes(good_pair(1)[0])
    (folder / "loop.png").symlink_to("loop.png")
    iterdir = Path.iterdir

    def refusing(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refusing)
    assert main(["predict", checkpoint, str(folder), str(folder / "loop.png"), str(locked), "--out",
                 str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert lines[0] == f"resunet predict: {locked}: cannot read the folder (Permission denied)", lines
    assert len(lines) == 2 and lines[1].startswith(f"resunet predict: {folder / 'loop.png'}: "), lines
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]


def test_an_image_too_large_at_the_working_size_is_named_by_evaluate_visualize_and_calibrate(checkpoint, tmp_path,
                                                                                             capsys):
    """8000×2 pixels read fine but become 256000×64 at the model's working size (64), over the 16,000,000-pixel
    bound: predict named the file, evaluate, visualize, calibrate and export's check gave the bound without it (an
    audit, 2026-12-06)."""
    root = make_dataset(tmp_path / "data")
    buffer = io.BytesIO()
    Image.new("RGB", (8000, 2), (90, 120, 30)).save(buffer, format="PNG")
    (root / "val" / "images" / "wide.png").write_bytes(buffer.getvalue())
    Image.new("L", (8000, 2), 0).save(root / "val" / "masks" / "wide.png")
    words = "8000×2 pixels become 256000×64 at working size 64"
    wide = str(Path("val") / "images" / "wide.png")
    assert main(["evaluate", checkpoint, "--data-root", str(root), "--workers", "0"]) == 2
    one_error_line(capsys, "evaluate", wide, words)
    assert main(["visualize", checkpoint, "--data-root", str(root), "--count", "4",
                 "--out", str(tmp_path / "grid.png")]) == 2
    one_error_line(capsys, "visualize", wide, words)
    copy = tmp_path / "model.pt"
    shutil.copy(checkpoint, copy)
    before = copy.read_bytes()
    assert main(["calibrate", str(copy), "--data-root", str(root)]) == 2
    one_error_line(capsys, "calibrate", wide, words)
    assert copy.read_bytes() == before
