"""resunet: a U-Net on ImageNet-pretrained encoders for semantic segmentation (PASCAL VOC and datasets like it)."""

from .metrics import ConfusionMatrix
from .model.unet import ResNetUNet
from .predict import Predictor, load

__all__ = ["ConfusionMatrix", "Predictor", "ResNetUNet", "load"]
__version__ = "0.1.0"
