"""The dataset doctor: read every (image, mask) pair once and report what would spoil training, grouped and counted.

    resunet check-data --data-root DIR [--split S ...] [--json OUT] [--plot PNG]

Checks are plain functions that return `Finding`s: errors (training cannot use the file), warnings (likely mistakes,
each with its reason) and, beside them, facts (counts, sizes, class shares, image kinds that are converted when
read). `format_report` writes them for people, `write_json` for programs. `train` runs the same `check_data` on its
splits before its first step, with the report cached by the files' sizes and modification and change times.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .data.classes import ClassInfo
from .data.dataset import PairedDataset
from .data.folder import (find_split_dir, folder_classes, layout_error, pairing_name, partner_hints,
                          split_folders)
from .data.images import (DEFAULT_MAX_PIXELS, INDEX_MASK_MODES, INT_MASK_MODES, RGB_MASK_MODES, TURNED_MASK_HINT,
                          SWAPPING_ORIENTATIONS, DataError, ImageTooLargeError, index_mask, list_images, looked_at,
                          nested_images, opened, palette_reading, read_image, rgb_mask_hint, unread_files, unread_note)
from .data.voc import find_voc_dir, named_otherwise, split_names, voc_classes
from .outputs import replace_text, save_figure, subplots, write_output

# Part of the cache key: a change in what the checks find must not reuse old reports (10: 16-bit PGMs, compacted
# palette masks, splits beside a root pool, datasets without a split to check; 11: no binary_255 for masks read by
# colour, a VOC photo of another suffix named)
REPORT_FORMAT = 11
NEAR_DUPLICATE_BITS = 4  # difference hashes at most this many bits apart (of 64): the same picture
NEAR_PALETTE = 32  # an off-palette colour within this many levels (every channel) of a palette colour is "near"
SHOWN_PER_KIND = 3
EXIF_ORIENTATIONS = {2: "mirrored", 3: "turned 180°", 4: "upside down", 5: "mirrored and turned", 6: "turned 90°",
                     7: "mirrored and turned", 8: "turned 270°"}

# kind → (severity, what the kind means; for warnings, why it is likely a mistake). The order is the report's order.
KINDS: dict[str, tuple[str, str]] = {
    "unreadable": ("error", "files that cannot be read (broken, truncated, not an image, unsupported mask mode)"),
    "too_large": ("error", "files over --max-pixels, refused from their header (decompression bombs?)"),
    "empty_split": ("error", "split folders without images"),
    "no_split": ("error", "no split to check (no --split given, and no train or val): nothing was read"),
    "half_split": ("error", "a train or val folder with images/ but no masks/ (or masks/ but no images/): training "
                            "reads both folders of both splits"),
    "unlabelled_split": ("error", "splits whose masks are all the ignore label: nothing to learn from, or to score "
                                  "(mIoU is undefined, so no best.pt could be chosen)"),
    "missing_mask": ("error", "images without a mask of the same name"),
    "orphan_mask": ("error", "masks without an image of the same name"),
    "same_name": ("error", "two images (or two masks) with the same name and different extensions: images pair "
                           "with masks by name, so one of them would share or lose its mask"),
    "missing_file": ("error", "split files naming absent images or masks"),
    "size_mismatch": ("error", "masks whose size differs from their image's"),
    "mask_values": ("error", "masks with values outside 0..C-1 and the ignore index"),
    "off_palette": ("error", "RGB masks with colours outside the dataset's palette"),
    "exif_orientation": ("warning", "images stored flipped or turned (EXIF orientation) whose mask fits both the "
                                    "stored and the shown picture: masks are read against the picture as shown, so "
                                    "one drawn on the stored pixels would be misaligned without any error — check"),
    "missing_split": ("warning", "no train or no val split, the two `resunet train` reads unless --train-split or "
                                 "--val-split name others (looked for when no --split is given)"),
    "nested_files": ("warning", "images or masks in subfolders of images/ or masks/: not read (only files directly in "
                                "those folders are)"),
    "unread_files": ("warning", "files in images/ or masks/ whose suffix is not an image suffix read here (.heic, "
                                ".jxl, .npy): not read, so not trained on or scored"),
    "mask_orientation": ("warning", "masks that carry an EXIF orientation: a mask is read as stored, never turned (its "
                                    "image is read as shown), so a mask painted over a copy of a turned photo does not "
                                    "fit it"),
    "jpeg_mask": ("warning", "masks stored as JPEG: lossy compression turns class edges into noise values, which "
                             "read as other classes — store masks as PNG"),
    "mask_alpha": ("warning", "masks with transparent pixels: a mask is read by its colour (or grey) alone, so a pixel "
                              "left transparent is the class its hidden colour names, not unlabelled — paint unlabelled "
                              "pixels in the ignore colour"),
    "lossy_mask": ("warning", "RGB masks with many colours near (not equal to) palette colours: they went through "
                              "lossy compression, and the edges became noise"),
    "binary_255": ("warning", "binary masks with only 0 and 255 where 255 is the ignore label: the object would be "
                              "ignored and the model learns only background — store the object as 1"),
    "one_class": ("warning", "masks that are all one class (or all ignore): nothing to tell apart — an empty or "
                             "failed annotation?"),
    "class_not_in_train": ("warning", "classes in a split but never in the training split: the model cannot learn "
                                      "them and scores 0 IoU on them"),
    "duplicate": ("warning", "the same image (identical pixels) in two splits: train/val leakage inflates every "
                             "score"),
    "near_duplicate": ("warning", f"nearly the same image (difference hash ≤ {NEAR_DUPLICATE_BITS} of 64 bits apart: "
                                  "re-encoded, resized, brightened) in two splits: leakage inflates every score"),
    "shared_split": ("warning", "two splits read the same folder (flat layout): validation on training images"),
    "palette_mixed": ("warning", "palette masks of one split read two ways: by colour (every index shows a dataset "
                                 "colour, some another class's) and by index (some colour is not the dataset's): "
                                 "class ids stored under a palette that shows other classes' colours (VOC's, say) "
                                 "are then read as other classes in some images — re-save them as index PNGs "
                                 "without that palette, or as RGB masks in the dataset's colours"),
}


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" or "warning"
    kind: str  # a key of KINDS
    path: str  # the file, relative to the data root (a split's name for split-wide findings)
    message: str  # one line that names the file and the problem


def finding(kind: str, path: str, message: str) -> Finding:
    return Finding(KINDS[kind][0], kind, path, message)


@dataclass
class Report:
    root: str
    findings: list[Finding]
    facts: dict
    from_cache: bool = False
    cache_note: str | None = None  # why the report could not be kept in `cache_dir` (it is checked again next time)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def to_dict(self) -> dict:
        return {"root": self.root, "errors": len(self.errors), "warnings": len(self.warnings),
                "findings": [asdict(f) for f in self.findings], "facts": self.facts}

    @classmethod
    def from_dict(cls, values: dict) -> "Report":
        return cls(values["root"], [Finding(**f) for f in values["findings"]], values["facts"])


# ---- listing: which pairs exist, and which files have no partner -------------------------------------------------


@dataclass
class Listing:
    base: Path  # paths in findings are relative to this (the data root, or VOC2012 for VOC)
    layout: str  # "voc" or "folder"
    info: ClassInfo
    splits: dict[str, PairedDataset]  # the complete (image, mask) pairs of each split
    files: list[Path] = field(default_factory=list)  # every file the report depends on (for the cache key)
    findings: list[Finding] = field(default_factory=list)


def relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def list_folder_splits(root: Path, splits: list[str] | None, num_classes: int | None, ignore_index: int | None,
                       max_pixels: int | None) -> Listing:
    """`root/{split}/{images,masks}` or flat `root/{images,masks}`, listed directly: `open_dataset` stops at the
    first image without a mask, the doctor wants them all (and the masks without images)."""
    halves = []  # the split folders `resunet train` reads, half there: passed over, train then refused the data
    missing_splits: list[str] = []
    if splits is None:  # the labelled splits (an unlabelled test/images is not a mistake)
        splits = [s for s in ("train", "val", "test") if all((root / s / d).is_dir() for d in ("images", "masks"))]
        halves = [(s, there, missing) for s in ("train", "val")
                  for there, missing in (("images", "masks"), ("masks", "images"))
                  if (root / s / there).is_dir() and not (root / s / missing).is_dir()]
        if not splits:  # other names (training/validation), also beside a pool at the root: those, not "all"
            splits = split_folders(root)
        if not splits and halves and not (root / "images").is_dir():  # "not a dataset: ... root/all/{...}" said less
            split, there, missing = halves[0]
            raise DataError(f"{root / split / there}: no {split}/{missing} folder beside it ({len(halves)} split "
                            "folder(s) half there), and no complete split")
        if splits:  # a split folder layout without train or val: train refused it, the check passed
            missing_splits = [s for s in ("train", "val") if s not in splits and s not in {h[0] for h in halves}]
    flat = not splits  # flat layout: one folder for every split, reported as "all"
    splits = splits or ["all"]
    split_dirs = {}
    for split in splits:
        try:
            split_dirs[split] = find_split_dir(root, split)
        except DataError:
            if not flat:
                raise
            # No flat layout either: named as train says it (root/train/...), not root/all/..., which no command
            # reads without --split all
            raise layout_error(root, "train") from None
    info = folder_classes(root, num_classes, ignore_index)
    listing = Listing(root, "folder", info, {})
    for split in missing_splits:
        listing.findings.append(finding("missing_split", split, f"{split}: no {split}/{{images,masks}} (splits here: "
                                        f"{', '.join(splits)}); train reads {split} unless --{split}-split names "
                                        "another, and --split NAME checks those"))
    for split, there, missing in halves:
        listing.findings.append(finding("half_split", f"{split}/{missing}", f"{split}/{there}: no {split}/{missing} "
                                        "folder beside it; train reads both, and would refuse this dataset"))
    if (root / "classes.json").is_file():
        listing.files.append(root / "classes.json")
    read_from: dict[Path, str] = {}
    for split, split_dir in split_dirs.items():
        image_dir, mask_dir = split_dir / "images", split_dir / "masks"
        if split_dir in read_from:  # flat layout asked for two splits: read once, say so
            listing.findings.append(finding("shared_split", split, f"{split}: reads the same folder as "
                                            f"{read_from[split_dir]} ({relative(split_dir, root) or '.'})"))
            continue
        read_from[split_dir] = split
        images, masks = list_images(image_dir), list_images(mask_dir)
        listing.files += images + masks
        unread = {folder: unread_files(folder) for folder in (image_dir, mask_dir)}
        for folder in (image_dir, mask_dir):
            if nested := nested_images(folder):
                listing.findings.append(finding("nested_files", relative(folder, root), f"{relative(folder, root)}: "
                                                f"{len(nested)} file(s) in subfolders, such as "
                                                f"{nested[0].relative_to(folder)}, are not read"))
            if unread[folder]:
                listing.findings.append(finding("unread_files", relative(folder, root),
                                                f"{relative(folder, root)}: {unread_note(unread[folder])}"))
        for files in (images, masks):
            first_by_stem: dict[str, Path] = {}
            for path in files:
                if (name := pairing_name(path)) in first_by_stem:
                    listing.findings.append(finding("same_name", relative(path, root), f"{relative(path, root)}: "
                                                    f"same name as {first_by_stem[name].name}"))
                first_by_stem.setdefault(name, path)
        masks_by_stem = {pairing_name(p): p for p in masks}
        image_stems = {pairing_name(p) for p in images}
        lone_images = [p for p in images if pairing_name(p) not in masks_by_stem]
        lone_masks = [p for p in masks if pairing_name(p) not in image_stems]
        mask_hints = partner_hints(lone_images, lone_masks, unread[mask_dir], relative(mask_dir, root))
        image_hints = partner_hints(lone_masks, lone_images, unread[image_dir], relative(image_dir, root))
        for image in lone_images:
            listing.findings.append(finding("missing_mask", relative(image, root), f"{relative(image, root)}: "
                                            f"no mask {image.stem}.* in {relative(mask_dir, root)}{mask_hints[image]}"))
        for mask in lone_masks:
            listing.findings.append(finding("orphan_mask", relative(mask, root), f"{relative(mask, root)}: no "
                                            f"image {mask.stem}.* in {relative(image_dir, root)}{image_hints[mask]}"))
        if not images:
            why = f" ({unread_note(unread[image_dir])})" if unread[image_dir] else ""
            listing.findings.append(finding("empty_split", relative(image_dir, root),
                                            f"{relative(image_dir, root)}: no images{why}"))
        paired = [p for p in images if pairing_name(p) in masks_by_stem]
        listing.splits[split] = PairedDataset(paired, [masks_by_stem[pairing_name(p)] for p in paired], info,
                                              description=str(split_dir), max_pixels=max_pixels)
    return listing


def list_voc_splits(voc_dir: Path, info: ClassInfo, splits: list[str] | None, max_pixels: int | None) -> Listing:
    """The names in `ImageSets/Segmentation/{split}.txt`, each checked for its image and mask."""
    split_files = voc_dir / "ImageSets" / "Segmentation"
    listing = Listing(voc_dir, "voc", info, {})
    if splits is None:
        splits = [s for s in ("train", "val") if (split_files / f"{s}.txt").is_file()]
        available = sorted(p.stem for p in split_files.glob("*.txt"))
        for split in sorted({"train", "val"} - set(splits)):  # a CVAT export's default.txt: nothing was checked
            where = relative(split_files / f"{split}.txt", voc_dir)
            listing.findings.append(finding(
                "missing_split" if splits else "no_split", where, f"{where}: not there (split files here: "
                f"{', '.join(available) or 'none'}); train reads it unless --{split}-split names another, and "
                "--split NAME checks those"))
    for split in splits:
        split_file = split_files / f"{split}.txt"
        if not split_file.is_file():
            available = sorted(p.stem for p in split_files.glob("*.txt"))
            raise DataError(f"{split_file}: no such split file (available: {', '.join(available) or 'none'})")
        listing.files.append(split_file)
        mask_dir = voc_dir / ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass")
        names = split_names(split_file)
        images, masks, hints = [], [], 0
        for name in names:
            pair = (voc_dir / "JPEGImages" / f"{name}.jpg", mask_dir / f"{name}.png")
            absent = [p for p in pair if not p.is_file()]
            for path in absent:
                # The first few looked for under another suffix: each look lists the folder (10k photos saved as
                # PNG would list it 10k times), and a few say what happened to all.
                hints += 1
                elsewhere = named_otherwise(path) if hints <= 5 else ""
                listing.findings.append(finding("missing_file", relative(path, voc_dir),
                                                f"{relative(split_file, voc_dir)} lists {name}, but "
                                                f"{relative(path, voc_dir)} is not there{elsewhere}"))
            if not absent:
                images.append(pair[0])
                masks.append(pair[1])
        if not names:
            listing.findings.append(finding("empty_split", relative(split_file, voc_dir),
                                            f"{relative(split_file, voc_dir)}: names no images"))
        listing.files += images + masks
        listing.splits[split] = PairedDataset(images, masks, listing.info, description=f"VOC2012 {split} ({voc_dir})",
                                              max_pixels=max_pixels)
    return listing


def list_splits(root: str | Path, splits: list[str] | None = None, num_classes: int | None = None,
                ignore_index: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Listing:
    """The layout `open_dataset` would pick (VOCdevkit first, then folders). A root that is no dataset at all is a
    DataError, as it is for every other command."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root is not a folder")
    splits = list(dict.fromkeys(splits)) if splits else None
    voc_dir = find_voc_dir(root)
    if voc_dir is not None:
        return list_voc_splits(voc_dir, voc_classes(voc_dir, num_classes, ignore_index), splits, max_pixels)
    return list_folder_splits(root, splits, num_classes, ignore_index, max_pixels)


