"""A generated VOC-format dataset: shapes of a few VOC classes on textured backgrounds.

Each class has its own shape and colour family, so a small model learns it in minutes on a CPU and a broken pipeline
shows up as a low mIoU. Masks are palette PNGs with a 255 void border around every object, as in VOC.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .classes import VOC_CLASSES, VOC_INFO
from .folder import holds_pairs, split_folders
from .images import DataError

# (class, shape, base colour): the colour is jittered per object, so shape and colour both carry the class.
DEMO_OBJECTS = (
    ("aeroplane", "triangle", (200, 200, 215)),
    ("car", "rectangle", (200, 40, 40)),
    ("cat", "ellipse", (220, 150, 60)),
    ("person", "capsule", (70, 90, 210)),
    ("sheep", "blob", (245, 245, 235)),
)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Low-frequency colour noise plus a gradient: texture without any object-like structure."""
    coarse = rng.integers(40, 160, size=(6, 6, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    noise = rng.normal(0, 12, size=(size, size, 3))
    ramp = np.linspace(-20, 20, size)[None, :, None] * rng.choice([-1, 1])
    array = np.clip(np.asarray(image, dtype=np.float64) + noise + ramp, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill, width: int = 0) -> None:
    x0, y0, x1, y1 = box
    if shape == "triangle":
        points = [((x0 + x1) // 2, y0), (x1, y1), (x0, y1)]
        draw.polygon(points, fill=fill, outline=fill, width=width)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill, outline=fill, width=width)
    elif shape == "ellipse":
        draw.ellipse(box, fill=fill, outline=fill, width=width)
    elif shape == "capsule":
        radius = (x1 - x0) // 2
        draw.rounded_rectangle(box, radius=radius, fill=fill, outline=fill, width=width)
    elif shape == "blob":
        w, h = x1 - x0, y1 - y0
        for dx, dy in ((0.0, 0.25), (0.35, 0.0), (0.3, 0.4), (0.05, 0.45)):
            cx, cy = x0 + dx * w, y0 + dy * h
            draw.ellipse((cx, cy, cx + 0.6 * w, cy + 0.55 * h), fill=fill, outline=fill, width=width)


def make_sample(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    image = _background(rng, size)
    mask = Image.new("L", (size, size), 0)
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    border = max(2, size // 64)
    for _ in range(rng.integers(1, 4)):
        name, shape, colour = DEMO_OBJECTS[rng.integers(len(DEMO_OBJECTS))]
        class_id = VOC_CLASSES.index(name)
        smallest = max(size // 5, 4 * border + 2)  # the inner (class) region must survive the void border
        w, h = (int(v) for v in rng.integers(smallest, max(size // 2, smallest + 1), size=2))
        if shape == "capsule":
            w = max(smallest, h // 3)
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        box = (x0, y0, x0 + w, y0 + h)
        fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour)
        _draw_shape(draw_image, shape, box, fill)
        # VOC-style: the object's outline is void (255), its inside is the class; later objects occlude earlier ones.
        _draw_shape(draw_mask, shape, box, 255)
        inner = (x0 + border, y0 + border, x0 + w - border, y0 + h - border)
        _draw_shape(draw_mask, shape, inner, class_id)
    image = image.filter(ImageFilter.GaussianBlur(0.6))
    return image, mask


def folder_dataset_parts(root: Path) -> list[str]:
    """What makes `root` a folder dataset: classes.json, SPLIT/ with images/ and masks/, or both at the root."""
    return ((["classes.json"] if (root / "classes.json").is_file() else [])
            + [f"{split}/" for split in split_folders(root)] + (["images/", "masks/"] if holds_pairs(root) else []))


def make_demo_dataset(root: str | Path, train: int = 64, val: int = 16, size: int = 128, seed: int = 0) -> Path:
    """Write `root/VOCdevkit/VOC2012` with JPEGImages, SegmentationClass (palette PNGs) and train/val split files."""
    root = Path(root)
    voc = root / "VOCdevkit" / "VOC2012"
    for split in ("train", "val"):  # rewriting a demo dataset is fine; rewriting a real one's lists is not
        listed = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        if listed.is_file() and any(not name.startswith("demo_") for name in listed.read_text().split()):
            raise DataError(f"{listed}: lists images that are not demo images; write the demo dataset elsewhere")
    # A VOC tree is read before a folder dataset beside it: the user's own data would no longer be read from there
    if (own := folder_dataset_parts(root)) and not voc.is_dir():
        raise DataError(f"{root}: holds a dataset of its own ({', '.join(own)}), which --data-root {root} would no "
                        "longer read beside a demo VOC tree; write the demo dataset elsewhere")
    try:
        for folder in (voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation"):
            folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:  # a file on the way
        raise DataError(f"{root}: cannot make the dataset's folders there ({error.strerror}: "
                        f"{error.filename})") from None
    rng = np.random.default_rng(seed)
    palette = VOC_INFO.palette_bytes()
    for split, count in (("train", train), ("val", val)):
        names = [f"demo_{split}_{i:05d}" for i in range(count)]
        for name in names:
            image, mask = make_sample(rng, size)
            image.save(voc / "JPEGImages" / f"{name}.jpg", quality=92)
            mask = mask.convert("P")
            mask.putpalette(palette)
            mask.save(voc / "SegmentationClass" / f"{name}.png")
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return voc
