"""The simple data path's per-sample transform: torchvision `transforms.v2` on (Image, Mask) pairs, the same
augmentations as the batched `transforms.augment_batch` (see `transforms.py` for what they are).

Its own module because torchvision's import costs nearly as much CPU as torch's (about 1.5 s): only a run on the
simple data path pays it, not every `resunet predict`, evaluation or service start.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


class RandomResizeNearestExactMasks(v2.RandomResize):
    """`v2.RandomResize` with masks resized by nearest-exact: each output label is the one under the output pixel's
    centre, where the bilinear image samples (torchvision's default for masks, legacy nearest, takes the pixel under
    its top-left corner: labels shifted up to half a pixel up-left of the image). The batched path does the same."""

    def transform(self, inpt, params: dict):
        if isinstance(inpt, tv_tensors.Mask):
            return self._call_kernel(v2.functional.resize, inpt, params["size"],
                                     interpolation=v2.InterpolationMode.NEAREST_EXACT)
        return super().transform(inpt, params)


class TrainTransform:
    def __init__(
        self,
        size: int,
        scales: tuple[float, float],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        ignore_index: int = 255,
        jitter: float = 0.2,
        crop: int | None = None,
    ) -> None:
        steps = [
            RandomResizeNearestExactMasks(max(1, int(size * scales[0])), max(1, int(size * scales[1])) + 1,
                                          antialias=True),
            v2.RandomCrop(crop or size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
            v2.RandomHorizontalFlip(),
        ]
        if jitter > 0:
            steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
        steps += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(mean, std)]
        self.transform = v2.Compose(steps)

    def __call__(self, image, mask) -> tuple[torch.Tensor, torch.Tensor]:
        image = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(mask))
        image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()
