"""What a user gets wrong, and what the toolkit must then do: one line naming the flag or the file, before any work
where the problem can be seen before it, never a traceback, never a finished file destroyed. Each case here was found
by trying to break the commands as a user would (2026-12-04)."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from resunet.cli import main
from test_bad_inputs import good_pair


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> str:
    return str(trained_run / "best.pt")


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith(f"resunet {command}: error: "), err
    return err


# ---- train: settings refused before any work ------------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--eval-every", "0"], "--eval-every 0: must be at least 1"),
    (["--size", "0"], "--size 0: must be a positive number of pixels"),
    (["--lr", "-1"], "--lr -1.0: must be a positive number"),
    (["--workers", "-1"], "--workers -1: must be 0 or more"),
    (["--mix-prob", "2"], "--mix-prob 2.0: must be a share between 0 and 1"),
    (["--scale-min", "3", "--scale-max", "1"], "--scale-min 3.0: must be positive and at most --scale-max (1.0)"),
    (["--focal-gamma", "-2"], "--focal-gamma -2.0: must be 0 or more"),
    (["--focal-gamma", "inf"], "--focal-gamma inf: must be 0 or more"),
    (["--jitter", "nan"], "--jitter nan: must be 0 or more"),
    (["--scale-max", "inf"], "--scale-max inf: must be a finite number"),
    (["--weight-decay", "inf"], "--weight-decay inf: must be 0 or more"),
    (["--warmup-epochs", "inf"], "--warmup-epochs inf: must be 0 or more"),
    # the plateau scheduler has no warm-up: it was ignored without a word
    (["--warmup-epochs", "1"], "--warmup-epochs 1.0: must be 0 with --scheduler plateau: a warm-up is part of"),
    # every step of a warm-up as long as the run: the rate only rose, and never decayed
    (["--scheduler", "cosine", "--epochs", "2", "--warmup-epochs", "2"],
     "--warmup-epochs 2.0: must be 0 or more, and fewer than --epochs (2)"),
    # mixing pairs an image with another of its batch: at batch 1 nothing was ever mixed, silently
    (["--mix", "cutmix", "--batch-size", "1"], "--batch-size 1: must be 2 or more with --mix cutmix"),
    # refused before any work: these were found after the data check, the cache build and the class weights, and
    # an --ohem-keep 0 with --loss ce was blamed on "--loss ce"
    (["--ohem-keep", "0"], "--ohem-keep 0.0: must be a fraction in (0, 1]"),
    # an option of a loss or of --mix not chosen changed nothing, yet was stored (a helper's audit, 2026-12-07)
    (["--loss", "ce", "--focal-gamma", "5"], "--focal-gamma 5.0: must be left out without --loss focal"),
    (["--ohem-keep", "0.5"], "--ohem-keep 0.5: must be left out without --loss ohem"),
    (["--mix-prob", "0.3"], "--mix-prob 0.3: must be left out without --mix cutmix or classmix"),
    # weights the Lovász loss does not use: stored, every mask read for them, and a resume refused to drop them
    (["--loss", "lovasz", "--class-weights", "sqrt-inv-freq"],
     "--class-weights sqrt-inv-freq: must be left out with --loss lovasz, whose class average is unweighted"),
    (["--ema", "1.5"], "--ema 1.5: must be a decay in [0, 1)"),
    (["--decoder-channels", "1,2"], "--decoder-channels 1,2: four positive widths"),
    (["--checkpoint-every", "nanm"], "--checkpoint-every nanm: give a number of steps"),
    (["--seed", str(2**32)], f"--seed {2**32}: must be an integer from 0 to 2**32 - 1"),
    (["--num-classes", "-2"], "--num-classes -2: must be at least 1"),
    (["--encoder", "resnet-34"], "--encoder resnet-34: unknown; did you mean resnet34? choose from resnet18"),
    # the file was loaded and --no-pretrained dropped without a word
    (["--no-pretrained", "--encoder-weights", "w.pth"], "--encoder-weights w.pth with --no-pretrained: the encoder "
                                                         "would not start from random weights"),
    (["--encoder-weights", "nope.pth"], "nope.pth: encoder weights file not found"),  # was after the data check
    (["--device", "banana"], "--device banana: not a device"),
    (["--batch-size", "1", "--size", "32"], "--batch-size 1 with a 32-pixel crop: the encoder's deepest features"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], ""),
])
def test_nonsense_train_settings_are_one_line(tmp_path, capsys, flags, words):
    code = main(["train", "--data-root", str(tmp_path), "--out", str(tmp_path / "run"), *flags])
    err = one_error_line(capsys, "train")
    assert code == 2 and words in err
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_an_out_folder_that_is_a_file_is_one_line(demo_root, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    cfg = ["--data-root", str(demo_root), "--size", "64", "--no-pretrained", "--skip-data-check"]
    assert main(["train", *cfg, "--out", str(tmp_path / "afile")]) == 2
    assert "--out" in one_error_line(capsys, "train") and (tmp_path / "afile").read_text() == "mine"
    assert main(["ablate", *cfg, "--out", str(tmp_path / "afile" / "sub"), "--options", "baseline"]) == 2
    assert "cannot make the ablation folder" in one_error_line(capsys, "ablate")


def test_an_out_folder_among_the_datas_folders_is_one_line(demo_root, tmp_path, capsys):
    """--out train/images was accepted: the run's curves.png and checkpoints were then read as images, and every later
    run, its own resume too, refused the dataset (a helper, 2026-12-06)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    voc = data / "VOCdevkit" / "VOC2012"
    cfg = ["--data-root", str(data), "--size", "64", "--no-pretrained", "--skip-data-check"]
    for out in (voc / "SegmentationClass", voc / "JPEGImages" / "run"):
        before = sorted(p.name for p in voc.rglob("*"))
        assert main(["train", *cfg, "--out", str(out)]) == 2
        line = one_error_line(capsys, "train")
        assert line.endswith(f"--out {out}: inside {(out if out.name != 'run' else out.parent).resolve()}, a "
                             "folder the dataset is read from (its files would be taken for data, or replaced); write "
                             "outside the data's folders"), line
        assert sorted(p.name for p in voc.rglob("*")) == before


def test_no_output_goes_over_a_datasets_classes_json_or_into_any_of_its_splits_folders(checkpoint, demo_root,
                                                                                      tmp_path, capsys, monkeypatch):
    """Only the files of the split a command read were protected (a helper, 2026-12-06): `evaluate --json
    D/classes.json` and `check-data --json D/classes.json` replaced the classes (every later train refused the
    data), visualize's grid replaced a training mask, evaluate's confusion plot a training photo, and `evaluate
    --worst 2 --out D/val/images` put worst.png among the images (no mask: the next train refused the data)."""
    import shutil

    import resunet.evaluate

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    voc = data / "VOCdevkit" / "VOC2012"
    train_mask = voc / "SegmentationClass" / f"{(voc / 'ImageSets/Segmentation/train.txt').read_text().split()[0]}.png"
    folder = tmp_path / "folder"
    for split in ("train", "val"):
        for part in ("images", "masks"):
            (folder / split / part).mkdir(parents=True)
        image, mask = good_pair(0)
        (folder / split / "images" / "a.png").write_bytes(image)
        (folder / split / "masks" / "a.png").write_bytes(mask)
    (folder / "classes.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(21)]}))
    before = {path: path.read_bytes() for root in (data, folder) for path in root.rglob("*") if path.is_file()}
    # Patched where each command looks it up: export binds it at its import, and a first import of resunet.export
    # under the patch kept the fake for the rest of the session (the exported-file fixtures then failed).
    import resunet.export

    for module in (resunet.evaluate, resunet.export):
        monkeypatch.setattr(module, "evaluate_dataset", lambda *a, **k: pytest.fail("evaluated anyway"))
    inside = ("a folder the dataset is read from (its files would be taken for data, or replaced); write outside "
              "the data's folders")
    for command, words in (
            (["evaluate", checkpoint, "--data-root", str(voc), "--confusion", str(voc / "JPEGImages" / "new.png")],
             f"--confusion {voc / 'JPEGImages' / 'new.png'}: inside {(voc / 'JPEGImages').resolve()}, {inside}"),
            (["evaluate", checkpoint, "--data-root", str(data), "--worst", "2", "--out", str(voc / "JPEGImages")],
             f"--out {voc / 'JPEGImages'}: inside {(voc / 'JPEGImages').resolve()}, {inside}"),
            (["visualize", checkpoint, "--data-root", str(data), "--out", str(train_mask)],
             f"--out {train_mask}: inside {train_mask.parent.resolve()}, {inside}"),
            (["evaluate", checkpoint, "--data-root", str(folder), "--json", str(folder / "classes.json")],
             f"--json {folder / 'classes.json'}: is one of this command's inputs; writing there would destroy it"),
            (["check-data", "--data-root", str(folder), "--split", "val", "--json", str(folder / "classes.json")],
             "is one of this command's inputs; writing there would destroy it"),
            (["check-data", "--data-root", str(folder), "--split", "val", "--plot",
              str(folder / "train" / "masks" / "a.png")], f"inside {(folder / 'train' / 'masks').resolve()}, {inside}"),
            (["export", checkpoint, "--onnx", str(tmp_path / "m.onnx"), "--data-root", str(data), "--json",
              str(voc / "SegmentationClass" / "e.json")], f"inside {(voc / 'SegmentationClass').resolve()}, {inside}")):
        assert main(command) == 2, command
        assert one_error_line(capsys, command[0]).endswith(words), command
    # Through a link outside the data to a training mask: the check looked at the link's folder (a helper).
    (tmp_path / "link.json").symlink_to(folder / "train" / "masks" / "a.png")
    (tmp_path / "link.png").symlink_to(train_mask)
    for command, where in (
            (["check-data", "--data-root", str(folder), "--json", str(tmp_path / "link.json")], folder / "train/masks"),
            (["visualize", checkpoint, "--data-root", str(data), "--out", str(tmp_path / "link.png")],
             train_mask.parent)):
        assert main(command) == 2, command
        assert f"inside {where.resolve()}, {inside}" in one_error_line(capsys, command[0])
    assert {path: path.read_bytes() for root in (data, folder) for path in root.rglob("*") if path.is_file()} == before
    assert not (tmp_path / "m.onnx").exists()
    # Beside the data's folders is outside them.
    assert main(["check-data", "--data-root", str(folder), "--json", str(folder / "report.json")]) == 0
    assert json.loads((folder / "report.json").read_text())


def test_encoder_weights_that_are_not_weights_are_one_line(tmp_path, capsys):
    from resunet.model.encoders import WeightsUnavailableError, build_encoder

    (tmp_path / "junk.pth").write_text("not a torch file")
    with pytest.raises(WeightsUnavailableError, match="junk.pth: not a PyTorch weights file"):
        build_encoder("resnet18", tmp_path / "junk.pth")
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsUnavailableError, match="other.pth: these weights do not fit the resnet18 encoder"):
        build_encoder("resnet18", tmp_path / "other.pth")
    (tmp_path / "empty.pth").write_bytes(b"x" * 0)  # it said "(EOFError)"
    with pytest.raises(WeightsUnavailableError, match=r"empty.pth: not a PyTorch weights file \(an empty file: a save "
                                                      r"or copy cut short\?\)$"):
        build_encoder("resnet18", tmp_path / "empty.pth")
    # A plain pickle: torch's two-line warning about its protocol came before the line.
    import pickle
    import warnings

    (tmp_path / "plain.pth").write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(WeightsUnavailableError, match=r"plain.pth: not a PyTorch weights file \(not a file "
                                                          r"torch.save writes\)$"):
            build_encoder("resnet18", tmp_path / "plain.pth")
    # A whole model saved (objects, not tensors): the line says what to save instead.
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")
    with pytest.raises(WeightsUnavailableError, match=r"model.pth: holds Python objects other than tensors \(torch"
                                                      r".nn.modules.linear.Linear\), which are not loaded .*Save its "
                                                      r"state_dict\(\) instead$"):
        build_encoder("resnet18", tmp_path / "model.pth")


def test_encoder_weights_from_training_scripts_with_their_args_load(tmp_path):
    """torchvision's references save {"model": ..., "args": argparse.Namespace}, timm's train.py {"state_dict": ...,
    "args": ..., "metric": numpy float}: torch.load's weights_only refused them, and the README says they load."""
    import argparse

    import numpy as np

    from resunet.model.encoders import build_encoder

    import torchvision

    weights = {key: torch.randn_like(value) if value.is_floating_point() else value
               for key, value in torchvision.models.resnet18().state_dict().items()}
    torch.save({"model": weights, "args": argparse.Namespace(lr=0.1, model="resnet18"), "epoch": 89},
               tmp_path / "torchvision.pth")
    torch.save({"state_dict": weights, "args": argparse.Namespace(lr=0.1), "metric": np.float64(71.5)},
               tmp_path / "timm.pth")
    for name in ("torchvision.pth", "timm.pth"):
        encoder = build_encoder("resnet18", tmp_path / name)
        assert torch.equal(encoder.state_dict()["stem.0.weight"], weights["conv1.weight"]), name


def test_encoder_weights_that_do_not_fit_leave_no_run_folder(demo_root, tmp_path, capsys):
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.pth")
    code = main(["train", "--data-root", str(demo_root), "--out", str(tmp_path / "run"), "--encoder", "resnet18",
                 "--encoder-weights", str(tmp_path / "other.pth"), "--skip-data-check", "--size", "64"])
    assert code == 2 and "other.pth: these weights do not fit the resnet18 encoder" in one_error_line(capsys, "train")
    assert not (tmp_path / "run").exists()  # an empty run folder was left behind


