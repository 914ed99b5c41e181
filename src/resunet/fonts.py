"""Text in plots in any script. Matplotlib draws with DejaVu Sans, which has no Chinese, Japanese, Korean, Thai, ...
characters: class names and file names in them came out as boxes. Here a plot's texts fall back on installed fonts
that have the characters DejaVu Sans lacks, and what no installed font has is said once."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib
from matplotlib import font_manager
from matplotlib.ft2font import FT2Font

# Matplotlib's own last fallback: a box naming the code point's block for every character, which is no glyph.
PLACEHOLDER_FONTS = ("Last Resort High-Efficiency", "LastResort")


@functools.cache
def font_characters(path: str) -> frozenset[int]:
    """The code points a font file has glyphs for (none for a file FreeType cannot open)."""
    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


def fallback_families(text: str) -> tuple[list[str], str]:
    """Installed font families that draw the characters of `text` the default font lacks, the one covering most
    first (a CJK font before one with a few of them), and the characters none of them has."""
    default = font_manager.findfont(font_manager.FontProperties())
    missing = {ord(c) for c in text if c.isprintable() and not c.isspace()} - font_characters(default)
    candidates = {}  # family → its upright regular file (or whichever it has)
    for entry in font_manager.fontManager.ttflist:
        if missing and entry.name not in PLACEHOLDER_FONTS and (entry.name not in candidates or
                                                                 (entry.style, entry.weight) == ("normal", 400)):
            candidates[entry.name] = entry.fname
    families = []
    while missing:
        covered = {name: missing & font_characters(path) for name, path in candidates.items()}
        best = max(sorted(covered), key=lambda name: len(covered[name]), default=None)
        if best is None or not covered[best]:
            break
        families.append(best)
        missing -= covered.pop(best)
        del candidates[best]
    return families, "".join(map(chr, sorted(missing)))


@contextmanager
def fonts_for(path: str | Path, *texts: str) -> Iterator[None]:
    """Around a plot's making and saving: its texts (every `texts` string it will show) fall back on the installed
    fonts their characters need, and matplotlib's warnings about glyphs none of them has (one per character and
    draw) become one line naming the file and the characters, on leaving."""
    families, unshown = fallback_families("".join(texts))
    # text.parse_math off: names are drawn as written ("scan_$1_$2.png" was mathtext: a traceback after the whole
    # evaluation, or "a $5 b $6" drawn as an italic "5b")
    with matplotlib.rc_context({"font.family": [*matplotlib.rcParams["font.family"], *families],
                                "text.parse_math": False}), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        yield
    if unshown:
        print(f"resunet: warning: {path}: no installed font has {unshown[:12]}{'...' if len(unshown) > 12 else ''}; "
              "drawn as boxes (install a font with them, e.g. Debian's fonts-noto-cjk)", file=sys.stderr)
