"""How far the dice loss's float32 overlap sum (before 9a9d458) was from the float64 one it uses now, on a batch the
size of `make camvid`'s (8 crops of 320×320 with bf16, 256×256 without; CamVid's 11 classes and their rough shares)
and on the 16×512×512 batch where the drift was found.

    python benchmarks/dice_float32_drift.py

Prints each loss and the relative difference of the loss and of its gradient.
"""

from __future__ import annotations

import torch

from resunet.losses import SegmentationLoss

CAMVID_SHARES = [0.16, 0.22, 0.01, 0.28, 0.08, 0.10, 0.01, 0.02, 0.05, 0.01, 0.01]


def float32_overlap_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The dice loss as it was: the per-class overlap summed pixel by pixel in float32 (no ignore pixels here)."""
    classes = logits.shape[1]
    probs = logits.softmax(1)
    labels = target.unsqueeze(1)
    overlap = probs.new_zeros(classes).scatter_add_(0, labels.flatten(), probs.gather(1, labels).flatten())
    truth = torch.bincount(target.flatten(), minlength=classes).to(probs.dtype)
    dice = 2 * overlap / (probs.sum((0, 2, 3)) + truth).clamp_min(1e-7)
    present = (truth > 0).to(dice.dtype)
    return ((1 - dice) * present).sum() / present.sum()


def compare(name: str, logits: torch.Tensor, target: torch.Tensor) -> None:
    logits.requires_grad_(True)
    before = float32_overlap_dice(logits, target)
    (grad_before,) = torch.autograd.grad(before, logits)
    now = SegmentationLoss("dice")(logits, target)
    (grad_now,) = torch.autograd.grad(now, logits)
    gradient = ((grad_before - grad_now).norm() / grad_now.norm()).item()
    print(f"{name}: loss {before.item():.6f} (float32 overlap) vs {now.item():.6f} (float64): relative "
          f"{abs(before - now).item() / now.item():.1e}; gradient relative {gradient:.1e}")


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    for crop in (256, 320):
        target = torch.multinomial(torch.tensor(CAMVID_SHARES), 8 * crop * crop, True, generator=generator)
        target = target.view(8, crop, crop)
        one_hot = torch.nn.functional.one_hot(target, 11).permute(0, 3, 1, 2)
        for sharpness in (2.0, 6.0):
            logits = torch.randn(8, 11, crop, crop, generator=generator) + sharpness * one_hot
            compare(f"make camvid's batch, 8×{crop}×{crop}, logits noise + {sharpness:g}·one-hot", logits, target)
    target = torch.zeros(16, 512, 512, dtype=torch.long)
    target[..., :16] = 1
    logits = torch.zeros(16, 2, 512, 512).scatter_(1, target[:, None], 7.0)
    compare("16×512×512, two classes, logits 7·one-hot", logits, target)


if __name__ == "__main__":
    main()
