"""Fused CPU kernels for the cached data path (numba: compiled on first use and cached on disk).

In PyTorch the per-pixel work after the resize is five passes over the batch (convert, matmul, clamp, flip,
label gather), each a general-purpose kernel. Here it is two loops the compiler vectorises: one that flips,
jitters, normalises and writes the float batch, one that gathers the nearest-neighbour labels from the cache.
"""

from __future__ import annotations

import numba
import numpy as np

numba.config.THREADING_LAYER = "workqueue"  # no OpenMP/TBB runtime of its own beside PyTorch's


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=True)
def colour(staging, flip, matrix, offset, low, high, out) -> None:
    """out[i, c, y, x] = clamp(M_i[c] · staging[i, :, y, x'] + t_i[c], low[c], high[c]), x' = x mirrored where
    flip[i]. staging: N×3×H×W uint8; out: N×3×H×W float32."""
    n, channels, height, width = staging.shape
    for i in numba.prange(n):
        for y in range(height):
            red, green, blue = staging[i, 0, y], staging[i, 1, y], staging[i, 2, y]
            for c in range(channels):
                m0, m1, m2, t = matrix[i, c, 0], matrix[i, c, 1], matrix[i, c, 2], offset[i, c]
                lo, hi = low[c], high[c]
                row = out[i, c, y]
                # Two plain loops rather than a reversed view or a variable step, either of which stops vectorisation.
                if flip[i]:
                    for x in range(width):
                        value = m0 * np.float32(red[x]) + m1 * np.float32(green[x]) + m2 * np.float32(blue[x]) + t
                        row[width - 1 - x] = min(max(value, lo), hi)
                else:
                    for x in range(width):
                        value = m0 * np.float32(red[x]) + m1 * np.float32(green[x]) + m2 * np.float32(blue[x]) + t
                        row[x] = min(max(value, lo), hi)


@numba.njit(parallel=True, cache=True, nogil=True)
def labels(masks, index, rows, cols, ignore, out) -> None:
    """out[i, y, x] = masks[index[i], rows[i, y], cols[i, x]], or `ignore` where either index is -1.
    masks: K×H×W uint8 (the cache); out: N×crop×crop int64."""
    n, height, width = out.shape
    for i in numba.prange(n):
        for y in range(height):
            row = out[i, y]
            if rows[i, y] < 0:
                row[:] = ignore
                continue
            line = masks[index[i], rows[i, y]]
            for x in range(width):
                source = cols[i, x]
                row[x] = line[source] if source >= 0 else ignore
