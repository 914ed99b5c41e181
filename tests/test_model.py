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

    monkeypatch.setattr(type(encoders.RESNETS["resnet34"][1]), "get_state_dict", no_network)
    with pytest.raises(WeightsUnavailableError) as info:
        ResNetUNet(encoder="resnet34", encoder_weights="imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert "--encoder-weights" in message and "resnet34-" in message and "--no-pretrained" in message


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


def test_lite0_pretrained_loads_offline_and_records_its_normalisation():
    model = ResNetUNet(num_classes=4, encoder="efficientnet-lite0", encoder_weights="imagenet")
    random = ResNetUNet(num_classes=4, encoder="efficientnet-lite0", encoder_weights=None)
    stem = "encoder.body.conv_stem.weight"
    assert not torch.equal(model.state_dict()[stem], random.state_dict()[stem])
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
