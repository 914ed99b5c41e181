"""Joint image/mask transforms: the recipe's random scale, crop, flip and colour jitter, in two implementations.

- `TrainTransform` (`sample_transforms.py`, apart so that only the simple data path imports torchvision): per sample,
  torchvision `transforms.v2` on (Image, Mask) pairs; used by the simple data path.
- `augment_batch`: the same augmentations for a batch of cached uint8 images, used by the cached data path
  (`cache.py`), where decoding happens once and this is all the per-epoch work. The randomness is drawn once per
  batch (`sample_augment_params`); on a CPU, numba kernels (`kernels.py`) apply it, resizing just the pixels each
  crop needs, with the batch's samples shared among threads; on CUDA, plain PyTorch ops on the device
  (`augment_batch_torch`).

Both: the image is scaled so its shorter side is `size × s`, s uniform in [scale_min, scale_max]; a `crop × crop`
crop (default crop = size) is taken (padding with 0 for the image and the ignore index for the mask where the image
is smaller); a coin flips it horizontally; brightness, contrast and saturation are jittered by factors in
[1 - j, 1 + j] in a random order. Images resize bilinearly (antialiased when shrinking), masks with nearest
neighbour, so no label is ever invented.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime import HelperThreads, cpu_threads


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 or 0..1 float NCHW → normalised float."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


@dataclass
class AugmentParams:
    """One batch's random augmentation, drawn once on the CPU and applied by either implementation.

    Per sample, along each axis: the source window [src_start, src_start + src_len) of the valid image is resized to
    out_len pixels placed at out_start in the crop (the rest is padding). Windows are whole source pixels, so the
    sampled scale is kept to within half a source pixel over the window (under 0.5% at our sizes).
    """

    src_y: torch.Tensor  # N×2 (start, length), int64
    src_x: torch.Tensor
    out_y: torch.Tensor  # N×2 (start, length) in the crop, int64
    out_x: torch.Tensor
    flip: torch.Tensor  # N, bool
    factors: torch.Tensor  # N×3 (brightness, contrast, saturation), float64
    orders: torch.Tensor  # N×3 permutations of (0, 1, 2)
    crop: int


def _windows(length: np.ndarray, factor: np.ndarray, crop: int, u: np.ndarray):
    """Per sample and axis (N×2 arrays: height, width): the source window and where it lands in the crop."""
    scaled = length * factor
    fits = scaled >= crop
    src_len = np.where(fits, np.maximum(np.minimum(np.round(crop / factor), length), 1), length)
    out_len = np.where(fits, crop, np.clip(np.round(scaled), 1, crop))
    src_start = np.where(fits, np.minimum(np.floor(u * (length - src_len + 1)), length - src_len), 0)
    out_start = np.where(fits, 0, np.minimum(np.floor(u * (crop - out_len + 1)), crop - out_len))
    return np.stack([src_start, src_len, out_start, out_len], 2).astype(np.int64)  # N×2 axes×4


def sample_augment_params(
    valid_sizes: torch.Tensor,
    size: int,
    scales: tuple[float, float],
    jitter: float,
    generator: torch.Generator | None = None,
    crop: int | None = None,
) -> AugmentParams:
    """The recipe's randomness for N images of valid_sizes (N×2 height, width): shorter side → size × s with s uniform
    in scales, a random crop × crop window (padded where the scaled image is smaller), a coin for the flip, and
    ColorJitter's factors and random order. The random numbers come from `generator`; the arithmetic on them is
    numpy's (float64, as PyTorch's would be, but without a dispatch per tiny op: a fifth of the data path's time)."""
    crop = crop or size
    n = len(valid_sizes)
    rand = torch.rand(n, 6, generator=generator)  # scale, y offset, x offset, flip (+ 2 spare: stable stream)
    uniform = rand.numpy().astype(np.float64)
    valid = np.asarray(valid_sizes, dtype=np.float64)
    scale = scales[0] + (scales[1] - scales[0]) * uniform[:, 0]
    factor = scale * size / np.minimum(valid[:, 0], valid[:, 1])  # source pixels → output pixels
    windows = torch.from_numpy(_windows(valid, factor[:, None], crop, uniform[:, 1:3]))
    src_y, src_x, out_y, out_x = windows[:, 0, :2], windows[:, 1, :2], windows[:, 0, 2:], windows[:, 1, 2:]
    # ColorJitter's range, [max(0, 1 - j), 1 + j]: a negative factor would invert the colours
    low, width = (1 - jitter, 2 * jitter) if jitter <= 1 else (0.0, 1 + jitter)
    factors = low + width * torch.rand(n, 3, generator=generator, dtype=torch.float64).numpy()
    orders = np.argsort(torch.rand(n, 3, generator=generator).numpy(), axis=1)
    if jitter <= 0:
        factors = np.ones((n, 3))
    return AugmentParams(src_y, src_x, out_y, out_x, torch.from_numpy(uniform[:, 3] < 0.5), torch.from_numpy(factors),
                         torch.from_numpy(orders), crop)


