"""Reading images and masks from disk, with one clear error line for a bad file."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .classes import ClassInfo

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# The largest image decoded by default: 8000×8000, above any camera's photo (a 48 MP phone shot is 8000×6000), far
# below what fills memory. A small file can declare billions of pixels (a "decompression bomb"); it is refused from
# its header, before a single pixel is decoded.
DEFAULT_MAX_PIXELS = 64_000_000
# PIL warns from 89 MP on; the limit above is what we enforce, with one clear line instead.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class DataError(ValueError):
    """A user's file is unusable; the message is one line that names the file and the problem."""


class ImageTooLargeError(DataError):
    """The image declares more pixels than allowed (checked from its header, before decoding)."""


def read_image(path: str | Path | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> np.ndarray:
    """H×W×3 uint8 RGB, EXIF orientation applied (phones store portrait photos sideways).

    `path` may also be the file's bytes (an upload); `name` then labels it in errors. `max_pixels=None`: no limit."""
    label = name or (str(path) if not isinstance(path, bytes) else "image")
    source = io.BytesIO(path) if isinstance(path, bytes) else path
    try:
        image = Image.open(source)  # reads the header only
        with image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(f"{label}: {width}×{height} = {width * height:,} pixels is over the limit "
                                         f"of {max_pixels:,} (--max-pixels; a decompression bomb?)")
            image = ImageOps.exif_transpose(image)
            return np.array(image.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{label}: file not found") from None
    except Image.DecompressionBombError as error:  # PIL's own ceiling (2 × its MAX_IMAGE_PIXELS) stops open()
        declared = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(declared.group(1)):,} pixels" if declared else "too many pixels"
        raise ImageTooLargeError(f"{label}: {size} is over the limit of "
                                 f"{min(max_pixels or Image.MAX_IMAGE_PIXELS * 2, Image.MAX_IMAGE_PIXELS * 2):,} "
                                 "(--max-pixels; a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise DataError(f"{label}: not a readable image (not an image format we know)") from None
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{label}: not a readable image ({error})") from None


def read_mask(path: str | Path, info: ClassInfo) -> np.ndarray:
    """H×W uint8 class indices.

    Palette ('P') and grey ('L') PNGs hold the indices directly. RGB masks drawn in the dataset's colours (as VOC's
    ground truth often circulates) are converted through the palette; a colour outside it is an error.
    """
    try:
        with Image.open(path) as image:
            if image.mode in ("P", "L"):
                mask = np.array(image)  # for 'P' these are palette indices = class ids
            elif image.mode in ("RGB", "RGBA"):
                mask = rgb_to_index(np.asarray(image.convert("RGB")), info, path)
            elif image.mode in ("I", "I;16", "I;16B", "I;16L"):
                mask = np.asarray(image).astype(np.int64)
                if mask.max(initial=0) > 255:
                    raise DataError(f"{path}: mask value {mask.max()} does not fit a class index (max 255)")
                mask = mask.astype(np.uint8)
            else:
                raise DataError(f"{path}: unsupported mask mode {image.mode!r} (need an index, palette or RGB PNG)")
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"{path}: not a readable mask ({error})") from None
    return mask


def rgb_to_index(rgb: np.ndarray, info: ClassInfo, path: str | Path = "mask") -> np.ndarray:
    """Map each pixel's colour to its class index (the ignore colour to the ignore index)."""
    colours = list(info.palette) + [info.ignore_colour]
    indices = list(range(info.num_classes)) + [info.ignore_index]
    lut = np.full(1 << 24, -1, dtype=np.int16)
    for colour, index in zip(colours, indices):
        lut[(colour[0] << 16) | (colour[1] << 8) | colour[2]] = index
    keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    mask = lut[keys]
    if (mask < 0).any():
        y, x = np.argwhere(mask < 0)[0]
        colour = tuple(int(v) for v in rgb[y, x])
        raise DataError(f"{path}: colour {colour} at (x={x}, y={y}) is not in the {info.name} palette")
    return mask.astype(np.uint8)


def check_mask_values(mask: np.ndarray, info: ClassInfo, path: str | Path) -> None:
    bad = (mask >= info.num_classes) & (mask != info.ignore_index)
    if bad.any():
        values = sorted(set(np.unique(mask[bad]).tolist()))
        raise DataError(
            f"{path}: mask values {values[:5]} outside 0..{info.num_classes - 1} and ignore {info.ignore_index}"
        )


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
