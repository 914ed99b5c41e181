"""Class names, colours and the ignore label of a dataset; VOC's by default, or read from `classes.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """PASCAL VOC's palette: class i's colour comes from the bits of i spread over R, G and B."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return colours


VOC_VOID_COLOUR = (224, 224, 192)  # palette entry 255


@dataclass(frozen=True)
class ClassInfo:
    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = 255
    ignore_colour: tuple[int, int, int] = VOC_VOID_COLOUR
    name: str = "dataset"

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "classes": list(self.names),
            "palette": [list(c) for c in self.palette],
            "ignore_index": self.ignore_index,
            "ignore_colour": list(self.ignore_colour),
        }

    @classmethod
    def from_dict(cls, values: dict, source: str = "classes", distinct_colours: bool = True) -> "ClassInfo":
        """`distinct_colours`: refuse two classes of one colour, or a class of the ignore colour (a dataset's RGB
        masks could not be read by them); False for a model's own description, which only draws with its colours:
        models trained on index masks before the rule (2026-12-04) were refused for good."""
        try:
            if not isinstance(values["classes"], (list, tuple)):
                raise TypeError(f"'classes' must be a list of names, got {type(values['classes']).__name__}")
            for i, name in enumerate(values["classes"]):
                # {"name": ..., "color": ...} entries (other tools' format) became names like "{'name': 'bg', ...}"
                # and their colours were dropped for VOC's without a word
                if isinstance(name, bool) or not isinstance(name, (str, int)) or not str(name).strip():
                    raise ValueError(f"{source}: class {i} is {json.dumps(name)}, not a name; a class file lists "
                                     "the names in 'classes' and their colours in 'palette'")
            names = tuple(str(n) for n in values["classes"])
            palette = values.get("palette") or voc_colormap(len(names))
            if not isinstance(palette, (list, tuple)):
                raise TypeError(f"'palette' must be a list of colours, got {type(palette).__name__}")
            palette = tuple(colour_values(colour, names[i] if i < len(names) else f"palette[{i}]", source)
                            for i, colour in enumerate(palette))
            ignore_index = whole_number(values.get("ignore_index", 255), "ignore_index", source)
            ignore_colour = colour_values(values.get("ignore_colour", VOC_VOID_COLOUR), "ignore_colour", source)
        except (KeyError, TypeError) as error:
            raise ValueError(f"{source}: malformed class description ({error!r})") from None
        if len(palette) < len(names):
            raise ValueError(f"{source}: {len(names)} classes but only {len(palette)} palette colours")
        check_classes(names, ignore_index, source)
        palette = palette[: len(names)]
        check_colours(names, palette, ignore_colour, source, distinct_colours)
        return cls(names, palette, ignore_index, ignore_colour, str(values.get("name", "dataset")))

    def palette_bytes(self) -> list[int]:
        """A 768-entry PIL palette: the classes' colours, the ignore colour at the ignore index, VOC's elsewhere."""
        colours = voc_colormap(256)
        colours[: self.num_classes] = self.palette
        if 0 <= self.ignore_index < 256:
            colours[self.ignore_index] = self.ignore_colour
        return [v for colour in colours for v in colour]

    def class_by_colour(self) -> dict[tuple[int, int, int], int]:
        """Each class's colour → its index, and the ignore colour → the ignore index (the colours are distinct:
        `check_colours`): how a mask drawn in colours is read."""
        return {**{tuple(colour): index for index, colour in enumerate(self.palette)},
                tuple(self.ignore_colour): self.ignore_index}

    def colour_lut(self) -> np.ndarray:
        """256×3 uint8 look-up table from class index to colour."""
        return np.array(self.palette_bytes(), dtype=np.uint8).reshape(256, 3)


VOC_INFO = ClassInfo(VOC_CLASSES, tuple(voc_colormap(21)), 255, VOC_VOID_COLOUR, "PASCAL VOC 2012")


def whole_number(value, what: str, source: str) -> int:
    """`value` as an int; ValueError naming `source` for anything else. int() read 254.7 as 254, and JSON's
    Infinity stopped the read with a traceback (a helper, 2026-12-06)."""
    if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{source}: {what} {value!r} is not a whole number")
    return int(value)


def colour_values(colour, name: str, source: str) -> tuple[int, ...]:
    """A colour given as a list of whole numbers (their count and range: `check_colours`). A string was read
    character by character ("255" as 2, 5, 5)."""
    if not isinstance(colour, (list, tuple)):
        raise ValueError(f"{source}: colour {colour!r} of {name!r} is not a list of three values in 0..255, such as "
                         "[128, 0, 0]")
    try:
        return tuple(whole_number(v, "", source) for v in colour)
    except ValueError:
        raise ValueError(f"{source}: colour {list(colour)} of {name!r} is not three whole numbers in 0..255") from None


