"""The dataset doctor (`resunet check-data`, and the same checks before `train`): small datasets that provoke every
finding kind for real, the grouped report, the JSON, the bar chart, the exit status and the cache."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resunet import doctor
from resunet.cli import main
from resunet.data.demo import make_demo_dataset, make_sample

from test_bad_inputs import declared_png

SIZE = 32
CLASSES = {"classes": ["background", "cat", "dog", "bird"],
           "palette": [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]], "ignore_index": 255}


def picture(seed: int) -> Image.Image:
    """A textured 32×32 RGB picture, different for every seed."""
    return make_sample(np.random.default_rng(seed), SIZE)[0]


def labels(*boxes: tuple[int, int, int, int, int], width: int = SIZE, fill: int = 0) -> Image.Image:
    """An index mask ('L'): `fill` with rectangles (class, x0, y0, x1, y1)."""
    mask = np.full((SIZE, width), fill, dtype=np.uint8)
    for value, x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = value
    return Image.fromarray(mask)


def cat_and_dog(width: int = SIZE) -> Image.Image:
    return labels((1, 2, 2, 14, 14), (2, 16, 16, 30, 30), width=width)


def save(image: Image.Image, path: Path, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def encoded(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def clean_dataset(root: Path, train: int = 4, val: int = 2) -> Path:
    """root/{train,val}/{images,masks} + classes.json; every pair fine."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(CLASSES))
    for split, count, first_seed in (("train", train, 0), ("val", val, 500)):
        for i in range(count):
            save(picture(first_seed + i), root / split / "images" / f"good_{i}.png")
            save(cat_and_dog(), root / split / "masks" / f"good_{i}.png")
    return root


