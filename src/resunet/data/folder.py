"""Custom datasets in folders of images and class-index masks with the same file stems.

Layouts: `root/{train,val,test}/{images,masks}/NAME.*`, or flat `root/{images,masks}` (one split, used for any).
An optional `root/classes.json` (names, palette, ignore index) sets the classes; otherwise `--num-classes` must.

The layout's own checks import no torch (demo-data asks them); the dataset, which does, is imported where it is made.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from .classes import ClassInfo, generic_info
from .images import IMAGE_SUFFIXES, DataError, list_images, nested_images, unread_files, unread_note

if TYPE_CHECKING:
    from .dataset import PairedDataset


def folder_classes(root: Path, num_classes: int | None, ignore_index: int | None) -> ClassInfo:
    from .dataset import class_file_info  # here: the layout's checks need no torch

    classes_json = root / "classes.json"
    if classes_json.is_file():
        return class_file_info(classes_json, num_classes, ignore_index)
    if num_classes is None:
        raise DataError(f"{root}: no classes.json here; pass --num-classes (and --ignore-index if not 255)")
    try:
        return generic_info(num_classes, 255 if ignore_index is None else ignore_index)
    except ValueError as error:
        raise DataError(str(error)) from None


def pairing_name(path: Path) -> str:
    """What an image and its mask share: the stem, in Unicode's composed form. A Mac writes 'café' decomposed (e +
    combining accent), most other tools composed: the same name on screen, and 'no mask café.*' in the check."""
    return unicodedata.normalize("NFC", path.stem)


# What tools add to an image's or a mask's name, as a last word after _ - . or a space: a mask's (CamVid's a_L,
# a_mask, ISIC's a_segmentation, Cityscapes' a_gtFine_labelIds), an image's (DeepGlobe's 1_sat, Cityscapes'
# a_leftImg8bit), or an extension kept (a.jpg.png). Only these: any last word matched scene01_right to scene01_left.
NAME_TAILS = frozenset({
    "mask", "masks", "m", "l", "label", "labels", "lbl", "lab", "gt", "gtfine", "gtcoarse", "seg", "segm",
    "segmentation", "annotation", "annotations", "anno", "ann", "target", "class", "classes", "labelids", "labelid",
    "trainids", "color", "colour", "sat", "img", "image", "im", "rgb", "photo", "raw", "input", "orig", "original",
    "leftimg8bit", *(suffix[1:] for suffix in IMAGE_SUFFIXES)})
LAST_WORD = re.compile(r"^(.+?)[ ._-]+([^ ._-]+)$")


def name_keys(path: Path) -> set[str]:
    """The name in any case, with and without the NAME_TAILS words it ends in."""
    name = whole = pairing_name(path).casefold()
    while (last := LAST_WORD.match(name)) and last.group(2) in NAME_TAILS:
        name = last.group(1)
    return {whole, name}


def near_partners(unpaired: list[Path], others: list[Path]) -> dict[Path, Path]:
    """For files without a partner, the one file of `others` (the other folder's files without a partner) whose name
    is nearly theirs: the same but for case, or for NAME_TAILS words on either side (a_mask.png, CamVid's a_L.png,
    a.jpg.png; DeepGlobe's 1_sat.jpg and 1_mask.png). Pairing stays exact; this names the likely partner in the
    error. A near name shared by two files of either side, or one file near to two, names nobody."""
    by_key: dict[str, list[Path]] = {}
    for other in others:
        for key in name_keys(other):
            by_key.setdefault(key, []).append(other)
    asked = Counter(key for path in unpaired for key in name_keys(path))
    found = {}
    for path in unpaired:
        matches = {by_key[k][0] for k in name_keys(path) if len(by_key.get(k, ())) == 1 and asked[k] == 1}
        if len(matches) == 1:
            found[path] = matches.pop()
    claimed = Counter(found.values())  # frame_9.png and frame_9_rgb.png both near frame_9_gt.png
    return {path: partner for path, partner in found.items() if claimed[partner] == 1}


def partner_hints(unpaired: list[Path], others: list[Path], others_unread: list[Path], folder: str) -> dict[Path, str]:
    """`partner_hint` for each of `unpaired`: `others` are the other folder's files without a partner, and
    `others_unread` its files whose suffix is not read (`unread_files`); `folder` names it in the hints."""
    near = near_partners(unpaired, others)
    unread = {pairing_name(p): p for p in others_unread}
    return {path: partner_hint(path, near.get(path), unread.get(pairing_name(path)), folder) for path in unpaired}


def partner_hint(path: Path, partner: Path | None, unread_twin: Path | None, folder: str) -> str:
    """Why `path` has no partner, when something says: a file of its very name in the other folder whose suffix is
    not read (an .npy mask, a .heic photo), or `near_partners`' answer. Nothing otherwise."""
    if unread_twin is not None:
        return (f" ({folder}/{unread_twin.name} has its name, but {unread_twin.suffix or 'a name without a suffix'}"
                " is not read)")
    if partner is None:
        return ""
    how = "differs only in case" if pairing_name(partner).casefold() == pairing_name(path).casefold() else \
        "has nearly its name"
    return f" ({folder}/{partner.name} {how}: images and masks pair by the exact name, the extension aside)"


def check_unique_stems(folder: Path, files: list[Path]) -> None:
    """Images pair with masks by stem, so a.jpg beside a.png would silently share (or lose) a mask."""
    seen: dict[str, Path] = {}
    for path in files:
        if (name := pairing_name(path)) in seen:
            raise DataError(f"{folder}: {seen[name].name} and {path.name} share the name {path.stem!r}; "
                            "images pair with masks by name, so keep one")
        seen[name] = path


def holds_pairs(folder: Path) -> bool:
    """Whether `folder` holds images/ and masks/ (a split of a folder dataset, or a flat one)."""
    try:
        return (folder / "images").is_dir() and (folder / "masks").is_dir()
    except OSError:  # a folder this user cannot enter (/root, lost+found): is_dir raises EACCES, not False
        return False


def split_folders(root: Path) -> list[str]:
    """The splits of a folder dataset: its subfolders holding images/ and masks/."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if holds_pairs(p))


def layout_error(root: Path, split: str) -> DataError:
    """No `root/split/{images,masks}` and no flat `root/{images,masks}`: a split that is not there (naming those
    that are), or no dataset at all."""
    present = split_folders(root)
    if present:
        return DataError(f"{root}: no split {split!r} (no {root / split}/{{images,masks}}); splits here: "
                         f"{', '.join(present)}")
    return DataError(f"{root}: not a dataset: expected VOCdevkit/VOC2012, {root / split}/{{images,masks}} or "
                     f"{root}/{{images,masks}}")


def find_split_dir(root: Path, split: str) -> Path:
    """Where a split of a folder dataset lies: root/split/{images,masks}, or the flat root/{images,masks}, which
    serves every split only in a dataset without split folders. Beside train/ and val/ (an "all images" pool kept at
    the root), a split spelt wrong (--split Val) was read from the pool, and a model was scored on its own training
    images without a word. layout_error for a split that is not there."""
    folder = root / split if (root / split / "images").is_dir() else root
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir() or (folder == root and split_folders(root)):
        raise layout_error(root, split)
    return folder


def folder_dataset(root: Path, split: str, num_classes: int | None = None, ignore_index: int | None = None) -> PairedDataset:
    split_dir = find_split_dir(root, split)
    image_dir, mask_dir = split_dir / "images", split_dir / "masks"
    info = folder_classes(root, num_classes, ignore_index)
    images = list_images(image_dir)
    masks = list_images(mask_dir)
    for folder, files in ((image_dir, images), (mask_dir, masks)):
        check_unique_stems(folder, files)
    masks_by_stem = {pairing_name(p): p for p in masks}
    missing = [p for p in images if pairing_name(p) not in masks_by_stem]
    if missing:
        image_names = {pairing_name(p) for p in images}
        orphans = [p for p in masks if pairing_name(p) not in image_names]
        hints = partner_hints(missing, orphans, unread_files(mask_dir), "masks")
        example = next((path for path in missing if hints[path]), missing[0])  # one that says why, if any does
        raise DataError(f"{mask_dir}: no mask for {len(missing)} images, e.g. {example.name}{hints[example]}")
    if not images:
        nested = nested_images(image_dir)
        hint = (f" ({len(nested)} in subfolders, such as {nested[0].relative_to(image_dir)}: images and masks are read "
                "only directly in their folders)") if nested else ""
        if not hint and (unread := unread_files(image_dir)):
            hint = f" ({unread_note(unread)})"
        raise DataError(f"{image_dir}: no images{hint}")
    masks = [masks_by_stem[pairing_name(p)] for p in images]
    from .dataset import PairedDataset  # here: the layout's checks need no torch

    return PairedDataset(images, masks, info, description=f"{split_dir}")
