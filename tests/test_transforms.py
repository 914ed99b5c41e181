"""Both augmentation paths keep image and mask aligned, pad masks with the ignore label, and invent no label."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from resunet.data.sample_transforms import TrainTransform
from resunet.data.transforms import (
    apply_colour_maps,
    augment_batch,
    augment_batch_torch,
    colour_maps,
    mean_colour,
    resize_windows,
    sample_augment_params,
)

IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean/std that leave 0..1 pixels readable


def blocks(height=60, width=80, seed=0):
    """A mask of big label blocks and an image whose red channel is 40 × label: alignment is checkable."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 5, size=(height // 20 + 1, width // 20 + 1))
    mask = np.kron(coarse, np.ones((20, 20), dtype=np.int64))[:height, :width].astype(np.uint8)
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = mask * 40
    image[..., 1] = 200
    return image, mask


def interior(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3×3 neighbourhood has one label (away from block edges, where bilinear blends)."""
    m = mask.float()[None, None]
    same = torch.ones_like(m, dtype=torch.bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= torch.roll(m, (dy, dx), (2, 3)) == m
    return same[0, 0]


def check_aligned(image: torch.Tensor, mask: torch.Tensor, ignore: int = 255):
    labelled = (mask != ignore) & interior(mask)
    assert labelled.sum() > 50
    red = image[0][labelled] * 255
    assert torch.allclose(red, mask[labelled].float() * 40, atol=2.0)
    assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 4, ignore}  # nearest: no invented label


@pytest.mark.parametrize("seed", range(5))
def test_per_sample_transform_keeps_alignment(seed):
    torch.manual_seed(seed)
    image, mask = blocks(seed=seed)
    out_image, out_mask = TrainTransform(48, (0.5, 2.0), *IDENTITY, jitter=0.0)(image, mask)
    assert out_image.shape == (3, 48, 48) and out_mask.shape == (48, 48) and out_mask.dtype == torch.int64
    check_aligned(out_image, out_mask)


def test_per_sample_crop_pads_mask_with_ignore_never_zero():
    torch.manual_seed(0)
    image, mask = blocks(20, 30)
    mask[:] = 3  # no 0 anywhere: any 0 in the output would be an invented background
    out_image, out_mask = TrainTransform(64, (1.0, 1.0), *IDENTITY, jitter=0.0)(image, mask)
    # shorter side 20 → 64: the image becomes 64×96 and fills the crop; use a smaller scale to force padding
    out_image, out_mask = TrainTransform(64, (0.5, 0.5), *IDENTITY, jitter=0.0)(image, mask)
    assert (out_mask == 255).any() and not (out_mask == 0).any()
    assert (out_image[:, out_mask == 255] == 0).all()


def canvas_batch(samples, canvas=(70, 90)):
    """The cache's layout: planar uint8 images K×3×H×W and masks K×H×W on canvases, valid top-left."""
    images = torch.zeros(len(samples), 3, *canvas, dtype=torch.uint8)
    masks = torch.full((len(samples), *canvas), 255, dtype=torch.uint8)
    sizes = torch.zeros(len(samples), 2, dtype=torch.int64)
    for i, (image, mask) in enumerate(samples):
        h, w = mask.shape
        images[i, :, :h, :w] = torch.from_numpy(image).permute(2, 0, 1)
        masks[i, :h, :w] = torch.from_numpy(mask)
        sizes[i] = torch.tensor([h, w])
    return images, masks, sizes


def test_batched_augmentation_keeps_alignment_and_ignore_padding():
    samples = [blocks(60, 80, seed=s) for s in range(6)] + [blocks(40, 60, seed=9)]
    images, masks, sizes = canvas_batch(samples)
    out_images, out_masks = augment_batch(images, masks, range(len(sizes)), sizes, 48, (0.5, 2.0), *IDENTITY, jitter=0.0,
                                          generator=torch.Generator().manual_seed(1))
    assert out_images.shape == (7, 3, 48, 48) and out_masks.shape == (7, 48, 48)
    for image, mask in zip(out_images, out_masks):
        check_aligned(image, mask)


def test_batched_augmentation_refuses_sizes_not_one_per_sample_and_samples_outside_the_canvases():
    """The numba kernel reads no bounds: a size per canvas for fewer samples read past its box array (a random
    MemoryError or ZeroDivisionError, a helper's audit)."""
    images, masks, sizes = canvas_batch([blocks(40, 60, seed=s) for s in range(3)])
    with pytest.raises(ValueError, match="valid_sizes has 3 rows for 5 samples"):
        augment_batch(images, masks, [0, 1, 2, 0, 1], sizes, 32, (0.5, 2.0), *IDENTITY)
    with pytest.raises(ValueError, match="outside the 3 canvases"):
        augment_batch(images, masks, [0, 3], sizes[:2], 32, (0.5, 2.0), *IDENTITY)
    too_tall = sizes.clone()
    too_tall[1, 0] = images.shape[-2] + 1
    for wrong in (too_tall, sizes * 0):
        with pytest.raises(ValueError, match="valid_sizes must lie within the"):
            augment_batch(images, masks, [0, 1, 2], wrong, 32, (0.5, 2.0), *IDENTITY)


def test_batched_small_scale_pads_with_ignore_and_black():
    image, mask = blocks(40, 40)
    mask[:] = 2
    images, masks, sizes = canvas_batch([(image, mask)], canvas=(40, 40))
    out_images, out_masks = augment_batch(images, masks, range(len(sizes)), sizes, 64, (0.5, 0.5), *IDENTITY, jitter=0.0,
                                          generator=torch.Generator().manual_seed(0))
    # shorter side 40 → 32 px: a 32×32 image inside a 64×64 crop, the rest void
    assert (out_masks == 2).sum() == pytest.approx(32 * 32, abs=70)
    assert set(out_masks.unique().tolist()) == {2, 255}
    void = (out_masks[0] == 255) & interior(out_masks[0])  # bilinear blends only at the image's own edge
    assert void.sum() >= 64 * 64 - 34 * 34 and (out_images[0][:, void] == 0).all()


def test_batched_flip_mirrors_image_and_mask_together():
    image = np.zeros((40, 40, 3), np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    image[:, :20, 0], mask[:, :20] = 40, 1  # left half label 1
    images, masks, sizes = canvas_batch([(image, mask)] * 16, canvas=(40, 40))
    out_images, out_masks = augment_batch(images, masks, range(len(sizes)), sizes, 40, (1.0, 1.0), *IDENTITY, jitter=0.0,
                                          generator=torch.Generator().manual_seed(0))
    left_is_one = (out_masks[:, :, :10] == 1).float().mean(dim=(1, 2)) > 0.9
    assert 0 < left_is_one.sum() < 16  # some flipped, some not
    for image_out, mask_out in zip(out_images, out_masks):
        check_aligned(image_out, mask_out)


def test_same_generator_seed_same_batch():
    images, masks, sizes = canvas_batch([blocks(seed=s) for s in range(3)])
    a = augment_batch(images, masks, range(len(sizes)), sizes, 32, (0.5, 2.0), *IDENTITY, generator=torch.Generator().manual_seed(5))
    b = augment_batch(images, masks, range(len(sizes)), sizes, 32, (0.5, 2.0), *IDENTITY, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def fused_jitter(images, factors, orders, mean, std):
    mean_colour = images.mean(dim=(2, 3)).double() / 255
    return apply_colour_maps(images, *colour_maps(mean_colour, factors, orders, mean, std))


def test_fused_jitter_equals_torchvision_sequential_adjustments():
    # Mid-range pixels and factors in [0.8, 1.2] never leave [0, 1] between steps, so clamping once at the end must
    # give exactly torchvision's brightness → contrast → saturation (in each image's own random order).
    g = torch.Generator().manual_seed(0)
    images = 0.3 + 0.3 * torch.rand(4, 3, 16, 16, generator=g)
    factors = 0.8 + 0.4 * torch.rand(4, 3, generator=g, dtype=torch.float64)
    orders = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 0, 2], [2, 0, 1]])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    fused = fused_jitter(images * 255, factors, orders, mean, std)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(4):
        expected = images[i]
        for op in orders[i].tolist():
            expected = adjust[op](expected, float(factors[i, op]))
        expected = TF.normalize(expected, mean, std)
        assert torch.allclose(fused[i], expected, atol=1e-4), i


