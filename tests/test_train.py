import json

import pytest
import torch

from resunet.checkpoint import load_checkpoint
from resunet.train import train

from conftest import tiny_config


# For tests of the loop's mechanics (not of what it learns): a quarter of the pixels and a lighter encoder.
SMALL = dict(size=32, encoder="resnet18")


def read_records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_beats_the_all_background_baseline(trained_run):
    records = read_records(trained_run)
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1))
    assert records[-1]["train_loss"] < 0.6 * records[0]["train_loss"]
    best = max(r["val_miou"] for r in records)
    # Predicting background everywhere scores 0.144 here (bg IoU ~0.87 averaged with 0 for 5 object classes);
    # uniform guessing among 21 classes scores under 0.05.
    assert best > 0.22, [round(r["val_miou"], 3) for r in records]
    assert best == pytest.approx(load_checkpoint(trained_run / "best.pt")["best_miou"])


def test_run_folder_contents(trained_run):
    record = read_records(trained_run)[-1]
    assert set(record) >= {"epoch", "train_loss", "val_miou", "val_iou", "lr", "seconds"}
    assert len(record["val_iou"]) == 21
    assert (trained_run / "curves.png").stat().st_size > 10_000
    ckpt = load_checkpoint(trained_run / "last.pt")
    assert ckpt["model_config"]["encoder"] == "resnet34" and ckpt["classes"]["classes"][1] == "aeroplane"
    assert ckpt["input_size"] == 64 and len(ckpt["normalization"]["mean"]) == 3
    assert ckpt["epoch"] == len(read_records(trained_run))
    # the settings-only read (resume's first look) maps the file and sees the same settings
    assert load_checkpoint(trained_run / "last.pt", tensors=False)["train_config"] == ckpt["train_config"]


@pytest.mark.parametrize("data_path", ["cached", "simple"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(demo_root, tmp_path, data_path):
    settings = dict(data_path=data_path, precision="fp32", batch_size=4, **SMALL)
    whole = tmp_path / "whole"
    train(tiny_config(demo_root, whole, epochs=2, **settings))
    part = tmp_path / "part"
    train(tiny_config(demo_root, part, epochs=1, **settings))
    train(tiny_config(demo_root, part, epochs=2, resume=str(part / "last.pt"), **settings))
    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(part / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["best_miou"] == b["best_miou"]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "train_images_per_s")} for r in rs]
    assert strip(read_records(whole)) == strip(read_records(part))


def test_eval_every_skips_evaluation_but_not_the_last_epoch(demo_root, tmp_path):
    out = tmp_path / "sparse"
    train(tiny_config(demo_root, out, epochs=3, eval_every=2, **SMALL))
    assert [r["val_miou"] is not None for r in read_records(out)] == [False, True, True]
    assert (out / "curves.png").is_file() and (out / "best.pt").is_file()


def test_validation_runs_in_eval_mode_and_leaves_batchnorm_statistics_alone(demo_root, tmp_path, monkeypatch):
    # Every epoch's validation must see the model in eval mode; a train-mode pass would update BN running stats
    # with validation images (and score with batch statistics).
    import resunet.train as train_module

    seen = []
    original = train_module.evaluate_dataset

    def spy(predictor, *args, **kwargs):
        model = predictor.model
        before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        matrix = original(predictor, *args, **kwargs)
        seen.append(not model.training)
        after = {k: v for k, v in model.state_dict().items() if "running" in k}
        assert all(torch.equal(before[k], after[k]) for k in before)
        return matrix

    monkeypatch.setattr(train_module, "evaluate_dataset", spy)
    train(tiny_config(demo_root, tmp_path / "run", epochs=3, **SMALL))
    assert seen == [True, True, True]


