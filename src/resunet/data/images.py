"""Reading images and masks from disk, with one clear error line for a bad file."""

from __future__ import annotations

import io
import os
import re
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .classes import ClassInfo

# What Pillow reads. .jfif and .jpe are JPEG (browsers save photos as .jfif); a GIF is read as its first frame. A file
# with another suffix is not listed: an image listed nowhere dropped its mask too, without a word outside check-data.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".avif", ".jp2",
                  ".j2k", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi")
# What Image.open may take a file for: raster formats Pillow decodes itself. Not EPS (Pillow runs Ghostscript on
# it: a client of the service could feed PostScript to it) nor the formats that need a handler installed, nor ICO:
# Pillow decodes an icon's embedded PNG inside Image.open, whatever size its PNG declares (an upload of ~10 MB that
# decodes to ~10 GB, before any size check; icons are no photos, and .ico was never listed as an image).
READ_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "AVIF", "PPM", "TGA", "QOI", "JPEG2000",
                "PCX", "SGI", "PSD")
# The largest image decoded by default: 8000×8000, above any camera's photo (a 48 MP phone shot is 8000×6000), far
# below what fills memory. A small file can declare billions of pixels (a "decompression bomb"); it is refused from
# its header, before a single pixel is decoded.
DEFAULT_MAX_PIXELS = 64_000_000
# Run-length-compressed BMP is decoded by Pillow in Python: an 8000×8000 one of 33 KB took 10 s of CPU on the Zen 4
# (a 64 MP PNG 0.55 s), so a few small uploads held the service. Such files are read up to this size (~0.6 s).
PYTHON_DECODED_MAX_PIXELS = 4_000_000
# PIL warns from 89 MP on; the limit above is what we enforce, with one clear line instead.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# A broken EXIF block: the picture is read as stored (no orientation to apply). PIL's two-line warnings ("Corrupt
# EXIF data", "Tag data larger than file", ...) split the service's one-line log entries and predict's stderr.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")


class DataError(ValueError):
    """A user's file is unusable; the message is one line that names the file and the problem."""


def one_line(error: BaseException) -> str:
    """The user's message alone. An error raised in a DataLoader worker comes back with the worker's traceback in
    its message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): keep its last line."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text or type(error).__name__


class ImageTooLargeError(DataError):
    """The image declares more pixels than allowed (checked from its header, before decoding)."""


_PIL_CEILING = threading.Lock()


@contextmanager
def open_unbounded(source: str | Path | io.BytesIO) -> Iterator[Image.Image]:
    """Image.open without PIL's own ceiling of 2 × MAX_IMAGE_PIXELS (179 MP): `opened` checks the size against
    --max-pixels from the same header, before any pixel is decoded. PIL's ceiling refused a 15000×15000 aerial photo
    whatever --max-pixels said, and named no width and height. It is a global, so it is lifted under a lock, and
    only for a file over it: while the file is open, since a TIFF checks it again when its pixels are decoded.

    A path is opened here and PIL given the file object: given a name, PIL memory-maps an uncompressed file, and an
    8-bit grey (or palette) TIFF stored turned by 90° then came out with its pixels scrambled (Pillow 13 turns the
    mapped image in place; decoded from the file object it is right)."""
    with ExitStack() as files:
        if not hasattr(source, "read"):
            source = files.enter_context(open(source, "rb"))
        try:
            image = Image.open(source, formats=READ_FORMATS)
        except Image.DecompressionBombError:
            image = None
        if image is not None:
            with image:
                yield image
            return
        source.seek(0)
        with _PIL_CEILING:
            ceiling, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(source, formats=READ_FORMATS) as image:
                    yield image
            finally:
                Image.MAX_IMAGE_PIXELS = ceiling


# ISO base media files (ftyp box) of HEIF brands: an iPhone's photos, which Pillow does not read without a plugin.
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


# The first bytes of formats in READ_FORMATS with a fixed signature (TGA, PCX and others have none to speak of).
READ_SIGNATURES = (
    ("JPEG", lambda head: head[:3] == b"\xff\xd8\xff"), ("PNG", lambda head: head[:8] == b"\x89PNG\r\n\x1a\n"),
    ("GIF", lambda head: head[:4] == b"GIF8"), ("BMP", lambda head: head[:2] == b"BM"),
    ("TIFF", lambda head: head[:4] in (b"II*\x00", b"MM\x00*")),
    ("WebP", lambda head: head[:4] == b"RIFF" and head[8:12] == b"WEBP"),
    ("AVIF", lambda head: head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis")),
    ("JPEG 2000", lambda head: head == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51"),
    ("QOI", lambda head: head[:4] == b"qoif"),
)


def first_bytes(source: str | Path | io.BytesIO) -> bytes:
    """The first 12 bytes of a file, or of an upload's bytes (b"" if it cannot be read)."""
    try:
        if hasattr(source, "read"):
            source.seek(0)
            return source.read(12)
        with open(source, "rb") as file:
            return file.read(12)
    except OSError:
        return b""