def test_the_no_flags_say_what_they_do(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--no-pretrained start the encoder from random weights instead of ImageNet's" in out
    assert "--no-progress no progress bars or in-epoch progress lines" in out


# ---- train --resume: what may change, and what is refused ------------------------------------------------------------

def test_resume_takes_every_flag_given_and_refuses_what_cannot_change(tmp_path, monkeypatch, capsys):
    import resunet.train
    from resunet.checkpoint import save_checkpoint
    from resunet.config import TrainConfig

    stored = TrainConfig(data_root="data", out="elsewhere", workers=0, epochs=7, lr=0.5, loss="ce+dice",
                         checkpoint_every="100").to_dict()
    save_checkpoint({"train_config": stored}, tmp_path / "last.pt")
    seen = []
    monkeypatch.setattr(resunet.train, "train", lambda cfg: seen.append(cfg) or {})
    resume = ["train", "--resume", str(tmp_path / "last.pt")]
    # Given explicitly, a flag counts even at its default value (workers 2, epochs 100 are the defaults).
    assert main([*resume, "--workers", "2", "--epochs", "100", "--data-root", "/moved/data"]) == 0
    assert (seen[-1].workers, seen[-1].epochs, seen[-1].data_root) == (2, 100, "/moved/data")
    assert seen[-1].loss == "ce+dice" and seen[-1].lr == 0.5
    assert main([*resume, "--lr", "0.1", "--loss", "ce+dice", "--out", str(tmp_path)]) == 0  # same loss and folder
    assert seen[-1].lr == 0.1 and not seen[-1].calibrate
    assert main([*resume, "--calibrate"]) == 0  # done to best.pt after training: it was refused ("True ... False")
    assert seen[-1].calibrate
    calls = len(seen)
    capsys.readouterr()
    assert main([*resume, "--loss", "dice"]) == 2
    assert one_error_line(capsys, "train").endswith("--loss dice: cannot change on --resume (the run trains with "
                                                    "ce+dice); start a new run with another --out")
    assert main([*resume, "--crop-size", "256"]) == 2  # it said "the run trains with None" (a helper, 2026-12-05)
    assert one_error_line(capsys, "train").endswith("--crop-size 256: cannot change on --resume (the run was started "
                                                    "without --crop-size); start a new run with another --out")
    assert main([*resume, "--out", str(tmp_path / "other")]) == 2
    assert "--out: a resumed run stays in its folder" in one_error_line(capsys, "train")
    assert main([*resume, "--no-pretrained"]) == 2  # it named a flag that does not exist: "--pretrained False"
    assert one_error_line(capsys, "train").endswith("--no-pretrained: cannot change on --resume (the run was started "
                                                    "without it); start a new run with another --out")
    assert len(seen) == calls


def test_a_run_started_from_a_weights_file_resumes_without_it(demo_root, ram_tmp, monkeypatch, capsys):
    """A resumed run read --encoder-weights again, from the path as given (relative to where the run started), only
    for the checkpoint to replace those weights: once the file moved, or from another folder, the run could not
    resume."""
    import torchvision

    from resunet.train import resume, train

    start = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(start, ram_tmp / "start.pth")
    monkeypatch.chdir(ram_tmp)
    run = ram_tmp / "run"
    train(tiny_config(demo_root, run, epochs=1, encoder="resnet18", encoder_weights="start.pth", pretrained=True))
    assert "resnet18 (pretrained: start.pth)" in capsys.readouterr().out
    stored = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["train_config"]
    assert stored["encoder_weights"] == str(ram_tmp / "start.pth")
    (ram_tmp / "start.pth").unlink()
    monkeypatch.chdir(demo_root)
    resume(run / "last.pt", epochs=2)
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert main(["train", "--resume", str(run / "last.pt"), "--encoder-weights", "start.pth", "--epochs", "2"]) == 0


def test_paths_given_as_path_objects_leave_checkpoints_that_load(tmp_path):
    # A Path in TrainConfig was stored as a pickled PosixPath, which torch.load(weights_only=True) refuses: every
    # checkpoint of a run started from Python with out=Path(...) was unreadable.
    from resunet.checkpoint import load_checkpoint, save_checkpoint
    from resunet.config import TrainConfig

    cfg = TrainConfig(data_root=tmp_path / "data", out=tmp_path / "run", resume=tmp_path / "run" / "last.pt")
    assert (cfg.data_root, cfg.out, cfg.resume) == (str(tmp_path / "data"), str(tmp_path / "run"),
                                                    str(tmp_path / "run" / "last.pt"))
    save_checkpoint({"train_config": cfg.to_dict()}, tmp_path / "x.pt")
    assert load_checkpoint(tmp_path / "x.pt")["train_config"]["out"] == str(tmp_path / "run")


@pytest.mark.parametrize("setting, words", [
    # a typo fell back to another recipe without a word: Adam, no schedule, ClassMix, no weights, the simple path
    ({"optimizer": "AdamW"}, "--optimizer 'AdamW': unknown; did you mean adamw? choose from adam, adamw"),
    ({"scheduler": "Cosine"}, "--scheduler 'Cosine': unknown; did you mean cosine?"),
    ({"mix": "CutMix"}, "--mix 'CutMix': unknown; did you mean cutmix?"),
    ({"class_weights": "sqrt_inv_freq"}, "--class-weights 'sqrt_inv_freq': unknown; did you mean sqrt-inv-freq?"),
    ({"data_path": "cache"}, "--data-path 'cache': unknown; did you mean cached?"),
    ({"attention": "scSE"}, "--attention 'scSE': unknown; did you mean scse?"),  # a ValueError after the data check
    ({"mix": None}, "--mix None: must be text"),
    # numbers as text, or not whole: TypeErrors inside the checks, the cache build or the loop (a run folder left)
    ({"lr": "1e-3"}, "--lr '1e-3': must be a number"),
    ({"ema": "0.999"}, "--ema '0.999': must be a number"),
    ({"epochs": 2.5}, "--epochs 2.5: must be a whole number"),
    ({"size": 64.5}, "--size 64.5: must be a whole number"),
    ({"batch_size": True}, "--batch-size True: must be a whole number"),
    ({"pretrained": "no"}, "--pretrained 'no': must be True or False"),
])
def test_python_settings_of_the_wrong_kind_are_one_line_before_any_work(tmp_path, setting, words):
    """Found by a helper using resunet from Python: argparse checks the flags' types and lists, nothing checked a
    TrainConfig built by hand."""
    from resunet.train import TrainingError, train

    with pytest.raises(TrainingError) as refused:
        train(tiny_config(tmp_path / "no-data", tmp_path / "run", **setting))
    assert words in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()


def test_python_settings_in_their_natural_forms_train(demo_root, ram_tmp, capsys):
    """The model's own tuple of decoder widths, numpy numbers, steps and seconds as numbers: stored as the flags'
    forms (a tuple failed with an AttributeError; numpy numbers would make the checkpoint unreadable)."""
    from resunet.checkpoint import load_checkpoint
    from resunet.train import train

    run = ram_tmp / "run"
    cfg = tiny_config(demo_root, run, epochs=np.int64(1), lr=np.float64(1e-3), decoder_channels=(64, 32, 16, 16),
                      checkpoint_every=5, time_budget=3600, size=32, encoder="efficientnet-lite0", precision="fp32")
    train(cfg)
    stored = load_checkpoint(run / "last.pt")["train_config"]
    assert stored["decoder_channels"] == "64,32,16,16" and stored["epochs"] == 1 and type(stored["epochs"]) is int
    assert stored["checkpoint_every"] == "5" and stored["time_budget"] == "3600" and stored["lr"] == 1e-3
    assert load_checkpoint(run / "last.pt")["model_config"]["decoder_channels"] == [64, 32, 16, 16]
    # Given again in the same forms on resume, they are the same settings (refused as changes: a helper, 2026-12-06)
    from resunet.train import resume

    resume(run / "last.pt", epochs=2, decoder_channels=(64, 32, 16, 16), time_budget=3600, checkpoint_every=5)
    assert load_checkpoint(run / "last.pt", tensors=False)["epoch"] == 2


def test_resume_from_python_keeps_the_runs_folder_and_recipe(demo_root, ram_tmp, capsys):
    """From Python a TrainConfig(resume=...) took its defaults for everything not given: the run went on in
    ./runs/train under the default loss and lr, or died on a KeyError in the optimiser's state. resume() is the
    CLI's --resume; a hand-built TrainConfig that differs from its run is refused in one line."""
    from resunet.config import TrainConfig
    from resunet.train import TrainingError, resume, train

    run = ram_tmp / "run"
    recipe = dict(encoder="resnet18", loss="dice", lr=2e-3, scheduler="cosine", eval_every=1)
    train(tiny_config(demo_root, run, epochs=1, **recipe))
    with pytest.raises(TrainingError, match=r"^out='runs/train': a resumed run stays in its folder \(.*run\); "
                                            r"resunet.train.resume\('.*last.pt', epochs=...\) keeps"):
        train(TrainConfig(resume=str(run / "last.pt"), data_root=str(demo_root), epochs=2))
    with pytest.raises(TrainingError, match=r"^loss='ce': the run trains with 'dice', and it cannot change on "
                                            "resume"):
        train(tiny_config(demo_root, run, epochs=2, resume=str(run / "last.pt"), **{**recipe, "loss": "ce"}))
    with pytest.raises(TrainingError, match=r"^crop_size=48: the run was started without crop_size, and it cannot "
                                            "change on resume"):  # "trains with None" (review, 2026-12-05)
        train(tiny_config(demo_root, run, epochs=2, resume=str(run / "last.pt"), **{**recipe, "crop_size": 48}))
    with pytest.raises(TrainingError, match=r"^--loss ce: cannot change on --resume \(the run trains with dice\)"):
        resume(run / "last.pt", epochs=2, loss="ce")
    with pytest.raises(TrainingError, match=r"^data_root \(--data-root\): required"):
        train(TrainConfig())
    assert not Path("runs/train").exists()
    capsys.readouterr()
    resume(run / "last.pt", epochs=2)  # in its folder, with its loss, lr and schedule
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and last["train_config"]["loss"] == "dice" and last["train_config"]["lr"] == 2e-3


def test_resume_with_a_lower_lr_scales_the_schedule_from_there(demo_root, ram_tmp, capsys):
    from resunet.train import train

    run = ram_tmp / "run"
    train(tiny_config(demo_root, run, epochs=1, scheduler="cosine", encoder="resnet18", eval_every=1))
    train(tiny_config(demo_root, run, epochs=3, scheduler="cosine", encoder="resnet18", eval_every=1,
                      resume=str(run / "last.pt"), lr=5e-4))
    assert "learning rate 0.001 → 0.0005 from here on" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Cosine over 3 epochs, no warm-up: after epoch 2 the factor is 0.5 (1 + cos(2π/3)) = 0.25 of the peak, and the
    # peak is now 5e-4.
    assert records[1]["epoch"] == 2 and records[1]["lr"] == pytest.approx(5e-4 * 0.25, rel=1e-6)
    assert records[2]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_resume_into_a_model_it_does_not_fit_is_one_line(demo_root, ram_tmp, capsys):
    from resunet.checkpoint import CheckpointError
    from resunet.train import train

    from resunet.checkpoint import load_checkpoint, save_checkpoint
    from resunet.train import TrainingError

    run = ram_tmp / "run"
    train(tiny_config(demo_root, run, epochs=1, encoder="resnet18", decoder_channels="16,16,16,16"))
    wider = dict(epochs=2, encoder="resnet18", decoder_channels="32,16,16,16", resume=str(run / "last.pt"))
    with pytest.raises(TrainingError, match="decoder_channels='32,16,16,16': the run trains with '16,16,16,16'"):
        train(tiny_config(demo_root, run, **wider))  # the settings say it first
    # Settings that do not describe the weights (a hand-edited file): the weights say it.
    payload = load_checkpoint(run / "last.pt")
    payload["train_config"]["decoder_channels"] = "32,16,16,16"
    save_checkpoint(payload, run / "last.pt")
    with pytest.raises(CheckpointError, match="its weights do not fit the model this run builds"):
        train(tiny_config(demo_root, run, **wider))


# ---- saving: a full disk, a read-only folder -------------------------------------------------------------------------

def test_a_checkpoint_write_torch_cannot_finish_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    from resunet import checkpoint

    checkpoint.save_checkpoint({"n": 1}, tmp_path / "last.pt")

    def full_disk(*args, **kwargs):  # what torch's zip writer raises when the disk fills up mid-file
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 107692864 vs 107692752")
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match=r"could not save the checkpoint \(the write stopped short"):
        checkpoint.save_checkpoint({"n": 2}, tmp_path / "last.pt")
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(tmp_path / "last.pt")["n"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_metrics_that_cannot_be_written_are_one_line(tmp_path, monkeypatch):
    import resunet.outputs
    import resunet.train as train_module

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    monkeypatch.setattr(resunet.outputs, "temporary_path", lambda path: tmp_path / "gone" / path.name)
    with pytest.raises(train_module.TrainingError, match="metrics.jsonl: could not write it .* previous metrics.jsonl "
                                                         "is intact"):
        train_module.write_atomically(tmp_path / "metrics.jsonl", '{"epoch": 2}\n')
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def test_metrics_are_on_disk_before_they_replace_the_previous_file(tmp_path, monkeypatch):
    """A power cut after the rename could leave metrics.jsonl empty (XFS, ext4 without the rename heuristics): a
    resume read no history and rewrote it with the epochs after it alone (a helper's review, 2026-12-07)."""
    import resunet.train as train_module

    real_fsync, real_replace, events = os.fsync, os.replace, []
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b))[1])
    train_module.write_atomically(tmp_path / "metrics.jsonl", '{"epoch": 2}\n')
    partial = events[0][1]
    assert re.fullmatch(re.escape(str(tmp_path / f".metrics.jsonl.tmp{os.getpid()}-")) + "[0-9a-f]{8}", partial)
    assert events == [("fsync", partial), ("replace", partial)]
    # Random beyond the PID: two containers sharing a volume, each its process 1, wrote into one file (2026-12-07)
    from resunet.checkpoint import temporary_path

    assert len({temporary_path(tmp_path / "best.pt") for _ in range(8)}) == 8
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 2}\n'


# ---- --cache-dir: a folder that cannot be written ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    from resunet.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("small")
    make_demo_dataset(root, train=4, val=2, size=48, seed=0)
    return root


def small_run(root: Path, out: Path, cache_dir: Path, *flags: str) -> int:
    return main(["train", "--data-root", str(root), "--out", str(out), "--size", "32", "--epochs", "1",
                 "--batch-size", "2", "--encoder", "resnet18", "--no-pretrained", "--workers", "0", "--no-progress",
                 "--cache-dir",
                 str(cache_dir), *flags])


@contextmanager
def immutable(folder: Path):
    """`folder` made immutable (chattr +i): what stops even root from writing into it, as tests here run as root."""
    folder.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("where, flags", [("afile", ["--skip-data-check"]), ("afile/sub", []),
                                          ("afile", ["--data-path", "cached"])])
def test_a_cache_dir_under_a_file_is_one_line_before_the_data_check_and_the_run_folder(small_root, tmp_path, capsys,
                                                                                        where, flags):
    (tmp_path / "afile").write_text("mine")
    assert small_run(small_root, tmp_path / "run", tmp_path / where, *flags) == 2
    err = one_error_line(capsys, "train")
    assert (f"--cache-dir {tmp_path / where}: cannot write the decoded-image cache ({tmp_path / 'afile'} is a file, "
            "not a folder); give a writable --cache-dir") in err
    assert "data check" not in capsys.readouterr().out  # refused before the data check read every image
    assert not (tmp_path / "run").exists() and (tmp_path / "afile").read_text() == "mine"


