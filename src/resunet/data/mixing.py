"""Mixing augmentations on a training batch, labels moving with their pixels.

- CutMix (Yun et al. 2019): a random box of another image of the batch, its area a uniform share of the image, is
  pasted with the same box of that image's mask.
- ClassMix (Olsson et al. 2021): the pixels of half of the classes present in another image (rounded up) are pasted
  with their labels. Ignored pixels are never a pasted class, so they stay where they were.

Both pick, for each image, a partner among the other images of the batch (a random cyclic order: each image is
some other image's partner once) and mix an image with probability `prob`. The draws come from the generator passed
in: the training loop seeds it by (seed, epoch, step), so a run resumed at any step mixes exactly as the
uninterrupted one.
"""

from __future__ import annotations

import torch

MIXES = ("none", "cutmix", "classmix")


def mix_batch(images: torch.Tensor, masks: torch.Tensor, kind: str, prob: float, ignore_index: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """images N×C×H×W (float), masks N×H×W (int) → mixed copies."""
    if kind == "none":
        return images, masks
    n, height, width = masks.shape
    partners = other_images(torch.randperm(n, generator=generator).tolist())
    chosen = (torch.rand(n, generator=generator) < prob).tolist()
    paste = torch.zeros((n, height, width), dtype=torch.bool)
    for i, j in enumerate(partners):
        if kind == "cutmix":
            area, cy, cx = torch.rand(3, generator=generator).tolist()
            if chosen[i] and j != i:
                paste[i] = cutmix_box(height, width, area, cy, cx)
        else:
            present = masks[j].unique().cpu()
            present = present[present != ignore_index]
            order = torch.randperm(len(present), generator=generator)
            if chosen[i] and j != i and len(present):
                picked = present[order[: (len(present) + 1) // 2]].to(masks.device)
                paste[i] = torch.isin(masks[j], picked).cpu()
    paste = paste.to(masks.device)
    mixed_masks = torch.where(paste, masks[partners], masks)
    mixed_images = torch.where(paste[:, None], images[partners], images)
    return mixed_images, mixed_masks


def other_images(order: list[int]) -> list[int]:
    """Each image's partner: the next image in a random cyclic `order` of the batch, never itself when the batch has
    two or more (a plain permutation left about 1 image in N unmixed, so --mix-prob 0.5 mixed 44% of a batch of 8)."""
    partners = list(range(len(order)))
    for k, image in enumerate(order):
        partners[image] = order[(k + 1) % len(order)]
    return partners


def cutmix_box(height: int, width: int, area: float, cy: float, cx: float) -> torch.Tensor:
    """A box covering about `area` of the image (sides scaled by √area), centred at (cy, cx) in 0..1, clipped."""
    box_h, box_w = round(height * area ** 0.5), round(width * area ** 0.5)
    top = min(max(round(cy * height - box_h / 2), 0), height - box_h)
    left = min(max(round(cx * width - box_w / 2), 0), width - box_w)
    inside = torch.zeros((height, width), dtype=torch.bool)
    inside[top:top + box_h, left:left + box_w] = True
    return inside
