"""Dataset-wide segmentation metrics from one confusion matrix.

mIoU here is the standard one: a single confusion matrix accumulated over every pixel of the whole split (at each
image's original resolution), ignore-labelled pixels excluded, IoU = TP / (TP + FP + FN) per class, and the mean over
classes that occur in the ground truth or the prediction (NaN-aware mean). Not per batch, not per image, not "micro".
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist


def summed_over_processes(counts: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of a CPU tensor over all processes (itself outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return counts
    summed = counts.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(summed)
    return summed.cpu()


class ConfusionMatrix:
    """`matrix[t, p]` counts pixels of true class t predicted as p."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """`pred`, `target`: integer tensors or arrays of the same shape (any shape), class indices; `target` may
        also hold `ignore_index`. A label outside the classes is an error: dropped, it would raise the mIoU of a
        model scored with the wrong class count."""
        # A copy of an array (a read-only one, as a cached mask is, would make torch warn); a tensor as it is.
        pred, target = (v if isinstance(v, torch.Tensor) else torch.tensor(np.asarray(v)) for v in (pred, target))
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        pred = pred.to(target.device)  # a GPU predictor's map against a mask read from disk
        for name, values in (("pred", pred), ("target", target)):
            if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
                raise ValueError(f"{name} holds {values.dtype}: class indices must be integers (a class map, not "
                                 "logits or probabilities: take their argmax over the class dimension)")
        n = self.num_classes
        target = target.reshape(-1).to(torch.int64)
        pred = pred.reshape(-1).to(torch.int64)
        keep = target != self.ignore_index
        for name, values in (("true", target[keep]), ("predicted", pred[keep])):
            if values.numel() and not 0 <= int(values.min()) <= int(values.max()) < n:  # another row's count
                outside = torch.unique(values[(values < 0) | (values >= n)])[:5].tolist()
                raise ValueError(f"{name} class(es) {outside} outside 0..{n - 1}"
                                 + (f" (and not the ignore index {self.ignore_index})" if name == "true" else ""))
        target, pred = target[keep], pred[keep]
        counts = torch.bincount(n * target + pred, minlength=n * n)
        self.matrix += counts.reshape(n, n).to(self.matrix.device)

    def reset(self) -> None:
        self.matrix.zero_()

    def all_reduce(self) -> None:
        """Sum the matrices of all processes (no-op outside torch.distributed)."""
        self.matrix = summed_over_processes(self.matrix)

    def compute(self) -> dict:
        """{"miou": float, "iou": [per class, NaN where absent from prediction and ground truth alike],
        "pixel_accuracy": float}"""
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


BOUNDARY_FRACTION = 0.02  # the band's width as a share of the image diagonal (Cheng et al.'s setting)


def boundary_band(masks: torch.Tensor, width: int) -> torch.Tensor:
    """K×H×W boolean masks → the pixels of each mask within `width` pixels (chessboard distance) of its contour or
    of the image edge: the mask minus its erosion by a (2·width+1)² square, eroded as two 1-D running minimums
    (scipy's take constant time a pixel whatever the width; a pooling window scans all 2·width+1, and width is 2% of
    the diagonal: 100 pixels for a 4000×3000 photo)."""
    from scipy.ndimage import minimum_filter1d

    masks = masks.cpu()
    x = masks.numpy().view(np.uint8)
    eroded = minimum_filter1d(x, 2 * width + 1, axis=1, mode="constant", cval=0)
    eroded = minimum_filter1d(eroded, 2 * width + 1, axis=2, mode="constant", cval=0)
    return masks & torch.from_numpy(eroded == 0)


class BoundaryIoU:
    """Boundary IoU per class (Cheng et al., CVPR 2021), accumulated over a whole split like the confusion matrix:
    IoU of the ground truth's and the prediction's boundary bands (each mask's pixels within d of its contour,
    d = 2% of the image diagonal), ignore-labelled pixels excluded. mIoU hides errors along the edges; this shows
    them. Ignore pixels are don't-care: the ground truth takes the prediction's class there before its contours are
    drawn, so the edge of a void region (VOC's band around every object) is no contour the prediction must meet."""

    def __init__(self, num_classes: int, ignore_index: int = 255, fraction: float = BOUNDARY_FRACTION) -> None:
        self.num_classes, self.ignore_index, self.fraction = num_classes, ignore_index, fraction
        self.intersection = torch.zeros(num_classes, dtype=torch.int64)
        self.union = torch.zeros(num_classes, dtype=torch.int64)

    def band_width(self, height: int, width: int) -> int:
        return max(1, round(self.fraction * math.hypot(height, width)))

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """One image: H×W integer class maps."""
        pred, target = pred.cpu().long(), target.cpu().long()
        valid = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        classes = torch.unique(torch.cat([target[valid], pred[valid]]))
        if len(classes) == 0:
            return
        d = self.band_width(*target.shape)
        truth = boundary_band(torch.where(valid, target, pred)[None] == classes[:, None, None], d) & valid
        guess = boundary_band(pred[None] == classes[:, None, None], d) & valid
        self.intersection[classes] += (truth & guess).sum((1, 2))
        self.union[classes] += (truth | guess).sum((1, 2))

    def all_reduce(self) -> None:
        self.intersection, self.union = summed_over_processes(torch.stack([self.intersection, self.union]))

    def compute(self) -> dict:
        """{"boundary_miou": float, "boundary_iou": [per class, NaN where no band]}"""
        union = self.union.double()
        iou = torch.where(union > 0, self.intersection.double() / union.clamp(min=1),
                          torch.full_like(union, math.nan))
        return {"boundary_miou": float(iou.nanmean()) if (union > 0).any() else math.nan,
                "boundary_iou": [float(v) for v in iou]}


def image_miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> float:
    """One image's own mIoU (classes in its ground truth or prediction): how `evaluate --worst` ranks images."""
    matrix = ConfusionMatrix(num_classes, ignore_index)
    matrix.update(pred.cpu(), target.cpu())
    return matrix.compute()["miou"]


class CalibrationError:
    """Expected calibration error over the non-ignored pixels of a split: the pixels binned by confidence (the top
    class's probability, 15 equal bins), ECE = Σ_bins (pixels in bin / all pixels) · |accuracy − mean confidence|."""

    def __init__(self, ignore_index: int = 255, bins: int = 15) -> None:
        self.ignore_index, self.bins = ignore_index, bins
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.confidence = torch.zeros(bins, dtype=torch.float64)
        self.correct = torch.zeros(bins, dtype=torch.float64)

    def update(self, probabilities: torch.Tensor, target: torch.Tensor) -> None:
        """probabilities N×C×H×W (softmax), target N×H×W."""
        confidence, prediction = probabilities.max(1)
        self.update_chosen(confidence, prediction, target)

    def update_chosen(self, confidence: torch.Tensor, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """confidence N×H×W (the predicted class's probability), prediction and target N×H×W: what `update` takes
        from the probabilities, for a predictor that gives only these (`Predictor.full_size_maps`, band by band)."""
        keep = target != self.ignore_index
        confidence, right = confidence[keep].double().cpu(), (prediction[keep] == target[keep]).double().cpu()
        index = (confidence * self.bins).long().clamp(max=self.bins - 1)
        self.count += torch.bincount(index, minlength=self.bins).double()
        self.confidence += torch.bincount(index, confidence, minlength=self.bins)
        self.correct += torch.bincount(index, right, minlength=self.bins)

    def all_reduce(self) -> None:
        self.count, self.confidence, self.correct = summed_over_processes(
            torch.stack([self.count, self.confidence, self.correct]))

    def compute(self) -> float:
        total = self.count.sum()
        if total == 0:
            return math.nan
        return float((self.correct - self.confidence).abs().sum() / total)