def test_fused_jitter_clamps_to_the_valid_range():
    images = torch.full((1, 3, 4, 4), 250.0)
    out = fused_jitter(images, torch.tensor([[1.2, 1.0, 1.0]], dtype=torch.float64), torch.tensor([[0, 1, 2]]),
                       (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert torch.allclose(out, torch.ones_like(out))  # 250/255 × 1.2 > 1 → clamped to white, as torchvision does


def test_cpu_kernel_path_equals_the_plain_torch_path():
    # The numba kernel (CPU training) and the plain PyTorch ops (CUDA training) apply the same drawn parameters:
    # identical labels, images within the uint8 rounding of the resize.
    samples = [blocks(60, 80, seed=s) for s in range(5)] + [blocks(40, 60, seed=7)]
    for i, (image, _) in enumerate(samples):
        image[..., 2] = np.random.default_rng(i).integers(0, 256, image.shape[:2])  # texture for resize and jitter
    images, masks, sizes = canvas_batch(samples)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    params = sample_augment_params(sizes, 48, (0.5, 2.0), 0.3, torch.Generator().manual_seed(4))
    assert params.flip.any() and not params.flip.all()
    index = [5, 0, 1, 2, 3, 4]  # any order of the cache's samples
    kernel_images, kernel_masks = augment_batch(images.numpy(), masks.numpy(), index, sizes[index], 48, (0.5, 2.0),
                                                mean, std, jitter=0.3, generator=torch.Generator().manual_seed(4))
    params = sample_augment_params(sizes[index], 48, (0.5, 2.0), 0.3, torch.Generator().manual_seed(4))
    torch_images, torch_masks = augment_batch_torch(images, masks, index, params, mean, std, 255, torch.device("cpu"))
    assert kernel_images.shape == torch_images.shape == (6, 3, 48, 48)
    assert torch.equal(kernel_masks, torch_masks) and kernel_masks.dtype == torch.int64
    assert (kernel_images - torch_images).abs().max() <= 1.5 / 255 / min(std)
    assert (kernel_masks == 255).any() and (kernel_masks != 255).any()


def test_sampled_scales_follow_the_recipe():
    # Shorter side → size × s, s uniform in [0.5, 2]: the resize factor of each window must match within rounding.
    sizes = torch.tensor([[300, 400]] * 400)
    g = torch.Generator().manual_seed(0)
    params = sample_augment_params(sizes, 64, (0.5, 2.0), 0.0, g)
    factor = params.out_y[:, 1].double() / params.src_y[:, 1].double()
    expected = (torch.rand(400, 6, generator=torch.Generator().manual_seed(0))[:, 0].double() * 1.5 + 0.5) * 64 / 300
    assert torch.allclose(factor, expected, rtol=0.02)
    # windows stay inside the image and outputs inside the crop
    assert (params.src_y.sum(1) <= 300).all() and (params.src_x.sum(1) <= 400).all()
    assert (params.out_y.sum(1) <= 64).all() and (params.out_x.sum(1) <= 64).all()
    assert 0.4 < params.flip.float().mean() < 0.6


@pytest.mark.parametrize("jitter", [0.2, 1.0, 1.5])
def test_jitter_factors_span_colorjitters_range(jitter):
    # torchvision's ColorJitter (the simple data path) draws each factor uniformly in [max(0, 1 - j), 1 + j]; the
    # cached path drew from 1 - j, negative above j = 1 (16% of the factors at 1.5), and inverted colours.
    factors = sample_augment_params(torch.tensor([[300, 400]] * 2000), 64, (1.0, 1.0), jitter,
                                    torch.Generator().manual_seed(0)).factors
    low = max(0.0, 1 - jitter)
    assert factors.min() >= low and factors.max() <= 1 + jitter
    assert factors.min() < low + 0.01 and factors.max() > 1 + jitter - 0.01
    assert float(factors.mean()) == pytest.approx((low + 1 + jitter) / 2, abs=0.03)


def test_resize_windows_match_pytorch_antialiased_bilinear():
    # Every sample's window, resized by the numba kernel and placed in a zero crop, must be F.interpolate's
    # antialiased bilinear resize of that window (computed in float, rounded to levels): at most one level apart,
    # where float32 sums land either side of a .5, and PyTorch's own uint8 kernel within one level too.
    samples = [blocks(60, 80, seed=s) for s in range(7)] + [blocks(40, 60, seed=9)]
    for i, (image, _) in enumerate(samples):
        image[..., 2] = np.random.default_rng(i).integers(0, 256, image.shape[:2])
    images, _, sizes = canvas_batch(samples)
    index = list(range(len(samples)))
    params = sample_augment_params(sizes, 48, (0.3, 2.0), 0.0, torch.Generator().manual_seed(3))
    full_y, full_x = params.out_y[:, 1] == 48, params.out_x[:, 1] == 48
    assert (full_y & full_x).any() and (~full_y & ~full_x).any() and (full_y ^ full_x).any()  # every kind of crop
    expected = torch.zeros(len(index), 3, 48, 48)
    pytorch_uint8 = torch.zeros(len(index), 3, 48, 48, dtype=torch.uint8)
    boxes = torch.cat([params.src_y, params.src_x, params.out_y, params.out_x], 1).tolist()
    for i, (sy, sh, sx, sw, oy, oh, ox, ow) in enumerate(boxes):
        window = images[i, :, sy : sy + sh, sx : sx + sw][None]
        resized = F.interpolate(window.float(), size=(oh, ow), mode="bilinear", antialias=True)
        expected[i, :, oy : oy + oh, ox : ox + ow] = resized[0].round().clamp(0, 255)
        pytorch_uint8[i, :, oy : oy + oh, ox : ox + ow] = F.interpolate(window, size=(oh, ow), mode="bilinear",
                                                                        antialias=True)[0]
    ours = resize_windows(images.numpy(), index, params).float()
    assert (ours - expected).abs().max() <= 1 and (ours != expected).float().mean() < 0.01
    assert (ours - pytorch_uint8.float()).abs().max() <= 1


@pytest.mark.parametrize("in_len, out_len", [(60, 48), (80, 48), (30, 48), (100, 40), (64, 24), (300, 48), (1000, 45)])
def test_horizontal_passes_equal_pytorch(in_len, out_len):
    # Every horizontal pass gives F.interpolate's antialiased bilinear sums: the dense one (any CPU, and spans too
    # wide for a permute), the AVX-512 permute (16 outputs, spans ≤ 32 and ≤ 64) and the AVX2 one (8 outputs, spans
    # ≤ 16, 24 and 32: 2, 3 or 4 registers). Upscaling, shrinking by ~1.2-22×, and 45 outputs (a last block of 5 of 8
    # lanes). Each permute runs where the CPU has its instructions.
    from resunet.data import kernels

    plane = np.zeros(in_len + 4 * kernels.LANES, np.float32)
    plane[:in_len] = np.random.default_rng(in_len).uniform(0, 255, in_len)
    first, weights = kernels.resize_weights(in_len, out_len)
    expected = F.interpolate(torch.from_numpy(plane[:in_len])[None, None, None], size=(1, out_len), mode="bilinear",
                             antialias=True)[0, 0, 0].numpy()
    dense = np.full(-(-out_len // kernels.LANES) * kernels.LANES, np.nan, np.float32)
    kernels.horizontal_dense(plane, *kernels.dense_tables(first, weights), dense)
    np.testing.assert_allclose(dense[:out_len], expected, rtol=1e-5, atol=1e-3)  # PyTorch's weights

    starts, index, lane_weights, span = kernels.permute_tables(first, weights, kernels.LANES)
    assert (span > 4 * kernels.LANES) == (in_len >= 300)  # 300 → 48 and 1000 → 45 are too wide for the permute
    if span <= 4 * kernels.LANES and kernels.AVX512:
        permuted = np.zeros_like(dense)
        kernels.horizontal_permute(plane, first, weights, starts, index, lane_weights, span > 2 * kernels.LANES,
                                   permuted)
        np.testing.assert_allclose(permuted[:out_len], expected, rtol=1e-5, atol=1e-3)

    starts, index, lane_weights, span = kernels.permute_tables(first, weights, kernels.PERMUTE8_LANES)
    # 2, 2, 2, 3 and 4 registers; the last two too wide
    assert span == {60: 12, 80: 16, 30: 7, 100: 22, 64: 25, 300: 57, 1000: 201}[in_len]
    if span <= 4 * kernels.PERMUTE8_LANES and kernels.AVX2:
        permuted = np.zeros_like(dense)
        kernels.horizontal_permute8(plane, weights.shape[1], starts, index, lane_weights, span, permuted)
        np.testing.assert_allclose(permuted[:out_len], expected, rtol=1e-5, atol=1e-3)


def test_every_kernel_names_only_globals_the_module_has():
    # numba drops a branch whose condition folds to a constant (`AVX512 and ...` on a CPU without AVX-512) before it
    # types it, so a name missing there fails only on the other CPU kind: check every kernel's global names here.
    import builtins
    import dis

    from resunet.data import kernels

    checked = 0
    for name, value in vars(kernels).items():
        function = getattr(value, "py_func", None)
        if function is None or function.__module__ != kernels.__name__:
            continue
        names = {i.argval for i in dis.get_instructions(function) if i.opname == "LOAD_GLOBAL"}
        assert not names - set(vars(kernels)) - set(dir(builtins)), name
        checked += 1
    assert checked >= 10  # resize_window, horizontal_dense, augment_samples, ...


def test_dense_tables_hold_each_outputs_weights_at_its_taps():
    # 10 → 4 (2.5× shrink, 7 taps): block 0 holds all four outputs; its span reaches the last output's last tap,
    # rounded up to 4 sums; each lane's column is that output's weights placed at first[x] - start, zeros elsewhere.
    from resunet.data import kernels

    first, weights = kernels.resize_weights(10, 4)
    starts, spans, widest, dense = kernels.dense_tables(first, weights)
    taps = weights.shape[1]
    assert list(starts) == [first[0]] and widest == spans[0] == -(-(first[3] + taps - first[0]) // 4) * 4
    matrix = dense.reshape(1, widest, kernels.DENSE_LANES)[0]
    for x in range(4):
        column = np.zeros(widest, np.float32)
        column[first[x] - first[0] : first[x] - first[0] + taps] = weights[x]
        np.testing.assert_array_equal(matrix[:, x], column)
        assert abs(matrix[:, x].sum() - 1) < 1e-6
    assert not matrix[:, 4:].any()  # lanes past the last output stay zero


def test_numba_colour_map_equals_the_torch_colour_maps():
    from resunet.data import kernels

    rng = np.random.default_rng(0)
    crops = torch.from_numpy(rng.integers(0, 256, (6, 3, 30, 41), dtype=np.uint8))
    factors = torch.from_numpy(rng.uniform(0.6, 1.4, (6, 3)))
    orders = torch.stack([torch.randperm(3, generator=torch.Generator().manual_seed(i)) for i in range(6)])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    matrix, offset, _, _ = colour_maps(mean_colour(crops), factors, orders, mean, std)
    for i in range(6):
        m, t = np.empty((3, 3)), np.empty(3)
        kernels.colour_map(crops[i].numpy(), factors[i].numpy(), orders[i].numpy(), np.array(mean), np.array(std), m, t)
        np.testing.assert_allclose(m, matrix[i].numpy(), rtol=1e-12)
        np.testing.assert_allclose(t, offset[i].numpy(), rtol=1e-12, atol=1e-12)



def test_threads_share_a_batch_without_changing_it(monkeypatch):
    # The CPU path splits a batch among threads; each sample's result depends only on its own parameters, so one
    # thread and three give the same batch, bit for bit.
    from resunet.data import transforms

    samples = [blocks(60, 80, seed=s) for s in range(7)]
    images, masks, sizes = canvas_batch(samples)
    batches = []
    for threads in (1, 3):
        monkeypatch.setattr(transforms, "data_threads", lambda n, threads=threads: threads)
        batches.append(augment_batch(images.numpy(), masks.numpy(), range(7), sizes, 48, (0.5, 2.0),
                                     (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), jitter=0.3,
                                     generator=torch.Generator().manual_seed(2)))
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])
    assert transforms._helpers.pool is not None and transforms._helpers.pool._max_workers >= 2  # the three really ran
