import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from resunet.data.classes import VOC_INFO, voc_colormap
from resunet.data.dataset import open_dataset
from resunet.data.demo import make_demo_dataset
from resunet.data.images import DataError, read_mask, rgb_to_index

from conftest import shared_dir


def test_voc_palette_known_colours():
    colours = voc_colormap(256)
    assert colours[1] == (128, 0, 0)  # aeroplane
    assert colours[3] == (128, 128, 0)  # bird
    assert colours[17] == (128, 64, 0)  # sheep
    assert colours[255] == (224, 224, 192)  # void


def test_demo_data_is_voc_format(tmp_path):
    voc = make_demo_dataset(tmp_path, train=4, val=2, size=48, seed=3)
    names = (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    assert len(names) == 4 and len((voc / "ImageSets/Segmentation/val.txt").read_text().split()) == 2
    image = Image.open(voc / "JPEGImages" / f"{names[0]}.jpg")
    mask = Image.open(voc / "SegmentationClass" / f"{names[0]}.png")
    assert image.format == "JPEG" and image.size == (48, 48)
    assert mask.mode == "P" and mask.getpalette()[3:6] == [128, 0, 0]
    values = set()
    for name in names:
        values |= set(np.unique(np.array(Image.open(voc / "SegmentationClass" / f"{name}.png"))).tolist())
    assert 0 in values and 255 in values  # background and void borders
    assert values - {0, 255} <= {1, 7, 8, 15, 17} and values - {0, 255}  # the demo's object classes
    dataset = open_dataset(tmp_path, "train")
    sample = dataset.load(0)
    assert sample.image.shape == (48, 48, 3) and sample.mask.shape == (48, 48)


def test_same_seed_same_data(tmp_path):
    a = make_demo_dataset(tmp_path / "a", train=2, val=1, size=32, seed=7)
    b = make_demo_dataset(tmp_path / "b", train=2, val=1, size=32, seed=7)
    for name in ("demo_train_00000", "demo_val_00000"):
        assert np.array_equal(np.array(Image.open(a / "SegmentationClass" / f"{name}.png")),
                              np.array(Image.open(b / "SegmentationClass" / f"{name}.png")))


def test_real_voc_rgb_masks_convert_to_class_indices():
    samples = shared_dir("voc-samples")
    expected = {"1": 1, "23": 17, "114": 3}  # aeroplane, sheep, bird
    for stem, class_id in expected.items():
        mask = read_mask(samples / f"{stem}_target.png", VOC_INFO)
        assert mask.shape == (513, 513)
        assert set(np.unique(mask).tolist()) == {0, class_id, 255}
        rgb = np.asarray(Image.open(samples / f"{stem}_target.png").convert("RGB"))
        assert (rgb[mask == class_id] == VOC_INFO.palette[class_id]).all()
        assert (rgb[mask == 255] == (224, 224, 192)).all()


def test_colour_outside_palette_names_the_file(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[2, 3] = (1, 2, 3)
    path = tmp_path / "odd.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(DataError) as info:
        read_mask(path, VOC_INFO)
    assert str(path) in str(info.value) and "(1, 2, 3)" in str(info.value) and "x=3, y=2" in str(info.value)
    assert rgb_to_index(np.zeros((2, 2, 3), np.uint8), VOC_INFO).tolist() == [[0, 0], [0, 0]]
    assert "grey" not in str(info.value)


def test_class_ids_saved_as_rgb_get_a_hint(tmp_path):
    """Ids written in three channels (cv2.imwrite of a 3-channel array) read as colours: (1, 1, 1) is no VOC colour.
    The error said only that; now it says what the mask looks like."""
    ids = np.array([[0, 1, 15], [20, 255, 3]], np.uint8)
    path = tmp_path / "ids.png"
    Image.fromarray(np.repeat(ids[..., None], 3, axis=2)).save(path)
    with pytest.raises(DataError) as info:
        read_mask(path, VOC_INFO)
    assert str(info.value) == (f"{path}: colour (1, 1, 1) at (x=1, y=0) is not in the PASCAL VOC 2012 palette (every "
                               "pixel is grey with a class id as its value (0, 1, 3, 15, 20, 255): class ids saved as "
                               "RGB? Save them as a one-channel (L) or palette PNG)")
    Image.fromarray(ids).save(path)  # as the hint says
    assert (read_mask(path, VOC_INFO) == ids).all()
    ids[0, 0] = 21  # not a VOC class: no hint
    Image.fromarray(np.repeat(ids[..., None], 3, axis=2)).save(path)
    with pytest.raises(DataError, match="palette$"):
        read_mask(path, VOC_INFO)


def make_folder_dataset(root, splits=("train", "val"), classes=None, size=(20, 30)):
    rng = np.random.default_rng(0)
    for split in splits:
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / split / "images" / f"{i}.png")
            Image.fromarray(rng.integers(0, 3, size, dtype=np.uint8)).save(root / split / "masks" / f"{i}.png")
    if classes:
        (root / "classes.json").write_text(json.dumps(classes))


def test_folder_dataset_with_classes_json(tmp_path):
    make_folder_dataset(tmp_path, ("train", "val", "test"),
                        {"classes": ["sky", "road", "car"], "palette": [[1, 1, 1], [2, 2, 2], [3, 3, 3]],
                         "ignore_index": 11})
    test = open_dataset(tmp_path, "test")
    assert len(test) == 3 and test.info.names == ("sky", "road", "car") and test.info.ignore_index == 11
    assert test.load(0).mask.max() <= 2
    with pytest.raises(DataError, match=r"classes.json: ignore index 11, not the 255 expected \(--ignore-index\)$"):
        open_dataset(tmp_path, "test", ignore_index=255)


def test_a_folder_split_that_is_not_there_is_named_with_those_that_are(tmp_path, capsys):
    from resunet.cli import main

    make_folder_dataset(tmp_path / "data", classes={"classes": ["sky", "road", "car"]})
    message = (f"{tmp_path / 'data'}: no split 'test' (no {tmp_path / 'data' / 'test'}/{{images,masks}}); splits here: "
               "train, val")
    with pytest.raises(DataError) as caught:
        open_dataset(tmp_path / "data", "test")
    assert str(caught.value) == message
    assert main(["check-data", "--data-root", str(tmp_path / "data"), "--split", "test"]) == 2
    assert capsys.readouterr().err.strip() == f"resunet check-data: error: {message}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: not a dataset: expected VOCdevkit/VOC2012"):
        open_dataset(tmp_path / "empty", "train")
    # An "all images" pool kept at the root beside the splits: a misspelt split was read from the pool (train and
    # val images, scored as if held out) without a word. A flat dataset without splits still serves every split.
    import shutil

    for folder in ("images", "masks"):
        shutil.copytree(tmp_path / "data" / "train" / folder, tmp_path / "data" / folder)
    with pytest.raises(DataError) as caught:
        open_dataset(tmp_path / "data", "Val")
    assert str(caught.value) == (f"{tmp_path / 'data'}: no split 'Val' (no {tmp_path / 'data' / 'Val'}/{{images,"
                                 "masks}); splits here: train, val")
    capsys.readouterr()
    assert main(["check-data", "--data-root", str(tmp_path / "data"), "--split", "Val"]) == 2  # the data check too
    assert capsys.readouterr().err.strip() == f"resunet check-data: error: {caught.value}"
    shutil.rmtree(tmp_path / "data" / "train")
    shutil.rmtree(tmp_path / "data" / "val")
    assert len(open_dataset(tmp_path / "data", "val")) == len(open_dataset(tmp_path / "data", "train")) > 0
    # A flag's class count against the data's (a model's is said by open_dataset_for_model: "(the model's)").
    with pytest.raises(DataError, match=r"classes.json: lists 3 classes, not the 21 expected \(--num-classes\)$"):
        open_dataset(tmp_path / "data", "val", num_classes=21)


