"""Dataset-wide evaluation at each image's original resolution.

Images are predicted at the working size and their logits upsampled back to the original size; one confusion
matrix collects every pixel of the split (ignore label excluded). Under torch.distributed each process takes every
world_size-th image (no padding duplicates, which would count some pixels twice) and the matrices are summed.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .data.classes import ClassInfo
from .data.dataset import (PairedDataset, data_locations, open_dataset_for_model, worker_batches,
                           worker_ignores_ctrl_c)
from .data.images import DEFAULT_MAX_PIXELS, DataError
from .metrics import BoundaryIoU, CalibrationError, ConfusionMatrix, image_miou
from .outputs import (PLOT_SUFFIXES, check_folder_apart, check_output_files, check_output_folder, is_stream,
                      resolved, write_output)
from .predict import AUTO_TTA, Predictor, load_ensemble
from .runtime import is_out_of_memory


def _as_lists(batch):
    return batch


def evaluate_dataset(
    predictor: Predictor,
    dataset: PairedDataset,
    batch_size: int = 8,
    workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    boundary: BoundaryIoU | None = None,
    per_image: list[tuple[int, float]] | None = None,
    calibration: CalibrationError | None = None,
    stop: Callable[[], bool] | None = None,
) -> ConfusionMatrix | None:
    """Confusion matrix over the whole dataset (all processes' shares summed). Given `boundary`, it accumulates the
    boundary IoU too; given `per_image`, (dataset index, the image's own mIoU) pairs are appended to it; given
    `calibration`, the probabilities' calibration error (the predictor must output logits). Given `stop`, it is asked
    after each batch, and True ends the pass: None (training's evaluation, when a signal leaves a grace period too
    short for a whole pass). Every process calls it as often as the one with the most batches: under torchrun it
    may be a collective that agrees on the answer."""
    info = dataset.info
    matrix = ConfusionMatrix(info.num_classes, info.ignore_index)
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, collate_fn=_as_lists,
                        worker_init_fn=worker_ignores_ctrl_c if workers else None)
    # A bar only on a terminal: in a log file it would be `\r` fragments.
    position = rank  # the dataset index of the next sample: the loader keeps the shard's order
    no_bar = not progress or rank != 0 or not sys.stderr.isatty()
    with worker_batches(loader) as batches:  # a bad file ends the pass: its workers end with it
        for samples in tqdm(batches, total=len(loader), desc="eval", leave=False, disable=no_bar):
            # Images of one size are run as one batch; a split with mixed sizes (VOC) runs in smaller groups.
            by_size: dict[tuple[int, int], list] = {}
            for sample in samples:
                by_size.setdefault(sample.mask.shape, []).append((position, sample))
                position += world_size
            for group in by_size.values():
                images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for _, s in group])
                targets = torch.stack([torch.from_numpy(s.mask) for _, s in group])
                try:
                    if calibration is not None:  # band by band: never the whole batch's full-size probabilities
                        (maps, confidence), = predictor.full_size_maps([images], confidence=True)
                        predictions = maps.long()
                        calibration.update_chosen(confidence, predictions, targets.to(predictions.device).long())
                        predictions = predictions.cpu()
                    else:
                        predictions = predictor.predict_tensor(images).cpu()
                except DataError as error:  # too large at the working size (one size: the group's first file)
                    raise dataset.named(group[0][0], error) from None
                except RuntimeError as error:  # a traceback, naming no file, for a batch too large for the device
                    if not is_out_of_memory(error):
                        raise
                    height, width = targets.shape[-2:]
                    raise dataset.named(group[0][0], DataError(
                        f"out of memory evaluating {len(group)} image(s) of {width}×{height} together; a lower "
                        "--batch-size (or --window) needs less, as does --device cpu")) from None
                matrix.update(predictions, targets)
                for (index, _), prediction, target in zip(group, predictions, targets):
                    if boundary is not None:
                        boundary.update(prediction, target)
                    if per_image is not None:
                        per_image.append((index, image_miou(prediction, target, info.num_classes, info.ignore_index)))
            if stop is not None and stop():
                return None
    if stop is not None:  # the calls the processes with more batches still make (shards differ by an image)
        most_batches = math.ceil(math.ceil(len(dataset) / world_size) / batch_size)
        for _ in range(len(loader), most_batches):
            if stop():
                return None
    matrix.all_reduce()
    for extra in (boundary, calibration):
        if extra is not None:
            extra.all_reduce()
    return matrix


def format_table(scores: dict, info: ClassInfo) -> str:
    """Per-class IoU (and boundary IoU when scored), then the means and pixel accuracy."""
    width = max(12, max(len(n) for n in info.names) + 2)
    boundary = scores.get("boundary_iou")
    percent = lambda v: "absent" if math.isnan(v) else f"{100 * v:7.2f}"
    lines = [f"{'class':<{width}} {'IoU %':>7}" + (f" {'boundary IoU %':>15}" if boundary else "")]
    for c, (name, iou) in enumerate(zip(info.names, scores["iou"])):
        lines.append(f"{name:<{width}} {percent(iou):>7}" + (f" {percent(boundary[c]):>15}" if boundary else ""))
    lines.append("-" * (width + (24 if boundary else 8)))
    lines.append(f"{'mIoU':<{width}} {100 * scores['miou']:7.2f}"
                 + (f" {100 * scores['boundary_miou']:15.2f}" if boundary else ""))
    lines.append(f"{'pixel acc.':<{width}} {100 * scores['pixel_accuracy']:7.2f}")
    if scores.get("ece") is not None:  # a predictor with probabilities (an end-to-end ONNX graph's too)
        temperature = scores.get("temperature", 1.0)
        if isinstance(temperature, list):  # an ensemble: each member's, applied before its probabilities are averaged
            said = "temperatures " + ", ".join(f"{t:.3g}" for t in temperature) + " of the members"
        else:
            said = f"temperature {temperature:.3g}"
        lines.append(f"{'ECE':<{width}} {100 * scores['ece']:7.2f}   (15 bins, {said})")
    return "\n".join(lines)


def strict_json(value, indent: int | None = 1) -> str:
    """JSON that every parser reads: NaN (a class absent from the split, an image with nothing scored) as null.
    `indent` None: one line (a .jsonl record)."""
    def clean(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: clean(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return item
    return json.dumps(clean(value), indent=indent, allow_nan=False)


def check_outputs(json_out: str | None, confusion_png: str | None, worst_out: str | None, data_root: str,
                  inputs: list = (), worst: int = 1) -> None:
    """Refuse, before evaluating, outputs that could not be written or would be written over an input (the models,
    the dataset's files), into the dataset's folders, or over each other."""
    outputs = [("--json", json_out), ("--confusion", confusion_png)]
    if worst_out:
        check_folder_apart("--out", worst_out, data_locations(data_root)[0])
        check_output_folder("--out", worst_out)
        folder = resolved(worst_out)
        for flag, path in outputs:  # written first, as a file: the sheets' folder could then not be made
            if path and (resolved(path) == folder or resolved(path) in folder.parents):
                raise DataError(f"--out {worst_out}: {flag} {path} is written as a file there, and the folder of "
                                "the worst images cannot be a file too; name another folder or file")
        outputs += [("--out", Path(worst_out) / name) for name in (*worst_sheet_names(worst), "worst.json")]
    check_output_files(outputs, inputs, suffixes={"--confusion": PLOT_SUFFIXES}, data_root=data_root)


def run_evaluate(
    checkpoint: str,
    data_root: str,
    split: str = "val",
    json_out: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    tta: str = AUTO_TTA,
    batch_size: int = 8,
    workers: int = 2,
    confusion_png: str | None = None,
    scales: tuple[float, ...] | None = None,
    window: int | None = None,
    stride: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    worst: int = 0,
    worst_out: str | None = None,
    ensemble: str | Path | Sequence[str | Path] = (),
    progress: bool = True,
) -> dict:
    """The `resunet evaluate` command (a .pt checkpoint or an .onnx file): print the per-class table (IoU and
    boundary IoU), return the scores. `worst` > 0: also draw the `worst` images with the lowest own mIoU into
    `worst_out`/worst.png (image, ground truth, prediction, errors; past WORST_PER_SHEET rows on worst-2.png, ...)
    and list them in `worst_out`/worst.json.
    `ensemble`: more model files whose probabilities are averaged with the first's."""
    if worst > 0 and not worst_out:  # the contact sheet went to the current folder, unchecked
        raise DataError(f"--worst {worst} needs --out DIR for its contact sheet")
    if worst_out and worst <= 0:
        raise DataError(f"--out {worst_out} is the folder for --worst K's contact sheet; give --worst too")
    check_outputs(json_out, confusion_png, worst_out if worst > 0 else None, data_root, worst=worst)  # before work
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: at least 1")
    ensemble = [ensemble] if isinstance(ensemble, (str, Path)) else ensemble  # one path, not its characters
    predictor = load_ensemble([checkpoint, *ensemble], device=device, precision=precision, tta=tta, scales=scales,
                              window=window, stride=stride)
    info = predictor.info
    members = getattr(predictor, "members", None)  # an ensemble's own models
    dataset = open_dataset_for_model(data_root, split, info, max_pixels)
    check_outputs(json_out, confusion_png, worst_out if worst > 0 else None, data_root,
                  inputs=[checkpoint, *ensemble, *dataset.image_paths, *dataset.mask_paths], worst=worst)
    boundary = BoundaryIoU(info.num_classes, info.ignore_index)
    per_image: list[tuple[int, float]] | None = [] if worst > 0 else None
    calibration = CalibrationError(info.ignore_index) if predictor.has_logits else None
    matrix = evaluate_dataset(predictor, dataset, batch_size, workers, progress=progress, boundary=boundary,
                              per_image=per_image, calibration=calibration)
    if matrix.matrix.sum() == 0:  # printed as "mIoU nan", exit status 0, without a word of why
        raise DataError(f"{dataset.description}: every mask pixel of its {len(dataset)} image(s) is the ignore label "
                        f"{info.ignore_index}: nothing to score")
    scores = {**matrix.compute(), **boundary.compute(),
              "ece": calibration.compute() if calibration else None,
              "temperature": [m.temperature for m in members] if members else predictor.temperature}
    extra = f", window {predictor.window} stride {predictor.stride}" if predictor.window else ""
    sizes = (f"working sizes {', '.join(str(m.size) for m in members)}" if members
             else f"working size {predictor.size}")
    scales_text = f" scales {','.join(f'{s:g}' for s in predictor.scales)}" if "ms" in predictor.tta else ""
    print(f"{dataset.description}: {len(dataset)} images, evaluated at original resolution "
          f"({sizes}, tta {predictor.tta}{scales_text}{extra})")
    print(format_table(scores, info))
    result = {"checkpoint": str(checkpoint), "ensemble": list(ensemble), "split": split, "images": len(dataset),
              "inference": predictor.inference_settings(), "classes": list(info.names),
              **scores, "confusion_matrix": matrix.matrix.tolist()}
    # A file is written now (the scores kept if the contact sheet fails) and again with the worst images; a stream
    # (`--json /dev/fd/3 3> scores.json`) once, at the end: it got two documents one after the other
    if json_out and not (per_image and is_stream(json_out)):
        write_output(json_out, strict_json(result))
        print(f"wrote {json_out}")
    if confusion_png:
        from .visualize import plot_confusion

        plot_confusion(matrix.matrix, info, confusion_png, scores)
        print(f"wrote {confusion_png} (confusion matrix and per-class IoU)")
    if per_image:
        rows, result["worst"] = worst_images(predictor, dataset, per_image, worst)
        # Their list and the scores first: drawing is the step most likely to fail (a full disk, a font), and the
        # whole evaluation is behind it.
        out = Path(worst_out)
        out.mkdir(parents=True, exist_ok=True)
        write_output(out / "worst.json", strict_json(result["worst"]))
        if json_out:
            write_output(json_out, strict_json(result))
        draw_worst(rows, info, out, keep=[path for path in (json_out, confusion_png) if path])
    return result


# Rows per contact sheet: matplotlib draws no picture 2^16 pixels high, which a single sheet of 226 rows (2.9 inches
# each) reached: `--worst 300` on VOC val ended in a traceback after the whole evaluation. More go on worst-2.png...
WORST_PER_SHEET = 25
# Each row's pictures kept at most this many pixels a side (drawn ~260 wide): 12-megapixel photos held whole, with
# their masks, took ~60 MB a row before matplotlib's own copies.
WORST_THUMBNAIL = 640


def worst_sheet_name(position: int) -> str:
    """The contact sheet of the `position`-th worst image (from 0): worst.png, then worst-2.png, worst-3.png, ..."""
    page = position // WORST_PER_SHEET + 1
    return "worst.png" if page == 1 else f"worst-{page}.png"


def worst_sheet_names(count: int) -> list[str]:
    """The contact sheets `count` worst images fill, in order."""
    return [worst_sheet_name(start) for start in range(0, count, WORST_PER_SHEET)]


def worst_images(predictor: Predictor, dataset: PairedDataset, per_image: list[tuple[int, float]],
                 count: int) -> tuple[list[dict], list[dict]]:
    """The `count` images with the lowest own mIoU (NaN, nothing scored, last): their contact-sheet rows
    (thumbnails) and their list (name, image file, scores, sheet)."""
    from .visualize import thumbnails

    ranked = sorted(per_image, key=lambda item: (math.isnan(item[1]), item[1]))[:count]
    rows, listed = [], []
    for position, (index, miou) in enumerate(ranked):
        sample = dataset.load(index)
        prediction = predictor.predict(sample.image)
        valid = sample.mask != dataset.info.ignore_index
        accuracy = float((prediction[valid] == sample.mask[valid]).mean()) if valid.any() else math.nan
        image, target, prediction = thumbnails(sample.image, sample.mask, prediction, WORST_THUMBNAIL)
        rows.append({"name": sample.name, "image": image, "target": target, "prediction": prediction,
                     "miou": miou, "pixel_accuracy": accuracy})
        listed.append({"name": sample.name, "image": str(dataset.image_paths[index]), "miou": miou,
                       "pixel_accuracy": accuracy, "sheet": worst_sheet_name(position)})
    return rows, listed


def draw_worst(rows: list[dict], info: ClassInfo, out: Path, keep: Sequence[str | Path] = ()) -> None:
    """The contact sheets of `rows` in `out`, WORST_PER_SHEET rows each. An earlier, longer list's sheets there are
    removed, but not `keep`, this run's other outputs (a --confusion named worst-2.png in --out was written, said,
    then removed)."""
    from .visualize import plot_worst

    sheets = [out / name for name in worst_sheet_names(len(rows))]
    kept = {os.path.realpath(path) for path in keep}
    for stale in out.glob("worst-*.png"):  # an earlier, longer list's sheets (another model's?) beside this one's
        page = re.fullmatch(r"worst-(\d+)\.png", stale.name)
        if page and int(page.group(1)) > len(sheets) and os.path.realpath(stale) not in kept:
            stale.unlink(missing_ok=True)
    for start, sheet in zip(range(0, len(rows), WORST_PER_SHEET), sheets):
        plot_worst(rows[start:start + WORST_PER_SHEET], info, sheet)
    more = f" and {sheets[-1].name}" if len(sheets) == 2 else f" to {sheets[-1].name}" if len(sheets) > 2 else ""
    print(f"wrote the {len(rows)} images with the lowest mIoU to {sheets[0]}{more} (list: {out / 'worst.json'})")
