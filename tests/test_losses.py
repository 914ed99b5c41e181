"""Each loss against values worked out by hand on three pixels (plus an ignored one) of two classes."""

import math

import pytest
import torch

from resunet.losses import LOSSES, SegmentationLoss

# Pixels: targets 1, 0, 1 and one ignored (255). The probability of class 1 at each: 0.4, 0.3, 0.9 (and 0.5).
P1 = [0.4, 0.3, 0.9, 0.5]
TARGET = torch.tensor([[[1, 0, 1, 255]]])
P_TRUE = [0.4, 0.7, 0.9]  # the probability of each valid pixel's own class


def logits() -> torch.Tensor:
    """1×2×1×4: two classes, softmax([0, log(p / (1 - p))]) = [1 - p, p]."""
    return torch.tensor([[[[0.0] * 4], [[math.log(p / (1 - p)) for p in P1]]]], dtype=torch.float64)


def loss(name, weight=None, **options):
    w = torch.tensor(weight, dtype=torch.float64) if weight else None
    return float(SegmentationLoss(name, w, 255, **options)(logits(), TARGET))


CE = [-math.log(p) for p in P_TRUE]  # 0.9163, 0.3567, 0.1054


def test_cross_entropy_skips_ignore_and_weights_as_torch_does():
    assert loss("ce") == pytest.approx(sum(CE) / 3)
    # weights [1, 3]: pixels of class 1 count three times: (3·0.9163 + 1·0.3567 + 3·0.1054) / 7
    assert loss("ce", [1, 3]) == pytest.approx((3 * CE[0] + CE[1] + 3 * CE[2]) / 7)


def test_focal_by_hand():
    by_hand = [(1 - p) ** 2 * c for p, c in zip(P_TRUE, CE)]  # 0.36·0.9163, 0.09·0.3567, 0.01·0.1054
    assert loss("focal") == pytest.approx(sum(by_hand) / 3)
    assert loss("focal", focal_gamma=0.0) == pytest.approx(loss("ce"))
    assert loss("focal", [1, 3]) == pytest.approx((3 * by_hand[0] + by_hand[1] + 3 * by_hand[2]) / 7)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_focal_gradients_stay_finite_on_a_pixel_already_right(gamma):
    # A margin of 20 in float32: p rounds to 1, and (1 - p)^0.5 had an infinite derivative there (NaN weights).
    x = torch.tensor([[[[20.0]], [[0.0]]]], requires_grad=True)
    value = SegmentationLoss("focal", None, 255, focal_gamma=gamma)(x, torch.zeros(1, 1, 1, dtype=torch.long))
    value.backward()
    assert torch.isfinite(x.grad).all() and value.item() == pytest.approx(0.0, abs=1e-8)


def test_dice_by_hand():
    # class 1: overlap 0.4 + 0.9 = 1.3, sum of p 1.6, 2 pixels → 1 - 2.6/3.6; class 0: overlap 0.7, sum of p 1.4,
    # 1 pixel → 1 - 1.4/2.4
    one, zero = 1 - 2.6 / 3.6, 1 - 1.4 / 2.4
    assert loss("dice") == pytest.approx((one + zero) / 2)
    assert loss("dice", [1, 3]) == pytest.approx((zero + 3 * one) / 4)


def test_dice_matches_the_one_hot_formula_on_a_batch():
    # The loss sums per class by scatter; the textbook form builds a one-hot of the valid pixels. Same value and
    # gradient on a random batch with ignored pixels, a class absent from the targets and class weights.
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (2, 7, 6))  # class 4 never appears
    target[1, 2:5] = 255
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    flat = x.permute(0, 2, 3, 1).reshape(-1, 5)[target.reshape(-1) != 255]
    labels = target.reshape(-1)[target.reshape(-1) != 255]
    probs, truth = flat.softmax(1), torch.nn.functional.one_hot(labels, 5).double()
    dice = 2 * (probs * truth).sum(0) / (probs.sum(0) + truth.sum(0))
    w = weight * (truth.sum(0) > 0)
    reference = ((1 - dice) * w).sum() / w.sum()
    (expected_grad,) = torch.autograd.grad(reference, x)
    value = SegmentationLoss("dice", weight, 255)(x, target)
    (grad,) = torch.autograd.grad(value, x)
    assert value.item() == pytest.approx(reference.item(), rel=1e-12)
    assert torch.allclose(grad, expected_grad, atol=1e-14)


def test_dice_in_float32_is_right_on_a_batch_of_millions_of_pixels():
    """Training hands the loss float32 logits. The per-class overlap was summed pixel by pixel in float32: past
    2**22 an addend near 1 rounds up, and 16 images of 512×512 read 0.00658 for 0.00743 (a helper's audit)."""
    target = torch.zeros(16, 512, 512, dtype=torch.long)
    target[..., :16] = 1
    logits = torch.zeros(16, 2, 512, 512).scatter_(1, target[:, None], 7.0)
    p = 1 / (1 + math.exp(-7))  # every pixel's probability of its own class
    n1 = 16 * 512 * 16
    n0 = target.numel() - n1
    dice = [2 * n * p / (n * p + other * (1 - p) + n) for n, other in ((n0, n1), (n1, n0))]
    assert SegmentationLoss("dice")(logits, target).item() == pytest.approx(1 - sum(dice) / 2, rel=1e-5)


