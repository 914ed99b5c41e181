"""Property-based checks (hypothesis) of the joint transforms and the confusion matrix.

Transforms, on random small images, scales, crops and seeds, in both implementations (the per-sample torchvision
`TrainTransform`; the batched `augment_batch` through the numba kernels and through the plain PyTorch ops): image and
mask stay aligned, no label is invented, ignore stays ignore, padding is black with the ignore label. The confusion
matrix: batching and order do not change it, it equals a plain count, and its scores match a hand computation.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from numpy.lib.stride_tricks import sliding_window_view

from resunet.data.sample_transforms import TrainTransform
from resunet.data.transforms import augment_batch, augment_batch_torch, sample_augment_params
from resunet.metrics import ConfusionMatrix

IGNORE = 255
LABELS = [0, 1, 2, 3, 4, IGNORE]
IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean/std that leave 0..1 pixels readable
GREEN = 200  # every image pixel's green level, so green 0 marks padding and nothing else
GARBAGE = 77  # the cache canvas outside each image's valid area: a label no mask uses, so reading it shows
SETTINGS = settings(max_examples=50, deadline=None, database=None)  # no .hypothesis/ folder left in the repo


def code(mask):
    """Red level that encodes a label: 40 × (label + 1) for classes 0..4, 0 for ignore."""
    mask = np.asarray(mask).astype(np.int64)
    return np.where(mask == IGNORE, 0, 40 * (mask + 1))


def encode(mask):
    """H×W×3 uint8 image of a mask: red = the label's code, green = GREEN everywhere."""
    image = np.zeros((*mask.shape, 3), np.uint8)
    image[..., 0] = code(mask)
    image[..., 1] = GREEN
    return image


