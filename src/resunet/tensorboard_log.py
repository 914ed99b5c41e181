"""`train --tensorboard`: the run as TensorBoard event files in OUT/tensorboard.

    tensorboard --logdir runs/          # then open http://localhost:6006

Scalars are indexed by optimisation step (the x axis stays continuous across epochs and resumes): train/loss (the
mean of every LOSS_EVERY steps), train/lr; at each epoch's end train/epoch_loss and train/images_per_s; at each
evaluation val/mIoU, val/pixel_accuracy, val/IoU/<class>, and `val/predictions`: a few validation images beside
their ground truth and the model's prediction, in the class colours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.dataset import PairedDataset
from .predict import Predictor

LOSS_EVERY = 10
PREVIEW_IMAGES = 4
PREVIEW_HEIGHT = 160


class TensorBoardUnavailable(RuntimeError):
    """--tensorboard without the tensorboard package."""


def check_tensorboard() -> type:
    """torch's SummaryWriter, or TensorBoardUnavailable naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TensorBoardUnavailable("--tensorboard needs the tensorboard package: "
                                     "pip install 'resunet[tensorboard]'") from None
    return SummaryWriter


class TensorBoardLog:
    def __init__(self, log_dir: str | Path, start_step: int) -> None:
        """`start_step`: the last step done when the run (re)starts; events a killed run wrote past it are dropped,
        so a resumed run's curves do not fold back on themselves, and those at it (the finished epoch's) are kept.
        A new run (0) drops every earlier event: a run killed before its first save left events no checkpoint
        records, and the next run's curves zigzagged through them."""
        self.writer = check_tensorboard()(str(log_dir), purge_step=start_step + 1)
        self.losses: list[torch.Tensor] = []

    def step(self, global_step: int, loss: torch.Tensor, lr: float) -> None:
        self.losses.append(loss)
        if global_step % LOSS_EVERY == 0:
            self.writer.add_scalar("train/loss", float(torch.stack(self.losses).mean()), global_step)
            self.writer.add_scalar("train/lr", lr, global_step)
            self.losses.clear()

    def epoch(self, global_step: int, record: dict, class_names: tuple[str, ...]) -> None:
        self.losses.clear()  # a partial group would mix epochs (and a resumed run could not repeat it)
        self.writer.add_scalar("train/epoch_loss", record["train_loss"], global_step)
        self.writer.add_scalar("train/images_per_s", record["train_images_per_s"], global_step)
        if record["val_miou"] is not None:
            self.writer.add_scalar("val/mIoU", record["val_miou"], global_step)
            self.writer.add_scalar("val/pixel_accuracy", record["val_pixel_accuracy"], global_step)
            for name, iou in zip(class_names, record["val_iou"]):
                if iou is not None and np.isfinite(iou):
                    self.writer.add_scalar(f"val/IoU/{name}", iou, global_step)
        self.writer.flush()

    def predictions(self, global_step: int, predictor: Predictor, dataset: PairedDataset) -> None:
        """The first few validation images: image | ground truth | prediction, one row each."""
        lut = dataset.info.colour_lut()
        rows = []
        for index in range(min(PREVIEW_IMAGES, len(dataset))):
            sample = dataset.load(index)
            row = np.concatenate([sample.image, lut[sample.mask], lut[predictor.predict(sample.image)]], axis=1)
            rows.append(_to_height(row, PREVIEW_HEIGHT))
        width = max(row.shape[1] for row in rows)
        sheet = np.concatenate([np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))) for row in rows])
        self.writer.add_image("val/predictions", sheet, global_step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _to_height(image: np.ndarray, height: int) -> np.ndarray:
    """Nearest-neighbour resize to a height (class colours stay exact)."""
    rows = np.arange(height) * image.shape[0] // height
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    cols = np.arange(width) * image.shape[1] // width
    return image[rows][:, cols]
