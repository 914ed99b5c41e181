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

    factors = 1 - jitter + 2 * jitter * torch.rand(n, 3, generator=generator, dtype=torch.float64)
    orders = torch.argsort(torch.rand(n, 3, generator=generator), dim=1)  # ColorJitter's random order per image
    if jitter <= 0:
        factors = torch.ones(n, 3, dtype=torch.float64)
    return jitter_and_normalize(out_images, factors, orders, mean, std), out_masks


GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def jitter_matrices(mean_colour: torch.Tensor, factors: torch.Tensor, orders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness, contrast and saturation as one affine colour map per image: x → M x + t.

    Each adjustment is affine in RGB (brightness b: x·b; contrast c: c·x + (1-c)·mean grey; saturation s:
    s·x + (1-s)·grey(x)), so any order of the three composes into one 3×3 matrix and offset. The mean grey that
    contrast needs is tracked through the earlier maps from the image's mean colour. mean_colour: N×3 (0..1),
    factors: N×3 (b, c, s), orders: N×3 permutations. Returns M: N×3×3 and t: N×3 (float64).
    """
    grey = torch.tensor(GREY, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    matrices, offsets = [], []
    for colour, (b, c, s), order in zip(mean_colour.double(), factors.double(), orders.tolist()):
        m, t = eye.clone(), torch.zeros(3, dtype=torch.float64)
        for op in order:
            if op == 0:
                step_m, step_t = b * eye, torch.zeros(3, dtype=torch.float64)
            elif op == 1:
                mean_grey = grey @ (m @ colour + t)
                step_m, step_t = c * eye, (1 - c) * mean_grey * torch.ones(3, dtype=torch.float64)
            else:
                step_m, step_t = s * eye + (1 - s) * torch.outer(torch.ones(3, dtype=torch.float64), grey), torch.zeros(3, dtype=torch.float64)
            m, t = step_m @ m, step_m @ t + step_t
        matrices.append(m)
        offsets.append(t)
    return torch.stack(matrices), torch.stack(offsets)


def jitter_and_normalize(
    images: torch.Tensor, factors: torch.Tensor, orders: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """0..255 float N×3×H×W → jittered, normalised images in two passes (one batched 3×3 matmul, one clamp).

    torchvision clamps to [0, 1] after each adjustment; here the result is clamped once, at the end (the same
    whenever no intermediate value leaves [0, 1]), which is what makes the single pass possible.
    """
    n, _, height, width = images.shape
    mean_colour = images.mean(dim=(2, 3)).double().cpu() / 255
    m, t = jitter_matrices(mean_colour, factors, orders)
    inv_std = 1 / torch.tensor(std, dtype=torch.float64)
    mean_t = torch.tensor(mean, dtype=torch.float64)
    m = inv_std[None, :, None] * m / 255  # fold the /255 and the normalisation into the map
    t = inv_std[None, :] * (t - mean_t[None, :])
    device, dtype = images.device, images.dtype
    flat = torch.baddbmm(t.to(device, dtype)[:, :, None], m.to(device, dtype), images.reshape(n, 3, height * width))
    low = (-mean_t * inv_std).to(device, dtype).view(1, 3, 1)
    high = ((1 - mean_t) * inv_std).to(device, dtype).view(1, 3, 1)
    return flat.clamp_(min=low, max=high).view(n, 3, height, width)  # in place: no second 6 MB buffer per batch


def resize_short_side(height: int, width: int, size: int) -> tuple[int, int]:
    """The working size for inference: shorter side = size, aspect kept."""
    scale = size / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))
