"""What a perfect prediction scores in boundary IoU on a split's ground truth, under the convention `evaluate` used
before 7801008 (the edges of void regions are contours to meet) and the one it uses now (void is don't-care).

    python benchmarks/boundary_void_ceiling.py ../shared/camvid --split val
    python benchmarks/boundary_void_ceiling.py DIR --num-classes 21   # ../shared/voc-samples as DIR/val/{images,masks}

The "perfect" prediction equals the ground truth on every scored pixel and gives each void pixel the class of the
nearest labelled one (any choice is right there). It bounds how far the old convention lowered the boundary figures
in RESULTS.md measured before that commit.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import ndimage

from resunet.data.dataset import open_dataset
from resunet.metrics import BoundaryIoU, boundary_band


class VoidEdgesAsContours(BoundaryIoU):
    """BoundaryIoU as it was: the ground truth's bands drawn from its own labels, void included."""

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.long(), target.long()
        valid = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        classes = torch.unique(torch.cat([target[valid], pred[valid]]))
        if len(classes) == 0:
            return
        d = self.band_width(*target.shape)
        truth = boundary_band(target[None] == classes[:, None, None], d) & valid
        guess = boundary_band(pred[None] == classes[:, None, None], d) & valid
        self.intersection[classes] += (truth & guess).sum((1, 2))
        self.union[classes] += (truth | guess).sum((1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root")
    parser.add_argument("--split", default="val")
    parser.add_argument("--num-classes", type=int, help="for a folder without classes.json (VOC-coloured masks: 21)")
    args = parser.parse_args()
    dataset = open_dataset(args.data_root, args.split, args.num_classes)
    info = dataset.info
    old = VoidEdgesAsContours(info.num_classes, info.ignore_index)
    new = BoundaryIoU(info.num_classes, info.ignore_index)
    void = pixels = 0
    for index in range(len(dataset)):
        mask = dataset.load(index).mask.astype(np.int64)
        is_void = mask == info.ignore_index
        void, pixels = void + int(is_void.sum()), pixels + mask.size
        if is_void.all():
            continue
        _, (rows, cols) = ndimage.distance_transform_edt(is_void, return_indices=True)
        pred, target = torch.from_numpy(mask[rows, cols]), torch.from_numpy(mask)
        old.update(pred, target)
        new.update(pred, target)
    print(f"{args.data_root} {args.split}: {len(dataset)} images, void {100 * void / pixels:.2f}% of the pixels")
    for name, metric in (("void edges as contours (before 7801008)", old), ("void as don't-care (now)", new)):
        scores = metric.compute()
        per_class = ", ".join(f"{n} {100 * v:.1f}" for n, v in zip(info.names, scores["boundary_iou"]) if v == v)
        print(f"  {name}: boundary mIoU {100 * scores['boundary_miou']:.2f}%  ({per_class})")


if __name__ == "__main__":
    main()
