"""PASCAL VOC 2012 segmentation: `VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}`.

Split `train_aug` (SBD + VOC train minus VOC val, 10,582 images, the standard training set for VOC results) reads
its masks from `SegmentationClassAug/`, which `resunet download sbd` builds (see `download.py`).
"""

from __future__ import annotations

from pathlib import Path

from .classes import VOC_INFO
from .dataset import PairedDataset, check_expected_classes
from .images import DataError


def find_voc_dir(root: Path) -> Path | None:
    """`root` may be the folder holding VOCdevkit, VOCdevkit itself, or VOC2012."""
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir() and (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    return None


def check_voc_classes(voc_dir: Path, num_classes: int | None, ignore_index: int | None) -> None:
    """VOC's classes are fixed (21, void 255): a model's or a flag's other count or ignore label is one line, as for a
    folder dataset's classes.json (--ignore-index was dropped here, without a word)."""
    check_expected_classes(VOC_INFO, num_classes, ignore_index, voc_dir, "VOC has", "VOC's void label is")


def split_names(split_file: Path) -> list[str]:
    """The image names a VOC split file lists, in order, each once (a name listed twice was trained on twice; the
    data check counted it once); one line, naming the file, if it cannot be read. A BOM (a list saved by Notepad)
    is not part of the first name."""
    try:
        text = split_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{split_file}: not a readable split file ({error})") from None
    return list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))


def voc_dataset(voc_dir: Path, split: str) -> PairedDataset:
    split_file = voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        available = sorted(p.stem for p in split_file.parent.glob("*.txt"))
        raise DataError(f"{split_file}: no such split file (available: {', '.join(available) or 'none'})")
    names = split_names(split_file)
    if not names:  # evaluate and visualize, which run no data check, scored nothing without a word
        raise DataError(f"{split_file}: lists no images")
    mask_dir = voc_dir / ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass")
    images = [voc_dir / "JPEGImages" / f"{name}.jpg" for name in names]
    masks = [mask_dir / f"{name}.png" for name in names]
    missing = [str(p) for pair in zip(images, masks) for p in pair if not p.is_file()]
    if missing:
        raise DataError(f"{split_file}: {len(missing)} listed files are missing, e.g. {missing[0]}")
    return PairedDataset(images, masks, VOC_INFO, description=f"VOC2012 {split} ({voc_dir})")
