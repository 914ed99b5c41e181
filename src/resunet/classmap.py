"""Class maps from low-resolution logits: bilinear upsampling and argmax fused into one CPU pass.

The Predictor's last step was `F.interpolate(logits, size, mode="bilinear").argmax(1)`: at the benchmark's 500×375
image that writes 21 × 187,500 float32 values (16 MB) only to read them back for the argmax, 5.2 ms of a 33 ms call
on the Intel Xeon with AMX, more than the input resize and normalisation together. `upsample_argmax` writes only
the uint8 class map:

- the argmax of each *low-resolution* logit pixel is taken once (4.5× fewer pixels than the output here);
- an output pixel whose four bilinear taps all have the same argmax k gets k without interpolating: its values are
  convex combinations of the taps', so k's is at least every other class's (rounding is monotonic);
- every other pixel (object boundaries) interpolates all C classes with PyTorch's own float32 weights and summation
  order (`aten/src/ATen/native/cpu/UpSampleKernel.cpp`, `align_corners=False`) and takes the first maximum.

So the class map equals PyTorch's bit for bit, except where two classes' interpolated values are *exactly* equal
in float32 while every tap favoured the later one (PyTorch then picks the earlier): a tie to the last bit, which the
tests have not met on real or random logits. The output rows are split among as many threads as PyTorch uses; the
kernel holds neither the GIL nor an OpenMP team. CPU only: other devices, and more than 256 classes, use the
two PyTorch calls.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .runtime import HelperThreads, cached_kernel, cpu_threads

_helpers = HelperThreads("resunet-classmap")


@cached_kernel(nogil=True)
def linear_taps(in_len: int, out_len: int):
    """For each output index along one axis: its two source indices and their weights, as PyTorch's bilinear
    (align_corners=False, no scale given) computes them in float32."""
    first = np.empty(out_len, np.int64)
    second = np.empty(out_len, np.int64)
    weight_first = np.empty(out_len, np.float32)
    weight_second = np.empty(out_len, np.float32)
    scale = np.float32(in_len) / np.float32(out_len)
    for o in range(out_len):
        if in_len == out_len:  # PyTorch copies at equal sizes
            first[o], second[o], weight_first[o], weight_second[o] = o, o, 1.0, 0.0
            continue
        source = scale * (np.float32(o) + np.float32(0.5)) - np.float32(0.5)
        if source < 0:
            source = np.float32(0.0)
        index = min(np.int64(np.floor(source)), in_len - 1)
        weight = min(max(source - np.float32(index), np.float32(0.0)), np.float32(1.0))
        first[o] = index
        second[o] = index + 1 if index < in_len - 1 else index
        weight_second[o] = weight
        weight_first[o] = np.float32(1.0) - weight
    return first, second, weight_first, weight_second


@cached_kernel(nogil=True)
def row_argmax(logits, first: int, last: int, out) -> None:
    """Rows first..last (inclusive) of h×w×C float32 logits → their first maximum in `out` (h×w uint8)."""
    classes = logits.shape[2]
    for y in range(first, last + 1):
        for x in range(logits.shape[1]):
            best, best_value = 0, logits[y, x, 0]
            for c in range(1, classes):
                value = logits[y, x, c]
                if value > best_value:
                    best, best_value = c, value
            out[y, x] = best


@cached_kernel(nogil=True)
def upsample_argmax_rows(logits, low, rows_y, taps_x, start: int, stop: int, out) -> None:
    """Output rows start..stop of one image: logits h×w×C float32, `rows_y` and `taps_x` the `linear_taps` of each
    axis, out H×W uint8. First the argmax of the logit rows these output rows read, into `low` (h×w uint8; a row
    shared with the next thread's share is written by both, with the same values)."""
    y0s, y1s, hy0s, hy1s = rows_y
    x0s, x1s, wx0s, wx1s = taps_x
    if start >= stop:
        return
    row_argmax(logits, y0s[start], y1s[stop - 1], low)
    classes = logits.shape[2]
    for oy in range(start, stop):
        y0, y1, hy0, hy1 = y0s[oy], y1s[oy], hy0s[oy], hy1s[oy]
        for ox in range(out.shape[1]):
            x0, x1 = x0s[ox], x1s[ox]
            k = low[y0, x0]
            if low[y0, x1] == k and low[y1, x0] == k and low[y1, x1] == k:
                out[oy, ox] = k
                continue
            w00, w01 = hy0 * wx0s[ox], hy0 * wx1s[ox]
            w10, w11 = hy1 * wx0s[ox], hy1 * wx1s[ox]
            best, best_value = 0, np.float32(0.0)
            for c in range(classes):
                value = (logits[y0, x0, c] * w00 + logits[y0, x1, c] * w01 + logits[y1, x0, c] * w10
                         + logits[y1, x1, c] * w11)
                if c == 0 or value > best_value:
                    best, best_value = c, value
            out[oy, ox] = best


def argmax_map(logits: torch.Tensor) -> torch.Tensor:
    """N×C×H×W logits already at full size → N×H×W class maps: uint8, or int64 beyond 256 classes."""
    maps = logits.argmax(1)
    return maps.to(torch.uint8) if logits.shape[1] <= 256 else maps


def upsample_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N×C×h×w logits (float32 or bfloat16, any memory layout) → N×H×W uint8 class maps at `size` (int64 beyond
    256 classes): those of `F.interpolate(logits.float(), size, mode="bilinear", align_corners=False).argmax(1)`
    (see the module's note on exact ties)."""
    n, classes = logits.shape[:2]
    height, width = size
    if logits.device.type != "cpu" or classes > 256 or height == 0 or width == 0:
        return argmax_map(F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False))
    # N×h×w×C float32, channels last: each pixel's classes side by side (no copy for a channels_last float32 tensor).
    nhwc = logits.float().permute(0, 2, 3, 1).contiguous().numpy()
    out = torch.empty((n, height, width), dtype=torch.uint8)
    maps = out.numpy()
    rows_y = linear_taps(logits.shape[2], height)
    taps_x = linear_taps(logits.shape[3], width)
    threads = cpu_threads(height // 16)  # bands of 16 rows at least: a small map stays on the calling thread
    bounds = np.linspace(0, height, threads + 1).astype(np.int64)
    low = np.empty(nhwc.shape[1:3], np.uint8)  # each image's low-resolution argmax, rewritten before it is read
    for i in range(n):
        _helpers.run([functools.partial(upsample_argmax_rows, nhwc[i], low, rows_y, taps_x, bounds[t], bounds[t + 1],
                                        maps[i]) for t in range(threads)])
    return out
