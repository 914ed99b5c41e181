"""Training losses. Each takes float logits N×C×H×W and int64 targets N×H×W, skips pixels labelled `ignore_index`,
and returns a scalar.

- ce: cross-entropy; with class weights, the weighted mean (as torch's CrossEntropyLoss); 0 on a batch with no
  labelled pixel, where torch's mean is 0/0.
- focal: cross-entropy scaled by (1 - p_t)^gamma (Lin et al. 2017): easy pixels count less; class weights as ce.
- dice: 1 - soft Dice per class over the batch, averaged over the classes present in the targets (weighted by the
  class weights when given).
- lovasz: the Lovász-softmax loss (Berman et al. 2018), a convex surrogate of the Jaccard index (IoU), averaged over
  the classes present; class weights are not used (the paper's plain average; in ce+lovasz they weight the ce).
- ohem: cross-entropy over the hardest pixels only: the `ohem_keep` fraction with the highest loss, ranked without
  the class weights (a low-weight class's wrong pixels stay hard), then weighted as ce.
- ce+dice, ce+lovasz: the sum of the two.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("ce", "focal", "dice", "lovasz", "ohem", "ce+dice", "ce+lovasz")


def valid_pixels(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits P×C and targets P of the pixels that are not ignored."""
    flat = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    target = target.reshape(-1)
    keep = target != ignore_index
    return flat[keep], target[keep]


def cross_entropy(logits, target, weight, ignore_index: int) -> torch.Tensor:
    """torch's (weighted) mean cross-entropy, except on a batch with every pixel ignored: there torch's mean is
    0/0 = NaN, and one such batch (a crop inside a void region, an unannotated image in a small batch) stopped a run
    as diverged. It is 0 then, with a zero gradient. Sum and divisor stay tensors: no synchronisation with a GPU."""
    total = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="sum")
    labelled = target != ignore_index
    if weight is None:
        divisor = labelled.sum().to(total.dtype)
    else:
        divisor = (weight.to(total.dtype)[target.masked_fill(~labelled, 0)] * labelled).sum()
    return total / divisor.clamp_min(torch.finfo(total.dtype).tiny)


def focal_loss(logits, target, weight, ignore_index: int, gamma: float = 2.0) -> torch.Tensor:
    flat, labels = valid_pixels(logits, target, ignore_index)
    if labels.numel() == 0:
        return logits.sum() * 0
    log_p = F.log_softmax(flat, dim=1).gather(1, labels[:, None])[:, 0]
    # 1 - p, clamped off 0: where p rounds to 1 (a margin over ~17) the gradient of x^gamma at 0 is infinite for
    # gamma < 1, and times log p = 0 it made NaN weights
    loss = -((-torch.expm1(log_p)).clamp_min(1e-12) ** gamma) * log_p
    w = weight[labels] if weight is not None else torch.ones_like(loss)
    return (w * loss).sum() / w.sum()


def dice_loss(logits, target, weight, ignore_index: int, eps: float = 1e-7) -> torch.Tensor:
    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0
    num_classes = logits.shape[1]
    # Per-class sums straight from the N×C×H×W probabilities, ignored pixels zeroed: no gathered P×C copy and no
    # int64 one-hot, which cost a training step several passes over the batch's logits.
    probs = logits.softmax(1) * valid.unsqueeze(1)
    labels = target.masked_fill(~valid, 0).unsqueeze(1)
    # The overlap is summed pixel after pixel: in float32 past 2**22 each ~1 addend rounds up (a batch of 16 at
    # 512×512 read 11% too low a loss), so it and the ratio are taken in float64.
    overlap = torch.zeros(num_classes, dtype=torch.float64, device=probs.device).scatter_add_(
        0, labels.flatten(), probs.gather(1, labels).flatten().double())
    truth = torch.bincount(target[valid], minlength=num_classes).double()
    dice = 2 * overlap / (probs.sum((0, 2, 3), dtype=torch.float64) + truth).clamp_min(eps)
    present = truth > 0
    w = (weight.double() if weight is not None else torch.ones_like(dice)) * present
    return (((1 - dice) * w).sum() / w.sum()).to(logits.dtype)


def lovasz_grad(truth_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss at pixels sorted by decreasing error."""
    total = truth_sorted.sum()
    intersection = total - truth_sorted.cumsum(0)
    union = total + (1 - truth_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_loss(logits, target, weight, ignore_index: int) -> torch.Tensor:
    flat, labels = valid_pixels(logits, target, ignore_index)
    if labels.numel() == 0:
        return logits.sum() * 0
    probs = flat.softmax(1)
    losses = []
    for c in labels.unique():
        truth = (labels == c).to(probs.dtype)
        errors, order = (truth - probs[:, c]).abs().sort(descending=True)
        losses.append(torch.dot(errors, lovasz_grad(truth[order])))
    return torch.stack(losses).mean()


def ohem_loss(logits, target, weight, ignore_index: int, keep: float = 0.25) -> torch.Tensor:
    flat, labels = valid_pixels(logits, target, ignore_index)
    if labels.numel() == 0:
        return logits.sum() * 0
    k = max(1, math.ceil(keep * labels.numel()))
    # Ranked by the unweighted loss: ranked by the weighted one, the CamVid ablation's road pixels (the lowest
    # sqrt-inverse-frequency weight) stopped being kept and road IoU fell to 17%. The ranking needs no gradient;
    # the kept pixels then get ce's own weighted mean, and only they enter the backward pass.
    with torch.no_grad():
        hardest = F.cross_entropy(flat, labels, reduction="none").topk(k).indices
    return F.cross_entropy(flat[hardest], labels[hardest], weight=weight)


class SegmentationLoss(nn.Module):
    """One of LOSSES as a module: `criterion(logits, target)`."""

    def __init__(self, name: str = "ce", weight: torch.Tensor | None = None, ignore_index: int = 255,
                 focal_gamma: float = 2.0, ohem_keep: float = 0.25) -> None:
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; one of {', '.join(LOSSES)}")
        if not 0 < ohem_keep <= 1:
            raise ValueError(f"ohem keep fraction {ohem_keep} is not in (0, 1]")
        self.name, self.ignore_index = name, ignore_index
        self.focal_gamma, self.ohem_keep = focal_gamma, ohem_keep
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Half precision in float32: in bf16 Lovász's cumulative counts and IoUs round to 2^-8 (its
        # per-pixel gradient, ~1/union, mostly 0), and in fp16 the ce divisor overflows past 65,504 labelled pixels
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits  # float64 stays
        parts = [self.part(name, logits, target) for name in self.name.split("+")]
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def part(self, name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w, ignore = self.weight, self.ignore_index
        if name == "ce":
            return cross_entropy(logits, target, w, ignore)
        if name == "focal":
            return focal_loss(logits, target, w, ignore, self.focal_gamma)
        if name == "dice":
            return dice_loss(logits, target, w, ignore)
        if name == "lovasz":
            return lovasz_loss(logits, target, w, ignore)
        return ohem_loss(logits, target, w, ignore, self.ohem_keep)
