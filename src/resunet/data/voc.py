"""PASCAL VOC 2012 segmentation: `VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}`.

Split `train_aug` (SBD + VOC train minus VOC val, 10,582 images, the standard training set for VOC results) reads
its masks from `SegmentationClassAug/`, which `resunet download sbd` builds (see `download.py`).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from .classes import VOC_INFO, ClassInfo
from .dataset import PairedDataset, check_expected_classes, class_file_info
from .images import DataError


def find_voc_dir(root: Path) -> Path | None:
    """`root` may be the folder holding VOCdevkit, VOCdevkit itself, or VOC2012."""
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir() and (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    return None


def voc_class_file(voc_dir: Path) -> Path | None:
    """A classes.json in the tree, nearest first: in VOC2012, VOCdevkit or the folder holding it (whichever level
    --data-root names). A VOC-format export of one's own classes (CVAT's, say) names them there, as a folder dataset
    does; it was passed over, and its masks read as VOC's 21 classes without a word."""
    full = Path(os.path.abspath(voc_dir))  # `--data-root .` inside VOC2012: its parents have names only so
    if full.parent.name == "VOCdevkit":  # VOCdevkit/VOC2012, or VOCdevkit/VOC2007 named itself
        levels = [full, full.parent, full.parent.parent]
    else:  # a VOC2012 in a folder of another name (given as --data-root), or a tree given as itself
        levels = [full, full.parent] if full.name == "VOC2012" else [full]
    return next((level / "classes.json" for level in levels if (level / "classes.json").is_file()), None)


def voc_classes(voc_dir: Path, num_classes: int | None = None, ignore_index: int | None = None) -> ClassInfo:
    """VOC's 21 classes (void 255), or those of the tree's classes.json (`voc_class_file`). A model's or a flag's
    other class count or ignore label is one line (--ignore-index was dropped here, without a word)."""
    path = voc_class_file(voc_dir)
    if path is not None:
        return class_file_info(path, num_classes, ignore_index)
    check_expected_classes(VOC_INFO, num_classes, ignore_index, voc_dir, "VOC has", "VOC's void label is")
    return VOC_INFO


def split_names(split_file: Path) -> list[str]:
    """The image names a VOC split file lists, in order, each once (a name listed twice was trained on twice; the
    data check counted it once); one line, naming the file, if it cannot be read. A BOM (a list saved by Notepad)
    is not part of the first name."""
    try:
        text = split_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{split_file}: not a readable split file ({error})") from None
    return list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))


def named_otherwise(path: Path) -> str:
    """' (NAME.png is there: ...)' for a photo or mask missing under the name a VOC tree reads, where a file of that
    name with another suffix is (a photo saved as PNG); '' if none is."""
    other = next((p for p in sorted(path.parent.glob(f"{glob.escape(path.stem)}.*")) if p.is_file()), None)
    return (f" ({other.name} is there: a VOC tree reads NAME.jpg photos and NAME.png masks; rename it)"
            if other is not None else "")


def voc_dataset(voc_dir: Path, split: str, info: ClassInfo = VOC_INFO) -> PairedDataset:
    """The split's pairs, labelled by `info` (`voc_classes`)."""
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
    missing = [p for pair in zip(images, masks) for p in pair if not p.is_file()]
    if missing:
        raise DataError(f"{split_file}: {len(missing)} listed files are missing, e.g. {missing[0]}"
                        f"{named_otherwise(missing[0])}")
    return PairedDataset(images, masks, info, description=f"VOC2012 {split} ({voc_dir})")
