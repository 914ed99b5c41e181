"""Predictor: images in, class maps out at each image's original size.

The one inference path of the toolkit: `predict`, `evaluate`, `visualize` and the validation pass of `train` all go
through `Predictor.logits`: resize so the shorter side is the working size, normalise, run the network (channels_last;
bf16 autocast where the hardware runs it faster than fp32), upsample the logits back to the original size. Class maps
(`predict`, `predict_tensor`) fuse that upsampling with the argmax on the CPU (`classmap.upsample_argmax`).

Test-time augmentation (`tta`): "flip" averages the logits with those of the horizontally flipped image (at the
working size, then upsampled); "ms" runs the image at several scales of the working size (`scales`) and averages the
logits at the original resolution; "ms+flip" does both. Sliding window (`window`, `stride`): after the usual resize,
an image larger than `window`×`window` is covered by overlapping tiles whose logits are averaged where they overlap,
so the model sees objects at the scale it was trained at while memory stays bounded; an image that fits one window
runs whole, exactly as without it. Other runtimes (the ONNX predictor) subclass `Predictor` and replace `network`.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .allocator import tune_cpu_allocator
from .checkpoint import (CheckpointError, checked_temperature, checkpoint_classes, load_checkpoint,
                         model_from_checkpoint, reading_description)
from .classmap import argmax_map, linear_taps, upsample_argmax
from .data.classes import ClassInfo
from .data.images import DataError, pil_to_rgb8, read_image
from .data.transforms import normalize, resize_short_side
from .model.fold import fold_batchnorm
from .runtime import (DeviceError, autocast, check_precision, parse_device, resolve_device, resolve_precision,
                      use_channels_last)

ImageLike = Image.Image | np.ndarray | str | Path
TTA_MODES = ("none", "flip", "ms", "ms+flip")
# tta "auto": what the model file holds, none for a checkpoint, the TTA an end-to-end ONNX graph was exported with
# (an explicit "none" given such a graph is refused: it ran the graph's flip without a word)
AUTO_TTA = "auto"
DEFAULT_SCALES = (0.75, 1.0, 1.25, 1.5)
# What an exported .onnx file runs as: on the CPU, at the precision it was exported with.
ONNX_DEVICES = ("auto", "cpu")
ONNX_PRECISIONS = ("auto", "fp32")


# What the network may be given at once: the working size scales an image's shorter side up or down, so a thin
# strip (1×20000 at size 64: 64×1,280,000) would ask for gigabytes from a file of a few kilobytes.
MAX_WORKING_PIXELS = 16_000_000
# What the service takes from a client (`max_working_pixels`): 16 working squares (an image 16 times as long as it is
# wide; a 4:3 photo is 1.33), at most the bound above. A 3000×2 PNG of 108 bytes at size 96 (96×144,000, under 16M)
# took 35 s and 6 GB there, five at once 21 GB. Not applied to datasets: a line-scan or text-line val split is data.
MAX_WORKING_SQUARES = 16
# Images past this many values per image (3 × 4M pixels) are resized band by band on the CPU; see resize_antialiased.
# A band's floats take 48 MB: over glibc's largest mmap threshold (32 MiB, which allocator.tune_cpu_allocator sets),
# so each band is returned to the system when freed instead of growing the heap band after band.
FLOAT_WHOLE_ELEMENTS = 3 * 4_000_000
BAND_BYTES = 48 * 2**20
# oneDNN's bf16 convolutions on the CPU (PyTorch 2.14 on a Xeon with AMX) sometimes return NaN where a stride-2 3×3
# convolution's output is one pixel wide: the encoder's last stage, for an input the model pads to 32 px. An input
# under 64 px is padded to 64 here (zeros on the right and bottom, as the model itself pads), so no map is that thin.
BF16_MIN_SIDE = 64
# Multi-scale TTA, ensembles and confidence maps need full-size logits (C floats a pixel: 5.4 GB for an 8000×8000
# photo with 21 classes, and a few such tensors at once). Past this many values (N × C × H × W: 256 MiB, a 1790×1790
# image with 21 classes) they are combined band by band of output rows instead (`Predictor.full_size_maps`);
# below it, whole, with PyTorch's own upsampling.
FULL_SIZE_WHOLE_ELEMENTS = 2**26


def max_working_pixels(size: int) -> int:
    """The most working pixels the service takes for one request at working size `size` (and runs in one pass)."""
    return min(MAX_WORKING_PIXELS, MAX_WORKING_SQUARES * size * size)


def check_working_size(height: int, width: int, size: int, limit: int = MAX_WORKING_PIXELS) -> None:
    """Raise DataError (one line, the caller adds the file) if the image at the working size is too large."""
    if height < 1 or width < 1:
        raise DataError(f"an empty image ({width}×{height} pixels)")
    work_h, work_w = resize_short_side(height, width, size)
    if work_h * work_w > limit:
        bound = f"{limit:,} pixels" if limit == MAX_WORKING_PIXELS else \
            f"{limit:,} pixels ({MAX_WORKING_SQUARES} × {size}², an image {MAX_WORKING_SQUARES} times as long as wide)"
        raise DataError(f"{width}×{height} pixels become {work_w}×{work_h} at working size {size}, more than {bound}: "
                        "crop the image or split it")


def as_uint8_rgb(image: ImageLike) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):  # as read_image reads a file
        return pil_to_rgb8(image)
    array = np.asarray(image)
    if array.ndim in (2, 3) and 0 in array.shape[:2]:
        raise ValueError(f"an empty image (shape {array.shape})")
    if array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 4)):
        return pil_to_rgb8(Image.fromarray(array))  # grey or RGBA: read as the same pixels in a PIL image or file are
    if array.ndim == 2 and array.dtype in (np.uint16, np.int32, np.float32):  # deep grey (a 16-bit or float TIFF's):
        return pil_to_rgb8(Image.fromarray(array))  # as PIL's I;16, I or F image, as its file is read
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 array (or H×W grey: uint8, uint16, int32 or float32; H×W×4 RGBA "
                         f"uint8), got shape {array.shape} dtype {array.dtype}")
    return array


def check_batch(images: list[np.ndarray]) -> None:
    """`predict_batch`'s input: a non-empty list of H×W×3 uint8 arrays (ValueError naming what is not)."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("predict_batch: expected a non-empty list of H×W×3 uint8 arrays")
    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", type(image).__name__)
            raise ValueError(f"predict_batch: image {index} is not an H×W×3 uint8 array (shape {shape}, {dtype})")
        if 0 in image.shape[:2]:
            raise ValueError(f"predict_batch: image {index} is empty (shape {image.shape})")