def bad_dataset(root: Path) -> Path:
    """One of every finding kind a folder dataset can have (missing_mask four times: the report shows three)."""
    clean_dataset(root)
    train, val = root / "train", root / "val"
    # Converted when read (facts, not findings): grey, CMYK, 16-bit, EXIF-rotated.
    save(picture(0).convert("L"), train / "images" / "good_0.png")
    save(picture(1).convert("CMYK"), train / "images" / "good_1.jpg", quality=95)
    (train / "images" / "good_1.png").unlink()
    save(Image.fromarray(np.asarray(picture(2).convert("L")).astype(np.uint16)), train / "images" / "good_2.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown rotated by 90°
    save(picture(3), train / "images" / "good_3.jpg", quality=95, exif=exif)
    (train / "images" / "good_3.png").unlink()

    def pair(name: str, image: Image.Image | bytes, mask: Image.Image, mask_suffix: str = ".png", **options):
        if isinstance(image, bytes):
            (train / "images").joinpath(f"{name}.png").write_bytes(image)
        else:
            save(image, train / "images" / f"{name}.png")
        save(mask, train / "masks" / f"{name}{mask_suffix}", **options)

    pair("jpeg_mask", picture(10), labels((1, 4, 4, 28, 28)), ".jpg", quality=90)
    pair("binary", picture(11), labels((255, 8, 8, 24, 24)))
    pair("one_class", picture(12), labels(fill=1))
    pair("mismatch", picture(13), cat_and_dog(width=24))
    pair("out_of_range", picture(14), labels((1, 2, 2, 14, 14), (7, 16, 16, 30, 30)))
    rgb = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    rgb[2:14, 2:14] = (128, 0, 0)  # cat
    rgb[16:30, 16:30] = (10, 200, 30)  # no class has this colour
    pair("off_palette", picture(15), Image.fromarray(rgb))
    png = encoded(picture(16), format="PNG")
    pair("broken", png[: len(png) // 2], cat_and_dog())
    pair("bomb", declared_png(40_000, 40_000), cat_and_dog())
    for i in range(4):
        save(picture(20 + i), train / "images" / f"no_mask_{i}.png")
    save(cat_and_dog(), train / "masks" / "orphan.png")
    pair("twin", picture(40), cat_and_dog())
    save(picture(41), train / "images" / "twin.jpg", quality=95)  # which picture does twin.png's mask label?
    # Leakage: the same picture in train and val, once byte for byte, once re-encoded as a JPEG.
    pair("dup", picture(30), cat_and_dog())
    save(picture(30), val / "images" / "dup_copy.png")
    save(cat_and_dog(), val / "masks" / "dup_copy.png")
    pair("near", picture(31), cat_and_dog())
    save(picture(31), val / "images" / "near_copy.jpg", quality=90)
    save(cat_and_dog(), val / "masks" / "near_copy.png")
    # A bird in val only.
    save(labels((1, 2, 2, 14, 14), (3, 16, 16, 30, 30)), val / "masks" / "good_0.png")
    return root


EXPECTED = {
    "unreadable": ["train/images/broken.png"],
    "too_large": ["train/images/bomb.png"],
    "missing_mask": [f"train/images/no_mask_{i}.png" for i in range(4)],
    "orphan_mask": ["train/masks/orphan.png"],
    "same_name": ["train/images/twin.png"],
    "size_mismatch": ["train/masks/mismatch.png"],
    "mask_values": ["train/masks/out_of_range.png"],
    "off_palette": ["train/masks/off_palette.png"],
    "exif_orientation": ["train/images/good_3.jpg"],  # stored turned 90°, square: its mask fits either way
    "jpeg_mask": ["train/masks/jpeg_mask.jpg"],
    "binary_255": ["train/masks/binary.png"],
    "one_class": ["train/masks/one_class.png"],
    "class_not_in_train": ["val/masks/good_0.png"],
    "duplicate": ["val/images/dup_copy.png"],
    "near_duplicate": ["val/images/near_copy.jpg"],
}


def by_kind(findings: list[dict]) -> dict[str, list[str]]:
    grouped = defaultdict(list)
    for item in findings:
        grouped[item["kind"]].append(item["path"])
    return {kind: sorted(paths) for kind, paths in grouped.items()}


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory) -> Path:
    return bad_dataset(tmp_path_factory.mktemp("bad") / "data")


def test_every_kind_is_found_grouped_and_counted(bad_root, tmp_path, capsys):
    report_json, plot = tmp_path / "report.json", tmp_path / "shares.png"
    assert main(["check-data", "--data-root", str(bad_root), "--json", str(report_json), "--plot", str(plot),
                 "--workers", "2"]) == 1
    out = capsys.readouterr().out

    report = json.loads(report_json.read_text())
    expected = {kind: [str(Path(p)) for p in paths] for kind, paths in EXPECTED.items()}
    assert by_kind(report["findings"]) == expected
    assert report["errors"] == 11 and report["warnings"] == 7
    assert all(item["severity"] == doctor.KINDS[item["kind"]][0] for item in report["findings"])
    messages = {item["kind"]: item["message"] for item in report["findings"]}
    assert "truncated" in messages["unreadable"] and "over the limit" in messages["too_large"]
    assert "24×32 but its image is 32×32" in messages["size_mismatch"] and "[7]" in messages["mask_values"]
    assert "(10, 200, 30)" in messages["off_palette"] and "'bird' (3)" in messages["class_not_in_train"]
    assert "dup.png" in messages["duplicate"] and "near.png" in messages["near_duplicate"]

    # The people's report: a summary, then one counted group per kind, errors first, the first three files each.
    assert "11 errors, 7 warnings" in out
    groups = [line for line in out.splitlines() if line.startswith(("ERROR", "WARNING"))]
    assert [line.split()[1] for line in groups] == list(EXPECTED)  # KINDS order: every error before any warning
    assert "missing_mask ×4: images without a mask" in out
    assert all(f"no_mask_{i}.png" in out for i in range(3)) and "no_mask_3.png" not in out
    assert "… and 1 more" in out
    assert "the model learns only background" in out and "leakage inflates every score" in out
    assert "store masks as PNG" in out

    facts = report["facts"]["splits"]
    assert facts["train"]["pairs"] == 16 and facts["val"]["pairs"] == 4
    assert facts["train"]["images_read"] == 14  # the broken image and the bomb are not
    assert facts["train"]["width"] == {"min": 32, "median": 32.0, "max": 32}
    assert facts["train"]["converted"] == {"grayscale": 2, "CMYK": 1, "16-bit": 1, "EXIF-rotated": 1,
                                           "palette masks read by colour": 0}
    assert facts["train"]["class_share"]["bird"] == 0 < facts["val"]["class_share"]["bird"]
    assert abs(sum(facts["val"]["class_share"].values()) - 1) < 1e-9
    assert "bird" in out and "16-bit" in out

    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_warnings_alone_exit_0(tmp_path, capsys):
    root = clean_dataset(tmp_path / "data")
    save(labels((1, 4, 4, 28, 28)), root / "val" / "masks" / "good_1.jpg", quality=95)
    (root / "val" / "masks" / "good_1.png").unlink()
    assert main(["check-data", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "0 errors, 1 warning" in out and "WARNING jpeg_mask ×1" in out and "good_1.jpg" in out


def test_the_demo_dataset_is_clean(demo_root, capsys):
    assert main(["check-data", "--data-root", str(demo_root)]) == 0
    out = capsys.readouterr().out
    assert "0 errors, 0 warnings" in out
    assert "voc dataset, 21 classes, ignore index 255" in out
    assert " 48 " in out.splitlines()[2] and " 8 " in out.splitlines()[3]  # train and val pair counts


def test_voc_split_files_naming_absent_files(tmp_path, capsys):
    voc = make_demo_dataset(tmp_path / "voc", train=3, val=2, size=SIZE, seed=1)
    (voc / "SegmentationClass" / "demo_val_00001.png").unlink()
    with open(voc / "ImageSets" / "Segmentation" / "val.txt", "a") as split_file:
        split_file.write("ghost\n")
    report = doctor.check_data(tmp_path / "voc", workers=1)
    assert {f.kind for f in report.errors} == {"missing_file"}  # (3 random train images: warnings may come)
    assert sorted(f.path for f in report.errors) == [str(Path("JPEGImages/ghost.jpg")),
                                                     str(Path("SegmentationClass/demo_val_00001.png")),
                                                     str(Path("SegmentationClass/ghost.png"))]
    assert "ImageSets/Segmentation/val.txt lists ghost" in report.errors[0].message.replace(os.sep, "/")
    assert report.facts["splits"]["val"]["pairs"] == 1
    # A photo saved under another suffix is named (the line said only that NAME.jpg was not there), here and by train.
    photo = voc / "JPEGImages" / "demo_val_00000.jpg"
    photo.rename(photo.with_suffix(".png"))
    report = doctor.check_data(tmp_path / "voc", workers=1)
    said = next(f.message for f in report.errors if f.path == str(Path("JPEGImages/demo_val_00000.jpg")))
    assert said.endswith("is not there (demo_val_00000.png is there: a VOC tree reads NAME.jpg photos and NAME.png "
                         "masks; rename it)"), said
    from resunet.data.dataset import open_dataset
    from resunet.data.images import DataError

    with pytest.raises(DataError, match=r"listed files are missing, e.g. .*demo_val_00000.jpg \(demo_val_00000.png "
                                        r"is there: "):
        open_dataset(tmp_path / "voc", "val")
    assert main(["check-data", "--data-root", str(tmp_path / "voc"), "--split", "train"]) == 0  # train is fine
    assert main(["check-data", "--data-root", str(tmp_path / "voc"), "--split", "nope"]) == 2  # not a split
    assert "nope.txt: no such split file" in capsys.readouterr().err
    for name in ("train", "val"):  # a split of photos all saved as PNG: the first five say so, the rest are listed
        for photo in (voc / "JPEGImages").glob(f"demo_{name}_*.jpg"):
            photo.rename(photo.with_suffix(".png"))
    report = doctor.check_data(tmp_path / "voc", workers=1)
    photos = [f.message for f in report.errors if f.path.startswith("JPEGImages")]
    assert len(photos) == 6 and sum("is there: a VOC tree reads" in said for said in photos) == 5, photos


def test_a_png_mask_that_went_through_jpeg_is_lossy(tmp_path):
    root = clean_dataset(tmp_path / "data", train=2, val=1)
    palette = np.array(CLASSES["palette"], dtype=np.uint8)
    rgb = palette[np.asarray(cat_and_dog())]
    noisy = Image.open(io.BytesIO(encoded(Image.fromarray(rgb), format="JPEG", quality=75)))
    save(noisy, root / "train" / "masks" / "good_1.png")  # a PNG now, the JPEG's noise kept
    report = doctor.check_data(root, workers=1)
    assert sorted((f.kind, f.path) for f in report.findings) == [
        ("lossy_mask", str(Path("train/masks/good_1.png"))), ("off_palette", str(Path("train/masks/good_1.png")))]


def test_a_flat_folder_read_as_train_and_val_is_read_once(tmp_path):
    root = tmp_path / "flat"
    for i in range(2):
        save(picture(i), root / "images" / f"{i}.png")
        save(cat_and_dog(), root / "masks" / f"{i}.png")
    report = doctor.check_data(root, ["train", "val"], num_classes=3, workers=1)
    assert [(f.kind, f.path) for f in report.findings] == [("shared_split", "val")]
    assert list(report.facts["splits"]) == ["train"]


def test_not_a_dataset_is_one_line_exit_2(tmp_path, capsys):
    assert main(["check-data", "--data-root", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: data root is not a folder" in capsys.readouterr().err


def test_the_report_is_cached_until_a_file_changes(tmp_path, monkeypatch):
    root = clean_dataset(tmp_path / "data", train=2, val=1)
    reads = []
    check_pair = doctor.check_pair
    monkeypatch.setattr(doctor, "check_pair", lambda *args: reads.append(args[1]) or check_pair(*args))
    first = doctor.check_data(root, workers=1, cache_dir=tmp_path / "cache")
    assert len(reads) == 3 and not first.from_cache
    again = doctor.check_data(root, workers=1, cache_dir=tmp_path / "cache")
    assert len(reads) == 3 and again.from_cache and again.to_dict() == first.to_dict()
    path = root / "val" / "masks" / "good_0.png"
    save(labels(fill=2), path)  # changed: read again
    changed = doctor.check_data(root, workers=1, cache_dir=tmp_path / "cache")
    assert len(reads) == 6 and [f.kind for f in changed.findings] == ["one_class"]


def test_train_refuses_a_dataset_with_errors_and_starts_with_skip_data_check(tmp_path, capsys):
    root = clean_dataset(tmp_path / "data")
    save(cat_and_dog(), root / "train" / "masks" / "orphan.png")  # an error the training loader would not notice
    args = ["train", "--data-root", str(root), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2",
            "--size", "32", "--no-pretrained", "--workers", "0", "--no-progress", "--cache-dir",
            str(tmp_path / "cache"), "--encoder", "resnet18"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "ERROR   orphan_mask ×1" in captured.out  # the report, then one line
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resunet train: error: ")
    assert str(Path("train/masks/orphan.png")) in lines[0]
    assert f"resunet check-data --data-root {root}" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert len(list((tmp_path / "cache" / "check-data").glob("*.json"))) == 1  # a re-run reads no image
    # The command named checks what train checked: its splits, its pixel limit (for --train-split train_aug it
    # named a check of train and val alone, which said "0 errors": a helper's review, 2026-12-07)
    (root / "train").rename(root / "training")
    assert main([*args, "--train-split", "training", "--max-pixels", "5000000"]) == 2
    suggested = capsys.readouterr().err.strip().split("or run: ")[1]
    assert suggested == f"resunet check-data --data-root {root} --split training val --max-pixels 5000000"
    assert main([*shlex.split(suggested)[1:], "--workers", "1"]) == 1
    assert "ERROR   orphan_mask ×1" in capsys.readouterr().out
    (root / "training").rename(root / "train")

    assert main([*args, "--skip-data-check"]) == 0
    assert (tmp_path / "run" / "last.pt").is_file()
    assert "orphan_mask" not in capsys.readouterr().out


def test_a_train_or_val_folder_without_its_masks_is_an_error_not_passed_over(tmp_path, capsys):
    """val/images without val/masks: the check listed train alone and said 0 errors, then train refused the data
    (a helper, 2026-12-06). An unlabelled test/images is no mistake and stays unsaid."""
    root = clean_dataset(tmp_path / "data")
    shutil.rmtree(root / "val" / "masks")
    save(picture(9), root / "test" / "images" / "t.png")
    assert main(["check-data", "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "ERROR   half_split ×1" in out and "val/images: no val/masks folder beside it; train reads both" in out
    assert "test/" not in out and "half_split ×2" not in out
    args = ["train", "--data-root", str(root), "--out", str(tmp_path / "run"), "--skip-data-check", "--size", "32"]
    assert main(args) == 2 and "no split 'val'" in capsys.readouterr().err
    # Both splits half there: "not a dataset: expected ... root/all/{images,masks}" named a split nobody made.
    shutil.rmtree(root / "train" / "masks")
    assert main(["check-data", "--data-root", str(root)]) == 2
    assert capsys.readouterr().err.strip() == (f"resunet check-data: error: {root / 'train' / 'images'}: no "
                                               "train/masks folder beside it (2 split folder(s) half there), and no "
                                               "complete split")

    # A folder of photos and no dataset: check-data suggested root/all/{images,masks}, which train never reads; now it
    # names what train reads, as train says it (2026-12-07).
    photos = tmp_path / "photos"
    save(picture(9), photos / "a.png")
    for command in (["check-data", "--data-root", str(photos)],
                    ["train", "--data-root", str(photos), "--out", str(tmp_path / "run2"), "--size", "32"]):
        assert main(command) == 2
        assert capsys.readouterr().err.strip().endswith(f"{photos}: not a dataset: expected VOCdevkit/VOC2012, "
                                                        f"{photos}/train/{{images,masks}} or {photos}/{{images,masks}}")
    # ... while a flat dataset beside a half-made train/ is still checked, the half split reported (a review: it
    # was "not a dataset" too, naming a layout that was there)
    flat = tmp_path / "flat"
    save(picture(9), flat / "images" / "a.png")
    save(cat_and_dog(), flat / "masks" / "a.png")
    save(picture(10), flat / "train" / "images" / "b.png")
    assert main(["check-data", "--data-root", str(flat), "--num-classes", "4"]) == 1
    assert "train/images: no train/masks folder beside it" in capsys.readouterr().out


def test_a_symlink_loop_or_dangling_link_with_skip_data_check_is_one_line_and_leaves_no_run_folder(tmp_path,
                                                                                                    capsys):
    """With --skip-data-check, a link in val that leads nowhere was a traceback (OSError) from the data signature, and
    the run folder was left empty behind it (a helper's audit, 2026-12-07)."""
    root = clean_dataset(tmp_path / "data")
    save(cat_and_dog(), root / "val" / "masks" / "odd.png")
    run = tmp_path / "run"
    args = ["train", "--data-root", str(root), "--out", str(run), "--skip-data-check", "--size", "32", "--batch-size",
            "2", "--epochs", "1", "--encoder", "resnet18", "--no-pretrained", "--workers", "0", "--precision", "fp32",
            "--cache-dir", str(tmp_path / "cache")]
    for target, reason in (("odd.png", "Too many levels of symbolic links"),
                           ("/nonexistent/odd.png", "No such file or directory")):
        link = root / "val" / "images" / "odd.png"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"resunet train: error: {link}: cannot be read ({reason})") and err.count("\n") == 1
        assert not run.exists()


def test_a_resume_given_the_runs_own_class_count_or_ignore_label_goes_on(tmp_path, capsys):
    """The run read them from classes.json; --ignore-index 255 on resume was refused as a change ("the run was started
    without --ignore-index"), where a new run takes it (a helper's audit, 2026-12-07). Another value stays refused."""
    root = clean_dataset(tmp_path / "data", train=4, val=2)
    run = tmp_path / "run"
    common = ["--size", "32", "--batch-size", "2", "--encoder", "resnet18", "--no-pretrained", "--workers", "0",
              "--precision", "fp32", "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", "--data-root", str(root), "--out", str(run), "--epochs", "1", *common]) == 0
    resume = ["train", "--resume", str(run / "last.pt"), "--epochs", "2", "--workers", "0"]
    assert main([*resume, "--ignore-index", "0"]) == 2
    assert "--ignore-index 0: cannot change on --resume" in capsys.readouterr().err
    assert main([*resume, "--ignore-index", "255", "--num-classes", "4"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_one_file_in_two_voc_split_lists_is_said_to_be_listed_twice(tmp_path, capsys):
    """It was "JPEGImages/x.jpg: identical pixels to JPEGImages/x.jpg (train)": the file compared with itself (a
    helper's audit, 2026-12-07)."""
    make_demo_dataset(tmp_path / "voc", train=4, val=2, size=32, seed=0)
    lists = tmp_path / "voc/VOCdevkit/VOC2012/ImageSets/Segmentation"
    shared = (lists / "train.txt").read_text().split()[0]
    with open(lists / "val.txt", "a") as val:
        val.write(f"{shared}\n")
    main(["check-data", "--data-root", str(tmp_path / "voc")])
    out = capsys.readouterr().out
    assert f"JPEGImages/{shared}.jpg: listed in train too" in out and "identical pixels to" not in out


def test_a_val_split_with_no_labelled_pixel_is_an_error_and_train_says_why_it_stops(tmp_path, capsys):
    """Every val pixel ignored: mIoU is undefined, so best.pt was never written, and `train` then named a best.pt
    that did not exist (ablate failed on it with a bare "not found")."""
    root = clean_dataset(tmp_path / "data")
    for mask in (root / "val" / "masks").glob("*.png"):
        save(Image.new("L", (SIZE, SIZE), 255), mask)
    assert main(["check-data", "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "ERROR   unlabelled_split ×1" in out and "val: every pixel of its 2 masks is the ignore label 255" in out
    args = ["train", "--data-root", str(root), "--out", str(tmp_path / "run"), "--epochs", "2", "--batch-size", "2",
            "--size", "32", "--no-pretrained", "--workers", "0", "--no-progress", "--cache-dir",
            str(tmp_path / "cache"), "--encoder", "resnet18"]
    assert main(args) == 2 and not (tmp_path / "run").exists()  # the data check refuses it before any work
    capsys.readouterr()
    assert main([*args, "--skip-data-check"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.endswith("every val pixel is the ignore label 255, so mIoU is undefined and no best.pt can be "
                         "chosen; fix the val masks (resunet check-data finds them); last.pt of epoch 1 is saved")
    assert (tmp_path / "run" / "last.pt").is_file() and not (tmp_path / "run" / "best.pt").exists()


def test_images_in_subfolders_are_said_not_to_be_read(tmp_path, capsys):
    from resunet.data.dataset import open_dataset
    from resunet.data.images import DataError

    root = clean_dataset(tmp_path / "data")
    for kind in ("images", "masks"):  # one pair moved one level down: silently left out before
        (root / "train" / kind / "city").mkdir()
        (root / "train" / kind / "good_3.png").rename(root / "train" / kind / "city" / "good_3.png")
    assert main(["check-data", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "WARNING nested_files ×2" in out
    assert f"{Path('train/images')}: 1 file(s) in subfolders, such as {Path('city/good_3.png')}, are not read" in out
    for path in (root / "val" / "images").glob("*.png"):  # every val image nested (a Cityscapes-style layout)
        (root / "val" / "images" / "city").mkdir(exist_ok=True)
        path.rename(root / "val" / "images" / "city" / path.name)
    with pytest.raises(DataError, match=r"val/images: no images \(2 in subfolders, such as city/good_0.png: images and "
                                        r"masks are read only directly in their folders\)$"):
        open_dataset(root, "val")


def test_the_data_check_reads_each_mask_as_training_does(tmp_path):
    # It read a palette mask's indices as they are (a colour mask re-saved with its own palette counted the wrong
    # classes, silently), and refused 1-bit and grey+alpha masks that training reads.
    from resunet.data.dataset import open_dataset

    root = clean_dataset(tmp_path / "data")
    masks = root / "train" / "masks"
    rgb = np.array(CLASSES["palette"], dtype=np.uint8)[np.asarray(cat_and_dog())]
    resaved = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=3)
    assert not np.array_equal(np.asarray(resaved), np.asarray(cat_and_dog()))  # its indices are not the classes
    save(resaved, masks / "good_0.png")
    save(Image.fromarray(np.asarray(labels((1, 0, 0, 32, 10))) == 1), masks / "good_1.png")  # 1-bit: class 1 a bit
    save(labels((2, 0, 0, 20, 20)).convert("LA"), masks / "good_2.png")
    assert [Image.open(masks / f"good_{i}.png").mode for i in range(3)] == ["P", "1", "LA"]
    report = doctor.check_data(root, workers=1)
    assert not [f.message for f in report.findings if f.severity == "error"]
    dataset = open_dataset(root, "train")
    expected = np.bincount(np.concatenate([dataset.load(i).mask.ravel() for i in range(len(dataset))]), minlength=4)
    # By hand: cat_and_dog's cat 12×12 and dog 14×14 twice (good_0 and good_3), a 32×10 cat, a 20×20 dog
    assert expected[1:].tolist() == [2 * 12 * 12 + 32 * 10, 2 * 14 * 14 + 20 * 20, 0]
    assert report.facts["splits"]["train"]["class_pixels"] == dict(zip(CLASSES["classes"], expected[:4].tolist()))


def test_a_photo_stored_flipped_or_turned_whose_mask_fits_either_way_is_a_warning(tmp_path):
    # Orientations 2-4 keep the picture's sides: a mask drawn on the stored pixels was misaligned without a word.
    root = clean_dataset(tmp_path / "data")
    images = root / "train" / "images"
    for name, orientation, width in (("good_0", 3, SIZE), ("good_1", 6, SIZE + 8), ("good_2", 1, SIZE)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        picture_ = picture(60).resize((width, SIZE)) if orientation != 6 else picture(60).resize((SIZE, width))
        save(picture_, images / f"{name}.jpg", quality=95, exif=exif)  # good_1: stored 32×40, shown 40×32
        (images / f"{name}.png").unlink()
    save(cat_and_dog(width=SIZE + 8), root / "train" / "masks" / "good_1.png")  # drawn on the picture as shown
    report = doctor.check_data(root, workers=1)
    found = {f.path: f.message for f in report.findings}
    assert list(found) == ["train/images/good_0.jpg"]
    assert found["train/images/good_0.jpg"] == ("train/images/good_0.jpg: EXIF orientation 3 (turned 180°); its "
                                                "mask is read against the picture as shown")
    assert doctor.KINDS["exif_orientation"][0] == "warning"


def test_a_split_whose_masks_are_all_off_the_palette_is_not_called_all_ignore(tmp_path):
    """Found by a helper (2026-12-06): masks whose every colour is off the palette (class ids saved as RGB, the
    README's own example) hold no readable pixel, and their split was reported as "every pixel ... is the ignore
    label": `train` stopped with that line, the first error, which was not what was wrong."""
    root = clean_dataset(tmp_path / "data")
    ids = np.asarray(cat_and_dog())
    for mask in (root / "val" / "masks").glob("*.png"):
        save(Image.fromarray(np.repeat(ids[..., None], 3, axis=2)), mask)
    report = doctor.check_data(root, workers=1)
    assert [f.kind for f in report.errors] == ["off_palette", "off_palette"]
    assert doctor.refusal(report, root).startswith("val/masks/good_0.png: 2 colour(s) outside the dataset palette")


def test_exif_orientation_0_or_9_is_not_counted_as_turned(tmp_path):
    # Found by a helper (2026-12-06): some software writes 0; the image is read as stored (read_header takes 1..8).
    for value in (0, 9, 6):
        exif = Image.Exif()
        exif[0x0112] = value
        picture(1).save(tmp_path / f"o{value}.jpg", exif=exif)
        with Image.open(tmp_path / f"o{value}.jpg") as image:
            assert ("EXIF-rotated" in doctor.notes_of(image)) == (value == 6)


def test_check_data_checks_splits_of_other_names(tmp_path):
    """Found by a helper (2026-12-06): DIR/training and DIR/validation were refused, naming a split "all" that
    nobody made, where --help says the default is the splits that exist."""
    root = clean_dataset(tmp_path / "data")
    (root / "train").rename(root / "training")
    (root / "val").rename(root / "validation")
    report = doctor.check_data(root, workers=1)
    assert sorted(report.facts["splits"]) == ["training", "validation"] and not report.errors
    assert report.facts["splits"]["validation"]["pairs"] == 2
    # Beside a pool of every image at the root (DIR/{images,masks}): the same splits (it was refused again, naming
    # "all": a helper's review, 2026-12-07)
    for kind in ("images", "masks"):
        shutil.copytree(root / "training" / kind, root / kind)
    report = doctor.check_data(root, workers=1)
    assert sorted(report.facts["splits"]) == ["training", "validation"] and not report.errors


def test_a_turned_tiff_whose_mask_fits_the_picture_as_shown_is_not_warned(tmp_path):
    """Found by a helper (2026-12-06): PIL gives a TIFF's size as shown, so every TIFF stored sideways whose mask was
    right (drawn on the picture as shown) was warned that its mask "fits both the stored and the shown picture"."""
    root = clean_dataset(tmp_path / "data")
    images = root / "train" / "images"
    picture(60).resize((SIZE, SIZE + 8)).save(images / "good_1.tif", tiffinfo={0x0112: 6})  # shown 40×32
    (images / "good_1.png").unlink()
    save(cat_and_dog(width=SIZE + 8), root / "train" / "masks" / "good_1.png")  # drawn on the picture as shown
    report = doctor.check_data(root, workers=1)
    assert [(f.kind, f.path) for f in report.findings] == []
    assert report.facts["splits"]["train"]["converted"]["EXIF-rotated"] == 1


def test_a_mask_with_transparent_pixels_is_a_warning(tmp_path):
    # Alpha is dropped when a mask is read: a pixel left transparent was read as whatever colour hides under it
    # (often black, a class), without a word.
    root = clean_dataset(tmp_path / "data")
    rgb = np.array(CLASSES["palette"], dtype=np.uint8)[np.asarray(cat_and_dog())]
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[:, :5] = 0  # 5 columns left transparent, 2 more half
    alpha[:, 5:7] = 128
    save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), root / "train" / "masks" / "good_0.png")
    save(Image.fromarray(np.dstack([rgb, np.full((SIZE, SIZE), 255, np.uint8)]), "RGBA"),
         root / "train" / "masks" / "good_1.png")  # opaque: nothing to say
    report = doctor.check_data(root, workers=1)
    assert [(f.kind, f.path, f.message) for f in report.findings] == [
        ("mask_alpha", "train/masks/good_0.png", f"train/masks/good_0.png: {7 * SIZE} transparent or translucent "
                                                 "pixel(s), read by their colour")]
    assert doctor.KINDS["mask_alpha"][0] == "warning"


def test_an_rgb_mask_of_class_ids_or_black_and_white_is_said_to_look_so(tmp_path):
    # The data check and the datasets share the hint (rgb_mask_hint); it had the binary one alone.
    root = clean_dataset(tmp_path / "data")
    ids = np.asarray(cat_and_dog())
    save(Image.fromarray(np.repeat(ids[..., None], 3, axis=2)), root / "train" / "masks" / "good_0.png")
    save(Image.fromarray(np.repeat((ids > 0)[..., None] * np.uint8(255), 3, axis=2)),
         root / "train" / "masks" / "good_1.png")
    report = doctor.check_data(root, workers=1)
    assert [(f.kind, f.path, f.message) for f in report.findings if f.kind == "off_palette"] == [
        ("off_palette", "train/masks/good_0.png", "train/masks/good_0.png: 2 colour(s) outside the dataset palette on "
         "340 pixels, e.g. (1, 1, 1) at (x=2, y=2) (every pixel is grey with a class id as its value (0, 1, 2): class "
         "ids saved as RGB? Save them as a one-channel (L) or palette PNG)"),
        ("off_palette", "train/masks/good_1.png", "train/masks/good_1.png: 1 colour(s) outside the dataset palette on "
         "340 pixels, e.g. (255, 255, 255) at (x=2, y=2) (a black-and-white binary mask? store it as an index PNG with "
         "the object as 1)")]
    # Nothing else is said of them: their colours are not noise (lossy_mask), and a grey 0 read as the palette's
    # black made the class-id mask "all one class" or "all ignore" (a helper, 2026-12-06).
    assert sorted(f.kind for f in report.findings if f.path.startswith("train/masks/good_")) == ["off_palette"] * 2


def test_a_32_bit_mask_with_negative_values_is_an_error_in_the_check_and_when_read(tmp_path):
    """A mode 'I' mask holding -2 passed check-data (0 errors) and was read wrapped into uint8: -2 as 254, which
    failed only at the end of the first epoch as a value not in the file, and -1 as 255, silently ignored (found by a
    helper, 2026-12-05)."""
    from resunet.data.dataset import open_dataset
    from resunet.data.images import DataError

    root = clean_dataset(tmp_path / "data", train=2, val=1)
    (root / "val" / "masks" / "good_0.png").unlink()
    values = np.asarray(cat_and_dog()).astype(np.int32)
    values[0, :3] = [-2, -1, 255]
    save(Image.fromarray(values, mode="I"), root / "val" / "masks" / "good_0.tif")
    assert Image.open(root / "val" / "masks" / "good_0.tif").mode == "I"
    report = doctor.check_data(root, workers=1)
    label = str(Path("val/masks/good_0.tif"))
    assert [(f.severity, f.kind, f.path, f.message) for f in report.findings] == [
        ("error", "mask_values", label, f"{label}: mask values [-2, -1] below 0 (class indices are 0..3, ignore 255)")]
    dataset = open_dataset(str(root), "val")
    with pytest.raises(DataError, match=r"good_0.tif: mask value -2 is below 0; class indices are 0..255$"):
        dataset.load(0)


def test_a_cache_built_before_the_negative_value_check_is_built_again(tmp_path, monkeypatch):
    """A decoded-image cache built before negative mask values were refused (format 2) holds a -1 as 255, the ignore
    label, and a --skip-data-check run reused it: those pixels were left out without a word. Now the masks are read
    again and the bad one is named."""
    import resunet.data.cache as cache
    import resunet.data.dataset as dataset_module
    from resunet.data.dataset import open_dataset
    from resunet.data.images import DataError

    root = clean_dataset(tmp_path / "data", train=2, val=1)
    (root / "train" / "masks" / "good_0.png").unlink()
    values = np.asarray(cat_and_dog()).astype(np.int32)
    assert values[0, 0] != 255
    values[0, 0] = -1
    save(Image.fromarray(values, mode="I"), root / "train" / "masks" / "good_0.tif")
    dataset = open_dataset(str(root), "train")
    size = max(values.shape)  # the cache keeps the masks unscaled
    with monkeypatch.context() as before:  # the cache format and the mask reading of then: wrapped into uint8
        before.setattr(cache, "CACHE_FORMAT", 2)
        before.setattr(dataset_module, "read_mask",
                       lambda path, info, max_pixels: np.asarray(Image.open(path)).astype(np.uint8))
        old = cache.build_cache(dataset, size=size, cache_dir=tmp_path / "cache", workers=1)
        index = dataset.mask_paths.index(root / "train" / "masks" / "good_0.tif")
        assert old.masks[index, 0, 0] == 255  # the -1: ignored, without a word
    with pytest.raises(DataError, match=r"good_0.tif: mask value -1 is below 0"):
        cache.build_cache(dataset, size=size, cache_dir=tmp_path / "cache", workers=1)


def test_an_image_and_its_mask_pair_when_their_names_differ_only_in_unicode_form(tmp_path):
    """'café' written composed (most tools) and decomposed (a Mac: e + combining accent): the same name on screen,
    yet the check said "no mask café.*" and named the mask an orphan, and training refused the split (found by a
    helper, 2026-12-05). Names pair in Unicode's composed form."""
    import unicodedata

    from resunet.data.dataset import open_dataset

    root = clean_dataset(tmp_path / "data", train=2, val=1)
    composed, decomposed = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert composed != decomposed
    (root / "val" / "images" / "good_0.png").rename(root / "val" / "images" / f"{composed}.png")
    (root / "val" / "masks" / "good_0.png").rename(root / "val" / "masks" / f"{decomposed}.png")
    assert doctor.check_data(root, workers=1).findings == []
    dataset = open_dataset(str(root), "val")
    assert [p.name for p in dataset.mask_paths] == [f"{decomposed}.png"]
    assert np.array_equal(dataset.load(0).mask, np.asarray(cat_and_dog()))


def test_the_cached_report_follows_a_permission_change_and_never_keeps_unreadable_files(tmp_path, monkeypatch):
    """A chmod changes a file's change time alone: keyed on sizes and modification times, the report of a file
    unreadable for its permissions was reused after they were set right (train refused data check-data passed).
    And a report of a file that could not be read is not kept: the read may succeed next time."""
    root = clean_dataset(tmp_path / "data", train=2, val=1)
    cache = tmp_path / "cache"
    path = root / "val" / "masks" / "good_0.png"
    assert not doctor.check_data(root, workers=1, cache_dir=cache).from_cache
    os.chmod(path, 0o600)
    assert not doctor.check_data(root, workers=1, cache_dir=cache).from_cache  # checked again
    assert doctor.check_data(root, workers=1, cache_dir=cache).from_cache
    check_pair = doctor.check_pair
    failing = [True]  # a read that fails once (a permission, a network disk), then works

    def flaky(split, image, mask, *rest):
        if failing and mask == path:
            failing.clear()
            mask = tmp_path / "absent.png"
        return check_pair(split, image, mask, *rest)

    monkeypatch.setattr(doctor, "check_pair", flaky)
    os.utime(path)  # the key changes
    first = doctor.check_data(root, workers=1, cache_dir=cache)
    assert [f.kind for f in first.errors] == ["unreadable"] and not first.from_cache
    again = doctor.check_data(root, workers=1, cache_dir=cache)
    assert not again.from_cache and not again.errors


def test_a_symlink_loop_or_a_dangling_link_is_a_finding_before_train_too(tmp_path, capsys):
    """check-data reported them; train's cached check looked at every file first for its key and raised."""
    root = clean_dataset(tmp_path / "data", train=2, val=1)
    loop = root / "train" / "images" / "loop.png"
    loop.symlink_to(loop.name)
    (root / "train" / "masks" / "loop.png").symlink_to("nowhere.png")
    args = ["train", "--data-root", str(root), "--out", str(tmp_path / "run"), "--epochs", "1", "--size", "32",
            "--batch-size", "2", "--no-pretrained", "--workers", "0", "--no-progress", "--cache-dir",
            str(tmp_path / "cache"), "--encoder", "resnet18"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "ERROR   unreadable ×2" in captured.out and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    # Without the check, the decoded-image cache's key names the first file it cannot look at.
    assert main([*args, "--skip-data-check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{root / 'train' / 'images' / 'loop.png'}: cannot be read" in err, err
    assert not (tmp_path / "run").exists()


def test_a_folder_that_cannot_be_read_is_one_line_for_check_data_and_train(tmp_path, capsys, monkeypatch):
    root = clean_dataset(tmp_path / "data", train=2, val=1)
    locked = root / "val" / "masks"
    iterdir = Path.iterdir

    def refusing(self):  # root reads any folder: a refusal is simulated
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refusing)
    said = f"{locked}: cannot read the folder (Permission denied)\n"
    assert main(["check-data", "--data-root", str(root)]) == 2
    assert capsys.readouterr().err == f"resunet check-data: error: {said}"
    assert main(["train", "--data-root", str(root), "--out", str(tmp_path / "run"), "--epochs", "1", "--size", "32",
                 "--batch-size", "2", "--no-pretrained", "--workers", "0", "--no-progress", "--cache-dir",
                 str(tmp_path / "cache"), "--encoder", "resnet18"]) == 2
    assert capsys.readouterr().err == f"resunet train: error: {said}"


def test_overwrite_keeps_the_earlier_run_when_the_new_one_is_refused_on_a_bad_file(tmp_path, capsys):
    """--overwrite removed the earlier run's files before the cache build found a bad mask (--skip-data-check): the
    new run was refused and the old one gone."""
    import shutil

    root = clean_dataset(tmp_path / "data", train=4, val=2)
    args = ["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--size", "32", "--batch-size", "2",
            "--no-pretrained", "--workers", "0", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--encoder", "resnet18"]
    assert main([*args, "--data-root", str(root)]) == 0
    kept = (tmp_path / "run" / "last.pt").read_bytes()
    bad = shutil.copytree(root, tmp_path / "bad")
    mask = bad / "train" / "masks" / "good_0.png"
    mask.write_bytes(mask.read_bytes()[:60])  # its header reads, its pixels do not
    capsys.readouterr()
    assert main([*args, "--data-root", str(bad), "--overwrite", "--skip-data-check"]) == 2
    assert "good_0.png" in capsys.readouterr().err
    assert (tmp_path / "run" / "last.pt").read_bytes() == kept
    # On the streamed path the class weights' read of every mask finds it first: the old run still stands
    assert main([*args, "--data-root", str(bad), "--overwrite", "--skip-data-check", "--data-path", "simple",
                 "--class-weights", "sqrt-inv-freq"]) == 2
    assert "good_0.png" in capsys.readouterr().err
    assert (tmp_path / "run" / "last.pt").read_bytes() == kept
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"last.pt", "best.pt", "metrics.jsonl"}


def test_palette_masks_of_one_split_read_two_ways_are_a_warning(tmp_path):
    """Class ids stored under VOC's palette in a dataset whose classes.json reuses a VOC colour at another position
    (road drawn in VOC's aeroplane red, which is this dataset's car): a mask with road alone shows only dataset
    colours, one of them another class's, and was read by colour (road became car); a mask with car too shows VOC's
    green, no colour of the dataset, and was read by index. Nothing said so (a helper, 2026-12-06); now a warning
    names an example of each."""
    from resunet.data.classes import voc_colormap

    root = tmp_path / "ids"
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "masks").mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps({"classes": ["background", "road", "car"],
                                                   "palette": [[0, 0, 0], [128, 64, 128], [128, 0, 0]]}))
    palette = [value for colour in voc_colormap(256) for value in colour]
    for name, ids in (("road", [0, 1]), ("road_car", [0, 1, 2])):
        picture(len(name)).save(root / "train" / "images" / f"{name}.png")
        mask = Image.fromarray(np.repeat(np.array(ids, np.uint8), SIZE * SIZE // len(ids) + 1)[:SIZE * SIZE]
                               .reshape(SIZE, SIZE), "P")
        mask.putpalette(palette)
        mask.save(root / "train" / "masks" / f"{name}.png")
    report = doctor.check_data(root, ["train"], workers=1)
    mixed = [f for f in report.findings if f.kind == "palette_mixed"]
    assert len(mixed) == 1 and mixed[0].severity == "warning", report.findings
    assert ("train/masks/road.png: read by colour (and 0 more in train), while train/masks/road_car.png (and 0 more) "
            "is read by index" in mixed[0].message), mixed[0].message
    # And the facts count the masks read by colour, read so alone too: ids under a palette that shows the
    # dataset's colours in another order had their classes swapped without a word (a helper, 2026-12-06).
    assert report.facts["splits"]["train"]["converted"]["palette masks read by colour"] == 1
    assert "1 palette masks read by colour" in doctor.format_report(report)
    # Both read the same way (the car mask alone): nothing to say.
    (root / "train" / "masks" / "road.png").unlink()
    (root / "train" / "images" / "road.png").unlink()
    assert not [f for f in doctor.check_data(root, ["train"], workers=1).findings if f.kind == "palette_mixed"]


def test_an_rgb_mask_of_background_and_the_ignore_colour_is_no_binary_mask(tmp_path):
    """A mask drawn by colour, background and the ignore colour (a void border drawn on purpose), was warned of as a
    0/255 binary mask whose "object" would be ignored (a helper, 2026-12-07); a grey one of 0 and 255 still is."""
    root = tmp_path / "rgb"
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "masks").mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps({"classes": ["background", "road"], "palette": [[0, 0, 0],
                                                  [128, 64, 128]], "ignore_colour": [224, 224, 192]}))
    void = np.zeros((SIZE, SIZE), dtype=bool)
    void[:, : SIZE // 4] = True
    for name, mode in (("drawn", "RGB"), ("grey", "L")):
        picture(len(name)).save(root / "train" / "images" / f"{name}.png")
        mask = (np.where(void[..., None], np.array([224, 224, 192], np.uint8), np.uint8(0)) if mode == "RGB"
                else np.where(void, 255, 0).astype(np.uint8))
        Image.fromarray(mask, mode).save(root / "train" / "masks" / f"{name}.png")
    report = doctor.check_data(root, ["train"], workers=1)
    assert [f.path for f in report.findings if f.kind == "binary_255"] == ["train/masks/grey.png"], report.findings
    assert {f.path for f in report.findings if f.kind == "one_class"} >= {"train/masks/drawn.png"}


def test_nearly_matching_names_are_named_as_the_likely_partner(tmp_path, capsys):
    """Pairing is by exact name; a mask named the image's name in another case, with a mask's word added (CamVid's
    _L, _mask), with the image's extension kept (a.jpg.png), or a file of the very name whose suffix is not read (an
    .npy mask) is named in the error, so the user sees what to rename. Names that share all but an ordinary last
    word (scene01_right, scene01_left) are not partners, and a near name two files share names nobody."""
    from resunet.data.dataset import open_dataset
    from resunet.data.images import DataError

    root = clean_dataset(tmp_path / "data")
    images, masks = root / "train" / "images", root / "train" / "masks"
    (masks / "good_0.png").rename(masks / "good_0_L.png")
    (masks / "good_1.png").rename(masks / "GOOD_1.png")
    (masks / "good_2.png").rename(masks / "good_2.png.png")
    (masks / "good_3.png").rename(masks / "good_3.npy")
    save(picture(60), images / "scene01_right.png")  # a stereo pair's other view: no partner
    save(cat_and_dog(), masks / "scene01_left.png")
    save(picture(62), images / "frame_9.png")  # one mask near two images: names neither
    save(picture(63), images / "frame_9_rgb.png")
    save(cat_and_dog(), masks / "frame_9_gt.png")
    save(picture(64), images / "z42_sat.jpg")  # DeepGlobe: a word on each side
    save(cat_and_dog(), masks / "z42_mask.png")
    report_json = tmp_path / "report.json"
    assert main(["check-data", "--data-root", str(root), "--json", str(report_json)]) == 1
    messages = {item["path"]: item["message"] for item in json.loads(report_json.read_text())["findings"]
                if item["kind"] in ("missing_mask", "orphan_mask")}
    masks_rel, images_rel = Path("train/masks"), Path("train/images")
    tail = ": images and masks pair by the exact name, the extension aside)"
    assert messages[str(images_rel / "good_0.png")] == (f"{images_rel / 'good_0.png'}: no mask good_0.* in {masks_rel} "
                                                        f"({masks_rel}/good_0_L.png has nearly its name{tail}")
    assert messages[str(images_rel / "good_1.png")].endswith(f"({masks_rel}/GOOD_1.png differs only in case{tail}")
    assert messages[str(images_rel / "good_2.png")].endswith(f"({masks_rel}/good_2.png.png has nearly its name{tail}")
    assert messages[str(images_rel / "good_3.png")].endswith(f"({masks_rel}/good_3.npy has its name, but .npy is not "
                                                             "read)")
    assert messages[str(masks_rel / "good_0_L.png")].endswith(f"({images_rel}/good_0.png has nearly its name{tail}")
    assert messages[str(images_rel / "z42_sat.jpg")].endswith(f"({masks_rel}/z42_mask.png has nearly its name{tail}")
    alone = [images_rel / "scene01_right.png", images_rel / "frame_9.png", images_rel / "frame_9_rgb.png"]
    for path in alone + [masks_rel / "scene01_left.png", masks_rel / "frame_9_gt.png"]:
        other = images_rel if "masks" in str(path) else masks_rel
        assert messages[str(path)].endswith(f"{Path(path).stem}.* in {other}"), messages[str(path)]
    assert len(messages) == 14  # 8 images, 6 masks (good_3.npy is no mask: not listed)
    capsys.readouterr()

    # The dataset's own refusal gives as its example an image whose line says why, if one does (frame_9.png, the
    # first, says nothing).
    with pytest.raises(DataError, match=r"train/masks: no mask for 8 images, e.g. good_0.png \(masks/good_0_L.png "
                                        r"has nearly its name: images and masks pair by the exact name"):
        open_dataset(root, "train")


def test_files_with_other_suffixes_are_said_not_to_be_read(tmp_path, capsys):
    """A phone's .heic photos copied among the images were passed over without a word: check-data warns, a split of
    nothing else says why it has no images, and predict says which files of a folder it leaves out."""
    from resunet.data.dataset import open_dataset
    from resunet.data.images import DataError, list_images

    root = clean_dataset(tmp_path / "data")
    (root / "train" / "images" / "IMG_0001.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (root / "train" / "images" / "Thumbs.db").write_bytes(b"\0")  # Windows' own: not worth a word
    (root / "train" / "images" / ".hidden.heic").write_bytes(b"\0")
    cache = tmp_path / "cache"
    report = doctor.check_data(root, workers=1, cache_dir=cache)
    [warning] = report.warnings
    assert warning.kind == "unread_files" and warning.path == str(Path("train/images"))
    assert warning.message == (f"{Path('train/images')}: 1 file(s) not read, such as IMG_0001.heic (suffix .heic; "
                               "images and masks are read from .jpg, .jpeg, .jpe, .jfif, .png, .gif, .bmp, .tif, "
                               ".tiff, .webp, .avif, .jp2, .j2k, .ppm, .pgm, .pbm, .pnm, .tga, .qoi)")
    (root / "train" / "images" / "IMG_0002.HEIC").write_bytes(b"\0")  # the listed files unchanged: the key sees it
    again = doctor.check_data(root, workers=1, cache_dir=cache)
    assert not again.from_cache and "2 file(s) not read" in again.warnings[0].message

    val_images = root / "val" / "images"
    for path in val_images.glob("*.png"):
        path.rename(path.with_suffix(".heic"))
    with pytest.raises(DataError, match=r"val/images: no images \(2 file\(s\) not read, such as good_0.heic \(suffix "
                                        r"\.heic; images and masks are read from \.jpg"):
        open_dataset(root, "val")
    capsys.readouterr()
    assert main(["predict", "nothing.pt", str(val_images), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{val_images}: a folder without images (2 file(s) not read, such as good_0.heic" in err
    train_images = root / "train" / "images"  # images beside them: predicted, and the others named in a note
    assert main(["predict", "nothing.pt", str(train_images), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"resunet predict: {train_images}: 2 file(s) not read, such as IMG_0001.heic (suffix .heic;" in err
    assert "nothing.pt: checkpoint not found" in err
    # A glob of them, and the check's own line for the empty split (train's refusal quotes it).
    assert main(["predict", "nothing.pt", str(val_images / "*.heic"), "--out", str(tmp_path / "out")]) == 1
    assert "*.heic: matches no image file (2 file(s) not read, such as good_0.heic" in capsys.readouterr().err
    # A glob matching them beside images (the README's 'DIR/**/*') says so as the folder does: it said nothing.
    assert main(["predict", "nothing.pt", str(train_images / "*"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"resunet predict: {train_images / '*'}: 2 file(s) not read, such as IMG_0001.heic (suffix .heic;" in err
    # A subfolder named like an image is no image: it was listed, then refused as unreadable ("Is a directory").
    (train_images / "album.jpg").mkdir()
    (train_images / "album.jpg" / "inside.png").write_bytes((train_images / "good_0.png").read_bytes())
    assert "album.jpg" not in [p.name for p in list_images(train_images)]
    assert main(["predict", "nothing.pt", str(train_images), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Is a directory" not in err and "image(s) in subfolders, such as album.jpg/inside.png" in err, err
    empty = next(f for f in doctor.check_data(root, workers=1).findings if f.kind == "empty_split")
    assert empty.message.startswith(f"{Path('val/images')}: no images (2 file(s) not read, such as good_0.heic")
    # Formats Pillow reads beyond the common ones are listed in folders as they are read when named: AVIF, PPM/PGM.
    from resunet.data.images import read_image

    save(picture(80), tmp_path / "more" / "a.avif")
    save(picture(81).convert("L"), tmp_path / "more" / "b.pgm")
    assert [p.name for p in list_images(tmp_path / "more")] == ["a.avif", "b.pgm"]
    assert read_image(tmp_path / "more" / "b.pgm").shape == (SIZE, SIZE, 3)


def test_a_dangling_link_is_named_as_one(tmp_path):
    from resunet.data.images import DataError, looked_at, read_image

    link = tmp_path / "photo.png"
    link.symlink_to(tmp_path / "gone" / "photo.png")
    with pytest.raises(DataError, match=rf"photo.png: image file not found \(a link to {tmp_path}/gone/photo.png, "
                                        r"which is not there\)$"):
        read_image(link)
    with pytest.raises(DataError, match=r"photo.png: cannot be read \(No such file or directory\) \(a link to .*gone"):
        looked_at(link)
    with pytest.raises(DataError, match=r"missing.png: image file not found$"):  # no link: nothing more to say
        read_image(tmp_path / "missing.png")


def test_a_mask_carrying_its_own_exif_turn_is_said_not_to_be_turned(tmp_path):
    """A mask painted over a copy of a phone photo keeps the photo's EXIF turn. The image is read as shown and the
    mask as stored, so they do not fit; the size error says both carry the turn, and a warning names the mask."""
    root = clean_dataset(tmp_path / "data")
    exif = Image.Exif()
    exif[0x0112] = 6
    wide = Image.fromarray(np.asarray(picture(70))[:24])  # 32×24 stored, shown 24×32
    save(wide, root / "train" / "images" / "turned.jpg", quality=95, exif=exif)
    mask = Image.fromarray(np.asarray(cat_and_dog())[:24])
    save(mask, root / "train" / "masks" / "turned.png", exif=exif)
    exif[0x0112] = 3  # turned 180° (sides kept): only the warning
    save(picture(71), root / "train" / "images" / "upside.png")
    save(cat_and_dog(), root / "train" / "masks" / "upside.png", exif=exif)
    report = doctor.check_data(root, workers=1)
    messages = {(f.kind, f.path): f.message for f in report.findings}
    turned, upside = str(Path("train/masks/turned.png")), str(Path("train/masks/upside.png"))
    assert messages[("size_mismatch", turned)] == (f"{turned}: mask is 32×24 but its image is 24×32 (both carry EXIF "
                                                   "orientation 6: the image is read turned, the mask as stored; save "
                                                   "the mask turned, without the orientation)")
    assert messages[("mask_orientation", turned)] == (
        f"{turned}: EXIF orientation 6 (turned 90°) (as its image does), not applied: masks are read as stored")
    assert messages[("mask_orientation", upside)] == (
        f"{upside}: EXIF orientation 3 (turned 180°), not applied: masks are read as stored")
    assert sorted(f.kind for f in report.findings) == ["mask_orientation", "mask_orientation", "size_mismatch"]
    # A TIFF mask's turn is applied (Pillow turns a TIFF as it loads it): no word. A mask whose EXIF block is
    # broken is read as every mask is, without its EXIF: not unreadable.
    (root / "train" / "masks" / "turned.png").unlink()
    (root / "train" / "images" / "turned.jpg").unlink()
    (root / "train" / "masks" / "upside.png").unlink()
    exif[0x0112] = 6
    save(cat_and_dog(), root / "train" / "masks" / "upside.tif", exif=exif)
    save(cat_and_dog(), root / "train" / "masks" / "good_0.png", exif=b"Exif\x00\x00ZZ\x00*\x00\x00\x00\x08")
    from resunet.data.images import read_mask

    assert read_mask(root / "train" / "masks" / "good_0.png", doctor.list_splits(root).info).shape == (SIZE, SIZE)
    assert doctor.check_data(root, workers=1).findings == []


def test_a_dataset_without_the_train_or_val_split_is_not_passed_as_clean(tmp_path, capsys):
    """Found by a helper (2026-12-06): a VOC tree whose split file is ImageSets/Segmentation/default.txt (CVAT's
    export) was checked not at all, yet check-data said "0 errors, 0 warnings" and exited 0; then train refused it.
    Nothing read is an error; a train or val split missing beside others is a warning naming the way round it."""
    from resunet.cli import main
    from resunet.data.demo import make_demo_dataset

    make_demo_dataset(tmp_path / "voc", train=2, val=2, size=16, seed=0)
    splits = tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    (splits / "train.txt").rename(splits / "default.txt")
    (splits / "val.txt").unlink()
    report = doctor.check_data(tmp_path / "voc", workers=1)
    assert [(f.severity, f.kind, f.path) for f in report.findings] == [
        ("error", "no_split", "ImageSets/Segmentation/train.txt"),
        ("error", "no_split", "ImageSets/Segmentation/val.txt")]
    assert report.findings[1].message == ("ImageSets/Segmentation/val.txt: not there (split files here: default); "
                                          "train reads it unless --val-split names another, and --split NAME checks "
                                          "those")
    assert main(["check-data", "--data-root", str(tmp_path / "voc"), "--workers", "1"]) == 1
    assert "no_split" in capsys.readouterr().out
    assert not doctor.check_data(tmp_path / "voc", ["default"], workers=1).errors  # asked for: checked
    (splits / "default.txt").rename(splits / "train.txt")
    report = doctor.check_data(tmp_path / "voc", workers=1)
    assert [(f.severity, f.kind) for f in report.findings] == [("warning", "missing_split")]
    assert report.facts["splits"]["train"]["pairs"] == 2

    root = clean_dataset(tmp_path / "data")  # a folder dataset of train alone
    shutil.rmtree(root / "val")
    report = doctor.check_data(root, workers=1)
    assert [(f.severity, f.kind, f.path) for f in report.findings] == [("warning", "missing_split", "val")]
    assert report.findings[0].message == ("val: no val/{images,masks} (splits here: train); train reads val unless "
                                          "--val-split names another, and --split NAME checks those")
    assert not doctor.check_data(root, ["train"], workers=1).findings  # the splits given are the ones checked