def test_folder_dataset_needs_num_classes_without_classes_json(tmp_path):
    make_folder_dataset(tmp_path)
    with pytest.raises(DataError, match="--num-classes"):
        open_dataset(tmp_path, "train")
    dataset = open_dataset(tmp_path, "train", num_classes=3, ignore_index=9)
    assert dataset.info.num_classes == 3 and dataset.info.ignore_index == 9


def test_mask_value_out_of_range_names_the_file(tmp_path):
    make_folder_dataset(tmp_path)
    bad = tmp_path / "train" / "masks" / "1.png"
    Image.fromarray(np.full((20, 30), 7, np.uint8)).save(bad)
    dataset = open_dataset(tmp_path, "train", num_classes=3)
    with pytest.raises(DataError, match=r"1\.png.*\[7\]"):
        dataset.load(1)


def test_mask_size_mismatch_names_the_file(tmp_path):
    make_folder_dataset(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "train" / "masks" / "2.png")
    with pytest.raises(DataError, match="2.png: mask is 10×10 but its image is 30×20"):
        open_dataset(tmp_path, "train", num_classes=3).load(2)


def test_missing_split_file_lists_available(tmp_path):
    make_demo_dataset(tmp_path, train=1, val=1, size=32)
    with pytest.raises(DataError, match="available: train, val"):
        open_dataset(tmp_path, "trainval")


def test_camvid_layout_reads_with_its_classes():
    camvid = shared_dir("camvid")
    dataset = open_dataset(camvid, "val")
    assert len(dataset) == 101 and dataset.info.num_classes == 11 and dataset.info.ignore_index == 11
    sample = dataset.load(0)
    assert sample.image.shape == (360, 480, 3) and sample.mask.max() <= 11


