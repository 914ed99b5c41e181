"""Inference-time BatchNorm folding: conv → BN becomes one conv with adjusted weights and bias.

In eval mode a BatchNorm is a fixed per-channel affine map, so it can be merged into the convolution before it. On
the CPU this removes one full pass over every activation per BN layer (45 of them in the ResNet34 U-Net). Only exact
`nn.Conv2d` → `nn.BatchNorm2d` pairs are folded (timm's BatchNormAct2d carries its activation and is left alone).
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _foldable(conv: nn.Module | None, bn: nn.Module | None) -> bool:
    return type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d


def fold_batchnorm(model: nn.Module) -> int:
    """Fold in place (the model must be in eval mode and stay there); returns the number of BN layers folded."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode")
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):  # conv_bn_relu blocks, the ResNet stem, downsample branches
            for i in range(len(module) - 1):
                if _foldable(module[i], module[i + 1]):
                    module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
                    folded += 1
        for k in (1, 2, 3):  # ResNet BasicBlock / Bottleneck: bn{k}(conv{k}(x))
            conv, bn = getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None)
            if _foldable(conv, bn):
                setattr(module, f"conv{k}", fuse_conv_bn_eval(conv, bn))
                setattr(module, f"bn{k}", nn.Identity())
                folded += 1
    return folded
