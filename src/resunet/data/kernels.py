"""Fused CPU kernels for the cached data path (numba: compiled on first use and cached on disk).

In PyTorch the per-pixel work after the resize is five passes over the batch (convert, matmul, clamp, flip,
label gather), each a general-purpose kernel, plus a few dozen tiny ops to build the colour maps. Here one call per
sample does all of it: the sample's mean colour, its jitter + normalisation map, one loop that flips, maps and
writes the float image, and one that gathers the nearest-neighbour labels from the cache, right after the
sample's resize, while its crop is still in cache.
"""

from __future__ import annotations

import numba
import numpy as np

from .transforms import GREY  # torchvision's rgb_to_grayscale weights, as the batched torch path uses them


@numba.njit(cache=True, nogil=True)
def colour_map(staging, factors, orders, mean, std, matrix, offset) -> None:
    """The jitter (brightness, contrast, saturation in `orders`) composed with /255 and the normalisation into
    x → M x + t for one 3×H×W uint8 crop; what `transforms.colour_maps` computes for a batch (same operations, same
    order, float64). Writes M into matrix (3×3) and t into offset (3). The mean colour that contrast needs comes from
    every 4th row and column, padding included."""
    colour = np.zeros(3)
    for c in range(3):
        total = 0
        for y in range(0, staging.shape[1], 4):
            for x in range(0, staging.shape[2], 4):
                total += staging[c, y, x]
        colour[c] = total / (((staging.shape[1] + 3) // 4) * ((staging.shape[2] + 3) // 4)) / 255
    b, k, s = factors[0], factors[1], factors[2]
    m, t = np.eye(3), np.zeros(3)
    for step in range(3):
        op = orders[step]
        mean_grey = 0.0
        for r in range(3):
            mean_grey += (m[r, 0] * colour[0] + m[r, 1] * colour[1] + m[r, 2] * colour[2] + t[r]) * GREY[r]
        step_m, step_t = np.eye(3), np.zeros(3)
        if op == 0:
            step_m *= b
        elif op == 1:
            step_m *= k
            step_t[:] = (1 - k) * mean_grey
        else:
            for r in range(3):
                for col in range(3):
                    step_m[r, col] = s * step_m[r, col] + (1 - s) * GREY[col]
        m, t = step_m @ m, step_m @ t + step_t
    for c in range(3):
        inv_std = 1 / std[c]
        for col in range(3):
            matrix[c, col] = inv_std * m[c, col] / 255
        offset[c] = inv_std * (t[c] - mean[c])


@numba.njit(cache=True, nogil=True, fastmath=True)
def colour(staging, flip, matrix, offset, low, high, out) -> None:
    """out[c, y, x] = clamp(M[c] · staging[:, y, x'] + t[c], low[c], high[c]), x' = x mirrored where flip.
    staging: 3×H×W uint8; matrix, offset, low, high float32; out: 3×H×W float32."""
    _, height, width = staging.shape
    for y in range(height):
        red, green, blue = staging[0, y], staging[1, y], staging[2, y]
        for c in range(3):
            m0, m1, m2, t = matrix[c, 0], matrix[c, 1], matrix[c, 2], offset[c]
            lo, hi = low[c], high[c]
            row = out[c, y]
            # Two plain loops rather than a reversed view or a variable step, either of which stops vectorisation;
            # the mirrored index is unsigned, or numba's negative-index wraparound check stops it too (3× slower).
            if flip:
                last = np.uintp(width - 1)
                for x in range(width):
                    value = m0 * np.float32(red[x]) + m1 * np.float32(green[x]) + m2 * np.float32(blue[x]) + t
                    row[last - np.uintp(x)] = min(max(value, lo), hi)
            else:
                for x in range(width):
                    value = m0 * np.float32(red[x]) + m1 * np.float32(green[x]) + m2 * np.float32(blue[x]) + t
                    row[x] = min(max(value, lo), hi)


@numba.njit(cache=True, nogil=True)
def nearest(src_start, src_len, out_start, out_len, crop, where) -> None:
    """where[p] = the source pixel whose area holds crop position p's centre (PyTorch's `nearest-exact`), or -1 in
    the padding; what `transforms.nearest_indices` computes."""
    scale = src_len / out_len
    for p in range(crop):
        position = p - out_start
        if 0 <= position < out_len:
            where[p] = min(np.int64(np.floor((position + 0.5) * scale)), src_len - 1) + src_start
        else:
            where[p] = -1


@numba.njit(cache=True, nogil=True)
def labels(mask, rows, cols, ignore, out) -> None:
    """out[y, x] = mask[rows[y], cols[x]], or `ignore` where either index is -1.
    mask: H×W uint8 (one image of the cache); out: crop×crop int64."""
    height, width = out.shape
    for y in range(height):
        row = out[y]
        if rows[y] < 0:
            row[:] = ignore
            continue
        line = mask[rows[y]]
        for x in range(width):
            source = cols[x]
            row[x] = line[source] if source >= 0 else ignore


@numba.njit(cache=True, nogil=True)
def finish_sample(staging, mask, flip, factors, orders, box, mean, std, ignore, out_image, out_mask) -> None:
    """Everything after the resize for one sample: colour map, flip + map + normalise into out_image (3×crop×crop
    float32), labels into out_mask (crop×crop int64). box: (src_y, len, src_x, len, out_y, len, out_x, len)."""
    crop = out_mask.shape[0]
    matrix, offset = np.empty((3, 3)), np.empty(3)
    colour_map(staging, factors, orders, mean, std, matrix, offset)
    low, high = np.empty(3, np.float32), np.empty(3, np.float32)
    for c in range(3):
        low[c], high[c] = -mean[c] * (1 / std[c]), (1 - mean[c]) * (1 / std[c])  # as colour_maps rounds
    colour(staging, flip, matrix.astype(np.float32), offset.astype(np.float32), low, high, out_image)
    rows, cols = np.empty(crop, np.int64), np.empty(crop, np.int64)
    nearest(box[0], box[1], box[4], box[5], crop, rows)
    nearest(box[2], box[3], box[6], box[7], crop, cols)
    labels(mask, rows, cols[::-1] if flip else cols, ignore, out_mask)  # the flip, once per sample
