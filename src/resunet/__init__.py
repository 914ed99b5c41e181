"""resunet: a U-Net on ImageNet-pretrained encoders for semantic segmentation (PASCAL VOC and datasets like it)."""

from __future__ import annotations

import importlib
import typing

if typing.TYPE_CHECKING:
    from .metrics import ConfusionMatrix
    from .model.unet import ResNetUNet
    from .predict import Predictor, load

__all__ = ["ConfusionMatrix", "Predictor", "ResNetUNet", "load"]
__version__ = "0.1.0"

# Imported on first use (PEP 562): the package itself loads no torch, so `resunet --help`, a refused flag or
# `resunet check-data` answer without the seconds torch and torchvision take to import.
_LAZY = {"ConfusionMatrix": ".metrics", "ResNetUNet": ".model.unet", "Predictor": ".predict", "load": ".predict"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
