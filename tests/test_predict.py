import numpy as np
import pytest
import torch
from PIL import Image

from resunet import Predictor
from resunet.data.demo import make_sample

from conftest import shared_dir


@pytest.fixture(scope="module")
def predictor(trained_run):
    return Predictor.from_checkpoint(trained_run / "best.pt", device="cpu")


def with_objects(predictor: Predictor, size: int, resize: tuple[int, int] | None = None) -> np.ndarray:
    """The first of a few demo pictures in which the predictor finds an object: tests of how maps are assembled need
    boundaries, and which picture a briefly trained model gets right depends on the CPU's arithmetic."""
    for seed in range(8):
        picture = make_sample(np.random.default_rng(seed), size)[0]
        image = np.array(picture.resize(resize) if resize else picture)
        if len(np.unique(predictor.predict(image))) >= 2:
            return image
    raise AssertionError(f"the trained model finds no object in 8 demo pictures of {size} px")


def test_predictor_rebuilds_everything_from_the_checkpoint(predictor):
    assert predictor.info.num_classes == 21 and predictor.size == 64
    assert predictor.model.config.encoder == "resnet34"


def test_predict_accepts_pil_path_and_array_and_keeps_original_size(predictor, tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (75, 100, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    from_array = predictor.predict(array)
    assert from_array.shape == (75, 100) and from_array.dtype == np.uint8
    assert np.array_equal(from_array, predictor.predict(Image.fromarray(array)))
    assert np.array_equal(from_array, predictor.predict(path))
    batch = predictor.predict([array, array[:50]])
    assert [m.shape for m in batch] == [(75, 100), (50, 100)]
    assert [m.shape for m in predictor.predict((array, array[:50]))] == [(75, 100), (50, 100)]
    # Grey and RGBA arrays: the maps of the same pixels as a PIL image (they were refused, PIL's were not)
    grey, rgba = array[..., 0], np.dstack([array, np.full((75, 100), 200, np.uint8)])
    assert np.array_equal(predictor.predict(grey), predictor.predict(Image.fromarray(grey)))
    assert np.array_equal(predictor.predict(rgba), predictor.predict(Image.fromarray(rgba)))
    assert np.array_equal(predictor.predict(grey), predictor.predict(np.dstack([grey] * 3)))


def test_predict_segments_demo_objects(predictor, demo_root):
    from resunet.data.dataset import open_dataset

    sample = open_dataset(demo_root, "val").load(0)
    prediction = predictor.predict(sample.image)
    labelled = sample.mask != 255
    assert (prediction[labelled] == sample.mask[labelled]).mean() > 0.8


# `resunet predict` through cli.main in-process (tests/test_cli.py runs the real entry point in its own process).
def test_cli_predict_writes_palette_pngs_at_original_size(trained_run, tmp_path):
    from resunet.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((37, 53, 3), 90, np.uint8)).save(inputs / "a.jpg")
    Image.fromarray(np.full((64, 48, 3), 200, np.uint8)).save(inputs / "b.png")
    Image.fromarray(np.full((30, 40, 3), 20, np.uint8)).save(inputs / "c.jfif", "JPEG")  # a browser's saved photo
    (inputs / "._a.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # a Mac's metadata file: not an image
    assert main(["predict", str(trained_run / "best.pt"), str(inputs), "--out", str(tmp_path / "out"), "--overlay"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png", "b.png", "c.png"]
    for name, size in (("a", (53, 37)), ("b", (48, 64)), ("c", (40, 30))):
        mask = Image.open(tmp_path / "out" / f"{name}.png")
        assert mask.mode == "P" and mask.size == size
        assert mask.getpalette()[3:6] == [128, 0, 0]
        assert Image.open(tmp_path / "out" / f"{name}_overlay.jpg").size == size


def test_cli_predict_reports_a_bad_file_and_finishes_the_rest(trained_run, tmp_path, capsys):
    from resunet.cli import main

    (tmp_path / "broken.jpg").write_text("not a jpeg")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "good.png")
    code = main(["predict", str(trained_run / "best.pt"), str(tmp_path / "broken.jpg"), str(tmp_path / "good.png"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "broken.jpg: not a readable image" in err and "Traceback" not in err
    assert (tmp_path / "out" / "good.png").is_file()


def test_cli_predict_skip_existing_predicts_only_inputs_with_a_missing_output(trained_run, tmp_path, capsys):
    from resunet.cli import main

    for name, value in (("a", 30), ("b", 120), ("c", 220)):
        Image.fromarray(np.full((24, 32, 3), value, np.uint8)).save(tmp_path / f"{name}.png")
    out = tmp_path / "out"
    command = ["predict", str(trained_run / "best.pt"), *(str(tmp_path / f"{n}.png") for n in "abc"), "--out", str(out)]
    assert main(command) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "b.png").unlink()  # c.png, the earlier run's result (marked so), is done and not written again
    stamps = {n: (out / f"{n}.png").stat().st_mtime_ns for n in "ac"}
    capsys.readouterr()
    assert main([*command, "--skip-existing"]) == 0
    assert capsys.readouterr().out.strip() == (f"wrote 1 prediction(s) to {out}; 2 skipped, their files already "
                                               "there (--skip-existing)")
    assert (out / "b.png").read_bytes() == first["b.png"]
    assert {n: (out / f"{n}.png").stat().st_mtime_ns for n in "ac"} == stamps
    # Asked for an overlay too: an input is done only when all its files are there.
    assert main([*command, "--skip-existing", "--overlay"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["a.png", "b.png", "c.png", "a_overlay.jpg",
                                                             "b_overlay.jpg", "c_overlay.jpg"])
    assert (out / "c.png").read_bytes() == first["c.png"]


def test_cli_predict_stopped_by_ctrl_c_or_sigterm_goes_on_with_skip_existing(trained_run, tmp_path, monkeypatch,
                                                                             capsys):
    """Ctrl-C (KeyboardInterrupt, as Python delivers it) landing part-way through a folder, in the middle of writing
    a file: the command says how far it got and exits 130, every file it left is whole (the one being written is
    not left half-done under its name, nor as a temporary file), and --skip-existing finishes the folder with the
    maps an uninterrupted run gives. A SIGTERM (a timeout, `docker stop`) is taken as Ctrl-C: it killed the run and
    left the file being written as .NAME.png.tmpPID-RANDOM (a helper, 2026-12-07)."""
    import itertools
    import os
    import signal

    from resunet.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(inputs / f"{i:03d}.png")
    out = tmp_path / "out"
    command = ["predict", str(trained_run / "best.pt"), str(inputs), "--device", "cpu", "--out", str(out)]
    real_save, saves = Image.Image.save, itertools.count(1)

    def save_then_sigterm(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        if next(saves) == 13:  # the 13th mask is written, not yet renamed into place
            os.kill(os.getpid(), signal.SIGTERM)

    ignored = []  # where the command set no handler of its own, the default one would end the test's process
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: ignored.append(signum))
    monkeypatch.setattr(Image.Image, "save", save_then_sigterm)
    capsys.readouterr()
    try:
        assert main(command) == 130 and not ignored
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [f"{i:03d}.png" for i in range(12)]  # whole, no leftovers
    for path in out.iterdir():
        Image.open(path).load()
    assert capsys.readouterr().err.strip() == (
        f"resunet predict: interrupted after 12 of 40 input(s), each of their files whole in {out}; the same command "
        "with --skip-existing goes on from there")
    assert main([*command, "--skip-existing"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote 28 prediction(s) to {out}; 12 skipped, their files "
                                                    "already there (--skip-existing)")
    predictor = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu")  # as the command builds it
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in inputs.iterdir())
    for path in sorted(inputs.iterdir()):
        assert np.array_equal(np.array(Image.open(out / path.name)), predictor.predict(path)), path.name


def test_cli_predict_takes_a_file_named_like_a_glob_as_that_file(trained_run, tmp_path, capsys):
    # `predict best.pt photos/*` hands over a[1].png, an existing file read as a glob: [1] matched a1.png instead
    # (a[1].png never predicted, exit 0) or, alone, nothing ("matches no image file", exit 1). A helper, 2026-12-06.
    from resunet.cli import main

    (tmp_path / "in").mkdir()
    for name, value in (("a[1].png", 30), ("a1.png", 200), ("b[2].png", 90)):
        Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(tmp_path / "in" / name)
    out = tmp_path / "out"
    assert main(["predict", str(trained_run / "best.pt"), str(tmp_path / "in" / "a[1].png"),
                 str(tmp_path / "in" / "b[2].png"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a[1].png", "b[2].png"]
    assert main(["predict", str(trained_run / "best.pt"), str(tmp_path / "in" / "a[0-9].png"), "--out",
                 str(tmp_path / "globbed")]) == 0  # a pattern that names no file is still a pattern
    assert sorted(p.name for p in (tmp_path / "globbed").iterdir()) == ["a1.png"]


def test_cli_predict_says_what_its_inputs_leave_out(trained_run, tmp_path, capsys):
    # A folder's subfolders are not read, and a glob that matched nothing was dropped: "wrote 1 prediction(s)", exit
    # 0, for a folder whose images sat one level down or a typo in one of several inputs.
    from resunet.cli import main

    (tmp_path / "in" / "city" / "deeper").mkdir(parents=True)
    for name in ("top.png", "city/a.png", "city/deeper/b.png"):
        Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(tmp_path / "in" / name)
    model, out = str(trained_run / "best.pt"), str(tmp_path / "out")
    assert main(["predict", model, str(tmp_path / "in"), "--out", out]) == 0
    assert capsys.readouterr().err.strip() == (f"resunet predict: {tmp_path / 'in'}: 2 image(s) in subfolders, such as "
                                               f"city/a.png, are not read; give '{tmp_path / 'in'}/**/*' to include them")
    assert main(["predict", model, str(tmp_path / "in" / "city"), str(tmp_path / "typo" / "*.png"), "--out", out]) == 1
    err = capsys.readouterr().err
    assert f"resunet predict: {tmp_path / 'typo' / '*.png'}: matches no image file" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "top.png"]
    assert main(["predict", model, f"{tmp_path / 'in'}/**/*", "--out", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["a.png", "b.png", "top.png"]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "empty" / "sub" / "c.png")
    assert main(["predict", model, str(tmp_path / "empty"), "--out", out]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-2:] == [
        f"resunet predict: {tmp_path / 'empty'}: a folder without images", "resunet predict: error: no input images found"]


def test_predict_on_real_voc_photos_runs(predictor):
    samples = shared_dir("voc-samples")
    for stem in ("1", "23", "114"):
        assert predictor.predict(samples / f"{stem}_image.png").shape == (513, 513)


@pytest.mark.parametrize("tta", ["none", "flip", "ms"])
def test_class_maps_are_the_argmax_of_the_logits(predictor, demo_root, tta):
    # predict and predict_tensor fuse the upsampling with the argmax (resunet.classmap) at one working size; the
    # maps must be those of the full-size logits. The demo model's 64-pixel working size is upsampled 8× to a
    # 513×513 picture, so most of a map is decided by its boundaries. Demo shapes drawn at that size: the model finds
    # them on any CPU (a VOC photo was all background for the same recipe trained on one thread).
    from resunet.data.dataset import open_dataset

    predictor.set_inference(tta)
    try:
        images = [with_objects(predictor, 513), open_dataset(demo_root, "val").load(0).image]
        for image in images:
            pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
            expected = predictor.logits(pixels).argmax(1)
            assert 1 < expected.unique().numel()
            assert torch.equal(predictor.predict_tensor(pixels), expected)
            assert np.array_equal(predictor.predict(image), expected[0].numpy())
    finally:
        predictor.set_inference("none")


def test_bf16_predictor_keeps_bf16_weights_with_the_same_logits_as_autocast(trained_run):
    # A folded (inference-only) model is cast to bf16 once instead of autocast casting each weight per call; the
    # logits must be those of the autocast forward of the same folded model.
    import torch

    from resunet.data.transforms import normalize
    from resunet.runtime import autocast

    predictor = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu", precision="bf16")
    assert predictor.bf16_weights
    assert {p.dtype for p in predictor.model.parameters()} == {torch.bfloat16}
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 64, 80), dtype=np.uint8))
    logits = predictor.logits(images)
    reference_model = Predictor.from_checkpoint(trained_run / "best.pt", device="cpu", precision="fp32").model
    x = normalize(images.float() / 255, predictor.mean, predictor.std).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(torch.device("cpu"), torch.bfloat16):
        reference = reference_model.to(memory_format=torch.channels_last)(x).float()
    assert logits.shape == (2, 21, 64, 80) and logits.dtype == torch.float32
    assert torch.allclose(logits, reference, atol=1e-6, rtol=0)


def test_bf16_predictor_keeps_fp32_weights_while_a_batchnorm_is_unfolded():
    # timm's BatchNormAct2d (EfficientNet-Lite encoders) is not folded; in bf16 its statistics would lose precision
    # (CamVid val 70.43% instead of 70.47%), so such a model stays fp32 under autocast.
    import torch

    from resunet import ResNetUNet
    from resunet.data.classes import VOC_INFO

    model = ResNetUNet(21, "efficientnet-lite0", encoder_weights=None)
    predictor = Predictor(model, VOC_INFO, 64, *model.normalization, device="cpu", precision="bf16", fold_bn=True)
    assert not predictor.bf16_weights
    assert {p.dtype for p in predictor.model.parameters()} == {torch.float32}
    assert predictor.predict(np.zeros((40, 50, 3), np.uint8)).shape == (40, 50)


def test_fp32_on_a_cpu_predicts_in_channels_last_and_trains_in_it_for_lite_encoders_only(trained_run):
    # NHWC pays in fp32 for inference with either encoder and for EfficientNet-Lite's training, not for ResNet's
    # training (runtime.py); whatever the layout, the model must compute the same logits.
    from resunet import ResNetUNet
    from resunet.checkpoint import load_checkpoint
    from resunet.data.classes import VOC_INFO
    from resunet.data.transforms import normalize
    from resunet.runtime import use_channels_last

    cpu = torch.device("cpu")
    assert [use_channels_last(cpu, None, e, training=True) for e in ("efficientnet-lite0", "resnet34")] == [True, False]
    assert use_channels_last(cpu, torch.bfloat16, "resnet34", training=True)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 64, 80), dtype=np.uint8))
    for encoder in ("efficientnet-lite0", "resnet18"):
        torch.manual_seed(0)
        model = ResNetUNet(5, encoder, encoder_weights=None).eval()
        reference_model = ResNetUNet(5, encoder, encoder_weights=None).eval()
        reference_model.load_state_dict(model.state_dict())
        predictor = Predictor(model, VOC_INFO, 64, *model.normalization, device="cpu", precision="fp32")
        assert predictor.channels_last, encoder
        kernels = [p for p in predictor.model.parameters() if p.dim() == 4 and p.shape[-1] == 3]
        assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels), encoder
        x = normalize(images.float() / 255, predictor.mean, predictor.std)
        with torch.inference_mode():
            reference = reference_model(x)
        assert torch.allclose(predictor.logits(images), reference, atol=1e-4, rtol=1e-4), encoder

    # Training keeps its own layout through validation, which runs a Predictor on the very weights being trained (a
    # conversion there would be in place): the seed model, trained in fp32 and validated every other epoch, saved its
    # 3×3 kernels in NCHW (torch.save keeps strides).
    saved = load_checkpoint(trained_run / "last.pt")["model"].values()
    kernels = [w for w in saved if w.dim() == 4 and w.shape[-1] == 3]
    assert kernels and all(w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last) for w in kernels)


def test_an_ensemble_averages_its_members_probabilities(trained_run, demo_root, tmp_path, capsys):
    import json

    from resunet.checkpoint import CheckpointError
    from resunet.data.classes import generic_info
    from resunet.model.unet import ResNetUNet
    from resunet.predict import Ensemble, load_ensemble

    first = Predictor.from_checkpoint(trained_run / "best.pt", precision="fp32")
    torch.manual_seed(0)
    other = Predictor(ResNetUNet(21, "resnet18", None).eval(), first.info, 48, first.mean, first.std, "cpu", "fp32")
    other.temperature = 2.0
    ensemble = Ensemble([first, other])
    image = torch.from_numpy(np.array(make_sample(np.random.default_rng(1), 64)[0])).permute(2, 0, 1)[None]
    by_hand = (first.logits(image).softmax(1) + (other.logits(image) / 2.0).softmax(1)) / 2
    assert torch.allclose(ensemble.probabilities(image), by_hand, atol=1e-6)
    assert torch.equal(ensemble.predict_tensor(image), by_hand.argmax(1))
    # one model twice is that model
    twice = load_ensemble([trained_run / "best.pt", trained_run / "best.pt"], precision="fp32")
    assert torch.allclose(twice.probabilities(image), first.probabilities(image), atol=1e-6)
    with pytest.raises(CheckpointError, match="classes differ"):
        Ensemble([first, Predictor(ResNetUNet(3, "resnet18", None), generic_info(3), 48, first.mean, first.std,
                                   "cpu", "fp32")], ["a.pt", "b.pt"])
    from resunet.cli import main

    assert main(["evaluate", str(trained_run / "best.pt"), "--data-root", str(demo_root), "--ensemble",
                 str(trained_run / "last.pt"), "--json", str(tmp_path / "e.json"), "--workers", "0"]) == 0
    scores = json.loads((tmp_path / "e.json").read_text())
    assert scores["ensemble"] == [str(trained_run / "last.pt")]
    # From Python one path as a string, as load_ensemble takes it (split into its characters: "/: checkpoint not
    # found"; a helper's audit, 2026-12-07)
    from resunet.evaluate import run_evaluate

    again = run_evaluate(str(trained_run / "best.pt"), str(demo_root), ensemble=str(trained_run / "last.pt"),
                         workers=0, progress=False)
    assert again["ensemble"] == scores["ensemble"] and again["miou"] == pytest.approx(scores["miou"], abs=1e-9)
    # Each member's own temperature is reported (the ensemble applies them before averaging), not a 1 of its own.
    temperatures = [Predictor.from_checkpoint(trained_run / name).temperature for name in ("best.pt", "last.pt")]
    assert scores["temperature"] == pytest.approx(temperatures)
    printed = capsys.readouterr().out
    assert f"working sizes {first.size}, {first.size}" in printed
    assert "temperatures " + ", ".join(f"{t:.3g}" for t in temperatures) + " of the members" in printed
    photo = sorted((demo_root / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))[0]
    assert main(["predict", str(trained_run / "best.pt"), str(photo), "--out", str(tmp_path / "pred"), "--ensemble",
                 str(trained_run / "last.pt")]) == 0
    assert (tmp_path / "pred" / f"{photo.stem}.png").is_file()


@pytest.mark.parametrize("height, width, size", [(301, 457, (64, 97)), (457, 301, (97, 64)), (90, 1200, (64, 853))])
def test_a_large_image_is_resized_band_by_band_to_the_same_bits(monkeypatch, height, width, size):
    """An 8000×8000 upload took 768 MB as floats before resizing (the service grew ~1 GB per such request); band by
    band it takes 48 MB, and the network must see exactly the same numbers."""
    from resunet import predict as predict_module

    pixels = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    whole = torch.nn.functional.interpolate(pixels.float(), size=size, mode="bilinear", align_corners=False,
                                            antialias=True)
    monkeypatch.setattr(predict_module, "FLOAT_WHOLE_ELEMENTS", 0)
    monkeypatch.setattr(predict_module, "BAND_BYTES", 4 * 3 * width * 7)  # 7 rows a band: many bands, a short last one
    real_interpolate, heights = torch.nn.functional.interpolate, []

    def spy(x, *args, **kwargs):
        heights.append(x.shape[-2])
        return real_interpolate(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    banded = predict_module.resize_antialiased(pixels, size)
    assert banded.shape == whole.shape and torch.equal(banded, whole)
    # Band by band indeed (the whole image in one call gives the same bits): 7-row bands, then the narrowed image
    assert heights == [7] * (height // 7) + [height % 7] * (height % 7 > 0) + [height]
    monkeypatch.setattr(torch.nn.functional, "interpolate", real_interpolate)
    assert torch.equal(predict_module.resize_antialiased(pixels.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
                                                         size), whole)  # an H×W×3 array's view, as predict passes it


@pytest.mark.parametrize("low, size", [((7, 9), (61, 83)), ((40, 30), (23, 17)), ((5, 5), (5, 12))])
def test_rows_of_the_upsampled_logits_match_the_whole_upsampling(low, size):
    from resunet.predict import upsampled_rows

    logits = torch.randn((2, 4) + low, generator=torch.Generator().manual_seed(5))
    whole = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    for rows in (1, 6, size[0] - 1):
        bands = torch.cat([upsampled_rows(logits, size, top, min(size[0], top + rows))
                           for top in range(0, size[0], rows)], dim=2)
        assert bands.shape == whole.shape and torch.allclose(bands, whole, atol=1e-5)


def test_banded_full_size_maps_match_the_whole_ones(trained_run, monkeypatch):
    """Multi-scale TTA, ensembles and confidence maps combine full-size logits; past FULL_SIZE_WHOLE_ELEMENTS they do
    it band by band of rows. Both ways must give the same maps and confidence (up to rounding order)."""
    from resunet import predict as predict_module
    from resunet.predict import Ensemble

    first = Predictor.from_checkpoint(trained_run / "best.pt", precision="fp32")
    second = Predictor.from_checkpoint(trained_run / "last.pt", precision="fp32")
    second.temperature, second.size = 1.7, 48
    image = with_objects(first, 96, (131, 97))
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    cases = []
    for predictor in (first, Ensemble([first, second])):
        predictor.set_inference("ms+flip", scales=(0.75, 1.25))
        cases.append((predictor, predictor.logits(pixels), predictor.predict_with_confidence(image)))
    monkeypatch.setattr(predict_module, "FULL_SIZE_WHOLE_ELEMENTS", 0)
    monkeypatch.setattr(predict_module, "BAND_BYTES", 4 * 21 * 131 * 10)  # 10 rows a band, a short last one
    for predictor, logits, (whole_mask, whole_confidence) in cases:
        expected = logits.argmax(1)[0].numpy()
        assert len(np.unique(expected)) >= 2  # a trained model: boundaries for the bands to get right
        assert np.array_equal(whole_mask, expected)
        mask, confidence = predictor.predict_with_confidence(image)
        assert (mask == expected).mean() >= 0.999 and np.allclose(confidence, whole_confidence, atol=1e-5)
        assert (predictor.predict(image) == expected).mean() >= 0.999
        probabilities = (logits / predictor.temperature).softmax(1)[0]
        assert np.allclose(confidence, probabilities.amax(0).numpy(), atol=1e-5)


def test_multi_scale_confidence_on_a_large_image_takes_bands_not_gigabytes(tmp_path):
    """A 2400×2400 photo's full-size logits take 484 MB per scale (21 classes); the multi-scale TTA and confidence
    maps held several such tensors at once (a 3000×3000 one took over 2 GB). Band by band the process grows by a
    fraction of one."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import numpy as np, torch
        from resunet.data.classes import generic_info
        from resunet.model.unet import ResNetUNet
        from resunet.predict import Ensemble, Predictor

        def peak_mb():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) // 1024

        torch.manual_seed(0)
        members = [Predictor(ResNetUNet(21, "resnet18", None).eval(), generic_info(21), 32, (0.5,) * 3, (0.25,) * 3,
                             "cpu", "fp32") for _ in range(2)]
        image = np.random.default_rng(0).integers(0, 256, (2400, 2400, 3), dtype=np.uint8)
        members[0].predict(image[:64, :64])  # warm up: the allocator and kernels, not the image
        for predictor in (members[0], Ensemble(members)):
            predictor.set_inference("ms", scales=(0.75, 1.0))
            start = peak_mb()
            mask, confidence = predictor.predict_with_confidence(image)
            assert mask.shape == confidence.shape == (2400, 2400)
            assert np.array_equal(predictor.predict(image), mask)
            print(peak_mb() - start)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    growth = [int(line) for line in result.stdout.split()]
    # The image (17 MB), its mask and confidence (29 MB) and a few 48 MB bands; whole, over 1.4 GB.
    assert len(growth) == 2 and max(growth) < 400, growth


def test_bf16_on_the_cpu_gives_no_nan_for_an_input_under_64_pixels():
    """oneDNN's bf16 stride-2 convolutions returned NaN, now and then, where their output was one pixel wide: the
    encoder's last stage for an input padded to 32 px (a 48×32 image gave all-NaN logits in 5 of 12 fresh models on
    the AMX Xeon, and predict wrote class 0 everywhere without a word). Such inputs are padded to 64 px."""
    from resunet.data.classes import generic_info
    from resunet.model.unet import ResNetUNet
    from resunet.runtime import autocast

    torch.manual_seed(0)
    for _ in range(12):  # a fresh model each time: the failure came with new weights
        predictor = Predictor(ResNetUNet(3, "resnet18", None).eval(), generic_info(3), 32, (0.5,) * 3, (0.25,) * 3,
                              "cpu", "bf16", fold_bn=True)
        seen = []
        hook = predictor.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
        narrow = torch.randn(1, 3, 48, 32)
        logits = predictor.network(narrow)
        hook.remove()
        assert logits.shape == (1, 3, 48, 32) and torch.isfinite(logits).all()
        # The padding itself, checked on any CPU (only the AMX Xeon's kernels gave the NaN): zeros to 64 px, cropped
        assert seen == [(1, 3, 64, 64)]
        with torch.inference_mode(), autocast(predictor.device, None):
            padded = torch.nn.functional.pad(narrow, (0, 32, 0, 16)).contiguous(memory_format=torch.channels_last).to(torch.bfloat16)
            assert torch.equal(logits, predictor.model(padded)[..., :48, :32])
    wide = torch.randn(1, 3, 64, 96).contiguous(memory_format=torch.channels_last).to(torch.bfloat16)
    with torch.inference_mode(), autocast(predictor.device, None):
        assert torch.equal(predictor.network(wide.float()), predictor.model(wide))  # 64 px and up: untouched


def test_overlay_mixes_by_alpha_and_refuses_an_alpha_outside_0_to_1():
    """Found by a helper: alpha 1.5 wrapped the uint8 pixels around (200 became 156) without a word; the CLI's
    --alpha is checked, the Python method was not."""
    from resunet.data.classes import generic_info
    from resunet.model.unet import ResNetUNet

    predictor = Predictor(ResNetUNet(3, "resnet18", None).eval(), generic_info(3), 32, (0.5,) * 3, (0.25,) * 3,
                          "cpu", "fp32")
    image = np.full((2, 3, 3), 200, np.uint8)
    mask = np.array([[0, 1, 2], [2, 1, 0]])
    colours = predictor.info.colour_lut()[mask]
    assert np.array_equal(np.asarray(predictor.overlay(image, mask, 1.0)), colours)
    assert np.array_equal(np.asarray(predictor.overlay(image, mask, 0.0)), image)
    half = np.asarray(predictor.overlay(image, mask, 0.5)).astype(int)
    assert np.abs(half - (200 + colours.astype(int)) / 2).max() <= 0.5
    for alpha in (1.5, -0.1, float("nan"), "0.5", None, True):  # "0.5": a TypeError naming no argument
        with pytest.raises(ValueError, match="alpha must be a number from 0 to 1, got "):
            predictor.overlay(image, mask, alpha)
    # Another image's mask, or probabilities: a numpy broadcast or indexing error (found by a helper, 2026-12-05).
    with pytest.raises(ValueError, match=r"^mask must be the image's H×W \(2×3\) of class ids \(integers\), got int64 3×2$"):
        predictor.overlay(image, mask.T.astype(np.int64))
    with pytest.raises(ValueError, match="of class ids \\(integers\\), got float32 2×3"):
        predictor.overlay(image, mask.astype(np.float32))
    # An id past the 256 colours was numpy's IndexError; -1 took the last colour without a word (2026-12-07).
    for bad, ids in ((300, "0..300"), (-1, "-1..2")):
        wrong = mask.copy()
        wrong[0, 0] = bad
        with pytest.raises(ValueError, match=f"^mask holds class ids {ids}: the colours cover 0..255$"):
            predictor.overlay(image, wrong)


def test_predict_with_confidence_takes_a_list_as_predict_does():
    """predict takes one image or a list; predict_with_confidence took a list for one image (numpy's shape error)."""
    from resunet.data.classes import generic_info
    from resunet.model.unet import ResNetUNet

    torch.manual_seed(0)
    predictor = Predictor(ResNetUNet(3, "resnet18", None).eval(), generic_info(3), 32, (0.5,) * 3, (0.25,) * 3,
                          "cpu", "fp32")
    images = [np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
              for seed, (h, w) in enumerate([(20, 30), (33, 17)])]
    pairs = predictor.predict_with_confidence(images)
    assert isinstance(pairs, list) and len(pairs) == 2
    for image, (mask, confidence) in zip(images, pairs):
        alone_mask, alone_confidence = predictor.predict_with_confidence(image)
        assert mask.shape == confidence.shape == image.shape[:2]
        assert np.array_equal(mask, alone_mask) and np.array_equal(confidence, alone_confidence)
        assert np.array_equal(mask, predictor.predict(image)) and (confidence > 1 / 3 - 1e-6).all()
    assert [mask.shape for mask, _ in predictor.predict_with_confidence(tuple(images))] == [(20, 30), (33, 17)]

    # A model of more than 256 classes (built in Python: class files stop at 255): its ids as predict gives them,
    # not wrapped to uint8 (290 became 34; a helper's audit, 2026-12-07)
    from resunet.data.classes import ClassInfo

    wide = ResNetUNet(300, "resnet18", None).eval()
    with torch.no_grad():
        head = [module for module in wide.modules() if isinstance(module, torch.nn.Conv2d)][-1]
        head.bias.zero_()
        head.bias[290] = 100.0
    info = ClassInfo(tuple(f"c{i}" for i in range(300)), tuple((i % 256, 0, 0) for i in range(300)), 300,
                     (224, 224, 192))
    many = Predictor(wide, info, 32, (0.5,) * 3, (0.25,) * 3, "cpu", "fp32")
    mask, _ = many.predict_with_confidence(images[0])
    assert mask.dtype == many.predict(images[0]).dtype == np.int64 and set(np.unique(mask)) == {290}


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 70368744177664 bytes")])
def test_a_photo_that_runs_the_device_out_of_memory_is_one_line_and_the_others_run(trained_run, tmp_path,
                                                                                   monkeypatch, capsys, error):
    """Running out of memory (torch's OutOfMemoryError on a GPU, the CPU allocator's RuntimeError) for one photo
    ended the whole predict run with a traceback, where a file the model cannot take is one line and the other inputs
    still run (review, 2026-12-06)."""
    from resunet.cli import main

    for name, size in (("big.png", 96), ("small.png", 48)):
        make_sample(np.random.default_rng(0), size)[0].save(tmp_path / name)
    real = Predictor.predict

    def predict(self, image):
        if np.asarray(image).shape[0] == 96:
            raise error
        return real(self, image)

    monkeypatch.setattr(Predictor, "predict", predict)
    out = tmp_path / "out"
    assert main(["predict", str(trained_run / "best.pt"), str(tmp_path / "big.png"), str(tmp_path / "small.png"),
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'big.png'}: out of cpu memory at 96×96; the other inputs still run" \
        in err, err
    assert sorted(path.name for path in out.iterdir()) == ["small.png"]


def test_multi_scale_tta_bounds_every_scale_before_running_any(trained_run, monkeypatch):
    """--tta ms checked each scale's working pixels as it came to it: a 2500×1 strip, within the bound at the
    working size (64) but not at 1.5 ×, ran the smaller scales first (50 s and 14 GB, or the OOM killer on a
    500×7 strip with a 360 model), then was refused naming 96 as the working size (a helper, 2026-12-06)."""
    from resunet.data.images import DataError

    predictor = Predictor.from_checkpoint(trained_run / "best.pt", precision="fp32", tta="ms")
    ran = []
    monkeypatch.setattr(predictor, "working_logits", lambda x: ran.append(x.shape))
    with pytest.raises(DataError, match=r"^1×2500 pixels become 96×240000 at working size 96, more than "
                                        r"16,000,000 pixels: crop the image or split it \(--tta ms runs it at 1.5 × "
                                        r"the working size 64\)$"):
        predictor.predict(np.zeros((2500, 1, 3), np.uint8))
    assert ran == []
    Predictor.from_checkpoint(trained_run / "best.pt", precision="fp32").check_size(2500, 1)  # one scale: fits
