import json
import math

import numpy as np
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