# What float pixels may span: 0..255 and a resize's overshoot at hard edges (NaN is outside it too).
FLOAT_PIXEL_RANGE = (-64.0, 320.0)


def check_image_tensor(images: torch.Tensor) -> None:
    """The tensor methods' input (`logits`, `probabilities`, `predict_tensor`): an N×3×H×W tensor of 0..255 pixels
    (ValueError naming what it got). Floats scaled to 0..1, torchvision's convention, would be read as nearly black
    images and give wrong maps without a word; a float image whose brightest pixel is at most 1 is refused."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or 0 in images.shape:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"expected an N×3×H×W image tensor (uint8 or float 0..255), got {shape}")
    if images.dtype in (torch.uint16, torch.uint32, torch.uint64):  # torchvision's 16-bit decode; no min() for them
        raise ValueError(f"expected pixels 0..255 (uint8 or float), got {str(images.dtype).removeprefix('torch.')}: "
                         "scale them to 0..255 (a 16-bit image: // 257)")
    if images.is_complex() or images.dtype == torch.bool:  # a bool tensor read as a black frame: a mask, likely
        raise ValueError(f"expected pixels 0..255 (uint8 or float), got {str(images.dtype).removeprefix('torch.')}")
    low, high = float(images.min()), float(images.max())
    # Up to 2, not 1: a bicubic resize of 0..1 floats overshoots a little (1.006 for a VOC photo) and was read as a
    # black frame; a 0..255 frame whose brightest pixel is under 2 is black anyway
    if images.is_floating_point() and 0 < high <= 2:
        raise ValueError(f"expected pixels 0..255 (uint8 or float), got floats from {low:.3g} to {high:.3g}, scaled to "
                         "0..1: pass (images * 255), or the uint8 image")
    # torchvision's Normalize(mean, std): about -2.1..2.6 (a dark 0..255 frame resized bicubic dips to about -0.6)
    if images.is_floating_point() and low < -1 and high <= 8:
        raise ValueError(f"expected pixels 0..255 (uint8 or float), got floats from {low:.2f} to {high:.2f}, "
                         "normalised already: pass the 0..255 pixels (the predictor normalises them)")
    # Far outside 0..255 (a bicubic resize overshoots by under 20): a 16-bit frame as floats, or a mean subtracted.
    # PyTorch took them as they were and an end-to-end graph clamped them: 62% of the pixels differed (2026-12-07).
    if images.is_floating_point() and not (FLOAT_PIXEL_RANGE[0] <= low and high <= FLOAT_PIXEL_RANGE[1]):
        raise ValueError(f"expected pixels 0..255 (uint8 or float), got floats from {low:.6g} to {high:.6g}: scale "
                         "them to 0..255 (a 16-bit image: / 257), with no mean taken off (the predictor normalises)")
    if not images.is_floating_point() and (low < 0 or high > 255):  # a 16-bit frame: divided by 255 as if 8-bit
        raise ValueError(f"expected pixels 0..255 (uint8 or float), got integers from {low:.0f} to {high:.0f}: scale "
                         "them to 0..255 (a 16-bit image: // 257)")


def check_groups(groups: list[torch.Tensor]) -> None:
    """The group methods' input: a list of image tensors as `check_image_tensor` takes them (a bare tensor was
    iterated over its batch, and 0..1 floats read as nearly black images without a word)."""
    if not isinstance(groups, (list, tuple)):
        raise ValueError(f"expected a list of N×3×H×W image tensors (one per image size), got {type(groups).__name__}"
                         "; wrap a single tensor in a list")
    for images in groups:
        check_image_tensor(images)


class Predictor:
    runtime = "pytorch"  # what runs the network (OnnxPredictor: onnxruntime)

    def __init__(
        self,
        model: torch.nn.Module,
        info: ClassInfo,
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: str | torch.device = "auto",
        precision: str = "auto",
        tta: str = "none",
        fold_bn: bool = False,
        scales: tuple[float, ...] = DEFAULT_SCALES,
        window: int | None = None,
        stride: int | None = None,
        channels_last: bool | None = None,
    ) -> None:
        """`fold_bn`: merge BatchNorm into the convolutions (faster; only for a model no longer trained).
        `channels_last`: the memory layout; None picks the inference one (`runtime.use_channels_last`). The model is
        converted in place, so a model still in training passes its training layout. Every prediction puts the
        model in eval mode and leaves it there: a training loop that predicts with the model it trains calls
        `model.train()` again before its next step (resunet's own does), or BatchNorm stops learning its
        statistics."""
        tune_cpu_allocator()
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = resolve_precision(precision, self.device)
        self.channels_last = (use_channels_last(self.device, self.dtype, model.config.encoder, training=False)
                              if channels_last is None else channels_last)
        self.model = model.to(self.device).eval()
        if fold_bn:
            fold_batchnorm(self.model)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # A model no longer trained keeps its weights in bf16: autocast would cast every weight again on every call
        # (7% of a CPU forward here), for the same result bit for bit. Not while a BatchNorm is left unfolded (timm's
        # BatchNormAct2d in the EfficientNet-Lite encoders): its statistics would lose precision in bf16.
        unfolded = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        self.bf16_weights = fold_bn and self.dtype == torch.bfloat16 and not unfolded
        if self.bf16_weights:
            self.model = self.model.to(torch.bfloat16)
        self.info, self.size, self.mean, self.std = info, size, tuple(mean), tuple(std)
        self.temperature = 1.0  # probabilities are softmax(logits / temperature); `resunet calibrate` fits it
        # Probabilities at full size, and working-size logits (which an end-to-end ONNX graph does not give).
        self.has_logits = self.has_working_logits = True
        self.set_inference(tta, scales, window, stride)

    def set_inference(self, tta: str = "none", scales: tuple[float, ...] = DEFAULT_SCALES, window: int | None = None,
                      stride: int | None = None) -> None:
        """Choose test-time augmentation and sliding window (checked here, so a bad setting fails before any work).
        `tta` "auto" is "none" here (see AUTO_TTA)."""
        if tta == AUTO_TTA:
            tta = "none"
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join((AUTO_TTA, *TTA_MODES))}")
        if (not isinstance(scales, (list, tuple)) or not scales
                or not all(isinstance(v, numbers.Real) and math.isfinite(v) and v > 0 for v in scales)):
            raise ValueError(f"scales must be a non-empty sequence of positive finite numbers, got {scales!r}")
        for name, value in (("window", window), ("stride", stride)):
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
                raise ValueError(f"{name} must be a whole number of pixels, got {value!r}")
        if window is not None and (window < 32 or not 0 < (window if stride is None else stride) <= window):
            raise ValueError(f"window must be ≥ 32 and 0 < stride ≤ window, got window {window} stride {stride}")
        if window is None and stride is not None:
            raise ValueError(f"stride {stride} needs a window")
        self.tta, self.scales = tta, tuple(float(s) for s in scales)
        self.window, self.stride = window, (stride or (window // 3 * 2 if window else None))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", precision: str = "auto", tta: str = "none",
                        scales: tuple[float, ...] | None = None, window: int | None = None,
                        stride: int | None = None) -> "Predictor":
        return cls.from_payload(load_checkpoint(path), path, device, precision, tta, scales, window, stride)

    @classmethod
    def from_payload(cls, payload: dict, path: str | Path, device: str = "auto", precision: str = "auto",
                     tta: str = "none", scales: tuple[float, ...] | None = None, window: int | None = None,
                     stride: int | None = None) -> "Predictor":
        """`from_checkpoint` for a checkpoint already read (`path` names it in errors): export reads it once.
        `scales`: for tta ms and ms+flip only (None: DEFAULT_SCALES)."""
        scales = chosen_scales(scales, tta)  # before the model is built: a refusal costs nothing
        model = model_from_checkpoint(payload, path)
        with reading_description(path):
            norm = payload["normalization"]
            info, size, temperature = (checkpoint_classes(payload), int(payload["input_size"]),
                                       checked_temperature(payload.get("temperature", 1.0), path))
            mean, std = tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
        predictor = cls(model, info, size, mean, std, device, precision, tta, fold_bn=True, scales=scales,
                        window=window, stride=stride)
        predictor.temperature = temperature
        return predictor

    @staticmethod
    def from_file(path: str | Path, **options) -> "Predictor":
        """A predictor for a `.pt` checkpoint or an exported `.onnx` file: the same code serves both."""
        return load(path, **options)

    def precision_name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    def inference_settings(self) -> dict:
        """How this predictor runs, recorded beside its scores (`evaluate --json`): a score means little without
        the TTA, working size and precision that gave it."""
        return {"runtime": self.runtime, "device": str(self.device), "precision": self.precision_name(),
                "working_size": self.size, "tta": self.tta, "scales": list(self.scales) if "ms" in self.tta else None,
                "window": self.window, "stride": self.stride}

    def network(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float N×3×h×w (on the predictor's device) → logits N×C×h×w. Subclasses swap the runtime."""
        height, width = x.shape[-2:]
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and min(height, width) < BF16_MIN_SIDE:
            x = F.pad(x, (0, max(0, BF16_MIN_SIDE - width), 0, max(0, BF16_MIN_SIDE - height)))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.bf16_weights:
            x = x.to(torch.bfloat16)
        with autocast(self.device, None if self.bf16_weights else self.dtype):
            return self.model(x)[..., :height, :width]

    def tiled(self, x: torch.Tensor) -> torch.Tensor:
        """`network` over the whole image, or over overlapping window tiles with logits averaged in the overlaps.
        The tiles (all of one size: the last of a row or column is flush with the edge) go through the network
        together, up to TILE_BATCH_PIXELS at a time: one call per tile took minutes for a long strip's thousands."""
        height, width = x.shape[-2:]
        if self.window is None or (height <= self.window and width <= self.window):
            return self.network(x)
        corners = [(top, left) for top in tile_starts(height, self.window, self.stride)
                   for left in tile_starts(width, self.window, self.stride)]
        tile_h, tile_w = min(height, self.window), min(width, self.window)
        per_call = max(1, TILE_BATCH_PIXELS // (len(x) * tile_h * tile_w))
        total = count = None
        for first in range(0, len(corners), per_call):
            chunk = corners[first:first + per_call]
            tiles = torch.cat([x[..., top:top + tile_h, left:left + tile_w] for top, left in chunk])
            outs = self.network(tiles).float().split(len(x))
            if total is None:
                total = outs[0].new_zeros(outs[0].shape[:2] + (height, width))
                count = outs[0].new_zeros((1, 1, height, width))
            for (top, left), out in zip(chunk, outs):
                total[..., top:top + tile_h, left:left + tile_w] += out
                count[..., top:top + tile_h, left:left + tile_w] += 1
        return total / count

    # no_grad, not inference_mode: a caller's in-place change of the result (logits -= max) or a temperature fitted
    # through it by autograd raised "Inplace update to inference tensor outside InferenceMode"
    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images: N×3×H×W uint8 (one size); returns float32 N×C×H×W logits at that size."""
        check_image_tensor(images)
        return self.logits_by_group([images])[0]

    @torch.no_grad()
    def logits_by_group(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """Groups of uint8 images, n×3×H×W each, whose sizes differ but share a `batch_key` → each group's float32
        n×C×H×W logits at its own size: one forward pass per working size for all of them, the scales averaged."""
        check_groups(groups)
        return [self.full_size_logits(models, images.shape[-2:], 0, images.shape[-2])
                for models, images in zip(self.low_res_logits(groups), groups)]

    @torch.no_grad()
    def class_maps_by_group(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """Groups as for `logits_by_group` → each group's n×H×W class maps at its own size. At one working
        size the upsampling and argmax are one fused pass (`classmap.upsample_argmax`: the same maps, without
        writing the full-size logits) on the CPU; multi-scale TTA, and a GPU, go through `full_size_maps`. uint8,
        or int64 beyond 256 classes."""
        sizes = self.tta_sizes()
        # The fused pass runs on the CPU; on a GPU the full-size logits are upsampled band by band instead of whole
        # (a 48-megapixel photo's would take 4 GB of GPU memory at 21 classes).
        if len(sizes) > 1 or self.device.type != "cpu":
            return [maps for maps, _ in self.full_size_maps(groups)]
        groups = self.on_device(groups)
        return [upsample_argmax(part, images.shape[-2:])
                for part, images in zip(self.working_logits_by_group(groups, sizes[0]), groups)]

    def low_res_logits(self, groups: list[torch.Tensor]) -> list[list[tuple[float, list[torch.Tensor]]]]:
        """Groups as for `logits_by_group` → for each group, for each model (one here; an `Ensemble`'s members):
        its temperature and its float32 logits at each working size, before any upsampling."""
        for images in groups:  # every scale's bound before any scale runs
            self.check_size(*images.shape[-2:])
        groups = self.on_device(groups)
        by_size = [self.working_logits_by_group(groups, size) for size in self.tta_sizes()]
        return [[(self.temperature, [parts[i] for parts in by_size])] for i in range(len(groups))]

    def full_size_logits(self, models: list[tuple[float, list[torch.Tensor]]], size: tuple[int, int], top: int,
                         bottom: int) -> torch.Tensor:
        """Rows top..bottom of one group's full-size logits from its `low_res_logits` (one model here)."""
        (_, parts), = models
        return averaged_rows(parts, size, top, bottom)

    @torch.no_grad()
    def full_size_maps(self, groups: list[torch.Tensor], confidence: bool = False
                       ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Groups as for `logits_by_group` → each group's n×H×W class maps (the argmax of `logits_by_group`) and, on
        request, float32 confidence (the chosen class's probability, calibrated by the temperature). A group whose
        full-size logits would pass `FULL_SIZE_WHOLE_ELEMENTS` is done band by band of rows, so memory stays at a
        band's logits (`BAND_BYTES`) instead of the whole image's; the bands' upsampling sums in another order than
        PyTorch's, so a pixel whose two best classes tie to the last bits may differ."""
        check_groups(groups)
        results = []
        for models, images in zip(self.low_res_logits(groups), groups):
            (n, classes), (height, width) = models[0][1][0].shape[:2], images.shape[-2:]
            maps = torch.empty((n, height, width), dtype=torch.uint8 if classes <= 256 else torch.int64,
                               device=self.device)
            chosen = torch.empty((n, height, width), device=self.device) if confidence else None
            for top, bottom, logits in self.logit_bands(models, (height, width)):
                maps[:, top:bottom] = argmax_map(logits)
                if chosen is not None:
                    chosen[:, top:bottom] = (logits / self.temperature).softmax(1).amax(1)
                del logits  # one band's held at a time
            results.append((maps, chosen))
        return results

    def logit_bands(self, models: list[tuple[float, list[torch.Tensor]]], size: tuple[int, int]
                    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """One group's full-size logits from its `low_res_logits`, as (top, bottom, rows top..bottom): whole, or band
        by band of rows once they would pass `FULL_SIZE_WHOLE_ELEMENTS` (a band holds `BAND_BYTES`)."""
        (n, classes), (height, width) = models[0][1][0].shape[:2], size
        rows = height
        if n * classes * height * width > FULL_SIZE_WHOLE_ELEMENTS:
            rows = max(1, BAND_BYTES // (4 * n * classes * width))
        for top in range(0, height, rows):
            bottom = min(height, top + rows)
            yield top, bottom, self.full_size_logits(models, size, top, bottom)

    def on_device(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        # Always eval mode: the training loop shares this model and switches it back to train mode each epoch;
        # inference in train mode would use batch statistics and fold val images into BN's running averages.
        if self.model is not None:
            self.model.eval()
        return [images.to(self.device, non_blocking=True) for images in groups]

    def working_logits_by_group(self, groups: list[torch.Tensor], size: int) -> list[torch.Tensor]:
        """Each group's float32 logits at working size `size`, from one forward pass for all the groups."""
        out = self.working_logits(torch.cat([self.preprocess(images, size) for images in groups])).float()
        return list(out.split([len(images) for images in groups]))

    def tta_sizes(self) -> list[int]:
        """The working sizes the image is run at: the working size, or one per scale for multi-scale TTA."""
        scales = self.scales if self.tta in ("ms", "ms+flip") else (1.0,)
        return [max(1, round(self.size * scale)) for scale in scales]

    def working_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images at one working size → logits at that size (flip TTA and sliding window applied)."""
        out = self.tiled(x)
        if self.tta in ("flip", "ms+flip"):
            out = (out + self.tiled(x.flip(-1)).flip(-1)) / 2
        return out

    def preprocess(self, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """N×3×H×W pixels (uint8 or float 0..255) → what the network sees: resized so the shorter side is `size`
        (default the working size; antialiased bilinear, skipped at that size already), normalised."""
        height, width = images.shape[-2:]
        check_working_size(height, width, size or self.size)
        work = resize_short_side(height, width, size or self.size)
        images = images.to(self.device)
        if work == (height, width):
            return normalize(images.float() / 255, self.mean, self.std)
        return normalize(resize_antialiased(images, work) / 255, self.mean, self.std)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """images: N×3×H×W uint8 (one size) → float32 N×C×H×W class probabilities, calibrated by the temperature."""
        return (self.logits(images) / self.temperature).softmax(1)

    def predict_with_confidence(self, image: ImageLike | list[ImageLike]
                                ) -> tuple[np.ndarray, np.ndarray] | list[tuple[np.ndarray, np.ndarray]]:
        """One image → its H×W class map (uint8; int64 past 256 classes, as `predict`) and H×W float32 confidence
        (the chosen class's probability); a list (or tuple) → a list of those pairs, as `predict`."""
        if isinstance(image, (list, tuple)):
            return [self.predict_with_confidence(item) for item in image]
        pixels = torch.from_numpy(np.require(as_uint8_rgb(image), requirements=("C", "W"))).permute(2, 0, 1)[None]
        (mask, confidence), = self.full_size_maps([pixels], confidence=True)
        return mask[0].cpu().numpy(), confidence[0].cpu().numpy()  # full_size_maps' dtype: 300 classes wrapped

    def predict_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×H×W uint8 → N×H×W int64 class maps on the predictor's device."""
        check_image_tensor(images)
        return self.class_maps_by_group([images])[0].long()

    def check_size(self, height: int, width: int) -> None:
        """DataError (one line; the caller adds the file) if this predictor cannot take an image of this size: at
        every working size it runs it at. Multi-scale TTA checked each scale as it came to it: a strip too long for
        its largest scale ran the others first (50 s and 14 GB, or the OOM killer), then was refused, naming the
        scale's size as the working size (a helper, 2026-12-06)."""
        for size in sorted(set(self.tta_sizes()), reverse=True):
            try:
                check_working_size(height, width, size)
            except DataError as error:
                if size == self.size:
                    raise
                raise DataError(f"{error} (--tta {self.tta} runs it at {size / self.size:g} × the working size "
                                f"{self.size})") from None

    def batch_key(self, height: int, width: int) -> tuple:
        """Images with equal keys can share one forward pass in `predict_batch`: the same network input shapes."""
        return tuple(resize_short_side(height, width, size) for size in self.tta_sizes())

    def working_pixels(self, height: int, width: int) -> int:
        """The pixels the network sees for one image (over every TTA scale): what a batch's memory grows with."""
        return sum(h * w for h, w in (resize_short_side(height, width, size) for size in self.tta_sizes()))

    @torch.no_grad()
    def predict_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """H×W×3 uint8 images of one `batch_key` (their own sizes may differ) → H×W uint8 class maps, each at its
        image's size, from one forward pass per working size. The same numbers as `predict` on each image alone."""
        check_batch(images)
        if len({self.batch_key(*image.shape[:2]) for image in images}) > 1:
            raise ValueError("predict_batch: the images do not share a batch_key (working size); group them by "
                             "predictor.batch_key(height, width), or call predict on each")
        groups = [torch.from_numpy(np.require(image, requirements=("C", "W"))).permute(2, 0, 1)[None]
                  for image in images]
        return [maps[0].cpu().numpy() for maps in self.class_maps_by_group(groups)]

    def predict(self, image: ImageLike | list[ImageLike]) -> np.ndarray | list[np.ndarray]:
        """One image (PIL, path, or H×W×3 uint8; H×W grey and H×W×4 RGBA arrays too) → H×W uint8 class map; a list
        (or tuple) → a list of them."""
        if isinstance(image, (list, tuple)):
            return [self.predict(item) for item in image]
        return self.predict_batch([as_uint8_rgb(image)])[0]

    def colorize(self, mask: np.ndarray | torch.Tensor) -> Image.Image:
        """A palette PNG image of a class map (H×W class ids, an array or a tensor), in this model's class colours."""
        mask = np.asarray(mask.cpu()) if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer) or mask.size == 0:
            raise ValueError(f"mask must be one H×W class map of integers (predict's, or predict_tensor's [i]), got "
                             f"{mask.dtype} {'×'.join(map(str, mask.shape))}")
        if int(mask.min()) < 0 or int(mask.max()) > 255:
            raise ValueError(f"mask holds class ids {int(mask.min())}..{int(mask.max())}: a palette PNG holds 0..255")
        image = Image.fromarray(mask.astype(np.uint8), mode="P")
        image.putpalette(self.info.palette_bytes())
        return image

    def overlay(self, image: ImageLike, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
        """The class colours over the image, `alpha` of them (0: the image, 1: the colours alone)."""
        # past 1 the uint8 pixels wrapped around (200 became 156); "0.5" was a TypeError naming no argument
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a number from 0 to 1, got {alpha!r}")
        rgb = as_uint8_rgb(image).astype(np.float32)
        mask = np.asarray(mask)
        if mask.shape != rgb.shape[:2] or not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(f"mask must be the image's H×W ({rgb.shape[0]}×{rgb.shape[1]}) of class ids (integers), "
                             f"got {mask.dtype} {'×'.join(map(str, mask.shape))}")
        if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 255):  # -1 took the last colour without a word
            raise ValueError(f"mask holds class ids {int(mask.min())}..{int(mask.max())}: the colours cover 0..255")
        colours = self.info.colour_lut()[mask].astype(np.float32)
        return Image.fromarray((rgb * (1 - alpha) + colours * alpha).round().astype(np.uint8))


class Ensemble(Predictor):
    """Several models as one predictor: their (temperature-scaled) class probabilities averaged at each image's
    original size. Each member keeps its own working size, TTA and runtime (.pt, or an .onnx logits graph). Its
    logits are the log of the averaged probabilities, so every Predictor method (predict, probabilities, batches)
    works on the ensemble unchanged."""

    def __init__(self, members: list[Predictor], names: list[str] | None = None) -> None:
        names = names or [f"member {i + 1}" for i in range(len(members))]
        first = members[0]
        for member, name in zip(members, names):
            if member.info.names != first.info.names or member.info.ignore_index != first.info.ignore_index:
                raise CheckpointError(f"{name}: its classes differ from {names[0]}'s; an ensemble needs the same "
                                      "classes in the same order")
            if not member.has_working_logits:
                raise CheckpointError(f"{name}: an end-to-end ONNX graph gives no working-size logits to average "
                                      "(export with --logits for an ensemble)")
        self.members = members
        self.info, self.size, self.mean, self.std = first.info, first.size, first.mean, first.std
        self.device, self.dtype, self.channels_last, self.bf16_weights, self.model = (
            first.device, first.dtype, first.channels_last, first.bf16_weights, None)
        self.tta, self.scales, self.window, self.stride = first.tta, first.scales, first.window, first.stride
        self.temperature, self.has_logits, self.has_working_logits = 1.0, True, True

    def set_inference(self, tta: str = "none", scales: tuple[float, ...] = DEFAULT_SCALES, window: int | None = None,
                      stride: int | None = None) -> None:
        """The same test-time augmentation and window for every member (each runs them at its own working size)."""
        for member in self.members:
            member.set_inference(tta, scales, window, stride)
        first = self.members[0]
        self.tta, self.scales, self.window, self.stride = first.tta, first.scales, first.window, first.stride

    def batch_key(self, height: int, width: int) -> tuple:
        return tuple(member.batch_key(height, width) for member in self.members)

    def inference_settings(self) -> dict:
        """The first member's, with each member's runtime, device, precision and working size listed."""
        members = [member.inference_settings() for member in self.members]
        listed = ("runtime", "device", "precision", "working_size")
        return {**members[0], **{key: [m[key] for m in members] for key in listed}}

    def working_pixels(self, height: int, width: int) -> int:
        return sum(member.working_pixels(height, width) for member in self.members)

    def low_res_logits(self, groups: list[torch.Tensor]) -> list[list[tuple[float, list[torch.Tensor]]]]:
        by_member = [member.low_res_logits(groups) for member in self.members]
        return [[(temperature, [part.to(self.device) for part in parts]) for models in by_member
                 for temperature, parts in models[i]] for i in range(len(groups))]

    def full_size_logits(self, models: list[tuple[float, list[torch.Tensor]]], size: tuple[int, int], top: int,
                         bottom: int) -> torch.Tensor:
        """The log of the members' averaged (temperature-scaled) probabilities, rows top..bottom."""
        total = None
        for temperature, parts in models:
            p = (averaged_rows(parts, size, top, bottom) / temperature).softmax(1)
            total = p if total is None else total + p
        return (total / len(models)).clamp_min(1e-12).log()

    def class_maps_by_group(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        # The members' probabilities are averaged at full size: no low-resolution logits for the fused pass.
        return [maps for maps, _ in self.full_size_maps(groups)]


def averaged_rows(parts: list[torch.Tensor], size: tuple[int, int], top: int, bottom: int) -> torch.Tensor:
    """Rows top..bottom of one model's logits at each working size, upsampled to `size` and averaged."""
    total = upsampled_rows(parts[0], size, top, bottom)
    for part in parts[1:]:
        total += upsampled_rows(part, size, top, bottom)
    return total if len(parts) == 1 else total / len(parts)


def upsampled_rows(logits: torch.Tensor, size: tuple[int, int], top: int, bottom: int) -> torch.Tensor:
    """Rows top..bottom of `F.interpolate(logits, size, mode="bilinear", align_corners=False)` without the others:
    the whole call when all rows are asked for; otherwise each output row blends its two source rows with PyTorch's
    weights (`classmap.linear_taps`), then the width is interpolated (the same values up to rounding order)."""
    if top == 0 and bottom == size[0]:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    first, second, weight_first, weight_second = (taps[top:bottom].to(logits.device)
                                                  for taps in row_taps(logits.shape[-2], size[0]))
    rows = (logits.index_select(2, first) * weight_first[:, None]
            + logits.index_select(2, second) * weight_second[:, None])
    n, classes, height, width = rows.shape
    return F.interpolate(rows.reshape(n, classes * height, width), size=size[1], mode="linear",
                         align_corners=False).reshape(n, classes, height, size[1])


@functools.lru_cache(maxsize=16)
def row_taps(in_len: int, out_len: int) -> tuple[torch.Tensor, ...]:
    """`classmap.linear_taps` as tensors, kept for the bands of one image (and the next of its size)."""
    return tuple(torch.from_numpy(taps) for taps in linear_taps(in_len, out_len))


def resize_antialiased(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N×3×H×W pixels → float N×3×h×w, antialiased bilinear. A large image on the CPU is not turned into floats whole
    (an 8000×8000 photo would take 768 MB): its rows are narrowed to width w band by band, then resized to height h.
    PyTorch's antialiased resize is separable and runs the width pass first, so the result is the same bit for bit
    (tests/test_predict.py checks it)."""
    height, width = images.shape[-2:]
    if images.device.type != "cpu" or images[:1].numel() <= FLOAT_WHOLE_ELEMENTS or size[1] == width:
        return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    rows = max(1, BAND_BYTES // (4 * images[:1, :, :1].numel()))
    narrowed = torch.cat([F.interpolate(images[:, :, top:top + rows].float(), size=(min(rows, height - top), size[1]),
                                        mode="bilinear", align_corners=False, antialias=True)
                          for top in range(0, height, rows)], dim=2)
    return F.interpolate(narrowed, size=size, mode="bilinear", align_corners=False, antialias=True)


# Window tiles per network call, in pixels of all of them: a batch of 4 at 512², 455 at 48².
TILE_BATCH_PIXELS = 2**20


def tile_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: every `stride`, the last one flush with the end (tiles never overhang)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def chosen_scales(scales: tuple[float, ...] | None, tta: str) -> tuple[float, ...]:
    """The multi-scale TTA's scales as given (None: DEFAULT_SCALES); ValueError for scales given with another TTA
    (ignored without a word, even when equal to the default: Predictor.from_checkpoint did so after `load` refused
    it)."""
    if scales is not None and "ms" not in tta:
        raise ValueError(f"scales {tuple(scales)} are for tta ms or ms+flip (tta is {tta})")
    return DEFAULT_SCALES if scales is None else scales


def onnx_runs_on(device: str | torch.device) -> bool:
    """Whether an exported file (onnxruntime, on the CPU) runs on `device`: auto, cpu, or cpu:N (torch.device("cpu",
    0) from Python)."""
    device = str(device)
    return device in ONNX_DEVICES or re.fullmatch(r"cpu:\d+", device) is not None


def load(path: str | Path, device: str = "auto", precision: str = "auto", tta: str = AUTO_TTA,
         scales: tuple[float, ...] | None = None, window: int | None = None, stride: int | None = None,
         threads: int | None = None) -> Predictor:
    """A predictor for a `.pt` checkpoint or an exported `.onnx` file (picked by the file's suffix). `threads`: the
    CPU threads, onnxruntime's session's for an .onnx file, torch's (process-wide) for a .pt checkpoint. `tta`
    "auto": none, or the TTA an end-to-end ONNX graph was exported with (which refuses any other). `scales`: for
    tta ms and ms+flip only (None: DEFAULT_SCALES)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1):
        raise DeviceError(f"--threads {threads!r}: a whole number, at least 1")
    threads = None if threads is None else int(threads)  # numpy's integers too, for onnxruntime's option
    device = str(device)  # a torch.device from Python: "cpu" for an .onnx file as for a .pt
    checked_scales = chosen_scales(scales, tta)  # refused before any file is read or any setting made
    if Path(path).suffix.lower() == ".onnx":
        from .onnx_predictor import OnnxPredictor  # onnxruntime is imported only by users of .onnx files

        # An exported file runs on the CPU at the precision it was exported with; asked otherwise, say so rather
        # than time a CPU run the user believes was on the GPU. A name no device or precision has is said as such
        # (device="CPU" was told the file "runs on the CPU").
        if device != "auto":
            parse_device(device)
        check_precision(precision)
        if not onnx_runs_on(device):
            raise DeviceError(f"--device {device}: {path} is an exported file, which runs on the CPU (onnxruntime); "
                              "give its .pt checkpoint to run elsewhere")
        if precision not in ONNX_PRECISIONS:
            raise DeviceError(f"--precision {precision}: {path} is an exported file, whose precision was set when it "
                              "was exported (fp32, or INT8 with export --int8); give its .pt checkpoint for "
                              f"{precision}")
        predictor = OnnxPredictor(path, tta=tta, scales=checked_scales, window=window, stride=stride, threads=threads)
        if precision == "fp32" and predictor.quantized:  # asked for fp32, it would have run INT8 without a word
            raise DeviceError(f"--precision fp32: {path} holds INT8 weights; give its fp32 copy "
                              f"({Path(path).stem}.fp32.onnx beside it, from export --int8) or its .pt checkpoint")
        return predictor
    if threads is not None:
        torch.set_num_threads(threads)
    return Predictor.from_checkpoint(path, device, precision, tta, scales, window, stride)  # as given: it checks them


def load_ensemble(paths: list[str | Path], **options) -> Predictor:
    """`load` for one model file, an `Ensemble` of them for several (same options for each)."""
    if isinstance(paths, (str, Path)):  # one file: as `load`
        paths = [paths]
    if not paths:
        raise ValueError("load_ensemble: no model files given")
    members = [load(path, **options) for path in paths]
    return members[0] if len(members) == 1 else Ensemble(members, [str(p) for p in paths])