def check_classes(names: tuple[str, ...], ignore_index: int, source: str) -> None:
    """ValueError (one line, naming `source`) for classes no uint8 mask can hold apart: more than 255, a name
    given twice (reports key classes by name), or an ignore label that is also a class."""
    if not names:
        raise ValueError(f"{source}: no classes")
    if len(names) > 255:  # and an ignore label outside them
        raise ValueError(f"{source}: {len(names)} classes; a uint8 mask holds at most 255 and the ignore label")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"{source}: class name(s) {', '.join(map(repr, twice))} given twice")
    if not 0 <= ignore_index <= 255:
        raise ValueError(f"{source}: ignore index {ignore_index} must be 0..255 (masks are uint8)")
    if 0 <= ignore_index < len(names):
        raise ValueError(f"{source}: ignore index {ignore_index} is also class {names[ignore_index]!r} (classes are "
                         f"0..{len(names) - 1}); give it a value outside them, e.g. 255")


def check_colours(names: tuple[str, ...], palette: tuple, ignore_colour: tuple, source: str,
                  distinct: bool = True) -> None:
    """ValueError (one line, naming `source`) for colours an RGB mask cannot be read by: not three values in 0..255
    (one out of range wrapped round to another colour, or stopped the read with a traceback), and where `distinct`,
    a colour given to two classes, or a class's colour that is also the ignore colour (its pixels were read as the
    later one, silently)."""
    for name, colour in [*zip(names, palette), ("ignore_colour", ignore_colour)]:
        if len(colour) != 3 or not all(0 <= v <= 255 for v in colour):
            raise ValueError(f"{source}: colour {list(colour)} of {name!r} is not three values in 0..255")
    if not distinct:
        return
    owner: dict[tuple, str] = {}
    for name, colour in zip(names, palette):
        if colour in owner:
            raise ValueError(f"{source}: classes {owner[colour]!r} and {name!r} have the same colour {list(colour)}; "
                             "an RGB mask could not tell them apart")
        owner[colour] = name
    if ignore_colour in owner:
        raise ValueError(f"{source}: class {owner[ignore_colour]!r} has the ignore colour {list(ignore_colour)}; give "
                         "one of them another colour")


def class_differences(expected: ClassInfo, found: ClassInfo) -> str | None:
    """How `found` labels otherwise than `expected` ("names, palette differ; class 1: 'car' → 'road'"), or None when
    they label alike (the dataset's display name aside)."""
    compared = [("names", expected.names, found.names), ("palette", expected.palette, found.palette),
                ("ignore label", (expected.ignore_index, expected.ignore_colour),
                 (found.ignore_index, found.ignore_colour))]
    differ = [what for what, a, b in compared if a != b]
    if not differ:
        return None
    first = next((f"class {i}: {a!r} → {b!r}" for i, (a, b) in enumerate(zip(expected.names, found.names)) if a != b),
                 None)
    return f"{', '.join(differ)} differ{f'; {first}' if first else ''}"


def generic_info(num_classes: int, ignore_index: int = 255) -> ClassInfo:
    """For a folder dataset without classes.json: names class_0.., VOC colours."""
    names = tuple(f"class_{i}" for i in range(num_classes))
    check_classes(names, ignore_index, "--num-classes/--ignore-index")
    return ClassInfo(names, tuple(voc_colormap(num_classes)), ignore_index)


def load_classes_json(path: Path) -> ClassInfo:
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # JSON is UTF-8; a BOM (Notepad) is fine
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read class description ({error})") from None
    if isinstance(values, dict):
        check_keys(values, str(path))
    return ClassInfo.from_dict(values, str(path))


CLASS_FILE_KEYS = ("name", "classes", "palette", "ignore_index", "ignore_colour")
# What other tools and habits call them (a spelling check alone sends "colours" to "ignore_colour").
KEY_SYNONYMS = {
    "palette": ("colors", "colours", "color", "colour", "colormap", "colourmap", "color_map", "colour_map", "cmap"),
    "classes": ("names", "class_names", "labels", "categories"),
    "ignore_index": ("ignore_label", "ignore", "void", "void_index", "void_label", "ignore_value"),
    "ignore_colour": ("ignore_color", "void_color", "void_colour"),
}


def check_keys(values: dict, source: str) -> None:
    """ValueError for a key a class file does not have: "colors" for "palette", or "ignore_label", was passed over
    and the default (VOC's colours, 255) used in its place without a word."""
    import difflib

    unknown = [key for key in values if key not in CLASS_FILE_KEYS]
    if not unknown:
        return
    hints = []
    for key in unknown:
        meant = [known for known, others in KEY_SYNONYMS.items() if str(key).lower() in others]
        meant = meant or difflib.get_close_matches(str(key).lower(), CLASS_FILE_KEYS, n=1, cutoff=0.6)
        hints.append(f"{key!r} (did you mean {meant[0]!r}?)" if meant else repr(key))
    raise ValueError(f"{source}: unknown key(s) {', '.join(hints)}; a class file has {', '.join(CLASS_FILE_KEYS)}")
