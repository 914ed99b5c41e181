"""Fused CPU kernels for the cached data path (numba: compiled on first use and cached on disk).

One call (`augment_samples`) does all of a batch's per-epoch work for the samples it is given, without the GIL, so
`transforms._augment_cpu` can share a batch among threads. Per sample: the antialiased bilinear resize of just the
source window its crop needs (`resize_window`), the sample's mean colour and its jitter + normalisation as one 3×3
map (`colour_map`), one loop that flips, maps and writes the float image (`colour`), and one that gathers the
nearest-neighbour labels from the cache (`labels`).

The resize computes PyTorch's antialiased bilinear weights (`F.interpolate(..., antialias=True)`, as PIL resizes) in
float32 and rounds to uint8 levels. Its vertical pass combines whole source rows (vectorises plainly); its
horizontal pass needs, for each output pixel, source pixels at irregular positions. A gather does that at one
element per cycle on the AMD EPYC (Zen 4); instead we load the source pixels a block of outputs spans into
registers once and pick each tap's values from them with register permutes: where the CPU has AVX-512, blocks of 16
outputs spanning up to 64 source pixels (`vpermi2ps`): well over twice the speed of PyTorch's own uint8 kernel
there; where it has AVX2 only, blocks of 8 spanning up to 32 (`vpermps` on 2-4 registers and a select): the resize
step 1.14-1.20x faster than with the dense pass below on the AMD EPYC Zen 3 (alternated on the benchmark's crops,
benchmarks/RESULTS.md). Other CPUs, and wider blocks
(shrinking by more than ~3x), multiply each block of 8 outputs' source span by a dense span×8 weight matrix (zeros
off the taps), one broadcast source pixel times one 8-wide weight row per step, in plain LLVM vector code that any
CPU runs (`_dense_block`): more multiplies than taps, but no gather and no scalar loop (2.9x the scalar loop it
replaced on the Zen 3). All passes give the same sums up to float rounding.
"""

from __future__ import annotations

import math

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ..runtime import cached_kernel
from .transforms import GREY  # torchvision's rgb_to_grayscale weights, as the batched torch path uses them

LANES = 16  # float32 lanes of an AVX-512 register
DENSE_LANES = 8  # outputs per block of the dense pass: one AVX2 register (two SSE ones, half an AVX-512 one)
DENSE_CHAINS = 4  # independent sums per dense block: a multiply-add's latency hidden behind the next three
PERMUTE8_LANES = 8  # float32 lanes of an AVX2 register: the AVX2 permute's block of outputs
_FEATURES = llvm.get_host_cpu_features()
AVX512 = bool(_FEATURES.get("avx512f", False))
AVX2 = bool(_FEATURES.get("avx2", False) and _FEATURES.get("fma", False))


# A register permute per block width: its LLVM intrinsic and how many source registers one call reads.
_PERMUTES = {LANES: ("llvm.x86.avx512.vpermi2var.ps.512", 2), PERMUTE8_LANES: ("llvm.x86.avx2.permps", 1)}