def unknown_format(source: str | Path | io.BytesIO) -> str:
    """Why an image was not identified, from its first bytes: a HEIC/HEIF photo is named, with the way round it."""
    head = first_bytes(source)
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return "a HEIC/HEIF photo, which is not read here: export it as JPEG or PNG"
    # A format we read whose header PIL could not parse: cut short or damaged (a truncated LZW TIFF keeps its
    # directory at the end), not an unknown format, which sent users looking for a format they had
    known = next((name for name, matches in READ_SIGNATURES if matches(head)), None)
    if known is not None:
        return f"{known} by its first bytes, but its header cannot be read: damaged or cut short?"
    return "not an image format we know"


# What PIL's decoders say of a file cut short or damaged past its header, in words that name no cause: a truncated
# WebP is "could not create decoder object", a truncated JPEG "Truncated File Read" or "cannot load this image", a
# damaged compressed TIFF (libtiff) "decoder error -2".
OPAQUE_DECODE_ERRORS = ("could not create decoder object", "Truncated File Read", "cannot load this image",
                        "decoder error -2")


def decode_failure(source: str | Path | io.BytesIO, error: BaseException) -> str:
    """Why the pixels of a file whose header was read could not be decoded, in words a user can act on."""
    said = str(error) or type(error).__name__
    if not any(opaque in said for opaque in OPAQUE_DECODE_ERRORS):
        return said
    head = first_bytes(source)
    known = next((name for name, matches in READ_SIGNATURES if matches(head)), "an image")
    return f"{known} whose data cannot be decoded: damaged or cut short?"


