"""Pictures: training curves, the 3×5 image / ground truth / prediction grid, a confusion heatmap with per-class
IoU bars, the worst images' contact sheet."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.patches import Patch
from PIL import Image

from .data.classes import ClassInfo
from .data.images import DEFAULT_MAX_PIXELS, DataError
from .fonts import fonts_for
from .outputs import PLOT_SUFFIXES, check_output_files, save_figure, subplots



def plot_curves(records: list[dict], path: str | Path) -> None:
    """Train loss, val mIoU and learning rate per epoch, from metrics.jsonl records."""
    epochs = [r["epoch"] for r in records]
    fig, axes = subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["train_loss"] for r in records], marker=".")
    axes[0].set_title("train loss")
    evaluated = [r for r in records if r.get("val_miou") is not None]  # --eval-every N skips some epochs
    axes[1].plot([r["epoch"] for r in evaluated], [100 * r["val_miou"] for r in evaluated], marker=".",
                 color="tab:green")
    axes[1].set_title("val mIoU (%)")
    axes[2].plot(epochs, [r["lr"] for r in records], marker=".", color="tab:orange")
    axes[2].set_title("learning rate")
    if all(r["lr"] > 0 for r in records):  # cosine decays to exactly 0 at the end: no log scale then
        axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    # Fixed margins, not tight_layout: it measured every label each epoch, about half the plot's time.
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.14, top=0.92, wspace=0.22)
    save_figure(fig, path, dpi=100)


def colorize(mask: np.ndarray, info: ClassInfo) -> np.ndarray:
    return info.colour_lut()[mask]


def class_legend(fig, info: ClassInfo, masks: list[np.ndarray]) -> float:
    """A legend along the figure's bottom of the classes that occur in the masks, in as many columns as the
    figure's width holds (a fixed 8 ran off both sides of a one-image grid); returns the height in inches its rows
    take, for the caller to keep free."""
    present = sorted({int(v) for m in masks for v in np.unique(m) if v < info.num_classes})
    if not present:
        return 0.0
    handles = [Patch(color=np.array(info.palette[c]) / 255, label=info.names[c]) for c in present]
    entry_inches = 0.55 + 0.09 * max(len(info.names[c]) for c in present)  # swatch, gaps, 10-pt text
    columns = max(1, min(len(handles), int(0.95 * fig.get_figwidth() / entry_inches)))
    fig.legend(handles=handles, loc="lower center", ncol=columns, frameon=False)
    return 0.3 * math.ceil(len(handles) / columns) + 0.1


def lay_out_with_legend(fig, info: ClassInfo, masks: list[np.ndarray], pictures_inches: float) -> None:
    """The class legend under pictures `pictures_inches` tall: the figure grows by the legend's rows."""
    legend_inches = class_legend(fig, info, masks)
    fig.set_figheight(pictures_inches + legend_inches)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))


def plot_grid(images: list[np.ndarray], targets: list[np.ndarray], predictions: list[np.ndarray], info: ClassInfo,
              path: str | Path) -> None:
    """Row 1 images, row 2 ground truth, row 3 prediction (class colours), legend of the classes present."""
    with fonts_for(path, *info.names):
        columns = len(images)
        # Each row as tall as its tallest picture (height over width) needs at 3 inches a column, plus its title: a
        # fixed height (made for square pictures) left bands of white between the rows of CamVid's 4:3 frames.
        aspect = min(max(image.shape[0] / image.shape[1] for image in images), 3.0)
        pictures_inches = 3 * (3 * aspect + 0.3)
        fig, axes = subplots(3, columns, figsize=(3 * columns, pictures_inches), squeeze=False)
        for col in range(columns):
            pictures = (images[col], colorize(targets[col], info), colorize(predictions[col], info))
            for row, picture in enumerate(pictures):
                axes[row][col].imshow(picture)
                axes[row][col].axis("off")
        for row, title in enumerate(("image", "ground truth", "prediction")):
            axes[row][0].set_title(title, loc="left", fontsize=11)
        lay_out_with_legend(fig, info, targets + predictions, pictures_inches)
        save_figure(fig, path, dpi=90)


def plot_confusion(matrix, info: ClassInfo, path: str | Path, scores: dict | None = None) -> None:
    """Row-normalised confusion matrix (rows: true class) with class names; given `scores`, beside it a bar chart of
    each class's IoU (and boundary IoU when scored)."""
    with fonts_for(path, *info.names):
        m = np.asarray(matrix, dtype=np.float64)
        m = m / np.maximum(m.sum(1, keepdims=True), 1)
        n = info.num_classes
        side = 0.45 * n + 2
        fig, axes = subplots(1, 2 if scores else 1, figsize=(2 * side + 3 if scores else side + 1, side),
                                 squeeze=False)
        ax = axes[0][0]
        ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), info.names, rotation=90)
        ax.set_yticks(range(n), info.names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("share of each true class's pixels (rows sum to 1)", fontsize=9, loc="left")
        if scores:
            bars = axes[0][1]
            rows = np.arange(n)
            iou = 100 * np.nan_to_num(np.asarray(scores["iou"], dtype=np.float64))
            boundary = scores.get("boundary_iou")
            height = 0.4 if boundary else 0.8
            bars.barh(rows - (height / 2 if boundary else 0), iou, height,
                      label=f"IoU (mean {100 * scores['miou']:.1f})")
            if boundary:
                bars.barh(rows + height / 2, 100 * np.nan_to_num(np.asarray(boundary, dtype=np.float64)), height,
                          label=f"boundary IoU (mean {100 * scores['boundary_miou']:.1f})")
            absent = np.isnan(np.asarray(scores["iou"], dtype=np.float64))
            for row in np.flatnonzero(absent):  # no bar is not a 0% bar: the class is in neither labels nor predictions
                bars.text(1, row, "absent", va="center", fontsize=8, color="#777", style="italic")
            bars.set_yticks(rows, [f"{name} (absent)" if gone else name for name, gone in zip(info.names, absent)])
            bars.invert_yaxis()
            bars.set_xlim(0, 100)
            bars.set_xlabel("%")
            bars.grid(axis="x", alpha=0.3)
            # Above the axes: inside them, "lower right" sat on the last classes' long bars (a CamVid bicyclist's 81%).
            bars.legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=2, fontsize=8, frameon=False)
        fig.tight_layout()
        save_figure(fig, path, dpi=90)


