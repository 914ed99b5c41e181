import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from resunet.data.demo import make_sample
from resunet.evaluate import run_evaluate
from resunet.metrics import ConfusionMatrix
from resunet.predict import Predictor


def mixed_size_folder(root, rng_seed=0):
    """A folder dataset whose images are NOT at the working size (64): 80×120 and 100×100 (VOC classes)."""
    rng = np.random.default_rng(rng_seed)
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "masks").mkdir(parents=True)
    sizes = [(80, 120), (100, 100), (80, 120)]
    for i, (h, w) in enumerate(sizes):
        image, mask = make_sample(rng, max(h, w))
        image.crop((0, 0, w, h)).save(root / "val" / "images" / f"{i}.png")
        mask.crop((0, 0, w, h)).save(root / "val" / "masks" / f"{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(21)]}))
    return sizes


def test_evaluate_counts_every_pixel_at_original_resolution(trained_run, tmp_path):
    sizes = mixed_size_folder(tmp_path / "data")
    result = run_evaluate(str(trained_run / "best.pt"), str(tmp_path / "data"), "val", str(tmp_path / "eval.json"),
                          precision="fp32")
    masks = [np.array(Image.open(tmp_path / "data" / "val" / "masks" / f"{i}.png")) for i in range(len(sizes))]
    labelled = sum(int((m != 255).sum()) for m in masks)
    matrix = torch.tensor(result["confusion_matrix"])
    assert matrix.sum() == labelled  # every non-void pixel of every original-size mask, once
    # The same numbers from first principles: predict each image alone, one matrix over all of them.
    predictor = Predictor.from_checkpoint(trained_run / "best.pt", precision="fp32")
    reference = ConfusionMatrix(21)
    for i, mask in enumerate(masks):
        prediction = predictor.predict(tmp_path / "data" / "val" / "images" / f"{i}.png")
        assert prediction.shape == mask.shape
        reference.update(torch.from_numpy(prediction.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)))
    assert torch.equal(matrix, reference.matrix)
    stored = json.loads((tmp_path / "eval.json").read_text())
    assert math.isclose(stored["miou"], reference.compute()["miou"])
    assert stored["images"] == 3 and len(stored["iou"]) == 21


def test_boundary_iou_by_hand():
    from resunet.metrics import BoundaryIoU

    # 20×20: a 10×10 square of class 1 at rows/cols 5..14; the prediction is the same square one column to the right.
    # d = max(1, round(0.02 · 28.3)) = 1: each band is the mask's pixels within one pixel of its contour/the edge.
    target = torch.zeros(20, 20, dtype=torch.long)
    target[5:15, 5:15] = 1
    pred = torch.zeros(20, 20, dtype=torch.long)
    pred[5:15, 6:16] = 1
    metric = BoundaryIoU(2)
    metric.update(pred, target)
    # Class 1: two 36-pixel outlines sharing the top and bottom rows' columns 6..14: 18 / (36 + 36 - 18).
    # Class 0: the image's edge ring (76) plus the 44-pixel ring around each square; the rings share rows 4 and 15,
    # columns 5..15 (22): (76 + 22) / (120 + 120 - 98).
    scores = metric.compute()
    assert scores["boundary_iou"] == pytest.approx([98 / 142, 18 / 54])
    assert scores["boundary_miou"] == pytest.approx((98 / 142 + 18 / 54) / 2)
    # Ignored pixels count for neither: ignoring the prediction's extra column leaves class 1 with its 18 shared
    # pixels, the GT outline (36) and the prediction's outline without that column (36 - 10).
    ignored = target.clone()
    ignored[5:15, 15] = 255
    metric = BoundaryIoU(2)
    metric.update(pred, ignored)
    assert metric.compute()["boundary_iou"][1] == pytest.approx(18 / (36 + 26 - 18))
    # The same masks: every band agrees.
    metric = BoundaryIoU(2)
    metric.update(target, target)
    assert metric.compute()["boundary_iou"] == [1.0, 1.0]


def test_evaluate_reports_boundary_iou_and_draws_the_worst_images(trained_run, demo_root, tmp_path, capsys):
    from resunet.data.dataset import open_dataset
    from resunet.metrics import image_miou

    result = run_evaluate(str(trained_run / "best.pt"), str(demo_root), workers=0, worst=3, precision="fp32",
                          worst_out=str(tmp_path / "worst"), json_out=str(tmp_path / "e.json"),
                          confusion_png=str(tmp_path / "confusion.png"))
    out = capsys.readouterr().out
    assert "boundary IoU %" in out and 0 < result["boundary_miou"] < result["miou"] + 0.2
    assert len(result["boundary_iou"]) == 21
    listed = json.loads((tmp_path / "worst" / "worst.json").read_text())
    assert listed == json.loads((tmp_path / "e.json").read_text())["worst"]
    assert len(listed) == 3 and [r["miou"] for r in listed] == sorted(r["miou"] for r in listed)
    # Each listed score is that image's own mIoU, and no other val image scores lower than the third.
    predictor = Predictor.from_checkpoint(trained_run / "best.pt", precision="fp32")
    dataset = open_dataset(demo_root, "val")
    own = {}
    for i in range(len(dataset)):
        sample = dataset.load(i)
        own[sample.name] = image_miou(torch.from_numpy(predictor.predict(sample.image)), torch.from_numpy(sample.mask),
                                      21)
    assert [r["miou"] for r in listed] == pytest.approx(sorted(own.values())[:3], abs=1e-6)
    assert Image.open(tmp_path / "worst" / "worst.png").size[1] > 3 * 150
    assert Image.open(tmp_path / "confusion.png").size[0] > Image.open(tmp_path / "confusion.png").size[1]


def test_run_evaluate_refuses_worst_without_a_folder_and_a_folder_without_worst(tmp_path, monkeypatch):
    """Found by a helper: from Python, worst=2 with no worst_out wrote worst.png and worst.json into the current
    folder, past the output checks, and a worst_out with worst=0 was ignored; the CLI refused both."""
    from resunet.data.images import DataError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="--worst 2 needs --out DIR for its contact sheet"):
        run_evaluate("model.pt", "data", worst=2)
    with pytest.raises(DataError, match="is the folder for --worst K's contact sheet; give --worst too"):
        run_evaluate("model.pt", "data", worst_out=str(tmp_path / "sheet"))
    assert not list(tmp_path.iterdir())