def _permute_block(lanes: int, registers: int):
    """An intrinsic: acc[acc_at + l] = Σ_k weights[at + lanes·k + l] × plane[start + index[at + lanes·k + l]] over
    k < taps, for the `lanes` lanes l of one block of outputs, every index < lanes × `registers`. The plane's floats
    from `start` are loaded into that many registers once, and each tap's values are picked from them by register
    permutes instead of a gather, the right register's kept by a select; the sum stays in a register.
    16 lanes: AVX-512's `vpermi2ps` (two registers a call, indices' bits 0-4), 2 or 4 registers. 8 lanes: AVX2's
    `vpermps` (one register a call, bits 0-2), 2, 3 or 4 registers. Compiled only on CPUs with the instruction."""
    name, per_call = _PERMUTES[lanes]

    def permute_block(typingctx, acc, acc_at, plane, start, index, weights, at, taps):
        sig = types.void(acc, acc_at, plane, start, index, weights, at, taps)

        def codegen(context, builder, signature, args):
            acc_a, plane_a, index_a, weights_a = (context.make_array(signature.args[i])(context, builder, args[i])
                                                  for i in (0, 2, 4, 5))
            _, acc_at_v, _, start_v, _, _, at_v, taps_v = args
            vf, vi = ir.VectorType(ir.FloatType(), lanes), ir.VectorType(ir.IntType(32), lanes)

            def load(array, offset, vector_type):
                pointer = builder.bitcast(builder.gep(array.data, [offset]), vector_type.as_pointer())
                return builder.load(pointer, align=4)

            operands = [vf, vi, vf] if per_call == 2 else [vf, vi]
            permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, operands), name)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf, vf]),
                                                 f"llvm.fma.v{lanes}f32")
            sources = [load(plane_a, builder.add(start_v, ir.Constant(start_v.type, k * lanes)), vf)
                       for k in range(registers)]

            def pick(group, indices):  # the values of the group's `per_call` registers at indices (mod their reach)
                first, *rest = sources[group * per_call : (group + 1) * per_call]
                return builder.call(permute, [first, indices, *rest])

            total = cgutils.alloca_once_value(builder, ir.Constant(vf, None))
            with cgutils.for_range(builder, taps_v) as loop:
                offset = builder.add(at_v, builder.mul(loop.index, ir.Constant(at_v.type, lanes)))
                indices = load(index_a, offset, vi)
                values = pick(0, indices)
                for group in range(1, registers // per_call):
                    beyond = builder.icmp_signed(">=", indices, ir.Constant(vi, [group * per_call * lanes] * lanes))
                    values = builder.select(beyond, pick(group, indices), values)
                builder.store(builder.call(fma, [load(weights_a, offset, vf), values, builder.load(total)]), total)
            pointer = builder.bitcast(builder.gep(acc_a.data, [acc_at_v]), vf.as_pointer())
            builder.store(builder.load(total), pointer, align=4)
            return context.get_dummy_value()

        return sig, codegen

    permute_block.__name__ = f"permute_block_{lanes}x{registers}"
    return intrinsic(permute_block)


_permute_block_narrow = _permute_block(LANES, 2)
_permute_block_wide = _permute_block(LANES, 4)
_permute8_block_2 = _permute_block(PERMUTE8_LANES, 2)
_permute8_block_3 = _permute_block(PERMUTE8_LANES, 3)
_permute8_block_4 = _permute_block(PERMUTE8_LANES, 4)


@intrinsic
def _dense_block(typingctx, acc, acc_at, plane, start, weights, at, span):
    """An intrinsic: acc[acc_at + l] = Σ_j weights[at + 8j + l] × plane[start + j] over j < span (a multiple of 4),
    for the 8 lanes l of one block of outputs: per j one broadcast source pixel times one 8-wide row of the block's
    dense weights. Four sums (j mod 4) run side by side, added at the end. Plain LLVM vector operations (no
    x86 intrinsic): each CPU gets its own widest registers and fused multiply-adds where it has them."""
    sig = types.void(acc, acc_at, plane, start, weights, at, span)

    def codegen(context, builder, signature, args):
        acc_a, plane_a, weights_a = (context.make_array(signature.args[i])(context, builder, args[i])
                                     for i in (0, 2, 4))
        _, acc_at_v, _, start_v, _, at_v, span_v = args
        i32 = ir.IntType(32)
        vf = ir.VectorType(ir.FloatType(), DENSE_LANES)
        fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf, vf]),
                                                 f"llvm.fmuladd.v{DENSE_LANES}f32")
        broadcast_mask = ir.Constant(ir.VectorType(i32, DENSE_LANES), [0] * DENSE_LANES)
        undefined = ir.Constant(vf, ir.Undefined)

        def index(value):
            return ir.Constant(span_v.type, value)

        sums = [cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for _ in range(DENSE_CHAINS)]
        with cgutils.for_range(builder, builder.udiv(span_v, index(DENSE_CHAINS))) as loop:
            step = builder.mul(loop.index, index(DENSE_CHAINS))
            for chain, total in enumerate(sums):
                j = builder.add(step, index(chain))
                pixel = builder.load(builder.gep(plane_a.data, [builder.add(start_v, j)]))
                pixels = builder.shuffle_vector(builder.insert_element(undefined, pixel, ir.Constant(i32, 0)),
                                                undefined, broadcast_mask)
                row = builder.add(at_v, builder.mul(j, index(DENSE_LANES)))
                weight = builder.load(builder.bitcast(builder.gep(weights_a.data, [row]), vf.as_pointer()), align=4)
                builder.store(builder.call(fmuladd, [weight, pixels, builder.load(total)]), total)
        first, second, third, fourth = (builder.load(total) for total in sums)
        result = builder.fadd(builder.fadd(first, second), builder.fadd(third, fourth))
        builder.store(result, builder.bitcast(builder.gep(acc_a.data, [acc_at_v]), vf.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@cached_kernel(nogil=True)
def resize_weights(in_len, out_len):
    """PyTorch's antialiased bilinear weights (align_corners=False) for in_len → out_len pixels: output i reads
    source pixels first[i] + k for k < taps with weights[i, k]. Every output gets the same number of taps (the most
    any needs, with zero weights where it needs fewer), all inside [0, in_len)."""
    scale = in_len / out_len
    support = scale if scale >= 1.0 else 1.0  # the triangle widens by the scale when shrinking: antialiasing
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    most = int(math.ceil(support)) * 2 + 1
    lows, counts = np.empty(out_len, np.int64), np.empty(out_len, np.int64)
    taps = 1
    for i in range(out_len):
        centre = scale * (i + 0.5)
        low = max(int(centre - support + 0.5), 0)
        count = min(max(min(int(centre + support + 0.5), in_len) - low, 0), most)
        while count > 1 and 1.0 - abs((count - 1 + low - centre + 0.5) * inverse) <= 0:
            count -= 1  # a trailing tap of weight 0
        lows[i], counts[i] = low, count
        taps = max(taps, count)
    taps = min(taps, in_len)
    first, weights = np.empty(out_len, np.int64), np.zeros((out_len, taps), np.float32)
    for i in range(out_len):
        centre = scale * (i + 0.5)
        low, count = lows[i], counts[i]
        first[i] = min(low, in_len - taps)
        total = 0.0
        for j in range(count):
            total += max(1.0 - abs((j + low - centre + 0.5) * inverse), 0.0)
        for j in range(count):
            weight = max(1.0 - abs((j + low - centre + 0.5) * inverse), 0.0)
            weights[i, low - first[i] + j] = weight / total if total != 0 else 0.0
    return first, weights


@cached_kernel(nogil=True)
def permute_tables(first, weights, lanes):
    """The horizontal pass's plan for the permutes: per block of `lanes` outputs (16 for the AVX-512 permute, 8 for
    the AVX2 one) its first source pixel, and per (block, tap) the lanes' source offsets from it and their
    weights. span: the widest block's reach in source pixels (it decides the permute, or the dense pass beyond)."""
    out_len, taps = weights.shape
    blocks = (out_len + lanes - 1) // lanes
    starts = np.empty(blocks, np.int64)
    index = np.zeros(blocks * taps * lanes, np.int32)
    lane_weights = np.zeros(blocks * taps * lanes, np.float32)
    span = 0
    for b in range(blocks):
        starts[b] = first[b * lanes]
        for lane in range(lanes):
            x = b * lanes + lane
            for k in range(taps):
                at = (b * taps + k) * lanes + lane
                if x < out_len:
                    index[at] = first[x] + k - starts[b]
                    lane_weights[at] = weights[x, k]
                    span = max(span, index[at] + 1)
    return starts, index, lane_weights, span


@cached_kernel(nogil=True)
def horizontal_permute(plane, first, weights, starts, index, lane_weights, wide, acc) -> None:
    """acc[x] = Σ_k weights[x, k] × plane[first[x] + k] (the plan from `permute_tables`), 16 outputs per step
    (AVX-512 only). plane must be readable 64 floats past its last source pixel."""
    taps = weights.shape[1]
    if wide:
        for b in range(len(starts)):
            _permute_block_wide(acc, b * LANES, plane, starts[b], index, lane_weights, b * taps * LANES, taps)
    else:
        for b in range(len(starts)):
            _permute_block_narrow(acc, b * LANES, plane, starts[b], index, lane_weights, b * taps * LANES, taps)


@cached_kernel(nogil=True)
def horizontal_permute8(plane, taps, starts, index, lane_weights, span, acc) -> None:
    """acc[x] = Σ_k weights[x, k] × plane[first[x] + k] (the plan from `permute_tables(..., 8)`, span ≤ 32), 8
    outputs per step on as few registers as the span needs (AVX2 only). plane must be readable 32 floats past a block's
    first source pixel."""
    if span <= 2 * PERMUTE8_LANES:
        for b in range(len(starts)):
            _permute8_block_2(acc, b * PERMUTE8_LANES, plane, starts[b], index, lane_weights, b * taps * PERMUTE8_LANES,
                              taps)
    elif span <= 3 * PERMUTE8_LANES:
        for b in range(len(starts)):
            _permute8_block_3(acc, b * PERMUTE8_LANES, plane, starts[b], index, lane_weights, b * taps * PERMUTE8_LANES,
                              taps)
    else:
        for b in range(len(starts)):
            _permute8_block_4(acc, b * PERMUTE8_LANES, plane, starts[b], index, lane_weights, b * taps * PERMUTE8_LANES,
                              taps)


@cached_kernel(nogil=True)
def dense_tables(first, weights):
    """The dense horizontal pass's plan: per block of 8 outputs its first source pixel and its span in source pixels
    (rounded up to a multiple of 4, so past the block's last tap: the plane must be readable 3 floats further), and
    the blocks' span×8 weight matrices (zeros where an output has no tap), each `widest` rows apart."""
    out_len, taps = weights.shape
    blocks = (out_len + DENSE_LANES - 1) // DENSE_LANES
    starts, spans = np.empty(blocks, np.int64), np.empty(blocks, np.int64)
    widest = 0
    for b in range(blocks):
        starts[b] = first[b * DENSE_LANES]
        last = min(out_len, (b + 1) * DENSE_LANES) - 1
        span = first[last] + taps - starts[b]
        spans[b] = (span + DENSE_CHAINS - 1) // DENSE_CHAINS * DENSE_CHAINS
        widest = max(widest, spans[b])
    dense = np.zeros(blocks * widest * DENSE_LANES, np.float32)
    for x in range(out_len):
        b = x // DENSE_LANES
        for k in range(taps):
            dense[(b * widest + first[x] + k - starts[b]) * DENSE_LANES + x % DENSE_LANES] = weights[x, k]
    return starts, spans, widest, dense


@cached_kernel(nogil=True)
def horizontal_dense(plane, starts, spans, widest, dense, acc) -> None:
    """acc[x] = Σ_k weights[x, k] × plane[first[x] + k] (the plan from `dense_tables`), 8 outputs per block, any
    CPU and any span. acc: at least 8 × blocks floats."""
    for b in range(len(starts)):
        _dense_block(acc, b * DENSE_LANES, plane, starts[b], dense, b * widest * DENSE_LANES, spans[b])


@cached_kernel(nogil=True)
def _no_permute(plane, first, weights, starts, index, lane_weights, wide, acc) -> None:
    """Stands in for `horizontal_permute` without AVX-512, where `resize_window` never takes that branch."""


@cached_kernel(nogil=True)
def _no_permute8(plane, taps, starts, index, lane_weights, span, acc) -> None:
    """Stands in for `horizontal_permute8` without AVX2 or with AVX-512, where `resize_window` never takes that
    branch."""


# Chosen once: a permute intrinsic is compiled only where the CPU has it (LLVM could not lower it elsewhere).
horizontal_permute_here = horizontal_permute if AVX512 else _no_permute
horizontal_permute8_here = horizontal_permute8 if AVX2 and not AVX512 else _no_permute8
# Lanes of the permute resize_window uses here: 16 with AVX-512, 8 with AVX2, none (the dense pass) otherwise.
PERMUTE_LANES = LANES if AVX512 else PERMUTE8_LANES if AVX2 else 0


@cached_kernel(nogil=True)
def resize_window(image, box, out) -> None:
    """Resize image[:, sy:sy+sh, sx:sx+sw] (planar 3×H×W uint8) to oh×ow, antialiased bilinear, into
    out[:, oy:oy+oh, ox:ox+ow] (3×crop×crop uint8), rounding to the nearest level. box: (sy, sh, sx, sw, oy, oh,
    ox, ow). Per output row and channel: the vertical pass over the window's row (whole rows, vectorised), then the
    horizontal pass."""
    sy, sh, sx, sw, oy, oh, ox, ow = box[0], box[1], box[2], box[3], box[4], box[5], box[6], box[7]
    first_y, weights_y = resize_weights(sh, oh)
    first_x, weights_x = resize_weights(sw, ow)
    taps_x = weights_x.shape[1]
    if PERMUTE_LANES:
        starts, index, lane_weights, span = permute_tables(first_x, weights_x, PERMUTE_LANES)
    else:
        starts, index, lane_weights, span = permute_tables(first_x[:0], weights_x[:0], 1)  # empty: same types
    permute = PERMUTE_LANES > 0 and span <= 4 * PERMUTE_LANES
    # Only the tables the chosen pass reads (building both took about 7% of the resize's time).
    dense_starts, dense_spans, widest, dense = dense_tables(first_x[:0] if permute else first_x,
                                                            weights_x[:0] if permute else weights_x)
    plane = np.zeros(sw + 4 * LANES, np.float32)
    acc = np.zeros((ow + LANES - 1) // LANES * LANES, np.float32)
    taps_y = weights_y.shape[1]
    for c in range(3):
        channel = image[c]
        for y in range(oh):
            # Row slices, not image[c, row, sx + p]: numba's check for negative indices stops that loop vectorising.
            top = sy + first_y[y]
            line = channel[top, sx : sx + sw]
            weight = weights_y[y, 0]
            for p in range(sw):
                plane[p] = weight * np.float32(line[p])
            for k in range(1, taps_y):
                line = channel[top + k, sx : sx + sw]
                weight = weights_y[y, k]
                for p in range(sw):
                    plane[p] += weight * np.float32(line[p])
            if permute and AVX512:
                horizontal_permute_here(plane, first_x, weights_x, starts, index, lane_weights, span > 2 * LANES,
                                        acc)
            elif permute:
                horizontal_permute8_here(plane, taps_x, starts, index, lane_weights, span, acc)
            else:
                horizontal_dense(plane, dense_starts, dense_spans, widest, dense, acc)
            row = out[c, oy + y, ox : ox + ow]
            for x in range(ow):
                row[x] = np.uint8(min(max(np.rint(acc[x]), np.float32(0)), np.float32(255)))


@cached_kernel(nogil=True)
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


@cached_kernel(nogil=True, fastmath=True)
def colour(staging, flip, matrix, offset, low, high, out) -> None:
    """out[c, y, x] = clamp(M[c] · staging[:, y, x'] + t[c], low[c], high[c]), x' = x mirrored where flip.
    staging: 3×H×W uint8; matrix, offset, low, high float32; out: 3×H×W float32. One loop per row reads each
    pixel's three levels once and writes its three outputs (a third of the loads of a loop per output channel)."""
    _, height, width = staging.shape
    m00, m01, m02, t0 = matrix[0, 0], matrix[0, 1], matrix[0, 2], offset[0]
    m10, m11, m12, t1 = matrix[1, 0], matrix[1, 1], matrix[1, 2], offset[1]
    m20, m21, m22, t2 = matrix[2, 0], matrix[2, 1], matrix[2, 2], offset[2]
    low0, low1, low2, high0, high1, high2 = low[0], low[1], low[2], high[0], high[1], high[2]
    last = np.uintp(width - 1)
    for y in range(height):
        red, green, blue = staging[0, y], staging[1, y], staging[2, y]
        out0, out1, out2 = out[0, y], out[1, y], out[2, y]
        # Two plain loops rather than a reversed view or a variable step, either of which stops vectorisation;
        # the mirrored index is unsigned, or numba's negative-index wraparound check stops it too (3× slower).
        if flip:
            for x in range(width):
                r, g, b = np.float32(red[x]), np.float32(green[x]), np.float32(blue[x])
                at = last - np.uintp(x)
                out0[at] = min(max(m00 * r + m01 * g + m02 * b + t0, low0), high0)
                out1[at] = min(max(m10 * r + m11 * g + m12 * b + t1, low1), high1)
                out2[at] = min(max(m20 * r + m21 * g + m22 * b + t2, low2), high2)
        else:
            for x in range(width):
                r, g, b = np.float32(red[x]), np.float32(green[x]), np.float32(blue[x])
                out0[x] = min(max(m00 * r + m01 * g + m02 * b + t0, low0), high0)
                out1[x] = min(max(m10 * r + m11 * g + m12 * b + t1, low1), high1)
                out2[x] = min(max(m20 * r + m21 * g + m22 * b + t2, low2), high2)


@cached_kernel(nogil=True)
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


@cached_kernel(nogil=True)
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


@cached_kernel(nogil=True)
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


@cached_kernel(nogil=True)
def augment_samples(images, masks, index, boxes, flips, factors, orders, mean, std, ignore, which, staging,
                    out_images, out_masks) -> None:
    """Batch positions `which`: sample index[i] of the cache (images N×3×H×W, masks N×H×W uint8) resized by
    boxes[i] into `staging` (3×crop×crop uint8, the caller's, reused from sample to sample), then finished
    (`finish_sample`) into out_images[i] and out_masks[i]."""
    crop = out_masks.shape[1]
    for i in which:
        box = boxes[i]
        if box[5] != crop or box[7] != crop:
            staging[:] = 0  # padding: black, as the torch path pads
        resize_window(images[index[i]], box, staging)
        finish_sample(staging, masks[index[i]], flips[i], factors[i], orders[i], box, mean, std, ignore,
                      out_images[i], out_masks[i])
