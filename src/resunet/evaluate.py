"""Dataset-wide evaluation at each image's original resolution.

Images are predicted at the working size and their logits upsampled back to the original size; one confusion
matrix collects every pixel of the split (ignore label excluded). Under torch.distributed each process takes every
world_size-th image (no padding duplicates, which would count some pixels twice) and the matrices are summed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .data.classes import ClassInfo
from .data.dataset import PairedDataset, open_dataset, worker_ignores_ctrl_c
from .data.images import DEFAULT_MAX_PIXELS
from .metrics import ConfusionMatrix
from .predict import DEFAULT_SCALES, Predictor, load


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
) -> ConfusionMatrix:
    """Confusion matrix over the whole dataset (all processes' shares summed)."""
    info = dataset.info
    matrix = ConfusionMatrix(info.num_classes, info.ignore_index)
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, collate_fn=_as_lists,
                        worker_init_fn=worker_ignores_ctrl_c if workers else None)
    # A bar only on a terminal: in a log file it would be `\r` fragments.
    for samples in tqdm(loader, desc="eval", leave=False, disable=not progress or rank != 0 or not sys.stderr.isatty()):
        # Images of one size are run as one batch; a split with mixed sizes (VOC) runs in smaller groups.
        by_size: dict[tuple[int, int], list] = {}
        for sample in samples:
            by_size.setdefault(sample.mask.shape, []).append(sample)
        for group in by_size.values():
            images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in group])
            targets = torch.stack([torch.from_numpy(s.mask) for s in group])
            predictions = predictor.predict_tensor(images).cpu()
            matrix.update(predictions, targets)
    matrix.all_reduce()
    return matrix


def format_table(scores: dict, info: ClassInfo) -> str:
    width = max(12, max(len(n) for n in info.names) + 2)
    lines = [f"{'class':<{width}} {'IoU %':>7}"]
    for name, iou in zip(info.names, scores["iou"]):
        lines.append(f"{name:<{width}} {'absent' if math.isnan(iou) else f'{100 * iou:7.2f}':>7}")
    lines.append("-" * (width + 8))
    lines.append(f"{'mIoU':<{width}} {100 * scores['miou']:7.2f}")
    lines.append(f"{'pixel acc.':<{width}} {100 * scores['pixel_accuracy']:7.2f}")
    return "\n".join(lines)


def run_evaluate(
    checkpoint: str,
    data_root: str,
    split: str = "val",
    json_out: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    tta: str = "none",
    batch_size: int = 8,
    workers: int = 2,
    confusion_png: str | None = None,
    scales: tuple[float, ...] = DEFAULT_SCALES,
    window: int | None = None,
    stride: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> dict:
    """The `resunet evaluate` command (a .pt checkpoint or an .onnx file): print the per-class table, return scores."""
    predictor = load(checkpoint, device=device, precision=precision, tta=tta, scales=scales, window=window,
                     stride=stride)
    info = predictor.info
    dataset = open_dataset(data_root, split, info.num_classes, info.ignore_index, max_pixels)
    matrix = evaluate_dataset(predictor, dataset, batch_size, workers)
    scores = matrix.compute()
    extra = f", window {predictor.window} stride {predictor.stride}" if predictor.window else ""
    scales_text = f" scales {','.join(f'{s:g}' for s in predictor.scales)}" if "ms" in predictor.tta else ""
    print(f"{dataset.description}: {len(dataset)} images, evaluated at original resolution "
          f"(working size {predictor.size}, tta {predictor.tta}{scales_text}{extra})")
    print(format_table(scores, info))
    result = {"checkpoint": str(checkpoint), "split": split, "images": len(dataset), "classes": list(info.names),
              **scores, "confusion_matrix": matrix.matrix.tolist()}
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1))
    if confusion_png:
        from .visualize import plot_confusion

        plot_confusion(matrix.matrix, info, confusion_png)
    return result