def error_map(target: np.ndarray, prediction: np.ndarray, info: ClassInfo) -> np.ndarray:
    """Wrong pixels red, right ones black, ignored ones grey."""
    picture = np.zeros(target.shape + (3,), dtype=np.uint8)
    picture[prediction != target] = (230, 40, 40)
    picture[target == info.ignore_index] = (128, 128, 128)
    return picture


def thumbnails(image: np.ndarray, target: np.ndarray, prediction: np.ndarray,
               longest: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image, its mask and its prediction at most `longest` pixels a side, for a contact sheet's row: the masks
    by nearest neighbour at one grid (their error map is the full-size one's, sampled), the image by area."""
    height, width = target.shape
    scale = longest / max(height, width)
    if scale >= 1:
        return image, target, prediction
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    rows = ((np.arange(size[1]) + 0.5) * height / size[1]).astype(np.intp)
    columns = ((np.arange(size[0]) + 0.5) * width / size[0]).astype(np.intp)
    picture = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    return picture, target[np.ix_(rows, columns)], prediction[np.ix_(rows, columns)]


def plot_worst(rows: list[dict], info: ClassInfo, path: str | Path) -> None:
    """A contact sheet, one row per image: image / ground truth / prediction / errors, titled with its scores.
    `rows`: dicts with name, image, target, prediction, miou, pixel_accuracy."""
    # A file name that is not UTF-8 (caf\xe9 from a Latin-1 archive) with U+FFFD where its bytes are not text:
    # the font machinery refused its escapes ("surrogates not allowed") after the whole evaluation.
    names = [os.fsencode(row["name"]).decode(errors="replace") for row in rows]
    with fonts_for(path, *info.names, *names):
        fig, axes = subplots(len(rows), 4, figsize=(13, 2.9 * len(rows)), squeeze=False)
        for ax_row, row, name in zip(axes, rows, names):
            pictures = (row["image"], colorize(row["target"], info), colorize(row["prediction"], info),
                        error_map(row["target"], row["prediction"], info))
            for ax, picture in zip(ax_row, pictures):
                ax.imshow(picture)
                ax.axis("off")
            # An image whose pixels are all ignored has no score (null in worst.json): not "nan%"
            scores = (f"mIoU {100 * row['miou']:.1f}%, pixel acc. {100 * row['pixel_accuracy']:.1f}%"
                      if math.isfinite(row["miou"]) else "not scored: every pixel ignored")
            ax_row[0].set_title(f"{name}\n{scores}", loc="left", fontsize=9)
        for ax, title in zip(axes[0][1:], ("ground truth", "prediction", "errors (red; ignored grey)")):
            ax.set_title(title, loc="left", fontsize=10)
        lay_out_with_legend(fig, info, [m for row in rows for m in (row["target"], row["prediction"])], 2.9 * len(rows))
        save_figure(fig, path, dpi=80)


def run_visualize(checkpoint: str, data_root: str, out: str, split: str = "val", count: int = 5, seed: int = 0,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, **options) -> None:
    """The `resunet visualize` command: the seed's 3×5 grid on `count` images of the split. `options`: those of
    `predict.load` (device, precision, tta, ...); `checkpoint` may be a .pt or an .onnx file."""
    from .data.dataset import open_dataset_for_model
    from .predict import load

    if str(out).endswith("/") or Path(out).is_dir():  # before ".png" is added: "vis" would become vis.png beside it
        raise DataError(f"--out {out}: is a folder; give a file name such as {Path(out) / 'grid.png'}")
    if not Path(out).suffix:  # matplotlib would add ".png" itself; name the file it writes
        out = f"{out}.png"
    check_output_files([("--out", out)], suffixes={"--out": PLOT_SUFFIXES}, data_root=data_root)
    predictor = load(checkpoint, **options)
    dataset = open_dataset_for_model(data_root, split, predictor.info, max_pixels)
    check_output_files([("--out", out)], inputs=[checkpoint, *dataset.image_paths, *dataset.mask_paths],
                       data_root=data_root)
    if len(dataset) == 0:
        raise DataError(f"{data_root}: the {split} split has no images to draw")
    picks = np.random.default_rng(seed).choice(len(dataset), size=min(count, len(dataset)), replace=False)
    indices = [int(i) for i in sorted(picks)]
    samples = [dataset.load(i) for i in indices]
    predictions = []
    for index, sample in zip(indices, samples):
        try:
            predictions.append(predictor.predict(sample.image))
        except DataError as error:  # too large at the working size
            raise dataset.named(index, error) from None
    plot_grid([s.image for s in samples], [s.mask for s in samples], predictions, predictor.info, out)
    print(f"wrote {out}")