# ---- one pair: read both files once, check each, measure what the facts need ------------------------------------


@dataclass
class PairResult:
    split: str
    image: str  # labels: paths relative to the listing's base
    mask: str
    findings: list[Finding]
    image_size: tuple[int, int] | None = None  # (width, height) as read (EXIF rotation applied)
    image_notes: tuple[str, ...] = ()  # "grayscale", "CMYK", "16-bit", "EXIF-rotated": fine, converted when read
    pixel_hash: str | None = None  # of the decoded pixels: exact duplicates
    difference_hash: int | None = None  # 64-bit dHash of the grey thumbnail: near duplicates
    class_pixels: np.ndarray | None = None  # pixels per class (num_classes,)
    ignored_pixels: int = 0
    palette_reading: str | None = None  # a palette mask's, as images.palette_reading says


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def notes_of(image: Image.Image) -> tuple[str, ...]:
    """What is unusual about an image file (from its header) but converted when read."""
    notes = []
    if image.mode in GREY_MODES:
        notes.append("grayscale")
    if image.mode == "CMYK":
        notes.append("CMYK")
    # PIL opens 16-bit RGB PNGs as 8-bit RGB; the raw mode of the undecoded tiles still says ";16".
    if image.mode.startswith("I;16") or any(";16" in str(getattr(tile, "args", "")) for tile in image.tile):
        notes.append("16-bit")
    if image.getexif().get(0x0112) in range(2, 9):  # 0 or 9, which some software writes, turn nothing (read_header)
        notes.append("EXIF-rotated")
    return tuple(notes)


