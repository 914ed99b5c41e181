"""The fused upsample + argmax (`classmap.upsample_argmax`) against PyTorch's two calls and a hand-worked map."""

import pytest
import torch
import torch.nn.functional as F

from resunet.classmap import argmax_map, upsample_argmax


def reference(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False).argmax(1).to(torch.uint8)


def test_hand_worked_two_by_two_map_with_ties_going_to_the_first_class():
    # Class 0 peaks at the top-left logit pixel, class 1 at the bottom-right. Upsampled 2 → 4, the row and column
    # weights on the first logit pixel are 1, .75, .25, 0, so class 0 minus class 1 at output (y, x) is
    # r[y]·r[x] − (1 − r[y])(1 − r[x]): positive above the anti-diagonal, zero on it (both values 0, or both
    # .1875 = .75 × .25: exact in float32, a tie, which goes to class 0 as in torch.argmax), negative below it.
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0, 0, 0] = 1.0
    logits[0, 1, 1, 1] = 1.0
    expected = torch.tensor([[0, 0, 0, 0],
                             [0, 0, 0, 1],
                             [0, 0, 1, 1],
                             [0, 1, 1, 1]], dtype=torch.uint8)
    assert torch.equal(upsample_argmax(logits, (4, 4))[0], expected)
    assert torch.equal(reference(logits, (4, 4))[0], expected)  # the hand-worked map is PyTorch's


@pytest.mark.parametrize("shape,size", [
    ((2, 21, 17, 23), (40, 31)),   # up, a different factor per axis
    ((1, 7, 30, 40), (15, 20)),    # down
    ((2, 5, 24, 32), (24, 32)),    # the same size: a copy in PyTorch
    ((1, 3, 1, 9), (6, 1)),        # one row / one column
    ((1, 1, 5, 5), (9, 9)),        # one class
    ((1, 256, 6, 7), (13, 11)),    # as many classes as uint8 holds
])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "bf16"])
def test_equals_pytorch_on_random_logits(shape, size, layout):
    generator = torch.Generator().manual_seed(sum(shape) + sum(size))
    logits = torch.randn(shape, generator=generator)
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    elif layout == "bf16":
        logits = logits.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    out = upsample_argmax(logits, size)
    assert out.dtype == torch.uint8 and out.shape == (shape[0], *size)
    assert torch.equal(out, reference(logits, size))


@pytest.mark.parametrize("threads", [1, 2])
def test_equals_pytorch_on_smooth_logits_with_boundaries(threads):
    # Spatially smooth logits, like a network's: large regions of one class (the fast path) and boundaries between
    # them (interpolated in full), upsampled by a non-integer factor as the Predictor does (256 → 375 here).
    generator = torch.Generator().manual_seed(threads)
    coarse = torch.randn(2, 21, 6, 8, generator=generator) * 4
    logits = F.interpolate(coarse, size=(256, 341), mode="bicubic", align_corners=False).to(torch.bfloat16)
    size = (375, 500)
    expected = reference(logits, size)
    assert 3 < expected.unique().numel()  # several classes, so there are boundaries to get right
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(upsample_argmax(logits, size), expected)
    finally:
        torch.set_num_threads(previous)


def test_more_classes_than_uint8_holds_come_back_as_int64():
    logits = torch.randn(1, 300, 4, 5, generator=torch.Generator().manual_seed(0))
    logits[0, 280] += 100  # the winning class is beyond 255
    out = upsample_argmax(logits, (8, 10))
    assert out.dtype == torch.int64 and (out == 280).all()


def test_full_size_maps_keep_classes_beyond_255():
    # The multi-scale TTA and ensemble paths take the argmax of full-size logits: uint8 up to 256 classes, int64 past.
    logits = torch.zeros(1, 300, 2, 3)
    logits[0, 280, 0, 0] = logits[0, 3, 1, 2] = 1.0
    assert argmax_map(logits).dtype == torch.int64 and argmax_map(logits)[0, 0, 0] == 280
    assert argmax_map(logits)[0, 1, 2] == 3
    small = argmax_map(logits[:, :256])
    assert small.dtype == torch.uint8 and small[0, 1, 2] == 3 and small[0, 0, 0] == 0