def test_an_immutable_cache_dir_is_refused_but_a_cache_built_there_still_loads(small_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    with immutable(cache):  # nothing built there yet: refused in one line
        assert small_run(small_root, tmp_path / "refused", cache) == 2
        err = one_error_line(capsys, "train")
        assert f"--cache-dir {cache}: cannot write the decoded-image cache (Operation not permitted)" in err
        assert not (tmp_path / "refused").exists()
    from resunet.data.cache import build_cache
    from resunet.data.dataset import open_dataset

    build_cache(open_dataset(small_root, "train"), 32, cache)  # what a first run with --size 32 builds
    with immutable(cache):  # built: read, never written, so a read-only cache serves the next runs
        assert small_run(small_root, tmp_path / "again", cache) == 0
        captured = capsys.readouterr()
    assert "cached data path" in captured.out and (tmp_path / "again" / "best.pt").is_file()
    assert captured.err.strip() == (f"resunet: warning: {cache / 'check-data'}: cannot keep the data check's report "
                                    "(Operation not permitted); it will be checked again next time")


def test_a_data_check_report_that_cannot_be_kept_is_a_warning_and_the_run_goes_on(small_root, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert small_run(small_root, tmp_path / "run", tmp_path / "afile", "--data-path", "simple") == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"resunet: warning: {tmp_path / 'afile' / 'check-data'}: cannot keep the data "
                                    "check's report (Not a directory); it will be checked again next time")
    assert "simple data path" in captured.out and (tmp_path / "run" / "best.pt").is_file()


# ---- data: classes.json, unreadable training masks, deep images ------------------------------------------------------

@pytest.mark.parametrize("text, words", [
    ("{bad json", "cannot read class description"),
    ("[1, 2]", "malformed class description"),
    ('{"classes": "abc"}', "'classes' must be a list of names"),
    ('{"classes": ["a", "b"], "ignore_index": "x"}', "ignore_index 'x' is not a whole number"),
    # Other tools' {"name", "color"} entries became names like "{'name': 'bg', ...}", their colours dropped.
    ('{"classes": [{"name": "bg", "color": [0, 0, 0]}, {"name": "car", "color": [255, 0, 0]}]}',
     'class 0 is {"name": "bg", "color": [0, 0, 0]}, not a name; a class file lists the names in \'classes\' and '
     "their colours in 'palette'"),
    ('{"classes": ["a", null]}', "class 1 is null, not a name"),
    ('{"classes": ["a", " "]}', 'class 1 is " ", not a name'),
    # Keys it does not have were passed over: VOC's colours and ignore 255 were used in their place, without a word.
    ('{"classes": ["a", "b"], "colors": [[0, 0, 0], [9, 9, 9]]}', "unknown key(s) 'colors' (did you mean 'palette'?);"
     " a class file has name, classes, palette, ignore_index, ignore_colour"),
    ('{"classes": ["a", "b"], "ignore_label": 0, "ignore_colr": [1, 1, 1], "extra": 1}',
     "unknown key(s) 'ignore_label' (did you mean 'ignore_index'?), 'ignore_colr' (did you mean 'ignore_colour'?), "
     "'extra'; a class"),
])
def test_a_malformed_classes_json_is_one_line(tmp_path, capsys, text, words):
    root = tmp_path / "data"
    for folder in ("images", "masks"):
        (root / "train" / folder).mkdir(parents=True)
    (root / "classes.json").write_text(text)
    assert main(["check-data", "--data-root", str(root)]) == 2
    err = one_error_line(capsys, "check-data")
    assert "classes.json" in err and words in err


def test_a_classes_json_not_in_utf8_is_one_line_naming_it_and_a_bom_is_read(tmp_path, capsys):
    root = tmp_path / "data"
    for folder in ("images", "masks"):
        (root / "train" / folder).mkdir(parents=True)
    (root / "classes.json").write_bytes('{"classes": ["fond", "bâtiment"]}'.encode("cp1252"))
    assert main(["check-data", "--data-root", str(root)]) == 2
    err = one_error_line(capsys, "check-data")  # was the codec's message alone, no file named
    assert "classes.json: cannot read class description" in err
    from resunet.data.classes import load_classes_json

    (root / "classes.json").write_bytes('\ufeff{"classes": ["fond", "bâtiment"]}'.encode("utf-8"))  # Notepad's BOM
    assert load_classes_json(root / "classes.json").names == ("fond", "bâtiment")


def test_check_data_with_no_readable_training_mask_reports_them(tmp_path, capsys):
    from test_doctor import clean_dataset

    root = clean_dataset(tmp_path / "data")
    for mask in (root / "train" / "masks").iterdir():
        mask.write_text("x")
    assert main(["check-data", "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "4 errors" in out and "good_0.png" in out


def test_a_16_bit_grey_image_is_read_at_its_values_not_white(tmp_path):
    from resunet.data.images import read_image

    grey = (np.arange(40 * 30).reshape(30, 40) % 256).astype(np.uint16)
    Image.fromarray(grey * 257).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    pixels = read_image(tmp_path / "deep.png")
    assert pixels.shape == (30, 40, 3) and pixels.dtype == np.uint8
    assert (pixels == grey[..., None]).all()  # 257·v / 257 = v, in every channel
    Image.fromarray((grey / 255).astype(np.float32)).save(tmp_path / "float.tif")  # a 0..1 float image
    assert np.abs(read_image(tmp_path / "float.tif").astype(int) - grey[..., None]).max() <= 1


def test_a_broken_exif_block_is_read_without_a_warning_on_stderr(tmp_path):
    """PIL's two-line "Corrupt EXIF data" UserWarning went to the service's log and predict's stderr, breaking their
    one line per problem (found by a helper, 2026-12-05). The picture is read as stored."""
    import sys

    header = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08"
    broken = {"cut short": header + b"\xff\xff",  # "Corrupt EXIF data"
              # one entry (ImageDescription, 100 characters) past the block's end: "Tag data larger than file"
              "past its end": header + b"\x00\x01\x01\x0e\x00\x02\x00\x00\x00\x64\x00\x00\x00\x1a\x00\x00\x00\x00"}
    paths = []
    for i, exif in enumerate(broken.values()):
        paths.append(str(tmp_path / f"badexif{i}.jpg"))
        Image.new("RGB", (6, 4), (200, 10, 10)).save(paths[-1], exif=exif)
    code = f"from resunet.data.images import read_image; print([read_image(p).shape for p in {paths!r}])"
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[(4, 6, 3), (4, 6, 3)]" and done.stderr == "", done.stderr
    # Without the filter each of them warns (the test's files are broken as described).
    check = ("import warnings; from PIL import Image, ImageOps; warnings.simplefilter('always'); "
             f"[ImageOps.exif_transpose(Image.open(p)) for p in {paths!r}]")
    warned = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120).stderr
    assert "Corrupt EXIF data" in warned and "Tag data larger than file" in warned, warned


def test_an_eps_file_is_not_read_so_no_client_can_feed_postscript_to_ghostscript(monkeypatch):
    """PIL opens EPS by running Ghostscript: any client of the service could send PostScript to it (found by a
    helper, 2026-12-05). Images are opened as raster formats PIL decodes itself."""
    import subprocess

    from resunet.data.images import DataError, read_image
    from resunet.serve.codec import RequestError, decode_image

    def no_program(*args, **kwargs):
        raise AssertionError(f"ran {args[0]!r}")

    for name in ("Popen", "check_call", "run"):
        monkeypatch.setattr(subprocess, name, no_program)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
    with pytest.raises(DataError, match=r"^upload: not a readable image \(not an image format we know\)$"):
        read_image(eps, name="upload")
    with pytest.raises(RequestError, match="not an image format we know") as refused:
        decode_image(eps, "upload", None)
    assert refused.value.status == 400
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA"):  # the usual ones are still read
        buffer = io.BytesIO()
        Image.new("RGB", (5, 4), (10, 200, 30)).save(buffer, format=fmt)
        assert read_image(buffer.getvalue()).shape == (4, 5, 3), fmt


# ---- inference commands -----------------------------------------------------------------------------------------------

def test_predict_run_again_over_its_own_out_leaves_its_results_out_and_goes_on(checkpoint, tmp_path, capsys):
    """`predict 'rec/**/*' --out rec/preds` run again (with --skip-existing, as its Ctrl-C line says) took its own
    results for photos: every input failed as one that would overwrite an input (found by a helper, 2026-12-05).
    Each file predict writes is marked (PNG text, JPEG comment), and a marked input is left out; a photo of the
    user's is not marked, and stays protected."""
    from resunet.outputs import is_prediction

    rec = tmp_path / "rec"
    for i, sub in enumerate(("a", "b")):
        (rec / sub).mkdir(parents=True)
        (rec / sub / f"photo{i}.png").write_bytes(good_pair(i)[0])
    command = ["predict", checkpoint, f"{rec}/**/*", "--out", str(rec / "preds"), "--overlay", "--confidence"]
    assert main(command) == 0
    written = sorted((rec / "preds").iterdir())
    assert len(written) == 6 and all(is_prediction(path) for path in written)
    assert not is_prediction(rec / "a" / "photo0.png")
    capsys.readouterr()
    assert main([*command, "--skip-existing"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"resunet predict: left out 6 file(s) that resunet predict wrote, such as "
                                    f"{written[0]}: results of an earlier run, not images to predict")
    assert captured.out.strip() == (f"wrote 0 prediction(s) to {rec / 'preds'}; 2 skipped, their files already there "
                                    "(--skip-existing)")
    assert main(command) == 0 and "wrote 2 prediction(s)" in capsys.readouterr().out
    assert sorted((rec / "preds").iterdir()) == written


def test_predict_an_unreadable_file_does_not_take_the_name_of_a_good_ones_result(checkpoint, tmp_path, capsys):
    """a.jpg (not an image) and a.png (a photo) in one folder: a.png was refused as overwriting a.jpg's result, which
    was never written (found by a helper, 2026-12-05). A name is taken by a result, not by a file that failed."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_text("not an image")
    (folder / "a.png").write_bytes(good_pair(0)[0])
    assert main(["predict", checkpoint, str(folder), "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "a.jpg: not a readable image" in captured.err and "would overwrite" not in captured.err
    assert "wrote 1 prediction(s)" in captured.out and "1 input(s) failed" in captured.out
    assert Image.open(tmp_path / "out" / "a.png").size == Image.open(folder / "a.png").size


def test_predict_never_writes_over_an_input_or_another_inputs_result(checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(good_pair(0)[0])
    Image.open(folder / "a.png").save(folder / "a.jpg")  # a.jpg's mask would be a.png, the input
    (folder / "b.jpg").write_bytes((folder / "a.jpg").read_bytes())
    before = (folder / "a.png").read_bytes()
    assert main(["predict", checkpoint, str(folder), "--out", str(folder)]) == 1
    captured = capsys.readouterr()
    assert (folder / "a.png").read_bytes() == before and (folder / "b.png").is_file()
    assert "a.jpg: not predicted, its output" in captured.err and "would overwrite an input image" in captured.err
    assert "wrote 1 prediction(s)" in captured.out
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    (other / "x" / "a.png").write_bytes(before)
    assert main(["predict", checkpoint, str(folder / "a.png"), str(other / "x" / "a.png"), "--out",
                 str(tmp_path / "out")]) == 1
    assert "x/a.png: not predicted, its output" in capsys.readouterr().err  # the first a.png keeps its result


def test_predict_on_a_case_insensitive_disk_keeps_the_first_of_two_names_for_one_result(checkpoint, tmp_path, capsys,
                                                                                       monkeypatch):
    """On macOS, exFAT or an SMB share, cam1/IMG_1.png's result and cam2/img_1.png's are one file under two names:
    the second replaced the first (exit 0; a helper's review, 2026-12-07). Such a disk is played here by a hard
    link: the first result, once written, is there under the second name too."""
    import resunet.outputs

    for folder, name, index in (("cam1", "IMG_1.png", 0), ("cam2", "img_1.png", 1)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(good_pair(index)[0])
    out, real_save = tmp_path / "out", resunet.outputs.save_whole

    def save_on_a_case_insensitive_disk(path, save):
        real_save(path, save)
        if path.name == "IMG_1.png":
            os.link(path, path.with_name("img_1.png"))

    monkeypatch.setattr(resunet.outputs, "save_whole", save_on_a_case_insensitive_disk)
    assert main(["predict", checkpoint, str(tmp_path / "cam1" / "IMG_1.png"), str(tmp_path / "cam2" / "img_1.png"),
                 "--out", str(out)]) == 1
    first = (out / "IMG_1.png").read_bytes()
    assert f"{tmp_path / 'cam2' / 'img_1.png'}: not predicted, its output {out / 'img_1.png'} would overwrite " \
        f"{tmp_path / 'cam1' / 'IMG_1.png'}'s result" in capsys.readouterr().err
    assert (out / "IMG_1.png").read_bytes() == first and os.path.samefile(out / "IMG_1.png", out / "img_1.png")


def test_predict_replaces_only_its_own_earlier_results(checkpoint, tmp_path, capsys):
    """`predict D/val/images --out D/val/masks` replaced the dataset's ground truth with predictions (exit 0), and
    `evaluate` then scored 100% (a helper, 2026-12-06). An existing file in the way is replaced only if resunet
    predict wrote it."""
    photos, masks = tmp_path / "images", tmp_path / "masks"
    photos.mkdir()
    masks.mkdir()
    for i in range(2):
        image, mask = good_pair(i)
        (photos / f"p{i}.png").write_bytes(image)
        (masks / f"p{i}.png").write_bytes(mask)
    truth = {path: path.read_bytes() for path in masks.iterdir()}
    assert main(["predict", checkpoint, str(photos), "--out", str(masks)]) == 1
    captured = capsys.readouterr()
    assert {path: path.read_bytes() for path in masks.iterdir()} == truth
    assert (f"resunet predict: {photos / 'p0.png'}: not predicted, its output {masks / 'p0.png'} would overwrite a "
            "file that resunet predict did not write (a dataset's mask?); give another --out or move the file"
            in captured.err)
    assert "wrote 0 prediction(s)" in captured.out and "2 input(s) failed" in captured.out
    # images/ beside masks/ is a dataset: writing there, even new names, adds to it (a helper, 2026-12-06), said.
    assert (f"resunet predict: note: --out {masks} is inside {masks.resolve()}, a folder a dataset is read from: "
            "the results will be read as its files" in captured.err)
    # Nor are they taken for finished results by --skip-existing ("2 skipped, their files already there", exit 0).
    assert main(["predict", checkpoint, str(photos), "--out", str(masks), "--skip-existing"]) == 1
    assert "2 input(s) failed" in capsys.readouterr().out
    (masks / "p1.png").unlink()  # its own result, written now, is replaced by the next run
    assert main(["predict", checkpoint, str(photos / "p1.png"), "--out", str(masks), "--overlay"]) == 0
    assert main(["predict", checkpoint, str(photos / "p1.png"), "--out", str(masks), "--overlay"]) == 0
    assert "wrote 1 prediction(s)" in capsys.readouterr().out
    assert (masks / "p0.png").read_bytes() == truth[masks / "p0.png"]


def test_predict_refuses_a_thin_strip_that_would_exhaust_memory_and_goes_on(checkpoint, tmp_path, capsys):
    Image.new("RGB", (20000, 1), (90, 120, 30)).save(tmp_path / "strip.png")
    (tmp_path / "good.png").write_bytes(good_pair(0)[0])
    assert main(["predict", checkpoint, str(tmp_path / "strip.png"), str(tmp_path / "good.png"), "--out",
                 str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "strip.png: 20000×1 pixels become" in err and "crop the image" in err
    assert (tmp_path / "out" / "good.png").is_file()


def test_a_pil_image_is_read_as_its_file_is_exif_orientation_applied(checkpoint, tmp_path):
    from resunet.predict import Predictor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 48, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: stored landscape, shown portrait
    image.save(tmp_path / "turned.jpg", exif=exif)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    from_file = predictor.predict(str(tmp_path / "turned.jpg"))
    from_pil = predictor.predict(Image.open(tmp_path / "turned.jpg"))
    assert from_file.shape == (48, 24) and (from_pil == from_file).all()


def test_evaluate_checks_its_outputs_before_the_work_and_writes_strict_json(checkpoint, demo_root, tmp_path,
                                                                             capsys, monkeypatch):
    import resunet.evaluate

    (tmp_path / "afolder").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "alink").symlink_to(tmp_path / "gone" / "worst")
    monkeypatch.setattr(resunet.evaluate, "evaluate_dataset", lambda *a, **k: pytest.fail("evaluated anyway"))
    for flags, words in ((["--json", str(tmp_path / "afolder")], "is a folder"),
                         (["--confusion", str(tmp_path / "afile" / "c.png")], "afile is a file, not a folder"),
                         (["--worst", "2", "--out", str(tmp_path / "afile")], "is a file, not a folder"),
                         (["--worst", "2", "--out", str(tmp_path / "alink" / "sheet")],
                          f"alink is a link to {tmp_path / 'gone' / 'worst'}, which does not exist")):
        assert main(["evaluate", checkpoint, "--data-root", str(demo_root), *flags]) == 2
        assert words in one_error_line(capsys, "evaluate")
    monkeypatch.undo()
    assert main(["evaluate", checkpoint, "--data-root", str(demo_root), "--json", str(tmp_path / "e.json")]) == 0
    text = (tmp_path / "e.json").read_text()
    scores = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert None in scores["iou"] and "NaN" not in text  # the demo's val split lacks some of VOC's classes
    assert all(v is None or not math.isnan(v) for v in scores["iou"])


def test_predict_an_output_one_file_cannot_take_fails_that_input_alone(checkpoint, demo_root, tmp_path, capsys):
    """A folder where one result would go failed the whole run like a full disk ("0 input(s) predicted before it",
    exit status 2) and the later inputs never ran (an audit, 2026-12-06). A write refused for that file alone is that
    input's failure, one line; the others are written; exit status 1. A full disk still stops the run (above)."""
    photos = sorted((demo_root / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))[:3]
    out = tmp_path / "pred"
    (out / f"{photos[0].stem}.png").mkdir(parents=True)
    assert main(["predict", checkpoint, *map(str, photos), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines == [f"resunet predict: {out / photos[0].stem}.png: could not write it (Is a directory)"], lines
    assert f"wrote 2 prediction(s) to {out}; 1 input(s) failed" in captured.out
    assert all(Image.open(out / f"{photo.stem}.png").size == Image.open(photo).size for photo in photos[1:])


def test_a_full_disk_after_the_work_is_one_line_and_keeps_what_was_there(checkpoint, demo_root, tmp_path, capsys,
                                                                          monkeypatch):
    """/dev/full fails every write with ENOSPC, as a full disk does; a link to it passes the checks made before the
    work (they only open the file), so the failure comes where a full disk's would: at the write."""
    import errno

    from resunet.data.images import DataError
    from resunet.outputs import write_output

    (tmp_path / "e.json").symlink_to("/dev/full")
    assert main(["evaluate", checkpoint, "--data-root", str(demo_root), "--json", str(tmp_path / "e.json")]) == 2
    captured = capsys.readouterr()
    assert "mIoU" in captured.out  # the scores were printed before the write
    assert captured.err.strip() == (f"resunet evaluate: error: {tmp_path / 'e.json'}: could not write it (No space "
                                    "left on device)")
    photo = sorted((demo_root / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))[0]
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / f"{photo.stem}.png").symlink_to("/dev/full")
    assert main(["predict", checkpoint, str(photo), "--out", str(tmp_path / "pred")]) == 2
    assert one_error_line(capsys, "predict").endswith(f"{photo.stem}.png: could not write it (No space left on "
                                                      "device); 0 input(s) predicted before it")
    # A regular file: written beside it and renamed, so a failed write leaves the old file whole and no leftovers.
    (tmp_path / "old.json").write_text('{"old": 1}')

    def half_then_full(self, text):
        Path.write_bytes(self, text[:3].encode())
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(DataError, match=r"old\.json: could not write it \(No space left on device\)$"):
        write_output(tmp_path / "old.json", '{"new": 2}')
    monkeypatch.undo()
    assert (tmp_path / "old.json").read_text() == '{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "old.json", "pred"]
    import matplotlib.pyplot as plt

    from resunet.outputs import save_figure

    (tmp_path / "c.png").symlink_to("/dev/full")
    with pytest.raises(DataError, match=r"c\.png: could not write it \(No space left on device\)$"):
        save_figure(plt.figure(), tmp_path / "c.png", dpi=50)
    assert Path("/dev/full").is_char_device()  # the link's target is left as it was


def test_a_model_with_other_classes_than_the_voc_data_is_one_line(demo_root, ram_tmp, capsys):
    from resunet.train import train

    folder = ram_tmp / "five"
    for split in ("train", "val"):
        for i in range(4):
            image, mask = good_pair(i)
            (folder / split / "images").mkdir(parents=True, exist_ok=True)
            (folder / split / "masks").mkdir(parents=True, exist_ok=True)
            (folder / split / "images" / f"p{i}.png").write_bytes(image)
            labels = np.array(Image.open(io.BytesIO(mask)))
            Image.fromarray(np.where(labels == 255, 255, labels % 5).astype(np.uint8)).save(
                folder / split / "masks" / f"p{i}.png")
    train(tiny_config(folder, ram_tmp / "run", epochs=1, batch_size=2, encoder="resnet18", num_classes=5))
    for command in ("evaluate", "calibrate"):
        assert main([command, str(ram_tmp / "run" / "best.pt"), "--data-root", str(demo_root)]) == 2
        assert "VOC has 21 classes, not the 5 expected" in one_error_line(capsys, command)


def test_window_stride_rules(checkpoint, demo_root, tmp_path, capsys):
    image = tmp_path / "p.png"
    image.write_bytes(good_pair(0)[0])
    assert main(["predict", checkpoint, str(image), "--out", str(tmp_path / "o"), "--window", "40",
                 "--stride", "26"]) == 0  # a stride under 32 is fine: the default for a 40 window is 26
    capsys.readouterr()
    assert main(["predict", checkpoint, str(image), "--out", str(tmp_path / "o"), "--window", "32", "--stride",
                 "64"]) == 2
    assert "--stride 64: needs --window, and at most the window" in one_error_line(capsys, "predict")


def test_export_never_replaces_its_checkpoint_and_names_onnx_files(checkpoint, tmp_path):
    import shutil

    from resunet.checkpoint import load_checkpoint
    from resunet.export import ExportError, run_export

    ckpt = tmp_path / "model.pt"
    shutil.copy(checkpoint, ckpt)
    with pytest.raises(ExportError, match="name the file \\*.onnx"):
        run_export(str(ckpt), str(ckpt))
    (tmp_path / "m.onnx").mkdir()
    with pytest.raises(ExportError, match="m.onnx is a folder"):
        run_export(str(ckpt), str(tmp_path / "m.onnx"))
    with pytest.raises(ExportError, match=r"--onnx .*new\.onnx/: is a folder; give a file name"):  # not a file new.onnx
        run_export(str(ckpt), f"{tmp_path / 'new.onnx'}/")
    assert not (tmp_path / "new.onnx").exists()
    with pytest.raises(ExportError, match="--calibration-count 0: at least 1 image"):
        run_export(str(ckpt), str(tmp_path / "q.onnx"), int8=True, calibration=str(tmp_path), calibration_count=0)
    # From Python as from the command line: a graph's typo (it exported a logits graph, then refused it after the
    # trace naming a temporary file) and options without what they need (ignored) are refused before any work.
    for options, words in ((dict(graph="end_to_end"), "graph 'end_to_end': choose 'end-to-end' or 'logits'"),
                           (dict(calibration=str(tmp_path)), f"--calibration {tmp_path} applies only with --int8"),
                           (dict(max_miou_drop=2.0), "--max-miou-drop 2.0 applies only with --int8"),
                           (dict(split="test"), "--split test applies only with --data-root")):
        with pytest.raises(ExportError, match=f"^{re.escape(words)}"):
            run_export(str(ckpt), str(tmp_path / "r.onnx"), **options)
    assert load_checkpoint(ckpt)["model_config"]  # still the checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "model.pt"]


def test_visualize_says_the_file_it_wrote(checkpoint, demo_root, tmp_path, capsys):
    assert main(["visualize", checkpoint, "--data-root", str(demo_root), "--out", str(tmp_path / "grid"),
                 "--count", "2"]) == 0
    assert f"wrote {tmp_path / 'grid.png'}" in capsys.readouterr().out and (tmp_path / "grid.png").is_file()
    with pytest.raises(SystemExit):
        main(["visualize", checkpoint, "--data-root", str(demo_root), "--count", "0"])
    # A folder, existing or written with a slash, is not a file name (vis.png was written beside "vis").
    (tmp_path / "vis").mkdir()
    capsys.readouterr()
    for out in (str(tmp_path / "vis"), str(tmp_path / "new") + "/"):
        assert main(["visualize", checkpoint, "--data-root", str(demo_root), "--out", out]) == 2
        assert one_error_line(capsys, "visualize").endswith(f"--out {out}: is a folder; give a file name such as "
                                                            f"{Path(out) / 'grid.png'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "vis"]


def test_the_class_legend_stays_inside_a_narrow_figure():
    """A one-image grid is 3 inches wide: a legend of 8 columns ran off both of its sides."""
    import matplotlib.pyplot as plt

    from resunet.data.classes import VOC_INFO
    from resunet.visualize import class_legend

    for width in (3, 6, 15):
        fig = plt.figure(figsize=(width, 4))
        inches = class_legend(fig, VOC_INFO, [np.arange(21, dtype=np.uint8)])
        fig.canvas.draw()
        box = fig.legends[0].get_window_extent()
        assert 0 <= box.x0 and box.x1 <= fig.bbox.x1  # every entry inside the width
        assert box.height <= inches * fig.dpi  # the height reported holds every row
        assert len(fig.legends[0].get_texts()) == 21
        plt.close(fig)


# ---- ablate ----------------------------------------------------------------------------------------------------------

def test_ablation_recipe_under_a_time_budget_is_the_budget_not_the_fitted_count():
    from resunet.ablate import recipe
    from resunet.config import TrainConfig

    requested = TrainConfig(data_root="d", epochs=40, eval_every=40, time_budget="40s")
    fitted = TrainConfig(data_root="d", epochs=6, eval_every=40, time_budget="40s")
    assert recipe(requested) == recipe(fitted)
    assert recipe(TrainConfig(data_root="d", epochs=40)) != recipe(TrainConfig(data_root="d", epochs=6))
    assert recipe(requested) != recipe(TrainConfig(data_root="d", epochs=40, eval_every=40, time_budget="50s"))


def test_tta_set_on_an_ensemble_reaches_every_member(checkpoint):
    from resunet.predict import load_ensemble

    image = np.array(Image.open(io.BytesIO(good_pair(3)[0])).convert("RGB"))
    later = load_ensemble([checkpoint, checkpoint], device="cpu", precision="fp32")
    later.set_inference(tta="flip")
    assert [member.tta for member in later.members] == ["flip", "flip"]
    at_load = load_ensemble([checkpoint, checkpoint], device="cpu", precision="fp32", tta="flip")
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    assert torch.allclose(later.probabilities(pixels), at_load.probabilities(pixels), atol=1e-6)
    with pytest.raises(ValueError, match="no model files"):
        load_ensemble([])


def test_a_hand_broken_metrics_file_is_one_line_on_resume(tmp_path):
    from resunet.train import TrainingError, read_metrics

    first = '{"epoch": 1, "train_loss": 1.0, "lr": 0.001, "val_miou": null}\n'
    (tmp_path / "metrics.jsonl").write_text(first + '{"epoch": 2, "train_lo\n')
    with pytest.raises(TrainingError, match="metrics.jsonl: line 2 is not an epoch's record"):
        read_metrics(tmp_path / "metrics.jsonl", 2)
    (tmp_path / "metrics.jsonl").write_text(first + '{"epoch": 2, "train_loss": 0.5, "lr": 0.0005}\n')
    assert read_metrics(tmp_path / "metrics.jsonl", 1) == [{"epoch": 1, "train_loss": 1.0, "lr": 0.001,
                                                            "val_miou": None}]
    # Found by a helper: a line without what the curves draw (or a string there, or an epoch of 1e999) was read,
    # and the resumed run stopped at its first drawing with a traceback, at every resume.
    for edited, words in (('{"epoch": 2, "train_loss": 0.5}', "'lr'"),
                          ('{"epoch": 2, "train_loss": 0.5, "lr": "1e-4"}', "lr '1e-4' is not a number"),
                          ('{"epoch": 2, "train_loss": 0.5, "lr": 0.1, "val_miou": "high"}', "val_miou 'high'"),
                          ('{"epoch": 1e999, "train_loss": 0.5, "lr": 0.1}', "infinity")):
        (tmp_path / "metrics.jsonl").write_text(first + edited + "\n")
        with pytest.raises(TrainingError, match=f"metrics.jsonl: line 2 is not an epoch's record \\(.*{words}"):
            read_metrics(tmp_path / "metrics.jsonl", 2)


def test_a_run_folder_given_as_the_model_says_so(trained_run, capsys, tmp_path):
    (tmp_path / "p.png").write_bytes(good_pair(0)[0])
    assert main(["predict", str(trained_run), str(tmp_path / "p.png"), "--out", str(tmp_path / "o")]) == 2
    err = one_error_line(capsys, "predict")
    assert f"{trained_run}: a folder, not a checkpoint file; give the .pt file itself (it holds best.pt" in err


def test_a_damaged_or_misnamed_model_file_says_what_it_is(trained_run, exported, tmp_path, capsys):
    """Found by an audit: every checkpoint torch.load refused got "not a readable resunet checkpoint (RuntimeError)",
    and a checkpoint named .onnx got onnxruntime's "Protobuf parsing failed": the line now says what the file is."""
    good = (trained_run / "best.pt").read_bytes()
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole model object, as torch.save(model) writes
    files = {"empty.pt": b"", "cut.pt": good[: len(good) // 2], "ckpt.onnx": good, "empty.onnx": b"",
             "model.pt": (exported["dir"] / "model.onnx").read_bytes()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "p.png").write_bytes(good_pair(0)[0])
    for name, words in (
            ("empty.pt", "not a readable resunet checkpoint (an empty file: a save or copy cut short?)"),
            ("cut.pt", "not a readable resunet checkpoint (its zip archive is cut short or damaged: a save, copy or "
                       "download cut short?)"),
            ("module.pt", "not a readable resunet checkpoint (it holds Python objects, such as a whole model, which "
                          "are not loaded (they could run code); resunet's files hold tensors and settings only)"),
            ("model.pt", "an exported ONNX model, not a resunet checkpoint: predict, evaluate, visualize and serve "
                         "take it named .onnx; train, calibrate and export need the .pt it was exported from"),
            ("ckpt.onnx", "not a readable ONNX file (it is a zip archive, as a PyTorch checkpoint is: name a resunet "
                          "checkpoint .pt)"),
            ("empty.onnx", "not a readable ONNX file (an empty file: an export or copy cut short?)")):
        assert main(["predict", str(tmp_path / name), str(tmp_path / "p.png"), "--out", str(tmp_path / "o")]) == 2
        assert f"{tmp_path / name}: {words}" in one_error_line(capsys, "predict")
    assert main(["calibrate", str(tmp_path / "model.pt"), "--data-root", str(tmp_path)]) == 2
    assert "model.pt: an exported ONNX model, not a resunet checkpoint" in one_error_line(capsys, "calibrate")
    # A file the system will not let it read (as root here, chmod cannot show it): the system's reason.
    from resunet.checkpoint import unreadable_reason

    assert unreadable_reason(tmp_path / "cut.pt", PermissionError(13, "Permission denied")) == "Permission denied"


def test_exporting_a_file_that_is_no_checkpoint_makes_no_folder(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    assert main(["export", str(tmp_path / "junk.pt"), "--onnx", str(tmp_path / "n" / "x.onnx")]) == 2
    assert "junk.pt: not a readable resunet checkpoint" in one_error_line(capsys, "export")
    assert not (tmp_path / "n").exists()  # the --onnx folder was made before the checkpoint was read


def test_int8_calibration_skips_an_unreadable_image_and_names_it(tmp_path, capsys):
    from resunet.export import ExportError, calibration_images

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"good_{i}.png").write_bytes(good_pair(i)[0])
    (folder / "broken.png").write_bytes(good_pair(9)[0][:100])
    images = calibration_images(folder, 4)
    assert len(images) == 3 and all(image.shape == (32, 32, 3) for image in images)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "calibration: skipped" in err and "broken.png" in err
    # Fewer asked for than the folder holds: a skipped pick is replaced by another photo (broken.png, picked first,
    # left one image where two were asked; a folder of good and bad ones was refused; a helper's audit, 2026-12-07)
    picked = calibration_images(folder, 2)
    assert len({image.tobytes() for image in picked}) == 2 <= len(images)
    assert {image.tobytes() for image in picked} <= {image.tobytes() for image in images}
    assert "broken.png" in capsys.readouterr().err
    for path in folder.glob("good_*"):
        path.write_bytes(b"")
    with pytest.raises(ExportError, match="none of the 4 calibration images could be used"):
        calibration_images(folder, 4)


def test_int8_calibration_spreads_over_the_list_and_skips_what_the_model_cannot_take(tmp_path, capsys):
    """Under twice the count, the first files were taken (a step of len // count); a 5000×1 strip was taken and
    failed the quantisation after the export, with no file named (found by a helper)."""
    from resunet.export import ExportError, calibration_images

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    assert [image[0, 0, 0] for image in calibration_images(folder, 3)] == [0, 80, 200]  # 0.png, 2.png, 5.png
    Image.new("RGB", (5000, 1)).save(folder / "9_strip.png")
    assert len(calibration_images(folder, 7, size=64)) == 6
    err = capsys.readouterr().err
    assert err.strip() == (f"calibration: skipped {folder / '9_strip.png'}: 5000×1 pixels become 320000×64 at working "
                           "size 64, more than 16,000,000 pixels: crop the image or split it")
    with pytest.raises(ExportError, match="--calibration .*0.png: a file; give a folder of images"):
        calibration_images(folder / "0.png", 3)


def test_a_budgeted_run_resumed_past_epoch_1s_middle_says_how_it_timed_it(demo_root, ram_tmp, capsys, monkeypatch):
    from resunet.train import train
    from test_faults import SMALL, signal_after_step

    run = ram_tmp / "run"
    signal_after_step(monkeypatch, 8)  # of 12: past the middle, where the second half's timing starts
    assert train(tiny_config(demo_root, run, epochs=3, time_budget="1h", **SMALL))["stopped_by"] == "SIGTERM"
    monkeypatch.undo()
    capsys.readouterr()
    train(tiny_config(demo_root, run, epochs=3, time_budget="1h", resume=str(run / "last.pt"), **SMALL))
    out = capsys.readouterr().out
    assert "(its second half not timed alone: the run resumed past its middle)" in out
    assert "at the pace of its second half" not in out


# ---- the Python API: a clear ValueError at the call, not a failure deep inside ------------------------------------

def test_api_inputs_are_checked_where_they_are_given(checkpoint):
    from resunet.predict import Predictor, load_ensemble

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for settings in (dict(tta="ms", scales=(float("nan"),)), dict(tta="ms", scales=(float("inf"),)),
                     dict(scales=1.0), dict(scales=("a",)), dict(window=64.5), dict(window="64"),
                     dict(window=64, stride=10.5), dict(window=64, stride=0), dict(stride=20)):
        with pytest.raises(ValueError):
            predictor.set_inference(**settings)
    predictor.set_inference(window=np.int64(64), scales=[np.float32(1.0)])  # numpy numbers are numbers
    predictor.set_inference()
    for batch, words in (([], "non-empty list"), ([image[..., 0]], "image 0 is not an H×W×3 uint8"),
                         ([image.astype(np.float32)], "image 0 is not an H×W×3 uint8"),
                         (["photo.png"], "image 0 is not"), ([image, image[:0]], "image 1 is empty")):
        with pytest.raises(ValueError, match=words):
            predictor.predict_batch(batch)
    with pytest.raises(ValueError, match="do not share a batch_key"):
        predictor.predict_batch([image, image[:10, :20]])
    with pytest.raises(ValueError, match="an empty image"):
        predictor.predict(np.zeros((0, 5, 3), np.uint8))
    for wrong in (image, torch.from_numpy(image), torch.from_numpy(image).permute(2, 0, 1)):
        for method in (predictor.probabilities, predictor.logits, predictor.predict_tensor):
            with pytest.raises(ValueError, match="expected an N×3×H×W image tensor"):
                method(wrong)
    # torchvision's 0..1 floats were read as nearly black 0..255 images: wrong maps without a word
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    # resized bicubic, as torchvision's pipelines do after ToDtype(scale=True), they overshoot 1 a little and were
    # read as a black frame (a helper's audit, 2026-12-07); torchvision's 16-bit decode (uint16) raised torch's own
    # "min_all not implemented"
    overshot = torch.nn.functional.interpolate(pixels.float() / 255, scale_factor=1.5, mode="bicubic")
    assert 1 < float(overshot.max()) <= 2
    for method in (predictor.probabilities, predictor.logits, predictor.predict_tensor):
        for scaled in (pixels.float() / 255, overshot):
            with pytest.raises(ValueError, match=r"got floats from \S+ to \S+, scaled to 0\.\.1: pass \(images \* "
                                                 r"255\)"):
                method(scaled)
        with pytest.raises(ValueError, match=r"got uint16: scale them to 0\.\.255 \(a 16-bit image: // 257\)"):
            method(pixels.to(torch.uint16) * 257)
        with pytest.raises(ValueError, match=r"^expected pixels 0\.\.255 \(uint8 or float\), got bool$"):
            method(pixels > 127)  # a mask, likely: it was read as a black frame (a helper's audit, 2026-12-07)
    assert torch.equal(predictor.predict_tensor(pixels.float()), predictor.predict_tensor(pixels))  # float 0..255
    # torchvision's Normalize output and 16-bit frames were taken too: divided by 255 again (a nearly flat image),
    # or cast to uint8 by an ONNX graph (300 -> 44), without a word (a helper's review, 2026-12-07)
    normalised = (pixels.float() / 255 - 0.45) / 0.225
    for method in (predictor.probabilities, predictor.logits, predictor.predict_tensor):
        with pytest.raises(ValueError, match=r"got floats from -2\.\d\d to 2\.\d\d, normalised already: pass the "
                                             r"0\.\.255 pixels"):
            method(normalised)
        with pytest.raises(ValueError, match=r"got integers from 0 to 65535: scale them to 0\.\.255"):
            method(pixels.int() * 257)
        # ... and as floats, a 16-bit frame or a Caffe-style mean taken off: PyTorch took them as they were, an
        # end-to-end graph clamped them (62% of the pixels differed; a helper's audit, 2026-12-07); NaN too
        for wrong in (pixels.float() * 257, pixels.float() - 100, torch.full((1, 3, 8, 8), float("nan"))):
            span = f"{float(wrong.min()):.6g} to {float(wrong.max()):.6g}"  # 0 to 65535, -100 to 155, nan to nan
            with pytest.raises(ValueError, match=rf"got floats from {span}: scale them to 0\.\.255 \(a 16-bit image: "
                                                 r"/ 257\), with no mean taken off"):
                method(wrong)
    dark = pixels.float() * 0.03 - 0.6  # a dark 0..255 frame resized bicubic: it dips under 0, and is taken
    assert predictor.predict_tensor(dark).shape == (1, *pixels.shape[2:])
    assert predictor.predict_tensor(torch.zeros(1, 3, 8, 8)).shape == (1, 8, 8)  # black is black in both scales
    assert load_ensemble(checkpoint, device="cpu", precision="fp32").predict(image).shape == (37, 53)


def test_the_tensor_methods_give_ordinary_tensors_and_check_the_group_methods_input(checkpoint):
    """Found by a helper (2026-12-06): logits and full_size_maps returned inference tensors (an in-place change, or
    a temperature fitted through them by autograd, raised); full_size_maps took a bare tensor (iterated over its
    batch) and 0..1 floats (read as nearly black) without a word; colorize took no tensor, and a batch of maps
    failed inside Pillow."""
    import torch.nn.functional as F

    from resunet.predict import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 40, 48), dtype=np.uint8))
    logits = predictor.logits(pixels)
    logits -= logits.amax(1, keepdim=True)  # in place
    assert float(logits.max()) == 0
    temperature = torch.ones((), requires_grad=True)
    labels = predictor.predict_tensor(pixels)
    F.cross_entropy(predictor.logits(pixels) / temperature, labels).backward()
    assert temperature.grad is not None
    (maps, confidence), = predictor.full_size_maps([pixels], confidence=True)
    maps[maps == 0] = 1
    confidence *= 2
    for method in (predictor.full_size_maps, predictor.logits_by_group):
        with pytest.raises(ValueError, match="expected a list of N×3×H×W image tensors .*wrap a single tensor"):
            method(pixels)
        with pytest.raises(ValueError, match=r"scaled to 0\.\.1: pass \(images \* 255\)"):
            method([pixels.float() / 255])
    first = labels[0]
    assert np.array_equal(np.array(predictor.colorize(first)), first.numpy())  # a tensor's map
    for wrong, words in ((labels.numpy(), "one H×W class map of integers .*got int64 2×40×48"),
                         (predictor.probabilities(pixels)[0, 0].numpy(), "got float32 40×48"),
                         (first.numpy() + 300, "class ids 300..")):
        with pytest.raises(ValueError, match=words):
            predictor.colorize(wrong)


def test_a_deep_grey_pil_image_is_read_as_its_file_is(tmp_path, checkpoint):
    from resunet.data.images import read_image
    from resunet.predict import as_uint8_rgb

    grey = ((np.arange(4096).reshape(64, 64) % 256) * 257).astype(np.int32)
    Image.fromarray(grey, mode="I").save(tmp_path / "deep.tiff")
    Image.fromarray((grey / 65535).astype(np.float32), mode="F").save(tmp_path / "unit.tiff")
    for name, array in (("deep.tiff", grey), ("unit.tiff", (grey / 65535).astype(np.float32))):
        from_file = read_image(tmp_path / name)
        assert (as_uint8_rgb(Image.open(tmp_path / name)) == from_file).all(), name
        assert from_file.max() == 255 and from_file.min() == 0
        # The same pixels as an array: read as the file is (refused, though the message said H×W grey was taken)
        assert (as_uint8_rgb(array) == from_file).all(), name
    assert (as_uint8_rgb(grey.astype(np.uint16)) == read_image(tmp_path / "deep.tiff")).all()
    # A dark 16-bit frame (every value under 256) stays dark, as its file does: a uint16 array must reach PIL as
    # I;16, whose scale is known, not as I, whose scale is guessed from the values (257× too bright here)
    dark = np.full((16, 20), 200, np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark.png")  # a 16-bit PNG
    assert read_image(tmp_path / "dark.png").max() == 1 and as_uint8_rgb(dark).max() == 1


def test_the_working_size_bounds_datasets_at_16_million_pixels_and_the_service_at_16_working_squares():
    """A 3000×2 PNG of 108 bytes became 96×144,000 at size 96: under the 16M bound, it took 35 s and 6 GB in the
    service, and eight at once 21 GB (found by a helper, 2026-12-05). The service takes 16 working squares at most;
    datasets and predict keep the 16M bound (a long val image is data: review, 2026-12-05)."""
    from resunet.data.images import DataError
    from resunet.predict import check_working_size, max_working_pixels

    assert max_working_pixels(64) == 16 * 64 * 64 and max_working_pixels(2000) == 16_000_000
    check_working_size(2, 3000, 96)  # 96×144,000: a dataset's or predict's image may be that long
    check_working_size(64, 1024, 64, max_working_pixels(64))  # 64×1024: 16 squares, what the service takes
    check_working_size(2, 2, 512, max_working_pixels(512))  # scaled up to 512×512
    with pytest.raises(DataError, match=r"^1025×64 pixels become 1025×64 at working size 64, more than 65,536 pixels "
                                        r"\(16 × 64², an image 16 times as long as wide\): crop the image or split it$"):
        check_working_size(64, 1025, 64, max_working_pixels(64))
    with pytest.raises(DataError, match=r"become 1000×16001 at working size 1000, more than 16,000,000 pixels: crop"):
        check_working_size(16001, 1000, 1000)


def test_the_end_to_end_onnx_graph_refuses_a_thin_strip_too(exported):
    from resunet.data.images import DataError
    from resunet.predict import load

    predictor = load(exported["dir"] / "model.onnx")
    with pytest.raises(DataError, match="pixels become"):
        predictor.predict(np.zeros((1, 20000, 3), np.uint8))
    with pytest.raises(ValueError, match="a batch of one size"):
        predictor.predict_batch([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)])
    assert predictor.predict(np.zeros((8, 9, 3), np.uint8)).shape == (8, 9)


def test_the_end_to_end_graph_refuses_an_image_whose_full_size_logits_would_not_fit(exported, demo_root,
                                                                                      monkeypatch):
    """An 8000×8000 image through an end-to-end graph took 7 GB (its full-size logits: 21 floats a pixel), 17× the
    .pt Predictor's fused path. Past the bound it is one line; the logits graph takes the same image."""
    from fastapi.testclient import TestClient

    import resunet.onnx_predictor
    from resunet.data.images import DataError
    from resunet.predict import load
    from resunet.serve import ServeSettings, create_app

    monkeypatch.setattr(resunet.onnx_predictor, "END_TO_END_MAX_LOGIT_BYTES", 21 * 4 * 100 * 100)  # 100×100 images
    predictor = load(exported["dir"] / "model.onnx")
    assert predictor.predict(np.zeros((100, 100, 3), np.uint8)).shape == (100, 100)
    with pytest.raises(DataError, match="101×100: this end-to-end graph would hold 0.01 GiB of full-size logits "
                                        "\\(limit 0.00 GiB\\); export with --logits"):
        predictor.predict(np.zeros((100, 101, 3), np.uint8))
    # At the real limit (2 GiB) a 5200×5000 photo's 2.03 GiB read "2.0 GiB (limit 2 GiB)": within it, seemingly
    monkeypatch.setattr(resunet.onnx_predictor, "END_TO_END_MAX_LOGIT_BYTES", 2 * 2**30)
    with pytest.raises(DataError, match=r"^5200×5000: this end-to-end graph would hold 2\.04 GiB of full-size logits "
                                        r"\(limit 2\.00 GiB\)"):
        predictor.check_size(5000, 5200)
    monkeypatch.setattr(resunet.onnx_predictor, "END_TO_END_MAX_LOGIT_BYTES", 21 * 4 * 100 * 100)
    # Images that fit one by one fit in a batch too, run in parts: the service batches concurrent requests of one
    # size, and eight 2000×2000 photos (each fine alone) were answered 500 (found by a helper, 2026-12-05).
    photos = sorted((demo_root / "VOCdevkit/VOC2012/JPEGImages").glob("demo_val_*.jpg"))[:3]
    images = [np.asarray(Image.open(photo).convert("RGB")) for photo in photos]  # 64×64: two a run, then one
    alone = [predictor.predict(image) for image in images]
    assert len({mask.tobytes() for mask in alone}) == 3
    assert all(np.array_equal(a, b) for a, b in zip(predictor.predict_batch(images), alone, strict=True))
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    assert np.array_equal(predictor.predict_tensor(tensor).numpy(), np.stack(alone))
    # Asked for the logits (evaluate's probabilities, ECE), a batch's are held at once: it must fit as a whole
    # (review, 2026-12-05: joining the parts undid the bound).
    with pytest.raises(DataError, match="full-size logits"):
        predictor.logits_by_group([tensor])
    assert [part.shape for part in predictor.logits_by_group([tensor[:2]])] == [(2, 21, 64, 64)]
    assert load(exported["dir"] / "logits.onnx").predict(np.zeros((100, 101, 3), np.uint8)).shape == (100, 101)
    buffer = io.BytesIO()
    Image.new("RGB", (101, 100)).save(buffer, format="PNG")
    with TestClient(create_app(exported["dir"] / "model.onnx", ServeSettings())) as client:
        answer = client.post("/predict", content=buffer.getvalue())
    assert answer.status_code == 413 and "full-size logits" in answer.json()["error"]


def test_calibrate_on_a_split_with_no_labelled_pixel_keeps_the_stored_temperature(checkpoint, demo_root, tmp_path,
                                                                                   capsys):
    import shutil

    from resunet.checkpoint import load_checkpoint, save_checkpoint

    ckpt = tmp_path / "model.pt"
    payload = load_checkpoint(checkpoint)
    payload["temperature"] = 0.5
    save_checkpoint(payload, ckpt)
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    masks = data / "VOCdevkit/VOC2012/SegmentationClass"
    for name in (data / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split():
        mask = Image.open(masks / f"{name}.png")
        mask.paste(255, (0, 0, *mask.size))  # every pixel the ignore label
        mask.save(masks / f"{name}.png")
    before = ckpt.read_bytes()
    assert main(["calibrate", str(ckpt), "--data-root", str(data)]) == 2
    assert "no labelled pixels in 8 image(s)" in one_error_line(capsys, "calibrate")
    assert ckpt.read_bytes() == before


def test_demo_data_never_rewrites_a_real_datasets_split_lists(tmp_path, capsys):
    from resunet.data.demo import make_demo_dataset

    voc = make_demo_dataset(tmp_path / "d", train=2, val=1, size=32)
    make_demo_dataset(tmp_path / "d", train=3, val=1, size=32)  # a demo dataset may be written again
    lists = voc / "ImageSets" / "Segmentation"
    assert len((lists / "train.txt").read_text().split()) == 3
    (lists / "train.txt").write_text("2007_000032\n")
    assert main(["demo-data", str(tmp_path / "d"), "--train", "2", "--val", "1", "--size", "32"]) == 2
    assert "lists images that are not demo images" in one_error_line(capsys, "demo-data")
    assert (lists / "train.txt").read_text() == "2007_000032\n"
    for flags in (["--size", "8"], ["--train", "-3"], ["--val", "0"], ["--size", "20000"]):  # 9 GiB an image
        with pytest.raises(SystemExit):
            main(["demo-data", str(tmp_path / "e"), *flags])
    assert not (tmp_path / "e").exists() and "must be 16 to 4096 pixels, got 20000" in capsys.readouterr().err
    # Found by a helper (2026-12-07): a folder dataset was taken over (--data-root then read the demo tree), and a
    # file where the folder goes was a traceback
    own = tmp_path / "own"
    for part in ("train/images", "train/masks"):
        (own / part).mkdir(parents=True)
    (own / "classes.json").write_text("{}")
    assert main(["demo-data", str(own), "--train", "2", "--val", "1", "--size", "32"]) == 2
    assert one_error_line(capsys, "demo-data").endswith(f"{own}: holds a dataset of its own (classes.json, train/), "
                                                        f"which --data-root {own} would no longer read beside a demo "
                                                        "VOC tree; write the demo dataset elsewhere")
    (tmp_path / "afile").write_text("")
    assert main(["demo-data", str(tmp_path / "afile"), "--train", "2", "--val", "1", "--size", "32"]) == 2
    assert f"afile: cannot make the dataset's folders there (" in one_error_line(capsys, "demo-data")
    assert sorted(p.name for p in own.iterdir()) == ["classes.json", "train"]


def test_a_checkpoint_that_cannot_be_rewritten_gives_the_callers_advice(tmp_path, monkeypatch):
    from resunet import checkpoint

    def refused(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(checkpoint.torch, "save", refused)
    with pytest.raises(checkpoint.CheckpointError, match="Operation not permitted.*no m.pt was written; make it "
                                                         "writable$"):
        checkpoint.save_checkpoint({"n": 1}, tmp_path / "m.pt", advice="make it writable")


def test_check_data_visualize_and_download_outputs_and_roots_are_one_line(demo_root, checkpoint, tmp_path, capsys):
    import shutil

    (tmp_path / "afolder").mkdir()
    (tmp_path / "afile").write_text("x")
    for flags in (["--json", str(tmp_path / "afolder")], ["--plot", str(tmp_path / "afolder")],
                  ["--plot", str(tmp_path / "p.xyz")]):
        assert main(["check-data", "--data-root", str(demo_root), *flags]) == 2
        assert one_error_line(capsys, "check-data").startswith(f"resunet check-data: error: {flags[0]} ")
    for flags in (["--num-classes", "0"], ["--max-pixels", "0"]):
        with pytest.raises(SystemExit):
            main(["check-data", "--data-root", str(demo_root), *flags])
    assert "argument --max-pixels: must be at least 1" in capsys.readouterr().err
    assert main(["download", "voc", "--root", str(tmp_path / "afile")]) == 2
    assert f"--root {tmp_path / 'afile'}: is a file, not a folder" in one_error_line(capsys, "download")
    assert main(["visualize", checkpoint, "--data-root", str(demo_root), "--out", str(tmp_path / "g.xyz")]) == 2
    assert "g.xyz: name a .png/.pdf/.svg/.jpg file" in one_error_line(capsys, "visualize")
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    (data / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").write_bytes(b"demo_val_00000\n\xff\xfe\n")
    assert main(["check-data", "--data-root", str(data)]) == 2
    assert "val.txt: not a readable split file" in one_error_line(capsys, "check-data")
    (data / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").write_text("")
    assert main(["visualize", checkpoint, "--data-root", str(data), "--out", str(tmp_path / "g.png")]) == 2
    assert "val.txt: lists no images" in one_error_line(capsys, "visualize")  # the list named, before any work


@pytest.mark.parametrize("description, words", [
    ({"classes": ["bg", "a", "b"], "ignore_index": 1}, "ignore index 1 is also class 'a'"),
    ({"classes": ["bg", "a", "a"]}, "class name(s) 'a' given twice"),
    ({"classes": ["bg", "a"], "ignore_index": 300}, "ignore index 300 must be 0..255 (masks are uint8)"),
    ({"classes": ["bg", "a"], "ignore_index": -1}, "ignore index -1 must be 0..255"),
    ({"classes": [f"c{i}" for i in range(300)]}, "300 classes; a uint8 mask holds at most 255 and the ignore label"),
    ({"classes": []}, "no classes"),
    # Read silently as the later class, or as ignore (CamVid's ignore colour is black: a black class was lost)
    ({"classes": ["bg", "a"], "palette": [[9, 9, 9], [9, 9, 9]]}, "classes 'bg' and 'a' have the same colour [9, 9"),
    ({"classes": ["bg", "a"], "palette": [[0, 0, 0], [9, 9, 9]], "ignore_colour": [0, 0, 0]},
     "class 'bg' has the ignore colour [0, 0, 0]"),
    # -1 wrapped round to 255 (another class's colour); 256 and a 2-value colour stopped the read with a traceback
    ({"classes": ["bg", "a"], "palette": [[-1, 0, 0], [9, 9, 9]]}, "colour [-1, 0, 0] of 'bg' is not three values"),
    ({"classes": ["bg", "a"], "palette": [[256, 0, 0], [9, 9, 9]]}, "colour [256, 0, 0] of 'bg' is not three values"),
    ({"classes": ["bg", "a"], "palette": [[1, 2], [9, 9, 9]]}, "colour [1, 2] of 'bg' is not three values"),
    # JSON's Infinity stopped the read with a traceback, 254.7 was read as 254 and "255" as the colour (2, 5, 5)
    ({"classes": ["bg", "a"], "ignore_index": float("inf")}, "ignore_index inf is not a whole number"),
    ({"classes": ["bg", "a"], "ignore_index": 254.7}, "ignore_index 254.7 is not a whole number"),
    ({"classes": ["bg", "a"], "palette": [[0, 0, float("inf")], [9, 9, 9]]},
     "colour [0, 0, inf] of 'bg' is not three whole numbers in 0..255"),
    ({"classes": ["bg", "a"], "palette": ["000", "255"]},
     "colour '000' of 'bg' is not a list of three values in 0..255, such as [128, 0, 0]"),
    ({"classes": ["bg", "a"], "palette": ["#000000", "#ff0000"]}, "colour '#000000' of 'bg' is not a list of three"),
    ({"classes": ["bg", "a"], "ignore_colour": [300, 0, 0]}, "colour [300, 0, 0] of 'ignore_colour' is not three"),
])
def test_classes_no_mask_can_hold_apart_are_refused(tmp_path, capsys, description, words):
    root = tmp_path / "data"
    for folder in ("images", "masks"):
        (root / "train" / folder).mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps(description))
    assert main(["check-data", "--data-root", str(root)]) == 2
    assert words in one_error_line(capsys, "check-data")
    (root / "classes.json").unlink()
    assert main(["check-data", "--data-root", str(root), "--num-classes", "3", "--ignore-index", "2"]) == 2
    assert "ignore index 2 is also class 'class_2'" in one_error_line(capsys, "check-data")


def test_images_or_masks_sharing_a_name_are_refused_not_paired_at_random(tmp_path, capsys):
    from resunet.data.dataset import open_dataset
    from resunet.data.images import DataError
    from test_doctor import clean_dataset, picture, save

    root = clean_dataset(tmp_path / "data")
    save(picture(7), root / "train" / "images" / "good_0.jpg", quality=95)  # beside good_0.png: whose mask?
    out = tmp_path / "run"
    assert main(["train", "--data-root", str(root), "--num-classes", "4", "--epochs", "1", "--out", str(out),
                 "--no-pretrained", "--device", "cpu"]) == 2
    assert "train/images/good_0.png: same name as good_0.jpg" in one_error_line(capsys, "train")  # the doctor's
    with pytest.raises(DataError, match="good_0.jpg and good_0.png share the name 'good_0'"):  # and the dataset's
        open_dataset(str(root), "train", 4)
    (root / "train" / "images" / "good_0.jpg").unlink()
    save(picture(8), root / "val" / "masks" / "good_1.bmp")
    with pytest.raises(DataError, match="good_1.bmp and good_1.png share the name"):
        open_dataset(str(root), "val", 4)


def test_commands_that_need_the_checkpoint_say_so_when_given_the_onnx_file(exported, demo_root, tmp_path, capsys):
    onnx_file = str(exported["dir"] / "model.onnx")
    assert main(["calibrate", onnx_file, "--data-root", str(demo_root)]) == 2
    assert "an exported ONNX model; this command needs the resunet checkpoint (.pt)" in one_error_line(capsys,
                                                                                                      "calibrate")
    assert main(["export", onnx_file, "--onnx", str(tmp_path / "again.onnx")]) == 2
    assert "needs the resunet checkpoint (.pt)" in one_error_line(capsys, "export")


def test_evaluate_on_a_split_with_no_labelled_pixel_says_there_is_nothing_to_score(checkpoint, demo_root, tmp_path,
                                                                                     capsys):
    """Every val mask pixel the ignore label: evaluate printed "mIoU nan" and exited 0 without a word of why (found
    by a helper, 2026-12-05); train refuses such a split."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    voc = data / "VOCdevkit/VOC2012"
    names = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    for name in names:
        mask = Image.open(voc / "SegmentationClass" / f"{name}.png")
        Image.new("L", mask.size, 255).save(voc / "SegmentationClass" / f"{name}.png")  # grey: indices as they are
    assert main(["evaluate", checkpoint, "--data-root", str(data), "--json", str(tmp_path / "e.json")]) == 2
    assert one_error_line(capsys, "evaluate").endswith(
        f"every mask pixel of its {len(names)} image(s) is the ignore label 255: nothing to score")
    assert not (tmp_path / "e.json").exists()


def test_a_command_refused_after_its_outputs_were_checked_leaves_no_folder(checkpoint, tmp_path, capsys):
    """Checking an output made its missing folders (2026-12-05): evaluate, export and visualize refused for a dataset
    that does not open left empty --json/--confusion/--out/--onnx folders behind."""
    missing = str(tmp_path / "no-dataset")
    new = tmp_path / "new"
    for command, flags in (
            ("evaluate", ["--json", str(new / "a" / "e.json"), "--confusion", str(new / "b" / "c.png"), "--worst", "2",
                          "--out", str(new / "worst")]),
            ("export", ["--onnx", str(new / "c" / "m.onnx"), "--json", str(new / "d" / "e.json")]),
            ("visualize", ["--out", str(new / "e" / "grid.png")])):
        assert main([command, checkpoint, "--data-root", missing, *flags]) == 2, command
        assert "no-dataset" in one_error_line(capsys, command)
        assert not new.exists(), (command, [str(p) for p in new.rglob("*")])


def test_outputs_are_checked_before_the_work_and_never_written_over_inputs(checkpoint, demo_root, tmp_path, capsys,
                                                                          monkeypatch):
    """Found by a helper (2026-12-04): evaluate wrote its JSON over the checkpoint, visualize its grid over a dataset
    image, an unwritable or missing folder was found only after the whole evaluation (a traceback, the work lost)."""
    import shutil

    import resunet.evaluate

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    model = tmp_path / "m.pt"
    shutil.copy(checkpoint, model)
    kept = model.read_bytes()
    voc = data / "VOCdevkit/VOC2012"
    first_val = (voc / "ImageSets/Segmentation/val.txt").read_text().split()[0]
    mask = voc / "SegmentationClass" / f"{first_val}.png"
    monkeypatch.setattr(resunet.evaluate, "evaluate_dataset", lambda *a, **k: pytest.fail("evaluated anyway"))
    for flags, words in (
            (["--json", str(model)], "is one of this command's inputs; writing there would destroy it"),
            (["--confusion", str(mask)], "a folder the dataset is read from"),
            (["--json", str(tmp_path / "x.png"), "--confusion", str(tmp_path / "x.png")], "also given to --json"),
            (["--confusion", str(tmp_path / "c.jpgx")], "name a .png/.pdf/.svg/.jpg file"),
            (["--confusion", str(tmp_path / "c")], "name a .png/.pdf/.svg/.jpg file"),
            (["--json", "/sys/fs/e.json"], "--json /sys/fs/e.json: cannot write in /sys/fs"),
            # A final slash was dropped: a file named evj written, "wrote evj/" (a helper's audit, 2026-12-07)
            (["--json", f"{tmp_path / 'evj'}/"], f"--json {tmp_path / 'evj'}/: is a folder; give a file name"),
            (["--worst", "2", "--out", "/sys/fs/worst"], "--out /sys/fs/worst: cannot write in /sys/fs/worst"),
            # The JSON was written as a file where the sheets' folder was to be made: a traceback after the work.
            (["--json", str(tmp_path / "w"), "--worst", "1", "--out", str(tmp_path / "w")],
             f"--out {tmp_path / 'w'}: --json {tmp_path / 'w'} is written as a file there"),
            (["--confusion", str(tmp_path / "c.png"), "--worst", "1", "--out", str(tmp_path / "c.png" / "sheets")],
             "the folder of the worst images cannot be a file too")):
        assert main(["evaluate", str(model), "--data-root", str(data), *flags]) == 2, flags
        assert words in one_error_line(capsys, "evaluate"), flags
    assert model.read_bytes() == kept
    monkeypatch.undo()
    # A missing folder is made, and each file written is named.
    out = tmp_path / "new" / "deeper"
    assert main(["evaluate", str(model), "--data-root", str(data), "--json", str(out / "e.json"), "--confusion",
                 str(out / "c.png")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'e.json'}" in printed and f"wrote {out / 'c.png'}" in printed
    assert json.loads((out / "e.json").read_text())["images"] > 0 and (out / "c.png").stat().st_size > 0
    image = voc / "JPEGImages" / f"{first_val}.jpg"
    image_bytes = image.read_bytes()
    assert main(["visualize", str(model), "--data-root", str(data), "--out", str(image)]) == 2
    assert "a folder the dataset is read from" in one_error_line(capsys, "visualize")
    assert image.read_bytes() == image_bytes
    assert main(["export", str(model), "--onnx", str(tmp_path / "m.onnx"), "--json", str(tmp_path / "m.onnx")]) == 2
    assert "--json " in one_error_line(capsys, "export") and not (tmp_path / "m.onnx").exists()
    assert main(["export", str(model), "--onnx", str(tmp_path / "m.onnx"), "--json", "/sys/fs/e.json"]) == 2
    assert "cannot write in /sys/fs" in one_error_line(capsys, "export") and not (tmp_path / "m.onnx").exists()
    assert main(["benchmark", "--quick", "--json", str(tmp_path)]) == 2  # before minutes of measuring
    assert "is a folder; give a file name" in one_error_line(capsys, "benchmark")
    assert main(["check-data", "--data-root", str(data), "--json", f"{tmp_path / 'report'}/"]) == 2
    said = one_error_line(capsys, "check-data")
    assert said.endswith(f"--json {tmp_path / 'report'}/: is a folder; give a file name")
    assert not (tmp_path / "evj").exists() and not (tmp_path / "report").exists()


@pytest.mark.parametrize("command, words", [
    (["evaluate", "M", "--data-root", "D", "--out", "w"], "--out DIR is the folder for --worst K's contact sheet"),
    (["evaluate", "M", "--data-root", "D", "--scales", "0.5,1"], "--scales is for --tta ms or ms+flip"),
    # the default's own value, given with flip: accepted and ignored, as no other value was
    (["evaluate", "M", "--data-root", "D", "--tta", "flip", "--scales", "0.75,1,1.25,1.5"],
     "--scales is for --tta ms or ms+flip (--tta is flip)"),
    (["predict", "M.onnx", "x.png", "--out", "o", "--backend", "auto"],
     "--backend auto chooses how a .pt checkpoint runs (auto: it or a file exported from it); M.onnx is an exported "
     "file, which runs in onnxruntime"),
    (["predict", "M.onnx", "x.png", "--out", "o", "--backend", "torch"], "--backend torch chooses how a .pt"),
    (["export", "M", "--onnx", "m.onnx", "--workers", "4"], "--workers 4 applies only with --data-root"),
    (["ablate", "--data-root", "D", "--options", ";"], "--options ';': no rows"),
    (["ablate", "--data-root", "D", "--calibrate"], "the table's ECE is measured before calibration"),
    (["ablate", "--data-root", "D", "--resume", "x.pt"], "ablate continues its stopped rows itself"),
    (["ablate", "--data-root", "D", "--overwrite"], "ablate keeps its finished rows and continues stopped ones"),
    (["predict", "M", "x.png", "--out", "o", "--alpha", "0.9"], "--alpha 0.9 applies only with --overlay"),
    (["predict", "M", "x.png", "--out", "o", "--ensemble", "N", "--backend", "auto"],
     "--backend auto picks one model's fastest file"),
])
def test_options_that_would_be_ignored_are_refused(command, words, capsys):
    assert main(command) == 2  # before any file is read: M, D, x.png do not exist
    assert words in one_error_line(capsys, command[0])


@pytest.mark.parametrize("command, flag, value", [
    ("evaluate", "--worst", "0"), ("evaluate", "--workers", "-1"), ("evaluate", "--scales", "nan"),
    ("evaluate", "--scales", "inf"), ("evaluate", "--max-pixels", "0"), ("visualize", "--seed", "-5"),
    ("demo-data", "--seed", "-1"),
])
def test_numbers_out_of_range_are_refused_by_the_parser(command, flag, value, capsys):
    args = {"evaluate": ["evaluate", "M", "--data-root", "D"], "visualize": ["visualize", "M", "--data-root", "D"],
            "demo-data": ["demo-data", "somewhere"]}[command]
    with pytest.raises(SystemExit) as stopped:
        main([*args, flag, value])
    assert stopped.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err


# ---- runs moved, linked, rewound or fed other data (found 2026-12-04, second hunt) ----------------------------------

def test_a_checkpoint_saved_through_a_link_updates_the_file_it_points_to(tmp_path):
    import os

    from resunet.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint({"n": 1}, tmp_path / "v1.pt")
    os.chmod(tmp_path / "v1.pt", 0o640)
    (tmp_path / "current.pt").symlink_to("v1.pt")
    save_checkpoint({"n": 2}, tmp_path / "current.pt")
    assert (tmp_path / "current.pt").is_symlink()  # it was replaced by a copy, and v1.pt kept the old weights
    assert load_checkpoint(tmp_path / "v1.pt")["n"] == 2
    assert os.stat(tmp_path / "v1.pt").st_mode & 0o777 == 0o640  # and the file keeps its permissions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.pt", "v1.pt"]


def test_calibrate_refuses_a_read_only_checkpoint_before_the_fit(checkpoint, demo_root, tmp_path, capsys):
    import os
    import shutil

    model = tmp_path / "model.pt"
    shutil.copy(checkpoint, model)
    os.chmod(model, 0o444)
    before = model.read_bytes()
    assert main(["calibrate", str(model), "--data-root", str(demo_root)]) == 2
    assert "read-only, and calibrate stores the temperature in it" in one_error_line(capsys, "calibrate")
    assert model.read_bytes() == before and os.stat(model).st_mode & 0o777 == 0o444


def test_a_run_whose_dataset_moved_is_told_to_give_its_new_place(demo_root, ram_tmp, capsys):
    """"data root is not a folder" named the stored root and no way on, where --data-root with --resume is the way
    (a helper's audit, 2026-12-07)."""
    import shutil

    from resunet.train import train

    data, run = ram_tmp / "data", ram_tmp / "run"
    shutil.copytree(demo_root, data)
    train(tiny_config(data, run, epochs=1, encoder="resnet18", size=32))
    data.rename(ram_tmp / "moved")
    assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "2"]) == 2
    assert one_error_line(capsys, "train") == (f"resunet train: error: {data}: the run's data root is not a folder; "
                                               "if the dataset moved, give its new place with --data-root (a resumed "
                                               "run may read its data from anywhere)")
    # A --data-root given is the user's own: not "the run's", and no advice to give one (a review)
    assert main(["train", "--resume", str(run / "last.pt"), "--data-root", str(ram_tmp / "typo")]) == 2
    assert one_error_line(capsys, "train") == f"resunet train: error: {ram_tmp / 'typo'}: data root is not a folder"
    assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "2", "--data-root",
                 str(ram_tmp / "moved")]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_run_resumed_through_a_link_from_another_folder_continues_in_its_own(demo_root, ram_tmp, monkeypatch):
    from resunet.checkpoint import load_checkpoint
    from resunet.train import train

    monkeypatch.chdir(demo_root.parent)
    run = ram_tmp / "run"
    train(tiny_config(demo_root.name, run, epochs=1, encoder="resnet18", size=32))  # a relative --data-root
    assert load_checkpoint(run / "last.pt")["train_config"]["data_root"] == str(demo_root)
    links = ram_tmp / "links"
    links.mkdir()
    (links / "last.pt").symlink_to(run / "last.pt")
    monkeypatch.chdir(links)  # elsewhere: the stored relative root would not be found from here
    assert main(["train", "--resume", "last.pt", "--epochs", "2"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert sorted(p.name for p in links.iterdir()) == ["last.pt"] and (links / "last.pt").is_symlink()


def test_a_bad_mask_found_by_the_class_weights_leaves_no_run_folder(demo_root, ram_tmp):
    """--class-weights sqrt-inv-freq reads every training mask before the first step: with --skip-data-check on the
    simple data path a bad one was found there, after the run folder was made, and the empty folder was left (and
    under torchrun each process printed the line; a helper's review, 2026-12-07)."""
    import re
    import shutil

    from resunet.data.dataset import open_dataset
    from resunet.data.images import DataError
    from resunet.train import train

    data = ram_tmp / "data"
    shutil.copytree(demo_root, data)
    mask = open_dataset(data, "train").mask_paths[1]
    mask.write_bytes(mask.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"^{re.escape(str(mask))}: "):
        train(tiny_config(data, ram_tmp / "run", epochs=1, skip_data_check=True, data_path="simple",
                          class_weights="sqrt-inv-freq"))
    assert not (ram_tmp / "run").exists()


# The unreadable-file tests' runs: two epochs on the simple data path, its files read by a loader worker
UNREADABLE_RUN = dict(epochs=2, skip_data_check=True, workers=1, data_path="simple")


@pytest.fixture(scope="module")
def uninterrupted_records(demo_root) -> list[dict]:
    """metrics.jsonl of the run the unreadable-file tests resume, had it never stopped: trained once for both."""
    import shutil

    from conftest import ram_dir
    from resunet.train import train

    folder = ram_dir("uninterrupted")
    try:
        train(tiny_config(demo_root, folder / "run", **UNREADABLE_RUN, cache_dir=str(folder / "cache")))
        return [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("split", ["val", "train"])
def test_a_file_found_unreadable_while_training_keeps_the_steps_before_it(demo_root, ram_tmp, split, capsys,
                                                                          uninterrupted_records):
    """With --skip-data-check a truncated val mask was found at the first evaluation: the epoch's training was lost,
    no checkpoint saved and an empty run folder left (a helper, 2026-12-06); a train mask, on the streamed data
    path, lost the steps before it. They are saved (the val case as the epoch's last step); mended, the resumed run
    goes on as a run that never stopped. Read by a loader worker, whose error comes back wrapped in its traceback:
    the line still names the file."""
    import re
    import shutil

    from resunet.checkpoint import load_checkpoint
    from resunet.data.dataset import open_dataset
    from resunet.data.images import DataError
    from resunet.train import train

    data = ram_tmp / "data"
    shutil.copytree(demo_root, data)
    mask = open_dataset(data, split).mask_paths[1]
    whole = mask.read_bytes()
    mask.write_bytes(whole[:len(whole) // 2])
    run = ram_tmp / "run"
    config = dict(UNREADABLE_RUN, cache_dir=str(ram_tmp / "cache"))
    kept = "epoch 1's training is" if split == "val" else r"the (\d+) step\(s\) of epoch 1 before it are"
    with pytest.raises(DataError, match=rf"^{re.escape(str(mask))}: [^\n]*; {kept} saved: mend the file \(or remove "
                                        rf"the image and its mask, and its line in a VOC split list\), then resunet "
                                        rf"train --resume {re.escape(str(run / 'last.pt'))}$") as caught:
        train(tiny_config(data, run, **config))
    saved = load_checkpoint(run / "last.pt", tensors=False)
    steps = 12 if split == "val" else int(re.search(kept, str(caught.value)).group(1))  # 48 images, batch 4
    assert saved["epoch"] == 0 and saved["position"]["step"] == steps
    mask.write_bytes(whole)
    capsys.readouterr()
    train(tiny_config(data, run, **config, resume=str(run / "last.pt")))
    assert "best val mIoU so far" not in capsys.readouterr().out  # none was measured (the data did change)
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(resumed, uninterrupted_records):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_miou"] == pytest.approx(b["val_miou"], rel=1e-5)


def test_resuming_from_a_checkpoint_behind_last_pt_is_refused(demo_root, ram_tmp):
    import shutil

    from resunet.checkpoint import load_checkpoint, save_checkpoint
    from resunet.train import TrainingError, train

    run = ram_tmp / "run"
    train(tiny_config(demo_root, run, epochs=1, encoder="resnet18", size=32))
    shutil.copy(run / "last.pt", run / "epoch1.pt")
    train(tiny_config(demo_root, run, epochs=2, encoder="resnet18", size=32, resume=str(run / "last.pt")))
    with pytest.raises(TrainingError, match=r"epoch1.pt: holds epoch 1, but .*last.pt is further on \(epoch 2\); "
                                            "resuming would overwrite it"):
        train(tiny_config(demo_root, run, epochs=3, encoder="resnet18", size=32, resume=str(run / "epoch1.pt")))
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    # Saved inside an epoch, last.pt holds the epochs before it and some steps: it read "holds epoch 1, but last.pt
    # is further on (epoch 1)" (a helper, 2026-12-06).
    payload = load_checkpoint(run / "last.pt")
    save_checkpoint({**payload, "epoch": 1, "position": {**(payload.get("position") or {}), "step": 9}},
                    run / "last.pt")
    with pytest.raises(TrainingError, match=r"epoch1.pt: holds epoch 1, but .*last.pt is further on \(epoch 1 and 9 "
                                            r"step\(s\) of epoch 2\); resuming would overwrite it"):
        train(tiny_config(demo_root, run, epochs=3, encoder="resnet18", size=32, resume=str(run / "epoch1.pt")))


def test_a_run_stopped_inside_an_epoch_resumes_on_data_that_shrank(demo_root, ram_tmp, monkeypatch, capsys):
    """The saved step replayed the batches of the old data's order: past the new epoch's end, a StopIteration
    traceback. Now the change is said, and that epoch starts again."""
    import shutil

    from resunet.train import train
    from test_faults import SMALL, signal_after_step

    data = ram_tmp / "data"
    shutil.copytree(demo_root, data)
    run = ram_tmp / "run"
    signal_after_step(monkeypatch, 8)  # 12 steps an epoch: stopped at step 8 of epoch 1
    assert train(tiny_config(data, run, epochs=1, **SMALL))["stopped_by"] == "SIGTERM"
    monkeypatch.undo()
    listing = data / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt"
    listing.write_text("\n".join(listing.read_text().split()[:16]) + "\n")  # 4 steps an epoch now
    capsys.readouterr()
    assert train(tiny_config(data, run, epochs=1, resume=str(run / "last.pt"), **SMALL))["stopped_by"] is None
    out = capsys.readouterr().out
    assert "the train data changed since" in out and "(48 → 16 train images, or files edited)" in out
    assert "epoch 1 starts again from its first step (it was saved at step 8 of the old training data)" in out
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_resume_where_an_epoch_takes_more_steps_keeps_the_schedule_ending_with_the_last_epoch(demo_root, ram_tmp,
                                                                                                 capsys):
    """Another process count (torchrun) or training set changes the steps an epoch takes; the schedule counted the
    old ones, so cosine ended early (lr 0 for the last epochs) or never reached 0."""
    import shutil

    from resunet.train import train
    from test_faults import SMALL

    data = ram_tmp / "data"
    shutil.copytree(demo_root, data)
    listing = data / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt"
    names = listing.read_text().split()
    listing.write_text("\n".join(names[:16]) + "\n")  # 4 steps an epoch
    run = ram_tmp / "run"
    train(tiny_config(data, run, epochs=1, scheduler="cosine", **SMALL))
    listing.write_text("\n".join(names) + "\n")  # 12 steps an epoch
    capsys.readouterr()
    train(tiny_config(data, run, epochs=2, scheduler="cosine", resume=str(run / "last.pt"), **SMALL))
    assert "the schedule is re-based from 4 to 12 steps done" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["lr"] == 0.0  # 24 of 24 steps: cosine's end
    # The usual resume, same steps an epoch: nothing re-based (bit-identical resumes are tested in test_faults).
    train(tiny_config(data, run, epochs=3, scheduler="cosine", resume=str(run / "last.pt"), **SMALL))
    assert "re-based" not in capsys.readouterr().out


def test_a_run_folder_it_cannot_write_in_is_refused_before_the_first_epoch(demo_root, ram_tmp, monkeypatch):
    import resunet.outputs as outputs_module
    from resunet.train import TrainingError, train, write_atomically

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(outputs_module.tempfile, "TemporaryFile", refused)
    with pytest.raises(TrainingError, match=r"--out .*run: cannot write in .*run \(Permission denied\)"):
        train(tiny_config(demo_root, ram_tmp / "run", epochs=1, encoder="resnet18", size=32))
    assert not (ram_tmp / "run" / "metrics.jsonl").exists()
    monkeypatch.undo()
    (ram_tmp / "ro").mkdir()
    monkeypatch.setattr("resunet.train.open", refused, raising=False)  # the file's own write (train opens it)
    with pytest.raises(TrainingError, match="could not write it .*; make it writable and start again$"):
        write_atomically(ram_tmp / "ro" / "metrics.jsonl", "{}\n")  # no last.pt there: nothing to resume


def test_a_file_named_twice_is_predicted_once(checkpoint, demo_root, tmp_path, capsys):
    photo = sorted((demo_root / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))[0]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / photo.name).write_bytes(photo.read_bytes())
    assert main(["predict", checkpoint, str(folder / photo.name), str(folder), str(folder / photo.name), "--out",
                 str(tmp_path / "out")]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"{photo.stem}.png"]
    assert "wrote 1 prediction(s)" in capsys.readouterr().out


def test_a_checkpoint_from_another_resunet_version_is_one_line(checkpoint, demo_root, tmp_path, capsys):
    # Model settings are added without a new VERSION (attention, decoder_channels): a newer file's unknown setting was
    # a TypeError traceback in predict, evaluate, export and serve; a missing description a KeyError.
    from resunet.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(checkpoint)
    image = tmp_path / "p.png"
    image.write_bytes(good_pair(0)[0])
    newer, missing, odd = tmp_path / "newer.pt", tmp_path / "missing.pt", tmp_path / "odd.pt"
    save_checkpoint({**payload, "model_config": {**payload["model_config"], "deep_supervision": True}}, newer)
    save_checkpoint({k: v for k, v in payload.items() if k != "normalization"}, missing)
    save_checkpoint(payload, odd)
    torch.save({**torch.load(odd, weights_only=True), "version": "2.0"}, odd)
    expected = {
        newer: "newer.pt: holds a model description this resunet cannot read (TypeError: ",
        missing: "missing.pt: holds a model description this resunet cannot read (KeyError: 'normalization'); made by "
                 "another resunet version?",
        odd: "odd.pt: not a resunet checkpoint (version '2.0')",
    }
    for path, words in expected.items():
        assert main(["predict", str(path), str(image), "--out", str(tmp_path / "out")]) == 2
        assert words in one_error_line(capsys, "predict")
        assert main(["export", str(path), "--onnx", str(tmp_path / "m.onnx")]) == 2
        assert words in one_error_line(capsys, "export")


def test_an_exported_file_asked_for_another_device_or_precision_is_refused_and_threads_reach_torch(exported, capsys,
                                                                                                     tmp_path):
    """An .onnx file runs on the CPU at its exported precision: --device cuda or --precision bf16 with one ran on the
    CPU in fp32 without a word. --threads, said to be onnxruntime's, was dropped for a .pt checkpoint."""
    import torch

    from resunet.cli import main
    from resunet.predict import load
    from resunet.runtime import DeviceError

    onnx = exported["dir"] / "model.onnx"
    with pytest.raises(DeviceError, match="--device cuda: .*model.onnx is an exported file, which runs on the CPU"):
        load(onnx, device="cuda")
    with pytest.raises(DeviceError, match="--precision bf16: .*model.onnx is an exported file"):
        load(onnx, precision="bf16")
    # A name that is no device or precision at all: said so ("CPU" was told the file "runs on the CPU", and
    # "float32" to give the .pt, which refuses it too; a helper's audit, 2026-12-07)
    for options, words in ((dict(device="CPU"), "--device CPU: not a device (auto, cpu, cuda, cuda:1, ...)"),
                           (dict(precision="float32"), "--precision float32: one of auto, fp32, bf16, fp16")):
        for model in (onnx, exported["ckpt"]):  # in the same words for both
            with pytest.raises(DeviceError, match=f"^{re.escape(words)}$"):
                load(model, **options)
    assert load(onnx, device="cpu", precision="fp32").predict(np.zeros((8, 9, 3), np.uint8)).shape == (8, 9)
    image = tmp_path / "black.png"  # not in exported["dir"]: that folder is shared by the test workers
    Image.new("RGB", (9, 8)).save(image)
    assert main(["predict", str(onnx), str(image), "--out", str(tmp_path / "never"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resunet predict: error: --device cuda: ") and err.count("\n") == 1
    assert not (tmp_path / "never" / "black.png").exists()

    before = torch.get_num_threads()
    try:
        load(exported["ckpt"], threads=1)
        assert torch.get_num_threads() == 1
        with pytest.raises(DeviceError, match="--threads 0: a whole number, at least 1"):
            load(exported["ckpt"], threads=0)
        # From Python a fraction or a bool reached torch.set_num_threads (its own TypeError-like RuntimeError, or
        # True taken as 1); numpy's integers are whole numbers (a helper, 2026-12-07).
        for threads in (1.5, True):
            with pytest.raises(DeviceError, match=f"--threads {threads}: a whole number, at least 1"):
                load(exported["ckpt"], threads=threads)
        load(exported["ckpt"], threads=np.int64(2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_out_of_memory_in_evaluate_or_visualize_is_one_line(checkpoint, demo_root, tmp_path, capsys, monkeypatch):
    """A batch or a model too large for the device ended evaluate, visualize and calibrate in a traceback naming no
    file (predict alone said it; a helper, 2026-12-06). evaluate names the batch's first file and what to lower;
    any command says it ran out of memory, in one line, with the flags it takes that need less."""
    from resunet.data.dataset import open_dataset
    from resunet.predict import Predictor

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9663676416 bytes.\n"
                           "Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(Predictor, "full_size_maps", out_of_memory)
    assert main(["evaluate", checkpoint, "--data-root", str(demo_root), "--batch-size", "3", "--workers", "0"]) == 2
    first = open_dataset(str(demo_root), "val").image_paths[0]
    assert one_error_line(capsys, "evaluate") == (
        f"resunet evaluate: error: {first}: out of memory evaluating 3 image(s) of 64×64 together; a lower "
        "--batch-size (or --window) needs less, as does --device cpu")
    monkeypatch.setattr(Predictor, "predict", out_of_memory)
    assert main(["visualize", checkpoint, "--data-root", str(demo_root), "--out", str(tmp_path / "grid.png")]) == 2
    assert one_error_line(capsys, "visualize") == (
        "resunet visualize: error: out of memory (DefaultCPUAllocator: can't allocate memory: you tried to allocate "
        "9663676416 bytes.); a lower --max-pixels needs less, as does --device cpu")
    assert not (tmp_path / "grid.png").exists()
    monkeypatch.setattr(Predictor, "predict", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # our bug, not the user's input: its traceback
        main(["visualize", checkpoint, "--data-root", str(demo_root), "--out", str(tmp_path / "grid.png")])


def test_a_file_name_that_is_not_utf8_is_checked_trained_on_and_drawn(demo_root, ram_tmp, capsys):
    """caf\\xe9.jpg from a Latin-1 archive: Python names it with an escape (surrogate) that strict UTF-8 refuses.
    train stopped in a traceback hashing the names for its cache, check-data printing a finding naming it, and
    evaluate --worst drawing it in the contact sheet (a helper, 2026-12-06)."""
    import os
    import shutil
    import sys

    from resunet.train import train

    voc, data = demo_root / "VOCdevkit" / "VOC2012", ram_tmp / "latin1"
    latin = os.fsdecode(b"caf\xe9")
    for split, count in (("train", 8), ("val", 4)):
        names = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[:count]
        for part in ("images", "masks"):
            (data / split / part).mkdir(parents=True)
        for i, name in enumerate(names):
            stem = f"{latin}_{split}" if i == 0 else name
            shutil.copy(voc / "JPEGImages" / f"{name}.jpg", data / split / "images" / f"{stem}.jpg")
            shutil.copy(voc / "SegmentationClass" / f"{name}.png", data / split / "masks" / f"{stem}.png")
    run = ram_tmp / "run"
    train(tiny_config(data, run, epochs=1, num_classes=21, size=32))  # the cache's key hashes every name
    assert main(["evaluate", str(run / "best.pt"), "--data-root", str(data), "--worst", "4", "--out",
                 str(ram_tmp / "worst"), "--workers", "0"]) == 0
    assert (ram_tmp / "worst" / "worst.png").is_file()
    assert f"{latin}_val" in {row["name"] for row in json.loads((ram_tmp / "worst" / "worst.json").read_text())}
    # A finding that names the file, printed to a strict UTF-8 stream (any locale but C's)
    shutil.copy(data / "train" / "masks" / f"{latin}_train.png", data / "train" / "masks" / f"{latin}_alone.png")
    result = subprocess.run([sys.executable, "-m", "resunet", "check-data", "--data-root", str(data),
                             "--num-classes", "21"], capture_output=True, timeout=300,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 1 and b"Traceback" not in result.stderr, result.stderr
    assert b"caf\\udce9_alone.png" in result.stdout
