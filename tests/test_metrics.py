import math

import numpy as np
import pytest
import torch

from resunet.metrics import ConfusionMatrix


def test_hand_computed_example_with_ignore_and_absent_class():
    # 4 classes; class 3 appears nowhere (neither target nor prediction) -> NaN, excluded from the mean.
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])  # the 255 pixels' predictions must not count (not even "3")
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    scores = cm.compute()
    # class 0: TP 1, FP 1 (a 2 predicted as 0), FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    assert scores["iou"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(scores["iou"][3])
    assert scores["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(4 / 6)


def test_class_only_predicted_counts_as_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 2]), torch.tensor([0, 0, 0]))
    scores = cm.compute()
    assert scores["iou"][0] == pytest.approx(2 / 3)
    assert scores["iou"][2] == 0.0  # predicted but never true: IoU 0, and it is in the mean
    assert math.isnan(scores["iou"][1])
    assert scores["miou"] == pytest.approx(1 / 3)


def test_dataset_wide_not_per_batch():
    # Two "images": averaging per-image mIoU would give a different number than the one matrix over both.
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))
    cm.update(torch.tensor([1, 1]), torch.tensor([1, 1]))
    scores = cm.compute()
    assert scores["iou"] == pytest.approx([3 / 4, 2 / 3])
    assert scores["pixel_accuracy"] == pytest.approx(5 / 6)


def test_batching_and_order_do_not_matter():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 9, 9), generator=g)
    target[:, 0] = 255
    pred = torch.randint(0, 5, (4, 9, 9), generator=g)
    whole = ConfusionMatrix(5)
    whole.update(pred, target)
    pieces = ConfusionMatrix(5)
    for i in (3, 1, 0, 2):
        pieces.update(pred[i], target[i])
    assert torch.equal(whole.matrix, pieces.matrix)


@pytest.mark.parametrize("outside", [3, -1, 255])
def test_a_prediction_outside_the_classes_is_an_error_not_another_rows_count(outside):
    # 3 classes: n·t + p with p = 3 was counted as (t + 1, 0); p = 255 broke the reshape with a RuntimeError.
    matrix = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=rf"predicted class\(es\) \[{outside}\] outside 0..2"):
        matrix.update(torch.tensor([outside, 0]), torch.tensor([0, 0]))
    assert matrix.matrix.sum() == 0
    matrix.update(torch.tensor([outside, 1]), torch.tensor([255, 1]))  # under an ignored pixel: not counted at all
    assert matrix.matrix.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("outside", [3, -1, 254])
def test_a_true_label_outside_the_classes_is_an_error_not_dropped(outside):
    # Dropped, the pixel left the count: scored with the wrong class count (3 for a 4-class set), a model's mIoU rose.
    matrix = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=rf"true class\(es\) \[{outside}\] outside 0..2 \(and not the ignore index "
                                         r"255\)"):
        matrix.update(torch.tensor([0, 1, 2]), torch.tensor([0, outside, 1]))
    assert matrix.matrix.sum() == 0


def test_numpy_class_maps_count_as_tensors_and_floats_are_refused():
    # Predictor.predict returns numpy arrays, and masks are read as numpy: both went in with an AttributeError.
    target = np.array([[0, 0, 1], [2, 255, 1]], np.uint8)
    target.flags.writeable = False  # as a cached mask is
    pred = np.array([[0, 1, 1], [2, 0, 1]], np.uint8)
    from_numpy, from_torch = ConfusionMatrix(3), ConfusionMatrix(3)
    from_numpy.update(pred, target)
    from_torch.update(torch.from_numpy(pred), torch.from_numpy(target.copy()))
    assert from_numpy.matrix.tolist() == from_torch.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match=r"pred holds torch.float32: class indices must be integers"):
        from_numpy.update(torch.rand(2, 3), torch.from_numpy(target.copy()))