@contextmanager
def opened(source: str | Path | io.BytesIO, label: str, max_pixels: int | None, kind: str = "image") -> Iterator:
    """The PIL image of `source`, its header read and its size checked against `max_pixels` before any pixel is
    decoded. Every way the file can fail — inside the block too — becomes one DataError line naming `label`."""
    try:
        with open_unbounded(source) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(f"{label}: {kind} of {width}×{height} = {width * height:,} pixels is over "
                                         f"the limit of {max_pixels:,} (--max-pixels; a decompression bomb?)")
            if width * height > PYTHON_DECODED_MAX_PIXELS and any(tile[0] == "bmp_rle" for tile in image.tile):
                raise ImageTooLargeError(f"{label}: {kind} of {width}×{height} is a run-length-compressed BMP, which "
                                         "Pillow decodes in Python (seconds for a large one); over "
                                         f"{PYTHON_DECODED_MAX_PIXELS:,} pixels it is not read: save it as PNG")
            yield image
    except FileNotFoundError:
        raise DataError(f"{label}: {kind} file not found{dangling_link(source)}") from None
    except Image.DecompressionBombError as error:  # PIL's own ceiling (2 × its MAX_IMAGE_PIXELS) stops open()
        declared = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(declared.group(1)):,} pixels" if declared else "too many pixels"
        limit = min(max_pixels or Image.MAX_IMAGE_PIXELS * 2, Image.MAX_IMAGE_PIXELS * 2)
        raise ImageTooLargeError(f"{label}: {kind} of {size} is over the limit of {limit:,} "
                                 "(--max-pixels; a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise DataError(f"{label}: not a readable {kind} ({unknown_format(source)})") from None
    except (OSError, SyntaxError, ValueError, struct.error, TypeError, IndexError) as error:
        # struct.error: a broken EXIF block; TypeError: a TIFF strip offset stored as a float (found by fuzzing)
        if isinstance(error, DataError):
            raise
        raise DataError(f"{label}: not a readable {kind} ({decode_failure(source, error)})") from None


def read_image(path: str | Path | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> np.ndarray:
    """H×W×3 uint8 RGB, EXIF orientation applied (phones store portrait photos sideways).

    `path` may also be the file's bytes (an upload); `name` then labels it in errors. `max_pixels=None`: no limit."""
    if isinstance(path, bytes):
        source, label = io.BytesIO(path), name or "image"
    else:
        source, label = path, name or str(path)
    with opened(source, label, max_pixels) as image:
        return pil_to_rgb8(image, owned=True)


DEEP_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # 16-bit, 32-bit and float grey images


def pil_to_rgb8(image: Image.Image, owned: bool = False) -> np.ndarray:
    """A PIL image as H×W×3 uint8 RGB, as every reader of images here sees it: EXIF orientation applied, deep grey
    scaled to 8 bits (Pillow's convert() would clip it to white).

    `owned`: the image is a file opened for this read, free to change: turned in place, and an RGB one not
    converted. Each copy costs the whole image again: a 64 MP upload took 1.1 GB to read (a helper, 2026-12-06),
    now about 10 bytes a pixel at the peak (PIL's 4, the array's 3, and the bytes numpy copies it from)."""
    bits = stored_bits(image)
    # I;16* modes hold up to 16 bits, and so does a PGM's "I" (Pillow scales a maxval over 255 to 0..65535): their
    # scale is known (a TIFF says 12 if it has 12), not guessed from the values (a dark 16-bit PGM was read 257×
    # too bright). Told before the turn: a turned copy has no format.
    sixteen_bit = image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PPM")
    if owned:
        ImageOps.exif_transpose(image, in_place=True)
    else:
        image = ImageOps.exif_transpose(image)
    if image.mode in DEEP_GREY_MODES:
        return grey_to_rgb8(np.asarray(image), sixteen_bit=sixteen_bit, bits=bits)
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))


def stored_bits(image: Image.Image) -> int:
    """The bits per sample a TIFF declares (a 12-bit camera's file decodes as 16-bit grey, white at 4095); 16 for any
    other file."""
    declared = getattr(image, "tag_v2", {}).get(258) if image.format == "TIFF" else None
    if isinstance(declared, tuple):
        declared = declared[0] if declared else None
    return declared if isinstance(declared, int) and 8 < declared < 16 else 16


def grey_to_rgb8(grey: np.ndarray, sixteen_bit: bool | None = None, bits: int = 16) -> np.ndarray:
    """A 16-bit, 32-bit or float grey image as 8-bit RGB.

    16-bit grey (`sixteen_bit`, by default: a uint16 array) is always ÷257, whatever its values: a dark 16-bit
    image stays dark, and one bright pixel does not change how the rest is read (a file of fewer `bits`, as a
    12-bit TIFF: scaled from 2**bits - 1). For 32-bit integer or float grey
    (PIL modes I and F) the scale is not in the file and is guessed from the values: above 255 → 16-bit (÷257),
    floats up to 1 → a 0..1 range, anything else → 8-bit already."""
    if sixteen_bit is None:
        sixteen_bit = grey.dtype.kind == "u" and grey.dtype.itemsize == 2
    values = grey.astype(np.float64)
    top = float(np.nanmax(values)) if values.size else 0.0
    if sixteen_bit:
        values = values * (255.0 / (2**bits - 1))
    elif top > 255:
        values = values / 257.0
    elif grey.dtype.kind == "f" and top <= 1.0:
        values = values * 255.0
    grey8 = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    return np.repeat(grey8[..., None], 3, axis=2)


SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90°: read, its sides swap


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding a pixel."""

    width: int  # as `read_image` returns the image: EXIF orientation applied
    height: int
    format: str  # PIL's name for the file's format: JPEG, PNG, WEBP, TIFF, ...
    orientation: int  # the EXIF orientation `read_image` applies (1: stored upright)


def read_header(path: str | Path | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                name: str | None = None) -> ImageHeader:
    """The header of `path` (or of a file's bytes, labelled `name` in errors); DataError as `read_image` would.
    No pixel is decoded: a PNG's orientation is found by walking its chunks (`png_orientation`)."""
    source, label = (io.BytesIO(path), name or "image") if isinstance(path, bytes) else (path, name or str(path))
    with opened(source, label, max_pixels) as image:
        width, height = image.size
        orientation = (png_orientation(image.fp, image.is_animated) if image.format == "PNG"
                       else image.getexif().get(0x0112, 1))
        orientation = orientation if orientation in range(1, 9) else 1  # exif_transpose ignores other values
        # PIL gives a TIFF's size as shown already (it turns the pixels when it decodes them): swapped again, the
        # decoded-image cache was sized for the stored picture and its build stopped with a traceback.
        if image.format != "TIFF" and orientation in SWAPPING_ORIENTATIONS:
            width, height = height, width
        return ImageHeader(width, height, image.format or "", orientation)


# The chunks PIL takes a PNG's orientation from: an EXIF block, or text (ImageMagick's raw EXIF profile, XMP).
PNG_ORIENTATION_CHUNKS = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")


def png_orientation(file: io.IOBase, animated: bool) -> int:
    """The EXIF orientation of a PNG file (from its first byte) as PIL finds it once the image is decoded — its EXIF
    block may follow the pixels, and PIL decodes them all to look there — from its metadata chunks alone: the pixel
    data is skipped unread. PIL's own chunk readers fill the info PIL's getexif reads; chunks are read as far as PIL
    reads them: the end, or the next frame's control chunk after the pixels of an `animated` one (PIL's
    is_animated)."""
    from PIL import PngImagePlugin

    where = file.tell()
    chunks = PngImagePlugin.PngStream(file)
    try:
        file.seek(8)  # the PNG signature
        pixels_passed = False
        while True:
            kind, _, length = chunks.read()
            if kind == b"IEND" or (kind == b"fcTL" and animated and pixels_passed):
                break
            pixels_passed |= kind == b"IDAT"
            if kind in PNG_ORIENTATION_CHUNKS:
                chunks.call(kind, 0, length)
                file.seek(4, os.SEEK_CUR)  # its checksum
            else:
                file.seek(length + 4, os.SEEK_CUR)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error):
        pass  # a broken chunk ends the walk, as it ends PIL's: what was read before it counts
    finally:
        file.seek(where)
    shown = Image.new("1", (1, 1))
    shown.info = chunks.im_info
    return shown.getexif().get(0x0112, 1)