@st.composite
def block_masks(draw, height, width, min_block=2, max_block=20):
    """A height × width mask of constant label blocks (random size in [min_block, max_block], random grid offset)
    over a random subset of LABELS. Blocks at least as wide as a resize's step between nearest samples are never
    stepped over; blocks at most half the visible source leave block edges in the crop to check."""
    block = draw(st.integers(min_block, max(min_block, max_block)))
    oy, ox = draw(st.integers(0, block - 1)), draw(st.integers(0, block - 1))
    labels = draw(st.lists(st.sampled_from(LABELS), min_size=1, max_size=len(LABELS), unique=True))
    coarse = draw(arrays(np.uint8, ((height + oy) // block + 1, (width + ox) // block + 1),
                         elements=st.sampled_from(labels), fill=st.nothing()))  # no fill: every block drawn
    return np.kron(coarse, np.ones((block, block), np.uint8))[oy : oy + height, ox : ox + width]


def sampling_step(source, output):
    """Widest run of source pixels a nearest resize source → output can step over, plus one for float rounding where
    a sample falls exactly on a pixel boundary."""
    return max(2, math.ceil(source / output) + 1)


def reach(zoom, floor_nearest=False):
    """Radius r (output pixels) such that the labels of an output pixel's (2r+1)² neighbours cover every source pixel
    its antialiased bilinear weights touch, for a resize by `zoom` (output / source pixels): the filter reaches
    s = max(1, 1 / zoom) source pixels either side of the centre and neighbour ±r's label lies r / zoom source pixels
    away, so r / zoom ≥ s - 1/2 suffices; torchvision's floor-based nearest (`floor_nearest`) samples half an output
    pixel earlier and needs (r - 1/2) / zoom ≥ s - 1/2."""
    return max(1, math.ceil(0.5 * zoom)) if not floor_nearest else max(2, math.ceil(0.5 * zoom + 0.5))


def check_aligned(image, mask, radius):
    """Where an output pixel and all its neighbours within `radius` are image (not padding) of one label, every source
    pixel blended into it has that label, so its colour must be that label's code (ignore included). Pixels within
    `radius` of the crop's edge are skipped: their blend may reach source pixels the crop cut off."""
    levels = np.rint(np.asarray(image, np.float64) * 255)
    mask = np.asarray(mask).astype(np.int64)
    labels = np.where(levels[1] == 0, -2, mask)  # padding never counts as a label region
    windows = sliding_window_view(np.pad(labels, radius, constant_values=-1), (2 * radius + 1,) * 2)
    uniform = (windows == labels[:, :, None, None]).all(axis=(2, 3)) & (labels >= 0)
    assert (np.abs(levels[0][uniform] - code(mask[uniform])) <= 1).all()
    assert (np.abs(levels[1][uniform] - GREEN) <= 1).all()


def check_padding(image, mask):
    """Padding (green 0) is black with the ignore label, and the image inside it is one rectangle.
    Returns that rectangle's rows and columns (boolean)."""
    image, mask = np.asarray(image), np.asarray(mask)
    padding = image[1] == 0
    assert (mask[padding] == IGNORE).all() and (image[:, padding] == 0).all()
    rows, cols = ~padding.all(1), ~padding.all(0)
    assert np.array_equal(~padding, np.outer(rows, cols))
    return rows, cols


def label_set(mask):
    return set(np.unique(np.asarray(mask)).tolist())


# --- the per-sample path (torchvision transforms.v2) -------------------------------------------------------------


@SETTINGS
@given(shape=st.tuples(st.integers(5, 40), st.integers(5, 40)), size=st.integers(5, 40), scale=st.floats(0.5, 2.0),
       spread=st.floats(0.0, 1.0), crop=st.none() | st.integers(5, 40), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_per_sample_transform_keeps_alignment_labels_and_ignore_padding(shape, size, scale, spread, crop, seed, data):
    # The shorter side is resized to an integer in the scales' range, the longer one in proportion (truncated).
    scales = (scale, scale + spread)
    height, width = shape
    short = min(height, width)
    shorts = (int(size * scales[0]), int(size * scales[1]))
    (low_h, low_w), (high_h, high_w) = ((int(s * height / short), int(s * width / short)) for s in shorts)
    radius = reach(shorts[1] / short, floor_nearest=True)
    step = max(sampling_step(height, low_h), sampling_step(width, low_w))
    wide = math.ceil((2 * radius + 1) * max(height / low_h, width / low_w))  # checkable block interiors
    visible = min(height, width, int((crop or size) * short / shorts[1]))  # source pixels across the crop, at least
    mask = data.draw(block_masks(height, width, max(step, min(wide, visible // 2)), visible // 2), label="mask")

    torch.manual_seed(seed)
    image, out_mask = TrainTransform(size, scales, *IDENTITY, jitter=0.0, crop=crop)(encode(mask), mask)
    crop = crop or size
    assert image.shape == (3, crop, crop) and out_mask.shape == (crop, crop) and out_mask.dtype == torch.int64
    assert label_set(out_mask) <= label_set(mask) | {IGNORE}  # nearest neighbour: nothing interpolated

    # Padding where the resized image is smaller than the crop: the visible image is min(crop, resized side).
    visible_h, visible_w = (int(v.sum()) for v in check_padding(image.numpy(), out_mask.numpy()))
    assert min(crop, low_h) <= visible_h <= min(crop, high_h) and min(crop, low_w) <= visible_w <= min(crop, high_w)
    check_aligned(image.numpy(), out_mask.numpy(), radius)

    # ColorJitter comes after the geometry and only touches the image: same seed, same labels.
    torch.manual_seed(seed)
    _, jittered_mask = TrainTransform(size, scales, *IDENTITY, jitter=0.3, crop=crop)(encode(mask), mask)
    assert torch.equal(jittered_mask, out_mask)


def nearest_reference(start, length, out_start, out_len, crop):
    """Per crop position, the source pixel whose area [j, j+1) holds the output pixel's centre (exact integer
    arithmetic), and the one before it where the centre sits exactly on their boundary (either is right there);
    -1 in the padding. Returns (exact, alternative)."""
    exact, alternative = np.full(crop, -1), np.full(crop, -1)
    for p in range(out_start, out_start + out_len):
        centre = (2 * (p - out_start) + 1) * length  # the centre's source position × 2 out_len
        exact[p] = start + centre // (2 * out_len)
        alternative[p] = exact[p] - (centre % (2 * out_len) == 0)
    return exact, alternative


def matches_nearest(out_mask, mask, rows, cols):
    """Per output pixel: is its label the source label under its centre (ignore in the padding)?"""
    mask = np.asarray(mask)

    def gather(r, c):
        labels = mask[r.clip(0)][:, c.clip(0)].astype(np.int64)
        return np.where((r[:, None] < 0) | (c[None, :] < 0), IGNORE, labels)

    return np.any([np.asarray(out_mask) == gather(r, c) for r in rows for c in cols], axis=0)


# Found by this test: the per-sample path resized masks with legacy nearest (the top-left corner's pixel).
@SETTINGS
@given(mask=arrays(np.uint8, st.integers(3, 30).map(lambda side: (side, side)), elements=st.integers(0, 9)),
       out=st.integers(2, 30), seed=st.integers(0, 2**31 - 1))
@example(mask=np.arange(9, dtype=np.uint8).reshape(3, 3), out=2, seed=0)  # 3 → 2 px: rows/cols 0, 2, not 0, 1
def test_per_sample_labels_come_from_the_pixel_under_each_output_centre(mask, out, seed):
    # A square image resized to out × out and cropped to out: no crop offset, no padding, only the coin for the flip.
    torch.manual_seed(seed)
    image = np.zeros((*mask.shape, 3), np.uint8)  # only the labels matter here
    _, out_mask = TrainTransform(out, (1.0, 1.0), *IDENTITY, jitter=0.0, crop=out)(image, mask)
    side = nearest_reference(0, len(mask), 0, out, out)
    mirrored = tuple(index[::-1] for index in side)
    assert matches_nearest(out_mask, mask, side, side).all() or matches_nearest(out_mask, mask, side, mirrored).all()


# --- the batched path (the cache's: numba kernels on the CPU, plain PyTorch ops on a device) -----------------------


@st.composite
def cache_batches(draw):
    """A batch as the cache hands it over: block-mask samples on one canvas (planar images K×3×H×W, masks K×H×W,
    valid top-left, GARBAGE around), the batch's indices into them (any order, repeats allowed), the recipe (size,
    scales, crop) and a seed. Each mask's blocks are wider than any step its resizes take between nearest samples."""
    shapes = draw(st.lists(st.tuples(st.integers(5, 32), st.integers(5, 32)), min_size=1, max_size=3))
    index = draw(st.lists(st.integers(0, len(shapes) - 1), min_size=1, max_size=4))
    size, scale, spread = draw(st.integers(5, 40)), draw(st.floats(0.5, 2.0)), draw(st.floats(0.0, 1.0))
    crop, seed = draw(st.none() | st.integers(5, 40)), draw(st.integers(0, 2**31 - 1))
    scales = (scale, scale + spread)
    sizes = torch.tensor(shapes)
    params = sample_augment_params(sizes[index], size, scales, 0.0, torch.Generator().manual_seed(seed), crop)
    steps, visible = [2] * len(shapes), [min(shape) for shape in shapes]
    boxes = torch.cat([params.src_y, params.src_x, params.out_y, params.out_x], 1).tolist()
    for sample, (_, sh, _, sw, _, oh, _, ow) in zip(index, boxes):
        wide = math.ceil((2 * reach(max(oh / sh, ow / sw)) + 1) * max(sh / oh, sw / ow))  # checkable interiors
        visible[sample] = min(visible[sample], sh, sw)  # the window: the source pixels the crop shows
        steps[sample] = max(steps[sample], sampling_step(sh, oh), sampling_step(sw, ow),
                            min(wide, visible[sample] // 2))
    masks = [draw(block_masks(*shape, step, seen // 2)) for shape, step, seen in zip(shapes, steps, visible)]
    canvas_h = max(height for height, _ in shapes) + draw(st.integers(0, 3))
    canvas_w = max(width for _, width in shapes) + draw(st.integers(0, 3))
    images = np.full((len(masks), 3, canvas_h, canvas_w), 250, np.uint8)
    canvas = np.full((len(masks), canvas_h, canvas_w), GARBAGE, np.uint8)
    for i, mask in enumerate(masks):
        images[i, :, : mask.shape[0], : mask.shape[1]] = encode(mask).transpose(2, 0, 1)
        canvas[i, : mask.shape[0], : mask.shape[1]] = mask
    return images, canvas, sizes, index, size, scales, crop, seed


@SETTINGS
@given(batch=cache_batches())
def test_batched_paths_keep_alignment_labels_and_ignore_padding(batch):
    images, masks, sizes, index, size, scales, crop, seed = batch
    params = sample_augment_params(sizes[index], size, scales, 0.0, torch.Generator().manual_seed(seed), crop)
    kernel = augment_batch(images, masks, index, sizes[index], size, scales, *IDENTITY, jitter=0.0,
                           generator=torch.Generator().manual_seed(seed), crop=crop)
    plain = augment_batch_torch(torch.from_numpy(images), torch.from_numpy(masks), index, params, *IDENTITY, IGNORE,
                                torch.device("cpu"))
    crop = crop or size
    boxes = torch.cat([params.src_y, params.src_x, params.out_y, params.out_x], 1).tolist()
    for i, (sample, (sy, sh, sx, sw, oy, oh, ox, ow)) in enumerate(zip(index, boxes)):
        # The window lies in the valid image, its place in the crop; a side is padded only when all of it is shown.
        valid_h, valid_w = sizes[sample].tolist()
        assert 0 <= sy < sy + sh <= valid_h and 0 <= sx < sx + sw <= valid_w
        assert 0 <= oy < oy + oh <= crop and 0 <= ox < ox + ow <= crop
        assert (oh == crop or sh == valid_h) and (ow == crop or sw == valid_w)
        rows = nearest_reference(sy, sh, oy, oh, crop)
        cols = nearest_reference(sx, sw, ox, ow, crop)
        placed_rows, placed_cols = rows[0] >= 0, cols[0] >= 0
        if params.flip[i]:
            cols, placed_cols = tuple(c[::-1] for c in cols), placed_cols[::-1]
        for out_images, out_masks in (kernel, plain):
            assert out_images.shape == (len(index), 3, crop, crop) and out_masks.shape == (len(index), crop, crop)
            assert out_masks.dtype == torch.int64
            image, out_mask = out_images[i].numpy(), out_masks[i].numpy()
            assert label_set(out_mask) <= label_set(masks[sample, :valid_h, :valid_w]) | {IGNORE}  # no garbage either
            assert matches_nearest(out_mask, masks[sample], rows, cols).all()  # flip included
            visible_rows, visible_cols = check_padding(image, out_mask)
            assert np.array_equal(visible_rows, placed_rows) and np.array_equal(visible_cols, placed_cols)
            check_aligned(image, out_mask, reach(max(oh / sh, ow / sw)))

    # The jitter only touches the images: same generator, same labels.
    jittered = augment_batch(images, masks, index, sizes[index], size, scales, *IDENTITY, jitter=0.3,
                             generator=torch.Generator().manual_seed(seed), crop=crop)
    assert torch.equal(jittered[1], kernel[1])


@SETTINGS
@given(shape=st.tuples(st.integers(5, 40), st.integers(5, 40)), size=st.integers(5, 40), scale=st.floats(0.5, 2.0),
       crop=st.none() | st.integers(5, 40), seed=st.integers(0, 2**31 - 1))
def test_an_all_ignore_mask_stays_all_ignore(shape, size, scale, crop, seed):
    mask = np.full(shape, IGNORE, np.uint8)
    torch.manual_seed(seed)
    _, out_mask = TrainTransform(size, (scale, scale), *IDENTITY, crop=crop)(encode(mask), mask)
    assert (out_mask == IGNORE).all()
    images, masks = encode(mask).transpose(2, 0, 1)[None].copy(), mask[None].copy()
    sizes = torch.tensor([shape])
    params = sample_augment_params(sizes, size, (scale, scale), 0.2, torch.Generator().manual_seed(seed), crop)
    _, kernel = augment_batch(images, masks, [0], sizes, size, (scale, scale), *IDENTITY,
                              generator=torch.Generator().manual_seed(seed), crop=crop)
    _, plain = augment_batch_torch(torch.from_numpy(images), torch.from_numpy(masks), [0], params, *IDENTITY, IGNORE,
                                   torch.device("cpu"))
    assert (kernel == IGNORE).all() and (plain == IGNORE).all()


# --- the confusion matrix -------------------------------------------------------------------------------------------


@st.composite
def labelled_pixels(draw):
    """(classes, target, pred): flat int64 arrays, targets in 0..classes-1 or ignore, predictions in 0..classes-1."""
    classes = draw(st.integers(1, 6))
    n = draw(st.integers(0, 300))
    target = draw(arrays(np.int64, n, elements=st.sampled_from([*range(classes), IGNORE]), fill=st.nothing()))
    pred = draw(arrays(np.int64, n, elements=st.integers(0, classes - 1), fill=st.nothing()))
    return classes, target, pred


def reference_matrix(classes, target, pred):
    """matrix[t, p]: pixels of true class t predicted as p, ignore pixels skipped; one pixel at a time."""
    matrix = np.zeros((classes, classes), np.int64)
    for t, p in zip(target.tolist(), pred.tolist()):
        if t != IGNORE:
            matrix[t, p] += 1
    return matrix


@settings(SETTINGS, max_examples=100)
@given(pixels=labelled_pixels(), data=st.data())
def test_confusion_matrix_is_a_plain_count_whatever_the_batching_and_order(pixels, data):
    classes, target, pred = pixels
    expected = reference_matrix(classes, target, pred)
    whole = ConfusionMatrix(classes)
    whole.update(torch.from_numpy(pred)[None], torch.from_numpy(target)[None])  # one (1, n) batch
    assert np.array_equal(whole.matrix.numpy(), expected)

    # The same pixels shuffled, cut into random chunks, fed in a random order (uint8 targets, as masks are stored).
    order = np.array(data.draw(st.permutations(range(len(target)))), dtype=np.int64)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(target)), max_size=6)))
    bounds = list(zip([0, *cuts], [*cuts, len(target)]))
    pieces = ConfusionMatrix(classes)
    for k in data.draw(st.permutations(range(len(bounds)))):
        chunk = order[bounds[k][0] : bounds[k][1]]
        pieces.update(torch.from_numpy(pred[chunk]), torch.from_numpy(target[chunk].astype(np.uint8)))
    assert torch.equal(pieces.matrix, whole.matrix)


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


@settings(SETTINGS, max_examples=100)
@given(pixels=labelled_pixels())
def test_scores_match_a_hand_computation(pixels):
    classes, target, pred = pixels
    matrix = reference_matrix(classes, target, pred)
    cm = ConfusionMatrix(classes)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    scores = cm.compute()

    iou = []
    for c in range(classes):
        true_positive = matrix[c, c]
        union = matrix[c, :].sum() + matrix[:, c].sum() - true_positive  # TP + FN + FP
        iou.append(true_positive / union if union else math.nan)  # absent from target and prediction: NaN
    present = [v for v in iou if not math.isnan(v)]
    total = matrix.sum()
    assert len(scores["iou"]) == classes and all(same(a, b) for a, b in zip(scores["iou"], iou))
    assert same(scores["miou"], sum(present) / len(present) if present else math.nan)
    assert same(scores["pixel_accuracy"], np.trace(matrix) / total if total else math.nan)