@pytest.mark.parametrize("fmt, mode", [("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I;16B"), ("PPM", "I")])
def test_16_bit_grey_is_always_read_divided_by_257_whatever_its_values(tmp_path, fmt, mode):
    """A 16-bit file's scale is in its mode: a dark one (every value ≤ 255) is not read 257× too bright, and one
    bright pixel does not change how the others are read. A 16-bit PGM opens as mode "I", whose scale was guessed
    from the values (a helper, 2026-12-06)."""
    from resunet.data.images import read_image

    def written(values: list[int], name: str) -> np.ndarray:
        image = Image.new(mode, (len(values), 1))
        for x, value in enumerate(values):
            image.putpixel((x, 0), value)
        path = tmp_path / name
        image.save(path, fmt)
        assert Image.open(path).mode == mode  # really read back as 16-bit
        pixels = read_image(path)
        assert pixels.shape == (1, len(values), 3) and (pixels == pixels[..., :1]).all()
        return pixels[0, :, 0]

    dark = written([100, 200], "dark.img")
    assert dark.tolist() == [0, 1]  # 100/257 → 0.39, 200/257 → 0.78, rounded
    with_bright = written([100, 200, 300, 65535], "bright.img")
    assert with_bright.tolist() == [0, 1, 1, 255]  # the same pixels read the same, with or without the bright one


def test_a_12_bit_pgm_is_read_from_its_maxval(tmp_path):
    # Pillow scales a PGM's maxval (4095 here, a 12-bit camera) to 0..65535: white is its maxval, as declared.
    from resunet.data.images import read_image

    path = tmp_path / "frame.pgm"
    path.write_bytes(b"P5\n3 1\n4095\n" + np.array([4095, 2048, 16], ">u2").tobytes())
    assert read_image(path)[0, :, 0].tolist() == [255, 128, 1]


def test_a_colour_mask_resaved_with_a_palette_of_its_own_is_read_by_colour(tmp_path):
    # PNG optimisers (optipng, oxipng) and editors re-save an RGB colour mask as a palette PNG in their own order; its
    # indices were read as class ids: classes 0, 3, 8 came out as 0, 1, 2, and the data check saw nothing wrong.
    from resunet.data.classes import ClassInfo

    info = ClassInfo.from_dict(json.loads((shared_dir("camvid") / "classes.json").read_text()))
    truth = np.zeros((8, 12), dtype=np.uint8)
    truth[:, 4:8], truth[:, 8:] = 3, 8
    truth[0, 0] = info.ignore_index
    rgb = np.array([info.palette[c] if c < info.num_classes else info.ignore_colour for c in truth.ravel()],
                   dtype=np.uint8).reshape(8, 12, 3)
    resaved = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    resaved.save(tmp_path / "resaved.png")
    with Image.open(tmp_path / "resaved.png") as check:
        assert not np.array_equal(np.array(check), truth)  # its indices are not the classes
    assert np.array_equal(read_mask(tmp_path / "resaved.png", info), truth)
    # Class ids under a palette of their own (greyscale, here): still the ids, even where one index's grey is the
    # ignore colour (black) of this dataset.
    ids = Image.fromarray(truth.clip(0, 8), mode="L").convert("P")
    ids.putpalette([v for i in range(256) for v in (i, i, i)])
    ids.save(tmp_path / "ids.png")
    assert np.array_equal(read_mask(tmp_path / "ids.png", info), truth.clip(0, 8))
    only_class_0 = Image.fromarray(np.zeros((4, 4), dtype=np.uint8), mode="L").convert("P")
    only_class_0.putpalette([v for i in range(256) for v in (i, i, i)])
    only_class_0.save(tmp_path / "zeros.png")
    assert (read_mask(tmp_path / "zeros.png", info) == 0).all()