def test_compile_trains_the_same_weights_and_saves_the_plain_model(demo_root, tmp_path, monkeypatch):
    # --compile wraps the training model in torch.compile. Inductor would spend minutes compiling C++ here, so
    # the test gives torch.compile the "eager" backend: TorchDynamo still captures the model's graph and the
    # training steps run through it, with the same arithmetic as the plain run, bit for bit in fp32. The
    # checkpoint must hold the plain model's weights (no "_orig_mod." prefixes), loadable without compiling.
    real_compile, compiled = torch.compile, []

    def eager_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    settings = dict(epochs=1, precision="fp32", batch_size=4, **SMALL)
    train(tiny_config(demo_root, tmp_path / "compiled", compile=True, **settings))
    assert len(compiled) == 1
    train(tiny_config(demo_root, tmp_path / "plain", **settings))
    assert len(compiled) == 1  # the plain run did not compile
    a, b = load_checkpoint(tmp_path / "compiled" / "last.pt"), load_checkpoint(tmp_path / "plain" / "last.pt")
    assert set(a["model"]) == set(b["model"]) and not any(k.startswith("_orig_mod") for k in a["model"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["train_config"]["compile"] is True
    assert read_records(tmp_path / "compiled")[0]["train_images_per_s"] > 0  # measured from the second step on


def test_progress_line_by_hand():
    from resunet.train import progress_line

    # 10 of 40 steps took 20 s (40 images): 2.0 img/s, 30 steps × 2 s left = 1 min.
    assert progress_line(3, 55, 10, 40, 40, 20.0) == "epoch 3/55: step 10/40, 2.0 img/s, epoch ETA 1m00s"


def test_a_log_file_gets_progress_lines_not_bar_fragments(demo_root, tmp_path, monkeypatch, capsys):
    import resunet.train as train_module

    monkeypatch.setattr(train_module, "PROGRESS_EVERY_S", 0.0)  # a line after every step
    train(tiny_config(demo_root, tmp_path / "run", epochs=1, progress=True, **SMALL))
    captured = capsys.readouterr()  # not a terminal, like a server's log file
    assert "\r" not in captured.out + captured.err
    steps = [line for line in captured.out.splitlines() if line.startswith("epoch 1/1: step ")]
    assert steps[0].startswith("epoch 1/1: step 1/12, ") and steps[-1].startswith("epoch 1/1: step 12/12, ")
    assert "img/s, epoch ETA" in steps[0]


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(demo_root, tmp_path, monkeypatch):
    import errno

    import resunet.checkpoint as checkpoint_module
    from resunet.checkpoint import CheckpointError

    run = tmp_path / "run"
    train(tiny_config(demo_root, run, epochs=1, **SMALL))
    before = (run / "last.pt").read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # most of the bytes go out, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(CheckpointError) as error:
        train(tiny_config(demo_root, run, epochs=2, resume=str(run / "last.pt"), **SMALL))
    message = str(error.value)
    assert "No space left on device" in message and "the previous last.pt is intact" in message
    assert (run / "last.pt").read_bytes() == before  # untouched, and it still loads
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_a_val_file_that_goes_bad_mid_run_is_named_and_the_checkpoint_kept(demo_root, tmp_path, capsys):
    import shutil

    from resunet.cli import main

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    run = tmp_path / "run"
    args = ["--out", str(run), "--batch-size", "4", "--size", "32", "--encoder", "resnet18", "--no-pretrained",
            "--workers", "0", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", "--data-root", str(data), "--epochs", "1", *args]) == 0
    before = (run / "last.pt").read_bytes()
    # After the cache was built: a val image is truncated on disk; the resumed run reads it at its evaluation.
    val_names = (data / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split()
    broken = data / "VOCdevkit/VOC2012/JPEGImages" / f"{val_names[0]}.jpg"
    broken.write_bytes(broken.read_bytes()[:300])
    capsys.readouterr()
    assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "2", "--skip-data-check", *args[9:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(broken) in err[0] and "truncated" in err[0].lower(), err
    assert (run / "last.pt").read_bytes() == before
