import math
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from resunet.data.classes import ClassInfo  # noqa: E402
from resunet.fonts import fallback_families, fonts_for  # noqa: E402
from resunet.visualize import plot_confusion  # noqa: E402

HOOKED_D = "\u1d81"  # ᶁ: not in DejaVu Sans, in STIXGeneral (both ship with matplotlib)
CAT = "\u732b"  # 猫: in no font matplotlib ships


def titled(text: str):
    figure = plt.figure(figsize=(1.5, 0.6))
    figure.text(0.05, 0.3, text, fontsize=14)
    return figure


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_characters_dejavu_lacks_are_drawn_with_an_installed_font_that_has_them(tmp_path, capsys):
    families, unshown = fallback_families(f"road {HOOKED_D}")
    assert families and unshown == ""
    assert fallback_families("road, sky: ASCII and Latin-1 ñ é") == ([], "")
    # Drawn as a glyph, not as matplotlib's last-resort box: the picture differs from plain savefig's, and
    # matplotlib's "Glyph ... missing" warning (one per character and draw) is not raised.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = titled(HOOKED_D)
        plain.savefig(tmp_path / "plain.png", dpi=50)
        assert any("missing from font" in str(w.message) for w in caught)
        caught.clear()
        with fonts_for(tmp_path / "fallback.png", HOOKED_D):
            titled(HOOKED_D).savefig(tmp_path / "fallback.png", dpi=50)
        assert not caught
    assert (pixels(tmp_path / "plain.png") != pixels(tmp_path / "fallback.png")).any()
    assert capsys.readouterr().err == ""
    # ASCII text is drawn exactly as before.
    titled("road").savefig(tmp_path / "a.png", dpi=50)
    with fonts_for(tmp_path / "b.png", "road"):
        titled("road").savefig(tmp_path / "b.png", dpi=50)
    assert (pixels(tmp_path / "a.png") == pixels(tmp_path / "b.png")).all()
    plt.close("all")


def test_characters_no_installed_font_has_are_said_once(tmp_path, capsys):
    """Class names in Chinese came out as boxes in every plot, with a warning per character and draw."""
    families, unshown = fallback_families(CAT + HOOKED_D)
    info = ClassInfo((f"{CAT}{HOOKED_D}", "dog", CAT), ((0, 0, 0), (9, 9, 9), (20, 20, 20)))
    scores = {"iou": [0.5, 0.25, float("nan")], "miou": 0.375}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_confusion(np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]]), info, tmp_path / "confusion.png", scores)
    assert not [w for w in caught if "missing from font" in str(w.message)]
    assert pixels(tmp_path / "confusion.png").shape[2] == 3
    err = capsys.readouterr().err
    if unshown:  # no CJK font here (none ships with matplotlib; Debian's fonts-noto-cjk would have it)
        assert unshown == CAT and families
        assert err == (f"resunet: warning: {tmp_path / 'confusion.png'}: no installed font has {CAT}; drawn as boxes "
                       "(install a font with them, e.g. Debian's fonts-noto-cjk)\n")
    else:
        assert err == ""


def test_the_grid_fits_its_rows_to_the_pictures_shape(tmp_path):
    """The grid was 9.6 inches tall whatever the pictures: 4:3 frames (CamVid's 480×360) left a quarter of it white
    rows between picture rows, 6:1 strips over three quarters."""
    from resunet.data.classes import generic_info
    from resunet.visualize import plot_grid

    rng = np.random.default_rng(0)
    for (height, width), most_white in (((300, 400), 0.2), ((100, 600), 0.4), ((400, 300), 0.2)):
        images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(2)]
        masks = [rng.integers(0, 3, (height, width), dtype=np.uint8) for _ in range(2)]
        path = tmp_path / f"grid_{height}x{width}.png"
        plot_grid(images, masks, masks, generic_info(3), path)
        grey = np.asarray(Image.open(path).convert("L"))
        white_rows = float((grey.min(axis=1) > 250).mean())  # titles and the legend are not white
        assert white_rows < most_white, (height, width, white_rows)


