"""Joint image/mask transforms: the recipe's random scale, crop, flip and colour jitter, in two implementations.

- `TrainTransform`: per sample, torchvision `transforms.v2` on (Image, Mask) pairs; used by the simple data path.
- `augment_batch`: the same augmentations on a whole uint8 batch at once, on the training device; used by the
  cached data path (`cache.py`), where decoding happens once and this is all the per-epoch work.

Both: the image is scaled so its shorter side is `size × s`, s uniform in [scale_min, scale_max]; a `crop × crop`
crop (default crop = size) is taken (padding with 0 for the image and the ignore index for the mask where the image is smaller); a coin
flips it horizontally; brightness, contrast and saturation are jittered by factors in [1 - j, 1 + j]. Images resize
bilinearly, masks with nearest neighbour, so no label is ever invented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2


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
            v2.RandomResize(int(size * scales[0]), int(size * scales[1]) + 1, antialias=True),
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


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 or 0..1 float NCHW → normalised float."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    valid_sizes: torch.Tensor,
    size: int,
    scales: tuple[float, float],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    ignore_index: int = 255,
    jitter: float = 0.2,
    generator: torch.Generator | None = None,
    crop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale, crop, flip and jitter a batch in one resampling pass.

    images: N×H×W×3 uint8 canvases; masks: N×H×W uint8 canvases (outside each image's valid area: ignore index);
    valid_sizes: N×2 (height, width) of each image inside its canvas. Random numbers come from `generator` (on the
    CPU), so a seeded generator gives the same batch on any device.
    Returns normalised N×3×crop×crop float images and N×crop×crop int64 masks on the images' device.
    """
    crop = crop or size
    n, canvas_h, canvas_w = masks.shape
    device = images.device
    rand = torch.rand(n, 6, generator=generator)  # scale, y offset, x offset, flip, then jitter below
    valid = valid_sizes.to(torch.float64)
    short = valid.min(dim=1).values
    scale = (scales[0] + (scales[1] - scales[0]) * rand[:, 0]).double()
    factor = scale * size / short  # source pixels → output pixels
    scaled_h, scaled_w = valid[:, 0] * factor, valid[:, 1] * factor
    # Crop offsets in scaled pixels; negative where the scaled image is smaller than the crop (it gets padded).
    zero = torch.zeros(n, dtype=torch.float64)
    off_y = torch.minimum(scaled_h - crop, zero) + rand[:, 1].double() * (scaled_h - crop).abs()
    off_x = torch.minimum(scaled_w - crop, zero) + rand[:, 2].double() * (scaled_w - crop).abs()
    flip = rand[:, 3] < 0.5

    out = torch.arange(crop, dtype=torch.float64) + 0.5  # output pixel centres
    out_x = torch.where(flip[:, None], crop - out[None, :], out[None, :])
    src_y = (out[None, :] + off_y[:, None]) / factor[:, None]  # source coordinates, in pixels from the top-left edge
    src_x = (out_x + off_x[:, None]) / factor[:, None]
    grid_y = (2 * src_y / canvas_h - 1).float()  # grid_sample's [-1, 1] with align_corners=False
    grid_x = (2 * src_x / canvas_w - 1).float()
    grid = torch.stack(
        [grid_x[:, None, :].expand(n, crop, crop), grid_y[:, :, None].expand(n, crop, crop)], dim=-1
    ).to(device)

    image_f = images.permute(0, 3, 1, 2).float()
    out_images = F.grid_sample(image_f, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Shift labels by one so grid_sample's zero padding reads as -1, i.e. outside the image → ignore.
    mask_f = masks[:, None].float() + 1
    out_masks = F.grid_sample(mask_f, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0] - 1
    out_masks = torch.where(out_masks < 0, torch.full_like(out_masks, ignore_index), out_masks).long()

    out_images = out_images.div_(255)
    if jitter > 0:
        factors = (1 - jitter + 2 * jitter * torch.rand(n, 3, generator=generator)).to(device)
        out_images = color_jitter(out_images, factors[:, 0], factors[:, 1], factors[:, 2])
    return normalize(out_images, mean, std), out_masks


def _grey(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def color_jitter(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor) -> torch.Tensor:
    """Per-sample brightness, contrast, saturation factors on 0..1 NCHW images (torchvision's definitions)."""
    images = (images * brightness.view(-1, 1, 1, 1)).clamp_(0, 1)
    mean_grey = _grey(images).mean(dim=(2, 3), keepdim=True)
    images = (mean_grey + (images - mean_grey) * contrast.view(-1, 1, 1, 1)).clamp_(0, 1)
    grey = _grey(images)
    return (grey + (images - grey) * saturation.view(-1, 1, 1, 1)).clamp_(0, 1)


def resize_short_side(height: int, width: int, size: int) -> tuple[int, int]:
    """The working size for inference: shorter side = size, aspect kept."""
    scale = size / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))
