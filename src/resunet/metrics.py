"""Dataset-wide segmentation metrics from one confusion matrix.

mIoU here is the standard one: a single confusion matrix accumulated over every pixel of the whole split (at each
image's original resolution), ignore-labelled pixels excluded, IoU = TP / (TP + FP + FN) per class, and the mean over
classes that occur in the ground truth or the prediction (NaN-aware mean). Not per batch, not per image, not "micro".
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """`matrix[t, p]` counts pixels of true class t predicted as p."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """`pred`, `target`: integer tensors of the same shape (any shape), class indices."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        n = self.num_classes
        target = target.reshape(-1).to(torch.int64)
        pred = pred.reshape(-1).to(torch.int64)
        keep = (target != self.ignore_index) & (target >= 0) & (target < n)
        counts = torch.bincount(n * target[keep] + pred[keep], minlength=n * n)
        self.matrix += counts.reshape(n, n).to(self.matrix.device)

    def reset(self) -> None:
        self.matrix.zero_()

    def all_reduce(self) -> None:
        """Sum the matrices of all processes (no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            matrix = self.matrix.to(device)
            dist.all_reduce(matrix)
            self.matrix = matrix.cpu()

    def compute(self) -> dict:
        """{"miou": float, "iou": [per class, NaN where absent], "pixel_accuracy": float, "class_present": [...]}"""
        m = self.matrix.double()
        true_positive = m.diag()
        union = m.sum(0) + m.sum(1) - true_positive  # TP + FP + FN
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, math.nan))
        total = m.sum()
        return {
            "miou": float(iou.nanmean()) if (union > 0).any() else math.nan,
            "iou": [float(v) for v in iou],
            "pixel_accuracy": float(true_positive.sum() / total) if total > 0 else math.nan,
        }