def test_the_iou_legend_covers_no_bar(tmp_path, monkeypatch):
    """The legend sat inside the bar chart's lower right, on the last classes' bars when they were long."""
    import resunet.visualize as visualize
    from resunet.data.classes import generic_info

    drawn = {}
    monkeypatch.setattr(visualize, "save_figure", lambda fig, path, dpi: (fig.canvas.draw(), drawn.update(fig=fig)))
    iou = [0.9, 0.15, 0.96, 0.81]
    visualize.plot_confusion(np.diag([5, 1, 9, 4]) + 1, generic_info(4), tmp_path / "c.png",
                             {"iou": iou, "miou": float(np.mean(iou)), "boundary_iou": [0.8, 0.1, 0.9, 0.78],
                              "boundary_miou": 0.645})
    chart = drawn["fig"].axes[1]
    legend = chart.get_legend().get_window_extent()
    bars = [patch.get_window_extent() for patch in chart.patches]
    assert len(bars) == 8 and not any(legend.overlaps(bar) for bar in bars)


def test_dollar_signs_in_file_and_class_names_are_drawn_as_written(tmp_path, monkeypatch):
    """Found by a helper: matplotlib read a title with two $ as mathtext, so "scan_$1_$2.png" among the worst images
    failed in savefig (a traceback after the whole evaluation, no sheet) and "a $5 b $6" was drawn as an italic 5b."""
    from matplotlib.text import Text

    from resunet.visualize import plot_worst

    info = ClassInfo(("back$ground$", "thing"), ((0, 0, 0), (200, 0, 0)), 255, (224, 224, 192))
    target = np.zeros((8, 8), np.uint8)
    target[2:6, 2:6] = 1
    rows = [{"name": "scan_$1_$2.png", "image": np.zeros((8, 8, 3), np.uint8), "target": target,
             "prediction": np.zeros((8, 8), np.uint8), "miou": 0.4, "pixel_accuracy": 0.75}]
    drawn = []
    real_draw = Text.draw

    def spy(self, renderer):
        drawn.append((self.get_text(), self._preprocess_math(self.get_text())[1]))
        return real_draw(self, renderer)

    monkeypatch.setattr(Text, "draw", spy)
    plot_worst(rows, info, tmp_path / "worst.png")
    assert Image.open(tmp_path / "worst.png").size[0] > 100
    as_math = [math for text, math in drawn if "$" in text]  # whether each text with a $ was drawn as mathtext
    assert {"scan_$1_$2.png", "back$ground$"} <= {text.split("\n")[0] for text, _ in drawn}
    assert as_math and not any(as_math)


def test_an_image_with_every_pixel_ignored_is_titled_not_scored_not_nan(tmp_path, monkeypatch):
    """Its mIoU is NaN (null in worst.json, ranked last): the sheet said "mIoU nan%, pixel acc. nan%"."""
    from matplotlib.text import Text

    from resunet.visualize import plot_worst

    info = ClassInfo(("background", "thing"), ((0, 0, 0), (200, 0, 0)), 255, (224, 224, 192))
    rows = [{"name": name, "image": np.zeros((8, 8, 3), np.uint8), "target": np.full((8, 8), fill, np.uint8),
             "prediction": np.zeros((8, 8), np.uint8), "miou": miou, "pixel_accuracy": accuracy}
            for name, fill, miou, accuracy in (("a.png", 0, 0.5, 0.75), ("void.png", 255, math.nan, math.nan))]
    drawn = []
    real_draw = Text.draw
    monkeypatch.setattr(Text, "draw", lambda self, renderer: (drawn.append(self.get_text()),
                                                              real_draw(self, renderer))[1])
    plot_worst(rows, info, tmp_path / "worst.png")
    assert "a.png\nmIoU 50.0%, pixel acc. 75.0%" in drawn
    assert "void.png\nnot scored: every pixel ignored" in drawn and not any("nan" in text for text in drawn)


def test_importing_and_plotting_leave_the_callers_matplotlib_backend_alone(tmp_path):
    """Found by a helper: importing resunet.train (visualize) switched matplotlib to Agg for good, so a notebook's
    inline plots and a script's plt.show() drew nothing after it. The figures are resunet's own now, not pyplot's."""
    import subprocess
    import sys

    script = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
import resunet.train, resunet.doctor
from resunet.visualize import plot_curves
mine = plt.figure()
plot_curves([{{"epoch": 1, "train_loss": 1.0, "val_miou": 0.5, "lr": 0.1}},
             {{"epoch": 2, "train_loss": 0.5, "val_miou": 0.6, "lr": 0.05}}], {str(tmp_path / "curves.png")!r})
print(matplotlib.get_backend(), plt.gcf() is mine, plt.get_fignums())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["svg", "True", "[1]"]
    assert Image.open(tmp_path / "curves.png").size[0] > 500