def unreadable(error: DataError, label: str) -> Finding:
    return finding("too_large" if isinstance(error, ImageTooLargeError) else "unreadable", label, str(error))


def difference_hash(rgb: np.ndarray) -> int:
    """dHash: for a 9×8 grey thumbnail, whether each pixel is brighter than its left neighbour. Re-encoding,
    resizing and brightness changes keep nearly every bit; different pictures differ in about half."""
    grey = np.asarray(Image.fromarray(rgb).convert("L").resize((9, 8), Image.BOX), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def palette_keys(info: ClassInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted packed colours (r<<16 | g<<8 | b), the class index of each, and the colours as a K×3 array: the
    palette plus the ignore colour, as `read_mask` maps them."""
    by_colour = {}
    for colour, index in zip(list(info.palette) + [info.ignore_colour], list(range(info.num_classes)) +
                             [info.ignore_index]):
        by_colour[(colour[0] << 16) | (colour[1] << 8) | colour[2]] = index
    keys = np.array(sorted(by_colour), dtype=np.int64)
    indices = np.array([by_colour[k] for k in keys.tolist()], dtype=np.int64)
    colours = np.stack([(keys >> 16) & 255, (keys >> 8) & 255, keys & 255], axis=1)
    return keys, indices, colours


def rgb_mask_findings(rgb: np.ndarray, info: ClassInfo, label: str, jpeg: bool) -> tuple[np.ndarray, list[Finding]]:
    """Class indices of an RGB mask (-1 where the colour is off the palette) and what is wrong with its colours."""
    keys, indices, colours = palette_keys(info)
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    position = np.clip(np.searchsorted(keys, packed), 0, len(keys) - 1)
    on_palette = keys[position] == packed
    classes = np.where(on_palette, indices[position], -1)
    if on_palette.all():
        return classes, []
    off_keys, off_counts = np.unique(packed[~on_palette], return_counts=True)
    y, x = np.argwhere(~on_palette)[0]
    colour = tuple(int(v) for v in rgb[y, x])
    hint = rgb_mask_hint(rgb, info)
    hint = f" ({hint})" if hint else ""
    findings = [finding("off_palette", label, f"{label}: {len(off_keys)} colour(s) outside the {info.name} palette "
                        f"on {int(off_counts.sum()):,} pixels, e.g. {colour} at (x={x}, y={y}){hint}")]
    if hint:  # its colours say what the file holds (a binary mask, class ids as grey): not noise, and no colour's
        # class is meant (a grey 0 is CamVid's ignore colour; read as such, the mask was "all ignore")
        return np.full_like(classes, -1), findings
    if not jpeg:  # a JPEG says so itself (jpeg_mask); this catches the PNG that went through a JPEG once
        top = np.argsort(off_counts)[::-1][:4096]  # the commonest colours are enough to tell noise from a mistake
        off_rgb = np.stack([(off_keys[top] >> 16) & 255, (off_keys[top] >> 8) & 255, off_keys[top] & 255], axis=1)
        distance = np.abs(off_rgb[:, None, :] - colours[None, :, :]).max(axis=2).min(axis=1)
        near = distance <= NEAR_PALETTE
        if near.sum() >= 4 and off_counts[top][near].sum() >= 0.5 * off_counts.sum():
            findings.append(finding("lossy_mask", label, f"{label}: {int(near.sum())} colours within "
                                    f"{NEAR_PALETTE} levels of a palette colour on "
                                    f"{int(off_counts[top][near].sum()):,} pixels: compression noise"))
    return classes, findings


def mask_findings(classes: np.ndarray, info: ClassInfo, label: str, by_colour: bool = False) -> list[Finding]:
    """Value checks on a mask's class indices (-1: an off-palette pixel, already reported). `by_colour`: read from
    an RGB mask's colours, where 255 is the ignore colour drawn as such, not a binary mask's white object."""
    findings = []
    values = set(np.unique(classes).tolist()) - {-1}
    bad = sorted(v for v in values if v >= info.num_classes and v != info.ignore_index)
    if bad:
        findings.append(finding("mask_values", label, f"{label}: mask values {bad[:5]} outside "
                                f"0..{info.num_classes - 1} and ignore {info.ignore_index}"))
    labelled = values - {info.ignore_index}
    if values == {0, 255} and info.ignore_index == 255 and not by_colour:
        share = float((classes == 255).mean())
        findings.append(finding("binary_255", label, f"{label}: only 0 and 255, and 255 is the ignore label: "
                                f"its object ({100 * share:.1f}% of the pixels) would be ignored"))
    elif not labelled and values:
        findings.append(finding("one_class", label, f"{label}: every pixel is the ignore label {info.ignore_index}"))
    elif len(labelled) == 1 and not bad:
        value = labelled.pop()
        findings.append(finding("one_class", label, f"{label}: every labelled pixel is class "
                                f"{info.names[value]!r} ({value})"))
    return findings


def mask_exif_orientation(mask: Image.Image) -> int | None:
    """The EXIF orientation a mask file carries; None for a broken EXIF block: masks are read without their EXIF, so
    one that is broken spoils nothing (the check must not call such a mask unreadable)."""
    try:
        return mask.getexif().get(0x0112)
    except (struct.error, SyntaxError, TypeError, IndexError, ValueError):
        return None


def check_pair(split: str, image_path: Path, mask_path: Path, info: ClassInfo, base: Path,
               max_pixels: int | None) -> PairResult:
    """Read one image and its mask once (the image as every command reads it, the mask raw, so that JPEG noise and
    off-palette colours can be told apart) and check both."""
    result = PairResult(split, relative(image_path, base), relative(mask_path, base), [])
    rgb, orientation, stored_size, mask_orientation = None, None, None, None
    try:
        with opened(image_path, result.image, max_pixels) as header:
            result.image_notes = notes_of(header)
            orientation, stored_size = header.getexif().get(0x0112), header.size
            if header.format == "TIFF" and orientation in SWAPPING_ORIENTATIONS:  # PIL gives its size as shown
                stored_size = stored_size[::-1]
        rgb = read_image(image_path, max_pixels, name=result.image)
    except DataError as error:
        result.findings.append(unreadable(error, result.image))
    if rgb is not None:
        result.image_size = (rgb.shape[1], rgb.shape[0])
        result.pixel_hash = hashlib.blake2b(rgb.tobytes() + str(rgb.shape).encode(), digest_size=16).hexdigest()
        result.difference_hash = difference_hash(rgb)

    try:
        with opened(mask_path, result.mask, max_pixels, "mask") as mask:
            mask_format, mode, mask_size = mask.format, mask.mode, mask.size
            jpeg = mask_format == "JPEG"
            mask_orientation = mask_exif_orientation(mask)
            if mode not in INDEX_MASK_MODES + RGB_MASK_MODES + INT_MASK_MODES:
                raise DataError(f"{result.mask}: unsupported mask mode {mode!r} (need an index, palette or RGB PNG)")
            see_through = int((np.asarray(mask.getchannel("A")) < 255).sum()) if mode in ("RGBA", "LA") else 0
            if mode in RGB_MASK_MODES:
                pixels = np.asarray(mask.convert("RGB"))
            elif mode == "P":  # as training reads it (a colour mask re-saved with its own palette is read by colour)
                pixels, result.palette_reading = palette_reading(mask, info)
            else:
                pixels = index_mask(mask, info) if mode in INDEX_MASK_MODES else np.asarray(mask)
    except DataError as error:
        result.findings.append(unreadable(error, result.mask))
        return result
    if jpeg:
        result.findings.append(finding("jpeg_mask", result.mask, f"{result.mask}: stored as JPEG (mode {mode})"))
    if mask_orientation in range(2, 9) and mask_format != "TIFF":  # Pillow turns a TIFF's pixels as it loads them
        same = " (as its image does)" if mask_orientation == orientation else ""
        result.findings.append(finding("mask_orientation", result.mask, f"{result.mask}: EXIF orientation "
                                       f"{mask_orientation} ({EXIF_ORIENTATIONS[mask_orientation]}){same}, not "
                                       "applied: masks are read as stored"))
    if see_through:
        result.findings.append(finding("mask_alpha", result.mask, f"{result.mask}: {see_through:,} transparent or "
                                       "translucent pixel(s), read by their colour"))
    if mode in RGB_MASK_MODES:
        classes, colour_findings = rgb_mask_findings(pixels, info, result.mask, jpeg)
        result.findings += colour_findings
    else:
        classes = pixels.astype(np.int64)
        if (negative := np.unique(classes[classes < 0]).tolist()):  # a 32-bit mask: read_mask refuses these
            result.findings.append(finding("mask_values", result.mask, f"{result.mask}: mask values {negative[:5]} "
                                           f"below 0 (class indices are 0..{info.num_classes - 1}, ignore "
                                           f"{info.ignore_index})"))
            classes = np.where(classes < 0, -1, classes)  # reported: not again as off-palette
    result.findings += mask_findings(classes, info, result.mask, by_colour=mode in RGB_MASK_MODES)
    if result.image_size == mask_size == stored_size and orientation in range(2, 9):
        # Orientations 2-4 keep the sides (5-8 too, on a square): a mask drawn on the stored pixels fits the size.
        result.findings.append(finding("exif_orientation", result.image, f"{result.image}: EXIF orientation "
                                       f"{orientation} ({EXIF_ORIENTATIONS[orientation]}); its mask is read against "
                                       "the picture as shown"))
    if result.image_size is not None and result.image_size != mask_size:
        rotated = TURNED_MASK_HINT if (
            "EXIF-rotated" in result.image_notes and result.image_size == mask_size[::-1]) else ""
        if rotated and mask_orientation == orientation in SWAPPING_ORIENTATIONS:  # both turned the same way
            rotated = (f" (both carry EXIF orientation {orientation}: the image is read turned, the mask as stored; "
                       "save the mask turned, without the orientation)")
        result.findings.append(finding("size_mismatch", result.mask, f"{result.mask}: mask is "
                                       f"{mask_size[0]}×{mask_size[1]} but its image is "
                                       f"{result.image_size[0]}×{result.image_size[1]}{rotated}"))
    in_range = classes[(classes >= 0) & (classes < info.num_classes)]
    result.class_pixels = np.bincount(in_range.ravel(), minlength=info.num_classes)[: info.num_classes]
    result.ignored_pixels = int((classes == info.ignore_index).sum())
    return result


# ---- across pairs and splits --------------------------------------------------------------------------------------


def leakage_findings(results: list[PairResult], split_order: list[str]) -> list[Finding]:
    """The same image in two splits: identical decoded pixels, or difference hashes ≤ NEAR_DUPLICATE_BITS apart.
    Reported once per image of the later split (split order: training split first)."""
    by_split: dict[str, list[PairResult]] = defaultdict(list)
    for result in results:
        if result.pixel_hash is not None:
            by_split[result.split].append(result)
    findings = []
    for j, later in enumerate(split_order):
        earlier = [r for split in split_order[:j] for r in by_split[split]]
        if not earlier or not by_split[later]:
            continue
        first_with_hash = {}
        for r in earlier:
            first_with_hash.setdefault(r.pixel_hash, r)
        hashes = np.array([r.difference_hash for r in earlier], dtype=np.uint64)
        for result in by_split[later]:
            twin = first_with_hash.get(result.pixel_hash)
            if twin is not None:  # one file in two VOC split lists is said so, not "identical pixels to" itself
                same = os.path.realpath(twin.image) == os.path.realpath(result.image)
                said = (f"listed in {twin.split} too" if same
                        else f"identical pixels to {twin.image} ({twin.split})")
                findings.append(finding("duplicate", result.image, f"{result.image}: {said}"))
                continue
            distance = np.bitwise_count(hashes ^ np.uint64(result.difference_hash))
            closest = int(np.argmin(distance))
            if distance[closest] <= NEAR_DUPLICATE_BITS:
                twin = earlier[closest]
                findings.append(finding("near_duplicate", result.image, f"{result.image}: looks like {twin.image} "
                                        f"({twin.split}; difference hashes {plural(int(distance[closest]), 'bit')} apart)"))
    return findings


def palette_findings(results: list[PairResult], split_order: list[str]) -> list[Finding]:
    """A split whose palette masks were read some by colour, some by index though a colour reading was looked for:
    `palette_reading` decides mask by mask, so ids under a palette that shows other classes' colours are read by
    colour only where every colour happens to fit. One finding a split, naming an example of each."""
    findings = []
    for split in split_order:
        by_colour = [r for r in results if r.split == split and r.palette_reading == "colour"]
        by_index = [r for r in results if r.split == split and r.palette_reading == "index, not colour"]
        if by_colour and by_index:
            findings.append(finding("palette_mixed", by_colour[0].mask, f"{by_colour[0].mask}: read by colour "
                                    f"(and {len(by_colour) - 1} more in {split}), while {by_index[0].mask} (and "
                                    f"{len(by_index) - 1} more) is read by index: its palette shows a colour "
                                    "outside the dataset's; if both store class ids, the first are read as other "
                                    "classes"))
    return findings


def coverage_findings(results: list[PairResult], info: ClassInfo, train_split: str | None) -> list[Finding]:
    """Classes that some split has and the training split never has."""
    if train_split is None:
        return []
    present: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))  # split → class → masks
    for result in results:
        if result.class_pixels is not None:
            for index in np.flatnonzero(result.class_pixels):
                present[result.split][int(index)].append(result.mask)
    findings = []
    in_train = set(present.get(train_split, {}))  # .get: no readable training mask at all is reported elsewhere
    for split, classes in present.items():
        if split == train_split:
            continue
        for index in sorted(set(classes) - in_train):
            masks = classes[index]
            findings.append(finding("class_not_in_train", masks[0], f"{masks[0]}: class {info.names[index]!r} "
                                    f"({index}) is in {len(masks)} {split} mask(s), in no {train_split} mask"))
    return findings


def unlabelled_findings(results: list[PairResult], info: ClassInfo) -> list[Finding]:
    """Splits whose masks, every one read, hold no pixel but the ignore label. A mask none of whose pixels could be
    read as a class or the ignore label (its colours off the palette: class ids saved as RGB) is not one of them:
    such a split was said to be "all ignore", and `train` stopped with that line, first among the errors."""
    read: dict[str, list[PairResult]] = defaultdict(list)
    for result in results:
        if result.class_pixels is not None and (result.class_pixels.any() or result.ignored_pixels):
            read[result.split].append(result)
    return [finding("unlabelled_split", split, f"{split}: every pixel of its {plural(len(masks), 'mask')} is the "
                    f"ignore label {info.ignore_index}")
            for split, masks in read.items() if not any(m.class_pixels.any() for m in masks)]


# A palette mask whose palette shows the dataset's colours in another order: read by those colours, not its indices
PALETTE_BY_COLOUR = "palette masks read by colour"


def split_facts(results: list[PairResult], info: ClassInfo, pairs: int) -> dict:
    """Counts, image sizes, class shares and image kinds of one split."""
    sizes = np.array([r.image_size for r in results if r.image_size is not None]).reshape(-1, 2)
    class_pixels = sum((r.class_pixels for r in results if r.class_pixels is not None),
                       np.zeros(info.num_classes, dtype=np.int64))
    labelled, ignored = int(class_pixels.sum()), sum(r.ignored_pixels for r in results)

    def spread(values: np.ndarray) -> dict | None:
        if not len(values):
            return None
        return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}

    notes = defaultdict(int)
    for result in results:
        for note in result.image_notes:
            notes[note] += 1
        # Said, so that ids stored under a palette showing the dataset's colours in another order (read by colour,
        # classes swapped) are not read so without a word (a helper, 2026-12-06)
        notes[PALETTE_BY_COLOUR] += result.palette_reading == "colour"
    return {
        "pairs": pairs,
        "images_read": len(sizes),
        "width": spread(sizes[:, 0]),
        "height": spread(sizes[:, 1]),
        "class_pixels": {name: int(n) for name, n in zip(info.names, class_pixels)},
        "class_share": {name: float(n) / max(labelled, 1) for name, n in zip(info.names, class_pixels)},  # of labelled
        "ignored_share": ignored / max(labelled + ignored, 1),  # of all pixels
        "converted": {note: notes[note] for note in ("grayscale", "CMYK", "16-bit", "EXIF-rotated", PALETTE_BY_COLOUR)},
    }


def sorted_findings(findings: Iterable[Finding]) -> list[Finding]:
    order = {kind: i for i, kind in enumerate(KINDS)}
    return sorted(findings, key=lambda f: (f.severity != "error", order[f.kind], f.path))


# ---- the whole check ---------------------------------------------------------------------------------------------


def report_key(listing: Listing, settings: str) -> str | None:
    """Like the decoded cache's key: the settings and every listed file's path, size, modification and change times
    (a chmod changes the latter alone). None when a file cannot be looked at (a symlink loop, a dangling link): the
    check then reads it and reports it."""
    # The listing's own findings too: a file it passes over (in a subfolder, with another suffix) is in no key.
    digest = hashlib.sha256(f"{REPORT_FORMAT}:{settings}:{json.dumps(listing.info.to_dict())}:"
                            f"{json.dumps([asdict(f) for f in listing.findings])}".encode())
    try:
        for path in listing.files:
            stat, real = looked_at(path)
            digest.update(os.fsencode(f"{real}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}\n"))
    except DataError:
        return None
    return digest.hexdigest()[:20]


def check_data(
    data_root: str | Path,
    splits: list[str] | None = None,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int = 4,
    train_split: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Report:
    """Check the splits of a dataset (default: train/val/test that exist; train/val for VOC).

    `train_split` (default: train or train_aug if checked) is the one other splits' classes are compared with.
    `cache_dir`: keep the report there, keyed by the files' sizes and times (a chmod too), and reuse it while nothing
    changed. A root that is not a dataset at all raises DataError."""
    listing = list_splits(data_root, splits, num_classes, ignore_index, max_pixels)
    split_order = list(listing.splits)
    if train_split is None:
        train_split = next((s for s in ("train", "train_aug") if s in listing.splits), None)
    if train_split in split_order:  # leakage is reported on the later split: the training split goes first
        split_order.remove(train_split)
        split_order.insert(0, train_split)
    cache_file = None
    key = report_key(listing, f"{split_order}:{train_split}:{max_pixels}") if cache_dir is not None else None
    if key is not None:
        cache_file = Path(cache_dir) / f"{key}.json"
        try:
            report = Report.from_dict(json.loads(cache_file.read_text()))
            report.from_cache = True
            return report
        except (OSError, ValueError, KeyError, TypeError):
            pass

    jobs = [(split, image, mask) for split in split_order
            for image, mask in zip(listing.splits[split].image_paths, listing.splits[split].mask_paths)]

    def check(job: tuple[str, Path, Path]) -> PairResult:
        return check_pair(*job, listing.info, listing.base, max_pixels)

    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without the GIL
        results = list(tqdm(pool.map(check, jobs), total=len(jobs), desc="checking", unit="pair", leave=False,
                            disable=not (progress and sys.stderr.isatty())))

    findings = list(listing.findings)
    for result in results:
        findings += result.findings
    findings += leakage_findings(results, split_order)
    findings += palette_findings(results, split_order)
    findings += coverage_findings(results, listing.info, train_split)
    findings += unlabelled_findings(results, listing.info)
    facts = {
        "root": str(listing.base),
        "layout": listing.layout,
        "classes": list(listing.info.names),
        "ignore_index": listing.info.ignore_index,
        "train_split": train_split,
        "splits": {split: split_facts([r for r in results if r.split == split], listing.info,
                                      len(listing.splits[split])) for split in split_order},
    }
    report = Report(str(listing.base), sorted_findings(findings), facts)
    # A report of files that could not be read is not kept: a read may succeed next time (a network disk back)
    # with nothing in the key changed.
    if cache_file is not None and not any(f.kind == "unreadable" for f in report.findings):
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            replace_text(cache_file, json.dumps(report.to_dict()))  # atomic: another process never reads half of it
        except OSError as error:  # a read-only or misplaced cache folder: the cache only saves time, the check is done
            report.cache_note = (f"{cache_file.parent}: cannot keep the data check's report "
                                 f"({error.strerror or error}); it will be checked again next time")
    return report


# ---- output --------------------------------------------------------------------------------------------------------


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def format_findings(findings: list[Finding]) -> str:
    """Grouped by kind, errors first, each group counted with its first SHOWN_PER_KIND files."""
    errors = sum(f.severity == "error" for f in findings)
    lines = [f"{plural(errors, 'error')}, {plural(len(findings) - errors, 'warning')}"]
    groups: dict[str, list[Finding]] = defaultdict(list)
    for item in sorted_findings(findings):
        groups[item.kind].append(item)
    for kind, items in groups.items():
        severity, meaning = KINDS[kind]
        lines.append(f"{severity.upper():8s}{kind} ×{len(items)}: {meaning}")
        lines += [f"          {item.message}" for item in items[:SHOWN_PER_KIND]]
        if len(items) > SHOWN_PER_KIND:
            lines.append(f"          … and {len(items) - SHOWN_PER_KIND} more")
    return "\n".join(lines)


def format_facts(facts: dict) -> str:
    splits = facts["splits"]
    lines = [f"{facts['root']}: {facts['layout']} dataset, {len(facts['classes'])} classes, ignore index "
             f"{facts['ignore_index']}"]
    lines.append(f"  {'split':12s}{'pairs':>7s}  {'width min/median/max':>22s}  {'height min/median/max':>22s}  "
                 "converted when read")
    for split, values in splits.items():
        sizes = [f"{s['min']}/{s['median']:g}/{s['max']}" if s else "-" for s in (values["width"], values["height"])]
        converted = ", ".join(f"{n} {note}" for note, n in values["converted"].items() if n) or "-"
        lines.append(f"  {split:12s}{values['pairs']:7d}  {sizes[0]:>22s}  {sizes[1]:>22s}  {converted}")
    lines.append("  class pixel share (% of labelled pixels)")
    lines.append("    " + f"{'':20s}" + "".join(f"{split[:9]:>10s}" for split in splits))
    for name in facts["classes"]:
        lines.append(f"    {name[:20]:20s}" + "".join(f"{100 * v['class_share'][name]:10.2f}" for v in splits.values()))
    lines.append(f"    {'(ignored, % of all)':20s}" + "".join(f"{100 * v['ignored_share']:10.2f}"
                                                            for v in splits.values()))
    return "\n".join(lines)


def format_report(report: Report) -> str:
    """The report for people: facts, then the findings grouped and counted, errors first."""
    return format_facts(report.facts) + "\n" + format_findings(report.findings)


def write_json(report: Report, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_output(path, json.dumps(report.to_dict(), indent=1))


def plot_class_shares(report: Report, path: str | Path) -> None:
    """Bar chart: each class's share of the labelled pixels, one bar per split."""
    from .fonts import fonts_for

    names, splits = report.facts["classes"], report.facts["splits"]
    with fonts_for(path, *names, *splits, str(report.root)):
        x = np.arange(len(names))
        width = 0.8 / max(len(splits), 1)
        fig, ax = subplots(1, 1, figsize=(max(6.0, 0.45 * len(names) * max(len(splits), 1) + 2), 4))
        for i, (split, values) in enumerate(splits.items()):
            shares = [100 * values["class_share"][name] for name in names]
            ax.bar(x + (i - (len(splits) - 1) / 2) * width, shares, width, label=f"{split} ({values['pairs']} pairs)")
        ax.set_xticks(x, names, rotation=45, ha="right")
        ax.set_ylabel("% of labelled pixels")
        ax.set_title(f"class pixel share: {report.root}", fontsize=10)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_figure(fig, path, dpi=100)


def refusal(report: Report, data_root: str | Path, flags: str = "") -> str:
    """The one line `train` stops with (the grouped report is printed before it); `flags`: the check-data flags
    that check what train checked (its splits, class count, pixel limit), which the command given ends with."""
    first = report.errors[0]
    return (f"{first.message} — {plural(len(report.errors), 'data error')} in {data_root}, see the report above "
            f"or run: resunet check-data --data-root {data_root}{flags}")