def test_lovasz_by_hand():
    # Class 1: errors |truth - p| = 0.6, 0.3, 0.1 (already decreasing), truth 1, 0, 1: Jaccard losses of the growing
    # prefixes 1 - 1/2, 1 - 1/3, 1 - 0/3 → increments 0.5, 1/6, 1/3 → 0.6·0.5 + 0.3/6 + 0.1/3.
    # Class 0: errors 0.6, 0.3, 0.1, truth 0, 1, 0 → prefixes 1 - 1/2, 1 - 0/2, 1 → increments 0.5, 0.5, 0.
    one = 0.6 * 0.5 + 0.3 / 6 + 0.1 / 3
    zero = 0.6 * 0.5 + 0.3 * 0.5
    assert loss("lovasz") == pytest.approx((one + zero) / 2)


def test_ohem_keeps_the_hardest_pixels():
    assert loss("ohem", ohem_keep=0.5) == pytest.approx((CE[0] + CE[1]) / 2)  # ceil(1.5) = 2 hardest
    assert loss("ohem", ohem_keep=0.1) == pytest.approx(CE[0])
    assert loss("ohem", ohem_keep=1.0) == pytest.approx(loss("ce"))
    # Weights [10, 1]: the class-0 pixel weighs 10 but is not the hardest; the ranking ignores the weights (the
    # weighted losses 0.9163, 3.567, 0.1054 would keep it first), the mean over the kept pixels uses them.
    assert loss("ohem", [10, 1], ohem_keep=0.1) == pytest.approx(CE[0])
    assert loss("ohem", [10, 1], ohem_keep=0.5) == pytest.approx((CE[0] + 10 * CE[1]) / 11)
    assert loss("ohem", [10, 1], ohem_keep=1.0) == pytest.approx(loss("ce", [10, 1]))


def test_sums():
    assert loss("ce+dice") == pytest.approx(loss("ce") + loss("dice"))
    assert loss("ce+lovasz") == pytest.approx(loss("ce") + loss("lovasz"))


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_ignores_void_and_has_gradients(name):
    # Changing an ignored pixel's logits changes neither the loss nor the other pixels' gradients.
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, :2] = 255
    criterion = SegmentationLoss(name, torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64), 255)
    value = criterion(x, target)
    value.backward()
    grad = x.grad.clone()
    y = x.detach().clone()
    y[0, :, :2] += 5.0
    y.requires_grad_(True)
    again = criterion(y, target)
    again.backward()
    assert again.item() == pytest.approx(value.item(), rel=1e-12)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(grad[0, :, :2], torch.zeros_like(grad[0, :, :2]))
    assert torch.allclose(y.grad, grad, atol=1e-12)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("weight", [None, [1.0, 2.0, 0.5]])
def test_each_loss_is_zero_with_a_zero_gradient_when_every_pixel_is_ignored(name, weight):
    # A batch of crops inside void regions, or an unannotated image: torch's mean cross-entropy is 0/0 = NaN there,
    # which stopped a run as diverged.
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(weight, dtype=torch.float64) if weight else None
    value = SegmentationLoss(name, w, 255)(x, torch.full((2, 4, 5), 255))
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_of_half_precision_logits_is_the_float32_loss(name, dtype):
    """Found by a helper: the losses ran in the logits' precision, so a user's own bf16 loop got Lovász gradients from
    cumulative counts and IoUs rounded to 2^-8 (per pixel ~1/union: mostly 0, with spikes). The loss is float32."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 32, 32).to(dtype)
    target = torch.randint(0, 3, (2, 32, 32))
    target[0, :4] = 255
    grads = []
    for x in (logits.float().requires_grad_(), logits.clone().requires_grad_()):
        SegmentationLoss(name, weight=torch.tensor([1.0, 2.0, 0.5]))(x, target).backward()
        grads.append(x.grad.float())
    assert torch.equal(grads[1], grads[0].to(dtype).float())  # a half leaf's gradient: the float32 one, rounded


def test_cross_entropy_of_fp16_logits_over_65504_labelled_pixels_is_finite():
    """In fp16 the mean's divisor, the labelled pixels' weight, overflows past 65,504 (one 256×256 crop)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 300, 300).half()
    target = torch.randint(0, 3, (1, 300, 300))
    loss = SegmentationLoss("ce", None, 255)(logits, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(SegmentationLoss("ce", None, 255)(logits.float(), target).item(), rel=1e-6)


def test_a_bad_keep_fraction_is_refused():
    with pytest.raises(ValueError, match="not in"):
        SegmentationLoss("ohem", None, 255, ohem_keep=0.0)


def test_training_with_a_chosen_loss(demo_root, ram_tmp):
    import json

    from resunet.checkpoint import load_checkpoint
    from resunet.train import train

    from conftest import tiny_config

    run = ram_tmp / "run"
    train(tiny_config(demo_root, run, epochs=2, size=32, encoder="efficientnet-lite0", loss="ce+lovasz",
                      class_weights="sqrt-inv-freq"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert load_checkpoint(run / "last.pt")["train_config"]["loss"] == "ce+lovasz"


def test_a_training_batch_with_every_pixel_ignored_does_not_stop_the_run(tmp_path, ram_tmp):
    # Batch 1 over two images, one of them unannotated (all void): one step of every epoch has nothing labelled.
    # Its cross-entropy was NaN and the run stopped at once, "the loss became NaN or infinite".
    import json

    from PIL import Image

    from resunet.data.demo import make_demo_dataset
    from resunet.train import train

    from conftest import tiny_config

    voc = make_demo_dataset(tmp_path, train=2, val=2, size=64, seed=1)
    unannotated = voc / "SegmentationClass" / "demo_train_00000.png"
    with Image.open(unannotated) as mask:
        void = Image.new("P", mask.size, 255)
        void.putpalette(mask.getpalette())
    void.save(unannotated)
    run = ram_tmp / "run"
    train(tiny_config(tmp_path, run, epochs=1, batch_size=1, size=64, encoder="efficientnet-lite0"))
    record = json.loads((run / "metrics.jsonl").read_text())
    assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0