def test_class_ids_under_a_palette_whose_unset_entries_are_black_stay_ids(tmp_path):
    # User code writes ids and fills only its classes' palette entries; the rest stay black, the colour of class 0.
    # Read by colour, the void index 255 (and a class whose entry was left out) became class 0 without a word.
    from resunet.data.classes import ClassInfo, generic_info

    ids = np.array([[0, 1, 2, 255], [1, 1, 2, 255]], dtype=np.uint8)
    for info, filled in ((generic_info(3), 3), (generic_info(3), 2),
                         (ClassInfo.from_dict({"classes": ["background", "car", "tree"],
                                               "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]]}), 3)):
        palette = np.zeros((256, 3), np.uint8)
        palette[:filled] = np.array(info.palette[:filled], dtype=np.uint8)
        mask = Image.fromarray(ids, "P")
        mask.putpalette(palette.ravel().tolist())
        mask.save(tmp_path / "ids.png")
        assert np.array_equal(read_mask(tmp_path / "ids.png", info), ids), (info.names, filled)


def test_macos_appledouble_files_beside_the_images_are_not_images(tmp_path):
    # A copy from a Mac to exFAT/SMB leaves ._name.jpg (metadata, not a picture) beside every file: they were listed
    # as images and masks, and the data check refused each as unreadable.
    from test_doctor import clean_dataset

    from resunet.doctor import check_data

    root = clean_dataset(tmp_path / "data")
    for split in ("train", "val"):
        for folder in ("images", "masks"):
            for path in list((root / split / folder).iterdir()):
                (path.parent / f"._{path.name}").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    assert [p.name for p in open_dataset(root, "train").image_paths] == [f"good_{i}.png" for i in range(4)]
    assert not [f for f in check_data(root, workers=1).findings if f.severity == "error"]


def test_a_voc_split_list_with_a_bom_a_name_twice_or_no_name(tmp_path):
    voc = make_demo_dataset(tmp_path, train=3, val=2, size=32)
    lists = voc / "ImageSets" / "Segmentation"
    names = lists.joinpath("train.txt").read_text().split()
    # Notepad's BOM was read into the first name ("2 listed files are missing, e.g. .../\ufeffdemo_train_00000.jpg")
    # and a name listed twice was trained on twice
    lists.joinpath("train.txt").write_text("\ufeff" + "\r\n".join(names + names[:1]) + "\r\n", encoding="utf-8")
    assert [p.stem for p in open_dataset(tmp_path, "train").image_paths] == names
    lists.joinpath("val.txt").write_text("\n")  # evaluate and visualize scored nothing without a word
    with pytest.raises(DataError, match="val.txt: lists no images"):
        open_dataset(tmp_path, "val")


def test_a_voc_root_refuses_another_class_count_or_void_label(tmp_path, capsys):
    from resunet.cli import main

    voc = make_demo_dataset(tmp_path, train=3, val=2, size=32)
    assert open_dataset(tmp_path, "val", num_classes=21, ignore_index=255).info.ignore_index == 255
    with pytest.raises(DataError, match=r"VOC has 21 classes, not the 5 expected \(--num-classes\)$"):
        open_dataset(tmp_path, "val", num_classes=5)
    # --ignore-index 0 was dropped without a word: void stayed 255 and class 0 was trained on
    message = f"{voc}: VOC's void label is 255, not the 0 expected (--ignore-index)"
    with pytest.raises(DataError) as caught:
        open_dataset(tmp_path, "val", ignore_index=0)
    assert str(caught.value) == message
    # The data check (which train runs first) says the same, before reading any image
    assert main(["check-data", "--data-root", str(tmp_path), "--ignore-index", "0"]) == 2
    assert capsys.readouterr().err.strip() == f"resunet check-data: error: {message}"


def test_jfif_jpe_and_gif_files_are_images_and_masks(tmp_path):
    # A browser saves photos as .jfif: the image was not listed, so it and its mask dropped out of every split
    # without a word (only check-data named the mask as an orphan).
    make_folder_dataset(tmp_path, ("train",))
    images, masks = tmp_path / "train" / "images", tmp_path / "train" / "masks"
    rng = np.random.default_rng(1)
    for name, image_suffix, mask_suffix in (("web", ".jfif", ".png"), ("old", ".jpe", ".gif"), ("anim", ".gif", ".png")):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(
            images / f"{name}{image_suffix}", "GIF" if image_suffix == ".gif" else "JPEG")
        mask = Image.fromarray(np.full((20, 30), 2, np.uint8), "P")
        mask.putpalette(VOC_INFO.palette_bytes())  # a GIF's saver may renumber its palette; its colours say the class
        mask.save(masks / f"{name}{mask_suffix}")
    dataset = open_dataset(tmp_path, "train", num_classes=3)
    assert [p.name for p in dataset.image_paths] == ["0.png", "1.png", "2.png", "anim.gif", "old.jpe", "web.jfif"]
    for index in range(3, 6):
        sample = dataset.load(index)
        assert sample.image.shape == (20, 30, 3) and (sample.mask == 2).all()


@pytest.mark.parametrize("classes", [(0, 1), (0,)])
def test_void_in_a_palette_compacted_on_saving_stays_void(tmp_path, classes):
    """Found by a helper: Pillow's GIF writer drops unused palette entries, so a VOC mask of classes 0..m-1 and void
    comes back with void's colour at index m, and void was read as class m (bicycle; aeroplane for background alone)
    without a word. The colour says void; black at such an index still proves nothing (CamVid's void is black)."""
    ids = np.zeros((8, 8), np.uint8)
    ids[2:6, 2:6] = classes[-1]
    ids[0] = 255
    mask = Image.fromarray(ids, "P")
    mask.putpalette(VOC_INFO.palette_bytes())
    mask.save(tmp_path / "m.gif")
    saved = Image.open(tmp_path / "m.gif")
    assert sorted(np.unique(np.array(saved)).tolist()) == list(range(len(classes) + 1))  # compacted by the writer
    assert (read_mask(tmp_path / "m.gif", VOC_INFO) == ids).all()


def test_one_bit_and_grey_alpha_masks_are_class_indices(tmp_path):
    # Both were refused ("unsupported mask mode"): a 1-bit PNG is how many tools save a binary mask.
    indices = np.array([[0, 1, 1], [1, 0, 0]], np.uint8)
    Image.fromarray(indices.astype(bool)).save(tmp_path / "binary.png")
    Image.fromarray(indices * 2, "L").convert("LA").save(tmp_path / "grey_alpha.png")
    assert Image.open(tmp_path / "binary.png").mode == "1" and Image.open(tmp_path / "grey_alpha.png").mode == "LA"
    assert read_mask(tmp_path / "binary.png", VOC_INFO).tolist() == indices.tolist()
    assert read_mask(tmp_path / "grey_alpha.png", VOC_INFO).tolist() == (indices * 2).tolist()


def test_a_mask_drawn_on_a_turned_photos_stored_pixels_says_so(tmp_path):
    # evaluate and visualize run no data check: their size error now carries the data check's hint.
    make_folder_dataset(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 30 wide and 20 high, shown 20 wide and 30 high
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "train" / "images" / "2.jpg", exif=exif)
    (tmp_path / "train" / "images" / "2.png").unlink()
    dataset = open_dataset(tmp_path, "train", num_classes=3)
    with pytest.raises(DataError) as caught:
        dataset.load(2)
    assert str(caught.value) == (f"{tmp_path / 'train' / 'masks' / '2.png'}: mask is 30×20 but its image is 20×30 (the "
                                 "image is EXIF-rotated; the mask matches it unrotated?)")


def twelve_bit_tiff(path, values: list[int]) -> None:
    """A one-row grey TIFF of 12 bits a sample (BitsPerSample 12, as some cameras and microscopes write), two values
    packed in three bytes."""
    assert len(values) == 2
    data = bytes([values[0] >> 4, ((values[0] & 15) << 4) | (values[1] >> 8), values[1] & 255])
    entries = [(256, 3, 2), (257, 3, 1), (258, 3, 12), (259, 3, 1), (262, 3, 1), (273, 4, None), (277, 3, 1),
               (278, 3, 1), (279, 4, len(data))]
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(entries) + 4
    out = b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_at if tag == 273 else value
        out += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else
                                                    struct.pack("<I", value))
    path.write_bytes(out + struct.pack("<I", 0) + data)


def test_tiffs_turned_deep_or_over_pils_ceiling_read_as_the_other_formats(tmp_path, monkeypatch):
    """Three ways TIFF differs from the other formats, each found by a helper (2026-12-06): PIL gives a turned TIFF's
    size as shown already, and image_size swapped it again (the decoded cache was sized for the stored picture: its
    build stopped with a traceback); PIL checks its own pixel ceiling again when a TIFF's pixels are decoded, after
    --max-pixels had lifted it for the header; a 12-bit TIFF decodes as 16-bit grey and was divided by 257 (white
    came out level 16)."""
    from resunet.data.cache import build_cache
    from resunet.data.images import image_size, read_image

    root = tmp_path / "turned"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.json").write_text(json.dumps({"classes": ["a", "b"]}))
    stored = np.random.default_rng(0).integers(0, 255, (4, 6, 3), dtype=np.uint8)  # 6 wide, 4 tall as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned: 4 wide, 6 tall
    Image.fromarray(stored).save(root / "images" / "p.tif", exif=exif.tobytes())
    Image.fromarray(np.zeros((6, 4), np.uint8)).save(root / "masks" / "p.png")
    assert read_image(root / "images" / "p.tif").shape == (6, 4, 3)
    assert image_size(root / "images" / "p.tif") == (4, 6)
    dataset = open_dataset(root, "train")
    cache = build_cache(dataset, 8, tmp_path / "cache")
    assert len(cache) == 1

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's ceiling 2,000 pixels: stands in for its 179 MP
    for suffix in ("png", "tif"):
        Image.new("RGB", (50, 50), (10, 20, 30)).save(tmp_path / f"big.{suffix}")
        assert read_image(tmp_path / f"big.{suffix}", max_pixels=10_000)[0, 0].tolist() == [10, 20, 30]
    assert Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.undo()

    twelve_bit_tiff(tmp_path / "deep.tif", [4095, 2048])
    assert read_image(tmp_path / "deep.tif")[0, :, 0].tolist() == [255, 128]


def test_a_scale_that_rounds_to_no_pixel_still_gives_a_crop():
    """--size 64 --scale-min 0.01: the simple path drew a 0-pixel side and stopped with a traceback (the cached path
    makes it one pixel)."""
    from resunet.data.sample_transforms import TrainTransform

    transform = TrainTransform(64, (0.01, 0.01), (0.5,) * 3, (0.5,) * 3, 255, 0.2)
    image, mask = transform(np.zeros((40, 50, 3), np.uint8), np.zeros((40, 50), np.uint8))
    assert tuple(image.shape) == (3, 64, 64) and tuple(mask.shape) == (64, 64)


EXIF_TURNS = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: lambda a: np.swapaxes(a, 0, 1),
              6: lambda a: np.rot90(a, -1), 7: lambda a: np.swapaxes(np.rot90(a, 2), 0, 1), 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", sorted(EXIF_TURNS))
def test_tiffs_of_every_mode_read_upright_for_every_orientation(tmp_path, orientation):
    """An 8-bit grey or palette TIFF stored turned by 90° came out scrambled when PIL memory-mapped the file (found
    2026-12-06: Pillow 13 turns the mapped image in place), RGB ones right: each mode, image and mask, against the
    orientation's definition (EXIF 2.3: 6 = turn 90° clockwise to show)."""
    from resunet.data.classes import ClassInfo
    from resunet.data.images import read_image

    stored = np.arange(6 * 4, dtype=np.uint8).reshape(4, 6) * 10  # every pixel different: any scramble shows
    exif = Image.Exif()
    exif[0x0112] = orientation
    shown = EXIF_TURNS[orientation](stored)
    palette = Image.fromarray(stored, "L").convert("P")
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    for name, image in {"grey": Image.fromarray(stored, "L"), "palette": palette,
                        "rgb": Image.fromarray(np.repeat(stored[..., None], 3, axis=2))}.items():
        image.save(tmp_path / f"{name}.tif", exif=exif.tobytes())
        assert read_image(tmp_path / f"{name}.tif")[..., 0].tolist() == shown.tolist(), name
    info = ClassInfo(tuple(f"c{i}" for i in range(240)), tuple((i, i, i) for i in range(240)))
    assert read_mask(tmp_path / "grey.tif", info).tolist() == shown.tolist()


def test_reading_an_image_holds_few_copies_of_it(tmp_path):
    """A 64 MP upload took 1.1 GB to read (a helper, 2026-12-06): EXIF turning and RGB conversion each copied the
    whole picture. Now PIL's decode (4 bytes a pixel), the bytes numpy copies from and the array (3 and 3): the
    peak growth of a fresh process reading a 16 MP PNG, and a 16 MP JPEG stored turned, stays under 12 bytes a
    pixel (it was 18)."""
    import subprocess
    import sys

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (4000, 4000), (10, 20, 30)).save(tmp_path / "flat.png")
    Image.new("RGB", (4000, 4000), (10, 20, 30)).save(tmp_path / "turned.jpg", exif=exif.tobytes())
    # VmHWM, the peak of this process's memory (getrusage's ru_maxrss starts from the parent's, pytest's, peak).
    probe = ("import re, sys\n"
             "from resunet.data.images import read_image\n"
             "def peak(): return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
             "data = open(sys.argv[1], 'rb').read()\n"
             "before = peak()\n"
             "image = read_image(data)\n"
             "assert image.shape == (4000, 4000, 3) and image.flags.writeable and image[5, 5].tolist() == [10, 20, 30]\n"
             "print(peak() - before)\n")
    for name in ("flat.png", "turned.jpg"):
        grown_kb = int(subprocess.run([sys.executable, "-c", probe, str(tmp_path / name)], capture_output=True,
                                      text=True, check=True).stdout)
        assert 4 * 4000 * 4000 < grown_kb * 1024 < 12 * 4000 * 4000, (name, grown_kb)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_chunks(before: list[bytes] = (), after: list[bytes] = (), garbled_pixels: bool = False) -> bytes:
    """A 30 wide, 20 high RGB PNG with extra chunks after its header or after its pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    header_end, end = 8 + 25, data.rindex(b"IEND") - 4
    pixels = data[header_end:end]
    if garbled_pixels:  # an IDAT chunk of the same length whose contents no decoder can inflate
        length = struct.unpack(">I", pixels[:4])[0]
        pixels = png_chunk(b"IDAT", b"\xff" * length) + pixels[12 + length:]
    return data[:header_end] + b"".join(before) + pixels + b"".join(after) + data[end:]


def test_a_pngs_orientation_is_read_from_its_chunks_wherever_they_are_without_decoding_its_pixels():
    """The service reads an upload's header before deciding to decode it. For a PNG whose EXIF block follows its
    pixels PIL decodes the whole image to find it, so the header read took orientation 1 there, and likewise for an
    orientation given as a text chunk (ImageMagick's raw EXIF profile, XMP): the service's X-Image-Orientation said
    1 of a mask it had turned. The header read now walks the chunks, skipping the pixel data unread."""
    from resunet.data.images import read_header, read_image

    exif = Image.Exif()
    exif[0x0112] = 6
    raw = exif.tobytes()
    profile = f"\nexif\n{len(raw):8d}\n{raw.hex()}".encode()
    turned = {
        "an EXIF block after the pixels": png_with_chunks(after=[png_chunk(b"eXIf", raw)]),
        "an EXIF block before them": png_with_chunks(before=[png_chunk(b"eXIf", raw)]),
        "a raw EXIF profile in text": png_with_chunks(before=[png_chunk(b"tEXt", b"Raw profile type exif\0" + profile)]),
        "a compressed one after the pixels": png_with_chunks(
            after=[png_chunk(b"zTXt", b"Raw profile type exif\0\0" + zlib.compress(profile))]),
    }
    for case, data in turned.items():
        header = read_header(data, name=case)
        assert (header.width, header.height, header.orientation) == (20, 30, 6), case
        assert read_image(data).shape == (30, 20, 3), case  # as the decoded image is turned
    xmp = png_with_chunks(after=[png_chunk(b"iTXt", b'XML:com.adobe.xmp\0\0\0\0\0<x tiff:Orientation="8"/>')])
    assert read_header(xmp).orientation == 8 and read_image(xmp).shape == (30, 20, 3)
    assert read_header(png_with_chunks()).orientation == 1
    # An animated PNG is read as PIL reads its first frame: up to the next frame's control chunk.
    frames = [Image.fromarray(np.full((20, 30, 3), level, np.uint8)) for level in (10, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    apng = buffer.getvalue()
    first_pixels = apng.index(b"IDAT")
    past_them = first_pixels + 8 + struct.unpack(">I", apng[first_pixels - 4:first_pixels])[0]
    end = apng.rindex(b"IEND") - 4
    for data, orientation in ((apng[:past_them] + png_chunk(b"eXIf", raw) + apng[past_them:], 6),
                              (apng[:end] + png_chunk(b"eXIf", raw) + apng[end:], 1)):  # past frame 2: not read
        assert read_header(data).orientation == orientation
        assert read_image(data).shape == ((30, 20, 3) if orientation == 6 else (20, 30, 3))
    # No pixel is decoded: pixel data no decoder can read still gives its header and the orientation after it.
    garbled = png_with_chunks(after=[png_chunk(b"eXIf", raw)], garbled_pixels=True)
    assert read_header(garbled).orientation == 6
    with pytest.raises(DataError, match="not a readable image"):
        read_image(garbled)


def test_a_folder_this_user_cannot_enter_is_not_a_dataset_and_not_a_traceback(tmp_path, monkeypatch):
    """For a user who is not root, Path.is_dir raises PermissionError (EACCES) inside a folder it cannot enter,
    where it returns False for a missing one. predict's --out looks for a dataset at every parent folder, so at /
    it met /root/images and stopped in a traceback; a data root beside lost+found did too (a helper, 2026-12-06).
    As root nothing is refused, so the refusal is made as the kernel makes it for another user."""
    import errno
    import pathlib

    from resunet.data.dataset import data_locations
    from resunet.data.folder import split_folders
    from resunet.outputs import data_folder_around

    for split in ("train", "val"):
        for part in ("images", "masks"):
            (tmp_path / "data" / split / part).mkdir(parents=True)
    (tmp_path / "data" / "lost+found").mkdir()
    (tmp_path / "locked").mkdir()
    real_is_dir = pathlib.Path.is_dir

    def is_dir(path):
        if path.parent.name in ("lost+found", "locked"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_is_dir(path)

    monkeypatch.setattr(pathlib.Path, "is_dir", is_dir)
    assert split_folders(tmp_path / "data") == ["train", "val"]
    assert data_locations(tmp_path / "locked" / "x") == ([], [])
    assert data_folder_around(tmp_path / "preds") is None  # tmp_path holds locked/, whose entries cannot be seen
    assert data_folder_around(tmp_path / "data" / "train" / "images" / "out") == tmp_path / "data" / "train" / "images"


def test_at_exit_only_resunets_own_workers_are_killed(tmp_path):
    """Found by a helper: the exit hook that SIGKILLs DataLoader workers (they ignore SIGTERM) killed every daemonic
    child of the program, so a user's own child never ran its SIGTERM clean-up. Ours, started by start_workers, are
    still killed: a pass left open at exit does not hang it."""
    import subprocess
    import sys

    marker = tmp_path / "cleaned-up"
    script = f"""
import multiprocessing, signal, sys, time
import torch
from torch.utils.data import DataLoader
from resunet.data.dataset import start_workers, worker_ignores_ctrl_c

def child():
    signal.signal(signal.SIGTERM, lambda *_: (open({str(marker)!r}, "w").close(), sys.exit(0)))
    time.sleep(60)

if __name__ == "__main__":
    mine = multiprocessing.get_context("fork").Process(target=child, daemon=True)
    mine.start()
    batches = start_workers(DataLoader(list(range(100)), batch_size=2, num_workers=2,
                                       worker_init_fn=worker_ignores_ctrl_c))
    next(batches)  # a pass left open at exit: its workers are ours
    time.sleep(0.5)
"""
    # Ours ignore SIGTERM: not killed, multiprocessing's exit would wait for them for ever (the timeout fails it)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert marker.exists()  # the user's child got SIGTERM, not SIGKILL


def rle_bmp(width: int, height: int, rows: list[bytes]) -> bytes:
    """An 8-bit run-length-compressed BMP (rows bottom up, each ending 00 00), palette index i = (i, 2i, 3i) RGB."""
    data = b"".join(row + b"\x00\x00" for row in rows) + b"\x00\x01"
    palette = b"".join(bytes((3 * i % 256, 2 * i % 256, i, 0)) for i in range(256))  # stored B, G, R, 0
    offset = 14 + 40 + len(palette)
    return (b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset)
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(data), 2835, 2835, 256, 0) + palette + data)


def test_a_large_run_length_compressed_bmp_is_refused_before_its_slow_decode(tmp_path):
    """Found by a helper: Pillow decodes RLE BMP in Python, so a 33 KB 8000×8000 one held a CPU for 10 s (a 64 MP
    PNG: 0.55 s), and a few such uploads held the service. Refused over 4 MP from the header; small ones are read."""
    from resunet.data.images import ImageTooLargeError, read_image

    (tmp_path / "small.bmp").write_bytes(rle_bmp(4, 2, [b"\x02\x01\x02\x02", b"\x04\x03"]))
    assert read_image(tmp_path / "small.bmp").tolist() == [[[3, 6, 9]] * 4, [[1, 2, 3]] * 2 + [[2, 4, 6]] * 2]
    (tmp_path / "large.bmp").write_bytes(rle_bmp(2500, 2000, [b"\x01\x00"] * 2000))
    with pytest.raises(ImageTooLargeError, match=r"large.bmp: image of 2500×2000 is a run-length-compressed BMP, which "
                                                  r"Pillow decodes in Python \(seconds for a large one\); over "
                                                  r"4,000,000 pixels it is not read: save it as PNG$"):
        read_image(tmp_path / "large.bmp")


def test_a_voc_tree_with_a_classes_json_is_read_with_its_classes(tmp_path, capsys):
    """A VOC-format export of one's own classes (CVAT's: RGB masks in its colours, the names in a classes.json) was
    read as VOC's 21 classes: check-data called every colour off VOC's palette, train took index masks for VOC's
    classes, without a word (a helper's audit, 2026-12-07). The file is found at any level of the tree."""
    from resunet.cli import main
    from resunet.data.dataset import data_locations

    make_demo_dataset(tmp_path, train=2, val=1, size=32)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    palette = np.array([[10, 10, 10], [0, 200, 0], [200, 0, 200]], dtype=np.uint8)
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["ground", "crop", "weed"],
                                                       "palette": palette.tolist()}))
    ids = {}
    for number, path in enumerate(sorted((voc / "SegmentationClass").glob("*.png"))):
        ids[path.stem] = (np.arange(32 * 32).reshape(32, 32) // 32 + number) % 3
        Image.fromarray(palette[ids[path.stem]]).save(path)  # RGB, in the file's colours
    levels = [(None, tmp_path), (None, voc.parent), (None, voc), (voc, "."), (voc.parent, "VOC2012"),
              (voc.parent, ".")]
    for cwd, level in levels:  # given relative too: `--data-root .` inside VOC2012 has parents without names
        with pytest.MonkeyPatch.context() as where:
            if cwd is not None:
                where.chdir(cwd)
            dataset = open_dataset(level, "train")
            assert dataset.info.names == ("ground", "crop", "weed") and dataset.info.ignore_index == 255, level
            for index, image in enumerate(dataset.image_paths):
                np.testing.assert_array_equal(dataset[index].mask, ids[image.stem])
    # In VOCdevkit beside a tree of another name, given as itself (VOCdevkit/VOC2007)
    (tmp_path / "classes.json").rename(voc.parent / "classes.json")
    voc.rename(voc.parent / "VOC2007")
    assert open_dataset(voc.parent / "VOC2007", "train").info.names == ("ground", "crop", "weed")
    (voc.parent / "VOC2007").rename(voc)
    (voc.parent / "classes.json").rename(tmp_path / "classes.json")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'classes.json'}: lists 3 classes, not the 21 expected "
                                        r"\(--num-classes\)$"):
        open_dataset(voc, "val", num_classes=21)
    assert data_locations(voc)[1] == [tmp_path / "classes.json"]  # an output may not go over it
    assert main(["check-data", "--data-root", str(tmp_path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out and "palette" not in out, out