def nearest_indices(src: torch.Tensor, out: torch.Tensor, crop: int) -> torch.Tensor:
    """N×crop source row (or column) for each crop position, -1 in the padding: the source pixel whose area holds
    the output pixel's centre (PyTorch's `nearest-exact`), so labels sit where the bilinear image puts its pixels."""
    position = torch.arange(crop)[None, :] - out[:, :1]
    scale = src[:, 1:].double() / out[:, 1:].double()
    index = torch.minimum(((position + 0.5) * scale).floor().long(), src[:, 1:] - 1) + src[:, :1]
    return torch.where((position >= 0) & (position < out[:, 1:]), index, -1)


def augment_batch(
    images: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    index: Sequence[int],
    valid_sizes: torch.Tensor,
    size: int,
    scales: tuple[float, float],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    ignore_index: int = 255,
    jitter: float = 0.2,
    generator: torch.Generator | None = None,
    crop: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale, crop, flip and jitter the samples `index` of uint8 canvases (images K×3×H×W, masks K×H×W) into a
    batch on `device`. valid_sizes is N×2, a row per entry of `index`: the (height, width) of that sample's image in
    its canvas's top-left corner.

    Random numbers come from `generator` (on the CPU), so a seeded generator gives the same batch on any device.
    Returns normalised N×3×crop×crop float32 images and N×crop×crop int64 masks.
    """
    # The CPU kernel reads no bounds: a row per canvas, not per sample, read past its box array (a random
    # MemoryError or ZeroDivisionError, a helper's audit).
    if len(valid_sizes) != len(index):
        raise ValueError(f"valid_sizes has {len(valid_sizes)} rows for {len(index)} samples: one per entry of index")
    if len(index) and not 0 <= min(index) <= max(index) < len(images):
        raise ValueError(f"index holds samples outside the {len(images)} canvases")
    sizes = torch.as_tensor(valid_sizes)
    if len(index) and not ((sizes >= 1).all() and (sizes <= torch.tensor(images.shape[-2:])).all()):
        raise ValueError(f"valid_sizes must lie within the {images.shape[-2]}×{images.shape[-1]} canvas, from 1")
    params = sample_augment_params(valid_sizes, size, scales, jitter, generator, crop)
    device = torch.device(device)
    if device.type == "cpu":
        return _augment_cpu(np.asarray(images), np.asarray(masks), list(index), params, mean, std, ignore_index)
    return augment_batch_torch(images, masks, index, params, mean, std, ignore_index, device)


def _resize_window(window: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 1×3×h×w → 1×3×height×width, bilinear with antialiasing (torchvision's and PIL's downscaling)."""
    if window.shape[-2:] == (height, width):
        return window
    return F.interpolate(window, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def resize_windows(images: np.ndarray, index: Sequence[int], params: AugmentParams) -> torch.Tensor:
    """Each sample's source window, resized (`kernels.resize_window`) into its place in an N×3×crop×crop uint8 batch
    of zeros, unflipped: the data path's resize step alone, which `resunet benchmark` times beside the whole path."""
    from . import kernels

    staging = torch.zeros(len(index), 3, params.crop, params.crop, dtype=torch.uint8)
    boxes = _boxes(params)
    for i, sample in enumerate(index):
        kernels.resize_window(images[sample], boxes[i], staging[i].numpy())
    return staging


def _boxes(params: AugmentParams) -> np.ndarray:
    """N×8 int64: (src_y, len, src_x, len, out_y, len, out_x, len) per sample."""
    return torch.cat([params.src_y, params.src_x, params.out_y, params.out_x], 1).numpy()


_helpers = HelperThreads("resunet-data")


def data_threads(n: int) -> int:
    """Threads for the CPU data path's n samples (`runtime.cpu_threads`)."""
    return cpu_threads(n)


def _augment_cpu(images, masks, index, params: AugmentParams, mean, std, ignore_index):
    """One numba call per sample (`kernels.augment_samples`: resize, colour map, flip, jitter, normalisation and
    label gather, while the crop is still in cache), the samples taken in turn by `data_threads` threads (the
    calling one included) as each becomes free, so a core slowed by other work just takes fewer. The kernel holds
    neither the GIL nor any OpenMP team, so the threads run side by side and the model's own OpenMP threads are
    left alone."""
    from . import kernels  # numba: compiled on first use, cached on disk

    n, crop = len(index), params.crop
    out_images = torch.empty(n, 3, crop, crop)
    out_masks = torch.empty(n, crop, crop, dtype=torch.int64)
    boxes = _boxes(params)
    arguments = (images, masks, np.asarray(index, np.int64), boxes, params.flip.numpy(),
                 params.factors.numpy(), params.orders.numpy(), np.asarray(mean, np.float64),
                 np.asarray(std, np.float64), ignore_index)
    outputs = (out_images.numpy(), out_masks.numpy())
    next_sample = itertools.count()  # shared by the threads; next() is atomic under the GIL
    singles = [np.array([i]) for i in range(n)]

    def work() -> None:
        staging = np.zeros((3, crop, crop), np.uint8)  # this thread's crop, reused by each sample it takes
        while (i := next(next_sample)) < n:
            kernels.augment_samples(*arguments, singles[i], staging, *outputs)

    _helpers.run([work] * data_threads(n))
    return out_images, out_masks


def mean_colour(staging: torch.Tensor) -> torch.Tensor:
    """N×3 mean colour (0..1) of N×3×H×W crops, padding included (as torchvision's contrast sees it), from every
    4th row and column: plenty for a jitter factor, and 16× less reading."""
    return staging[:, :, ::4, ::4].double().mean(dim=(2, 3)).cpu() / 255


def label_indices(params: AugmentParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Source rows and columns (flip applied) of each crop pixel's label, -1 in the padding."""
    rows = nearest_indices(params.src_y, params.out_y, params.crop)
    cols = nearest_indices(params.src_x, params.out_x, params.crop)
    return rows, torch.where(params.flip[:, None], cols.flip(1), cols)


def augment_batch_torch(images, masks, index, params: AugmentParams, mean, std, ignore_index, device):
    """The same augmentation in plain PyTorch ops on any device (the CUDA path): per-sample float resize of the
    window (rounded to uint8 levels, as the CPU kernel's resize gives), then batched flip, colour map and label
    gather."""
    n, crop = len(index), params.crop
    images, masks = torch.as_tensor(images), torch.as_tensor(masks)
    staging = torch.zeros(n, 3, crop, crop, device=device)
    out_masks = torch.empty(n, crop, crop, dtype=torch.long, device=device)
    rows, cols = (indices.to(device) for indices in label_indices(params))
    boxes = _boxes(params).tolist()
    for i, (sample, (sy, sh, sx, sw, oy, oh, ox, ow)) in enumerate(zip(index, boxes)):
        window = images[sample, :, sy : sy + sh, sx : sx + sw].to(device, non_blocking=True)[None]
        resized = _resize_window(window.float(), oh, ow).round_().clamp_(0, 255)
        staging[i, :, oy : oy + oh, ox : ox + ow] = resized[0]
        source = masks[sample].to(device, non_blocking=True).long()
        labels = source[rows[i].clamp(min=0)][:, cols[i].clamp(min=0)]
        out_masks[i] = torch.where((rows[i, :, None] < 0) | (cols[i, None, :] < 0), ignore_index, labels)
    maps = colour_maps(mean_colour(staging), params.factors, params.orders, mean, std)  # before the flip, as on CPU
    staging = torch.where(params.flip.to(device)[:, None, None, None], staging.flip(3), staging)
    return apply_colour_maps(staging, *maps), out_masks


GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def jitter_matrices(mean_colour: torch.Tensor, factors: torch.Tensor, orders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness, contrast and saturation as one affine colour map per image: x → M x + t.

    Each adjustment is affine in RGB (brightness b: x·b; contrast c: c·x + (1-c)·mean grey; saturation s:
    s·x + (1-s)·grey(x)), so any order of the three composes into one 3×3 matrix and offset. The mean grey that
    contrast needs is tracked through the earlier maps from the image's mean colour. mean_colour: N×3 (0..1),
    factors: N×3 (b, c, s), orders: N×3 permutations. Returns M: N×3×3 and t: N×3 (float64).
    """
    n = len(factors)
    grey = torch.tensor(GREY, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
    colour, factors = mean_colour.double(), factors.double()
    b, c, s = (factors[:, k, None, None] for k in range(3))
    saturation = s * eye + (1 - s) * grey.expand(3, 3)  # every row of the second term is the grey weights
    m, t = eye.clone(), torch.zeros(n, 3, dtype=torch.float64)
    for step in range(3):
        op = orders[:, step, None, None]
        mean_grey = ((m @ colour[:, :, None])[:, :, 0] + t) @ grey  # N: the grey mean of the image so far
        step_m = torch.where(op == 0, b * eye, torch.where(op == 1, c * eye, saturation))
        step_t = torch.where(op[:, :, 0] == 1, (1 - c[:, :, 0]) * mean_grey[:, None], 0.0).expand(n, 3)
        m, t = step_m @ m, (step_m @ t[:, :, None])[:, :, 0] + step_t
    return m, t


def colour_maps(mean_colour: torch.Tensor, factors: torch.Tensor, orders: torch.Tensor, mean, std):
    """The per-image map from 0..255 pixels to jittered, normalised values, and the clamp range: M (N×3×3), t (N×3),
    low, high (3). torchvision clamps to [0, 1] after each adjustment; here the result is clamped once, at the end
    (the same whenever no intermediate value leaves [0, 1]), which is what makes the single pass possible."""
    m, t = jitter_matrices(mean_colour, factors, orders)
    inv_std = 1 / torch.tensor(std, dtype=torch.float64)
    mean_t = torch.tensor(mean, dtype=torch.float64)
    m = inv_std[None, :, None] * m / 255  # fold the /255 and the normalisation into the map
    t = inv_std[None, :] * (t - mean_t[None, :])
    return m, t, -mean_t * inv_std, (1 - mean_t) * inv_std


def apply_colour_maps(images: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor, low: torch.Tensor,
                      high: torch.Tensor) -> torch.Tensor:
    """0..255 float N×3×H×W → M x + t per image, clamped to [low, high] per channel (one matmul, one clamp)."""
    n, _, height, width = images.shape
    device, dtype = images.device, images.dtype
    flat = torch.baddbmm(offset.to(device, dtype)[:, :, None], matrix.to(device, dtype), images.reshape(n, 3, -1))
    flat = flat.clamp_(min=low.to(device, dtype).view(1, 3, 1), max=high.to(device, dtype).view(1, 3, 1))
    return flat.view(n, 3, height, width)


def resize_short_side(height: int, width: int, size: int) -> tuple[int, int]:
    """The working size for inference: shorter side = size, aspect kept, each side rounded half up.

    Integer arithmetic, so an exported ONNX graph computes the same size from its input's shape."""
    short = min(height, width)
    return max(1, (2 * height * size + short) // (2 * short)), max(1, (2 * width * size + short) // (2 * short))