def image_size(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as `read_image` returns the image (EXIF rotation applied), from the header alone."""
    header = read_header(path, max_pixels)
    return header.width, header.height


# How each mode of mask file is read: class ids stored directly (`index_mask`), colours (`rgb_to_index`), or wide
# integers (values above 255 refused). Shared with the data check, which must read a mask as training does.
INDEX_MASK_MODES = ("P", "L", "LA", "1")
RGB_MASK_MODES = ("RGB", "RGBA")
INT_MASK_MODES = ("I", "I;16", "I;16B", "I;16L")


TURNED_MASK_HINT = " (the image is EXIF-rotated; the mask matches it unrotated?)"  # after a size mismatch


def sides_swapped(path: str | Path) -> bool:
    """Whether the image is stored turned by 90° (False for a file that cannot be read: asked after an error)."""
    try:
        return read_header(path, None).orientation in SWAPPING_ORIENTATIONS
    except DataError:
        return False


def read_mask(path: str | Path, info: ClassInfo, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """H×W uint8 class indices.

    Palette, grey and 1-bit PNGs hold the indices directly (`index_mask`). RGB masks drawn in the dataset's colours
    (as VOC's ground truth often circulates) are converted through the palette; a colour outside it is an error.
    """
    with opened(path, str(path), max_pixels, "mask") as image:
        if image.mode in INDEX_MASK_MODES:
            return index_mask(image, info)
        if image.mode in RGB_MASK_MODES:
            return rgb_to_index(np.asarray(image.convert("RGB")), info, path)
        if image.mode in INT_MASK_MODES:
            mask = np.asarray(image).astype(np.int64)
            if mask.max(initial=0) > 255:
                raise DataError(f"{path}: mask value {mask.max()} does not fit a class index (max 255)")
            if mask.min(initial=0) < 0:  # uint8 would wrap it: -1 became 255 (ignored), -2 became 254
                raise DataError(f"{path}: mask value {mask.min()} is below 0; class indices are 0..255")
            return mask.astype(np.uint8)
        raise DataError(f"{path}: unsupported mask mode {image.mode!r} (need an index, palette or RGB PNG)")


def index_mask(image: Image.Image, info: ClassInfo) -> np.ndarray:
    """The class ids of a mask in one of INDEX_MASK_MODES. Palette ('P'): `palette_indices`, unless the palette is
    the dataset's colours in another order. Grey ('L', or 'LA': its alpha dropped, as RGBA's is). 1-bit ('1', how
    many tools save a binary mask): 0 and 1; PIL's convert("L") would make 1 into 255, the usual ignore label."""
    if image.mode == "P":
        return palette_reading(image, info)[0]
    if image.mode == "1":
        return np.array(image).astype(np.uint8)
    return np.array(image.getchannel("L"))


def palette_reading(image: Image.Image, info: ClassInfo) -> tuple[np.ndarray, str]:
    """A palette mask's class ids, and how they were read: "colour", "index", or "index, not colour" (by index, though
    some index shows another class's colour: a colour reading was ruled out). The data check warns when one split
    holds masks read both ways: ids stored under a palette that happens to show other classes' colours (VOC's
    palette, say) are read by colour in the images where every colour fits, by index in the others.

    Its indices are the ids (VOC's masks, or ids under any palette of their own),
    unless the palette is the dataset's colours in another order: a colour mask re-saved by a PNG optimiser or an
    editor gets its own palette, and its indices then name other classes (read so, silently, until 2026-12-04).
    So when every index used shows a colour of the dataset (a class's or the ignore colour), each a different one,
    and one of them another class's colour than its own, the pixels are read by colour. Black alone is no evidence:
    code that writes ids fills the palette entries of its classes and leaves the rest black, so the void index 255
    (or a class left out) shows black, the colour of class 0 in VOC-style palettes; read by colour, void became
    background without a word."""
    indices = np.array(image)
    flat = image.getpalette() or []
    colours = [tuple(flat[i:i + 3]) for i in range(0, len(flat) - 2, 3)]
    by_colour = info.class_by_colour()
    used = np.flatnonzero(np.bincount(indices.ravel(), minlength=256))
    shown = [by_colour.get(colours[u]) if u < len(colours) else None for u in used]
    # The void colour at another index is evidence unless it is black: a palette compacted on saving (Pillow's GIF
    # writer; masks holding classes 0..m-1 and void) shows it at index m, read as class m until 2026-12-07.
    moved = [u for u, c in zip(used, shown)
             if c is not None and c != u and (c != info.ignore_index or colours[u] != (0, 0, 0))]
    if not moved:
        return indices, "index"
    if any(c is None for c in shown) or len(set(shown)) < len(shown) or all(colours[u] == (0, 0, 0) for u in moved):
        return indices, "index, not colour"
    lut = np.arange(256, dtype=np.uint8)
    lut[used] = shown
    return lut[indices], "colour"


def rgb_to_index(rgb: np.ndarray, info: ClassInfo, path: str | Path = "mask") -> np.ndarray:
    """Map each pixel's colour to its class index (the ignore colour to the ignore index)."""
    lut = np.full(1 << 24, -1, dtype=np.int16)
    for colour, index in info.class_by_colour().items():
        lut[(colour[0] << 16) | (colour[1] << 8) | colour[2]] = index
    keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    mask = lut[keys]
    if (mask < 0).any():
        y, x = np.argwhere(mask < 0)[0]
        colour = tuple(int(v) for v in rgb[y, x])
        hint = rgb_mask_hint(rgb, info)
        raise DataError(f"{path}: colour {colour} at (x={x}, y={y}) is not in the {info.name} palette"
                        + (f" ({hint})" if hint else ""))
    return mask.astype(np.uint8)


def rgb_mask_hint(rgb: np.ndarray, info: ClassInfo) -> str:
    """What an RGB mask with colours off the palette looks like, where it is clear: black and white alone (a binary
    mask), or every pixel grey with a class id or the ignore label as its value (ids saved in three channels, as
    cv2.imwrite of a 3-channel array does). Said: the mask is refused as off the palette either way (the data check
    then reads no class from it; a JPEG's noise around black is grey too)."""
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    if not grey.all():
        return ""
    values = np.unique(rgb[..., 0])
    if set(values.tolist()) <= {0, 255}:
        return "a black-and-white binary mask? store it as an index PNG with the object as 1"
    if not ((values < info.num_classes) | (values == info.ignore_index)).all():
        return ""
    shown = ", ".join(map(str, values[:6].tolist())) + (", ..." if len(values) > 6 else "")
    return (f"every pixel is grey with a class id as its value ({shown}): class ids saved as RGB? Save them as a "
            "one-channel (L) or palette PNG")


def check_mask_values(mask: np.ndarray, info: ClassInfo, path: str | Path) -> None:
    bad = (mask >= info.num_classes) & (mask != info.ignore_index)
    if bad.any():
        values = sorted(set(np.unique(mask[bad]).tolist()))
        raise DataError(
            f"{path}: mask values {values[:5]} outside 0..{info.num_classes - 1} and ignore {info.ignore_index}"
        )


def image_name(path: Path) -> bool:
    """Whether a file is taken for an image by its name: an image suffix, and not hidden (a copy from a Mac to exFAT,
    FAT or SMB leaves a `._name.jpg`, AppleDouble metadata, beside each file)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def dangling_link(source: object) -> str:
    """' (a link to X, which is not there)' for a path that is a link to nothing, else nothing: 'file not found'
    for a file the user sees listed sends them looking in the wrong place."""
    if not isinstance(source, (str, Path)) or not os.path.islink(source):
        return ""
    try:
        return f" (a link to {os.readlink(source)}, which is not there)"
    except OSError:
        return ""


def looked_at(path: Path) -> tuple[os.stat_result, Path]:
    """A listed file's stat and real path; DataError naming it when it has none (a symlink loop, a dangling link,
    a folder without permission)."""
    try:
        return path.stat(), path.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: Path.resolve() on a symlink loop before Python 3.13
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        link = dangling_link(path) if isinstance(error, FileNotFoundError) else ""
        raise DataError(f"{path}: cannot be read ({reason}){link}") from None


def list_images(folder: Path) -> list[Path]:
    """The images directly in `folder` (its subfolders are not read: see `nested_images`), by `image_name`: the
    AppleDouble files were listed and then refused as unreadable; a subfolder named like an image, photo.jpg/, was
    read as one. DataError for a folder that cannot be read."""
    try:
        return sorted(p for p in folder.iterdir() if image_name(p) and not p.is_dir())
    except OSError as error:
        raise DataError(f"{folder}: cannot read the folder ({error.strerror or error})") from None


SYSTEM_FILES = ("thumbs.db", "desktop.ini")  # what Windows leaves in a folder of pictures


def unread_files(folder: Path) -> list[Path]:
    """The files directly in `folder` that `list_images` passes over for their suffix (a phone's .heic, a .jxl, an
    .npy mask), hidden and system files aside: copied in with the rest, they were left out without a word."""
    try:
        return sorted(p for p in folder.iterdir() if not image_name(p) and not p.name.startswith(".")
                      and p.name.lower() not in SYSTEM_FILES and p.is_file())
    except OSError:  # list_images says why the folder cannot be read
        return []


def unread_note(files: list[Path]) -> str:
    """'3 file(s) not read, such as a.heic (...)' for `unread_files`, or nothing."""
    if not files:
        return ""
    suffixes = sorted({p.suffix.lower() or "(none)" for p in files})
    return (f"{len(files)} file(s) not read, such as {files[0].name} (suffix {', '.join(suffixes[:5])}; images and "
            f"masks are read from {', '.join(IMAGE_SUFFIXES)})")


def nested_images(folder: Path) -> list[Path]:
    """Images in `folder`'s subfolders (a Cityscapes-style images/CITY/*.png), which the datasets do not read."""
    return sorted(p for p in folder.glob("*/**/*")
                  if image_name(p) and p.is_file())
