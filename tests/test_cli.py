"""The command line end to end, as a user runs it. The real entry point (`python -m resunet`, a process of its own)
runs in test_end_to_end's training and in test_user_errors_are_one_line; other commands call `cli.main` in-process,
the same code without the seconds of imports a process costs (6-8 s each on a 2-core machine)."""

import json
import subprocess
import sys

import pytest
from PIL import Image


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "resunet", *args], capture_output=True, text=True, timeout=timeout)


def test_end_to_end(ram_tmp, capsys):
    from resunet.cli import main

    data, run = ram_tmp / "data", ram_tmp / "run"
    assert main(["demo-data", str(data), "--train", "8", "--val", "4", "--size", "48"]) == 0  # in-process: 4 s less
    result = run_cli("train", "--data-root", str(data), "--out", str(run), "--epochs", "2", "--batch-size", "4",
                     "--size", "48", "--encoder", "resnet18", "--no-pretrained", "--workers", "0",
                     "--cache-dir", str(ram_tmp / "cache"),
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "epoch   2/2" in result.stdout
    for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png"):
        assert (run / name).is_file(), name
    capsys.readouterr()
    assert main(["evaluate", str(run / "best.pt"), "--data-root", str(data), "--json", str(ram_tmp / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "aeroplane" in out and "pixel acc." in out
    scores = json.loads((ram_tmp / "e.json").read_text())
    assert 0 <= scores["miou"] <= 1 and len(scores["iou"]) == 21
    assert main(["visualize", str(run / "best.pt"), "--data-root", str(data), "--out", str(ram_tmp / "grid.png")]) == 0
    assert Image.open(ram_tmp / "grid.png").size[0] > 600
    # `train --resume` from the command line: tests/test_faults.py (after SIGTERM, Ctrl-C and kill -9)


def help_text(capsys, *args: str) -> str:
    """`resunet ARGS --help` in-process (a subprocess per command costs seconds of imports; test_end_to_end runs the
    real entry point)."""
    from resunet.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["demo-data", "train", "evaluate", "predict", "visualize", "export", "serve",
                                     "check-data", "download", "encoders", "benchmark", "ablate"])
def test_every_command_has_help(command, capsys):
    assert help_text(capsys, command).startswith(f"usage: resunet {command}")


def test_train_flags_cover_the_recipe(capsys):
    out = help_text(capsys, "train")
    for flag in ("--epochs", "--batch-size", "--lr", "--size", "--encoder", "--no-pretrained", "--seed", "--workers",
                 "--device", "--resume", "--precision", "--compile", "--loss", "--checkpoint-every", "--tensorboard"):
        assert flag in out, flag
    assert "(default: 0.0001)" in out and "(default: 100)" in out and "(default: 256)" in out
    # An unset flag said "(default: None)", after its own "(default: size)" or "(default 255, ...)"
    flat = " ".join(out.split())
    assert "default: None" not in flat and flat.count("(default: size)") == 1
    assert "classes.json) (default" not in flat and "$XDG_CACHE_HOME/resunet, or ~/.cache/resunet)" in flat


def test_ensemble_given_twice_keeps_every_model():
    # argparse's default action kept the last --ensemble list alone: b.pt was dropped without a word, and the scores
    # (and --json's "ensemble") were those of a.pt + c.pt (a helper, 2026-12-06).
    from resunet.cli import build_parser

    evaluate = ["evaluate", "a.pt", "--data-root", "d", "--ensemble", "b.pt", "--ensemble", "c.pt", "d.pt"]
    assert build_parser().parse_args(evaluate).ensemble == ["b.pt", "c.pt", "d.pt"]
    predict = ["predict", "a.pt", "x.jpg", "--out", "o", "--ensemble", "b.pt", "--ensemble", "c.pt"]
    assert build_parser().parse_args(predict).ensemble == ["b.pt", "c.pt"]
    assert build_parser().parse_args(["predict", "a.pt", "x.jpg", "--out", "o"]).ensemble == []


def test_inputs_given_after_ensemble_are_named_as_such(tmp_path, capsys):
    """`predict a.pt --ensemble b.pt photos --out o`: argparse gave photos to --ensemble, and the command said only
    "the following arguments are required: inputs" (an image there was read as a checkpoint: "not a readable resunet
    checkpoint"), a helper, 2026-12-07. Refused before any model is loaded (none of these files exists); inputs after
    any other flag are still inputs, and a run folder given to --ensemble is left to the loader's own line."""
    from resunet.cli import build_parser, main

    photos, run = tmp_path / "photos", tmp_path / "run"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"")
    run.mkdir()
    (run / "best.pt").write_bytes(b"")
    (run / "curves.png").write_bytes(b"")
    takes = ("--ensemble takes every word up to the next flag as a model: give the inputs before it (resunet predict "
             "MODEL INPUT... --ensemble MODEL2 ...)")
    for words, what in ((["x.jpg", "--ensemble", "b.pt", str(photos)], f"{photos}: a folder of images"),
                        (["x.jpg", "--ensemble", "b.pt", "y.JPG"], "y.JPG: an image")):
        assert main(["predict", "a.pt", *words, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err == f"resunet predict: error: --ensemble {what}, not a model; {takes}\n", err
    with pytest.raises(SystemExit):
        main(["predict", "a.pt", "--ensemble", "b.pt", str(photos), "--out", str(tmp_path / "o")])
    assert capsys.readouterr().err.endswith(f"error: the following arguments are required: inputs ({takes})\n")
    assert not (tmp_path / "o").exists()
    parse = build_parser().parse_args
    assert parse(["predict", "a.pt", "--out", "o", "x.jpg"]).inputs == ["x.jpg"]
    assert parse(["predict", "a.pt", "--ensemble", "b.pt", "--out", "o", "x.jpg"]).inputs == ["x.jpg"]
    assert main(["predict", "a.pt", "x.jpg", "--ensemble", str(run), "--out", str(tmp_path / "o")]) == 2
    assert "not a model" not in capsys.readouterr().err


def test_ablate_help_offers_only_what_ablate_takes(capsys):
    """ablate takes the train flags, but refuses --resume, --overwrite and --calibrate (each with its reason): its
    --help offered them with train's words, and --data-root said "unless --resume reads it from the run"."""
    flat = " ".join(help_text(capsys, "ablate").split())
    for flag in ("--resume", "--overwrite", "--calibrate"):
        assert flag not in flat, flag
    assert "--data-root DATA_ROOT dataset folder: VOCdevkit layout or {train,val}/{images,masks} (required)" in flat
    assert "--eval-every EVAL_EVERY evaluate every N epochs, with --scheduler plateau only" in flat
    assert "one run folder per row (default: runs/ablation)" in flat
    from resunet.cli import main

    assert main(["ablate", "--data-root", ".", "--resume", "x.pt"]) == 2  # still parsed, to be refused with the reason
    assert "ablate continues its stopped rows itself" in capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path, capsys):
    from resunet.cli import main

    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    result = run_cli("evaluate", str(tmp_path / "junk.pt"), "--data-root", str(tmp_path))  # the real entry point
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "junk.pt: not a readable resunet checkpoint" in result.stderr
    assert main(["train", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "nowhere: data root is not a folder" in capsys.readouterr().err


def test_encoders_lists_every_encoder_with_weights_status(capsys):
    from resunet.cli import main

    assert main(["encoders"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(lines) == {"resnet18", "resnet34", "resnet50", "resnet101", "efficientnet-lite0", "efficientnet-lite1",
                          "efficientnet-lite2"}
    assert "21.28M" in lines["resnet34"] and "64/64/128/256/512" in lines["resnet34"]
    assert "16/24/40/112/320" in lines["efficientnet-lite0"] and "efficientnet-lite0-" in lines["efficientnet-lite0"]
    assert "--encoder-weights" in lines["resnet34"] or "checkpoints" in lines["resnet34"]


def test_resume_keeps_the_stored_settings_and_changes_only_what_is_given(tmp_path, monkeypatch):
    import resunet.train
    from resunet.checkpoint import save_checkpoint
    from resunet.cli import main
    from resunet.config import TrainConfig

    stored = TrainConfig(data_root="data", out="elsewhere", workers=0, cache_dir="/cache", epochs=7, lr=0.5,
                         tensorboard=True, checkpoint_every="100", calibrate=True, progress=False,
                         skip_data_check=True).to_dict()
    save_checkpoint({"train_config": stored}, tmp_path / "last.pt")
    seen = []
    monkeypatch.setattr(resunet.train, "train", lambda cfg: seen.append(cfg) or {})
    assert main(["train", "--resume", str(tmp_path / "last.pt")]) == 0
    cfg = seen[-1]
    assert (cfg.workers, cfg.cache_dir, cfg.epochs, cfg.lr, cfg.tensorboard, cfg.checkpoint_every) == \
        (0, "/cache", 7, 0.5, True, "100")
    assert cfg.out == str(tmp_path) and cfg.resume == str(tmp_path / "last.pt") and cfg.data_root == "data"
    assert main(["train", "--resume", str(tmp_path / "last.pt"), "--workers", "3", "--epochs", "9", "--lr", "0.1",
                 "--checkpoint-every", "5m"]) == 0
    cfg = seen[-1]
    assert (cfg.workers, cfg.epochs, cfg.checkpoint_every) == (3, 9, "5m")
    assert cfg.lr == 0.1  # the learning rate may change (the way out of a diverged run); the rest of the recipe may
    # not: tests/test_user_errors.py
    assert (cfg.tensorboard, cfg.calibrate, cfg.progress, cfg.skip_data_check) == (True, True, False, True)
    # The switches a resume may change, turned back: there was no flag for it (a run started with --tensorboard could
    # not be resumed on a machine without the package; a helper, 2026-12-07).
    assert main(["train", "--resume", str(tmp_path / "last.pt"), "--no-tensorboard", "--no-calibrate", "--progress",
                 "--data-check"]) == 0
    cfg = seen[-1]
    assert (cfg.tensorboard, cfg.calibrate, cfg.progress, cfg.skip_data_check) == (False, False, True, False)


def test_a_resume_takes_the_runs_own_values_in_other_spellings(tmp_path):
    """--decoder-channels "256, 128, 64, 32" and --time-budget 15 (or 0.25m) for a run's "256,128,64,32" and "15s"
    were refused as changes, the message naming the value given as the run's; from Python, checkpoint_every=500.0
    was "give a number of steps (500)" and an array of widths "must be text" (a helper, 2026-12-07)."""
    import numpy as np

    from resunet.checkpoint import save_checkpoint
    from resunet.config import TrainConfig
    from resunet.train import TrainingError, check_resumed_settings, resumed_config

    stored = {**TrainConfig(data_root="data", out=str(tmp_path), time_budget="15s").to_dict(),
              "decoder_channels": " 64, 32 ,16,8"}  # as a run of an earlier version stored what it was given
    save_checkpoint({"train_config": stored}, tmp_path / "last.pt")
    for changes in ({"decoder_channels": "64,32,16,8"}, {"decoder_channels": (64, 32, 16, 8)},
                    {"decoder_channels": np.array([64, 32, 16, 8])}, {"time_budget": "15"}, {"time_budget": "0.25m"},
                    {"time_budget": 15.0}):
        cfg = resumed_config(tmp_path / "last.pt", changes)
        assert (cfg.decoder_channels, cfg.time_budget) == ("64,32,16,8", "15s"), changes
        check_resumed_settings(cfg)  # as train() checks it again (it compared with the stored text)
    check_resumed_settings(resumed_config(tmp_path / "last.pt", {}))  # the old run's spaced widths, no flag given
    with pytest.raises(TrainingError, match=r"^--decoder-channels 64,32,16,4: cannot change on --resume"):
        resumed_config(tmp_path / "last.pt", {"decoder_channels": "64,32,16,4"})
    with pytest.raises(TrainingError, match=r"^--time-budget 16: cannot change on --resume \(the run trains with "
                                            r"15s\)"):
        resumed_config(tmp_path / "last.pt", {"time_budget": "16"})
    assert TrainConfig(data_root="d", checkpoint_every=np.float64(500)).checkpoint_every == "500"
    assert TrainConfig(data_root="d", time_budget=90.5).time_budget == "90.5"


def test_json_to_dev_stdout_through_a_pipe(tmp_path):
    # /dev/stdout's real path is /proc/PID/fd/pipe:[N] when stdout is a pipe (`... --json /dev/stdout | jq`): the
    # report was refused after all the work ("could not write it (No such file or directory)").
    from test_doctor import clean_dataset

    root = clean_dataset(tmp_path / "data")
    result = run_cli("check-data", "--data-root", str(root), "--json", "/dev/stdout", "--workers", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1])
    assert report["errors"] == 0 and report["facts"]["splits"]["train"]["pairs"] == 4


def test_json_to_dev_stdout_redirected_to_a_file_keeps_what_was_printed(tmp_path):
    # `check-data ... --json /dev/stdout >> log.txt`: /dev/stdout's real path is then log.txt, and the report was
    # renamed over it: the lines printed before it and the log's earlier content were lost (as root; for another
    # user, "cannot write in /dev"). It is now written through the open descriptor. A helper, 2026-12-06.
    from test_doctor import clean_dataset

    root = clean_dataset(tmp_path / "data")
    log = tmp_path / "log.txt"
    log.write_text("an earlier line\n")
    with open(log, "a") as stdout:
        result = subprocess.run([sys.executable, "-m", "resunet", "check-data", "--data-root", str(root), "--json",
                                 "/dev/stdout", "--workers", "1"], stdout=stdout, stderr=subprocess.PIPE, text=True,
                                timeout=300)
    assert result.returncode == 0, result.stderr
    text = log.read_text()
    assert text.startswith("an earlier line\n") and "0 errors, 0 warnings" in text.split("{")[0]
    assert json.loads(text[text.index("{"):text.rindex("}") + 1])["errors"] == 0
    from resunet.data.images import DataError
    from resunet.outputs import check_output_files, descriptor_of

    assert [descriptor_of(p) for p in ("/dev/stdout", "/dev/stderr", "/dev/fd/5", "/proc/self/fd/7", "/dev/null",
                                       "/proc/1/fd/1", "out/dev/stdout")] == [1, 2, 5, 7, None, None, None]
    with pytest.raises(DataError, match="^--json /dev/fd/987: descriptor 987 is not open$"):
        check_output_files([("--json", "/dev/fd/987")])


def test_a_failed_save_removes_only_what_it_wrote(tmp_path):
    # A file refused at opening (a read-only mask of an earlier run, for a user who is not root) was deleted. Now
    # every file is written beside its name and renamed into place: a write cut short by a full disk or by Ctrl-C
    # leaves the earlier file whole, or no file, and nothing beside it (predict --skip-existing trusts what it finds).
    from resunet.data.images import DataError
    from resunet.outputs import save_whole

    kept = tmp_path / "kept.png"
    kept.write_bytes(b"earlier result")
    kept.chmod(0o640)

    def refused(where):
        raise PermissionError(13, "Permission denied")

    def half_then_full(where):
        where.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    def half_then_ctrl_c(where):
        where.write_bytes(b"half")
        raise KeyboardInterrupt

    for path in (kept, tmp_path / "new.png"):
        with pytest.raises(DataError, match=r"could not write it \(Permission denied\)$"):
            save_whole(path, refused)
        with pytest.raises(DataError, match=r"could not write it \(No space left on device\)$"):
            save_whole(path, half_then_full)
        with pytest.raises(KeyboardInterrupt):
            save_whole(path, half_then_ctrl_c)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.png"]
        assert kept.read_bytes() == b"earlier result"
    save_whole(kept, lambda where: where.write_bytes(b"new result"))
    assert kept.read_bytes() == b"new result" and kept.stat().st_mode & 0o777 == 0o640


def test_help_and_refused_flags_answer_without_importing_torch(tmp_path):
    """`resunet --help` took 3.5 s here, a refused flag 4 s: the package and every command's module imported torch
    and torchvision first. The public API still imports on first use. demo-data needs no torch either (its check
    for a folder dataset imported it: a review, 2026-12-07)."""
    script = """
import sys
from resunet.cli import main
try:
    main(["--help"])
except SystemExit as stop:
    print("help", stop.code, "torch" in sys.modules)
for argv in (["train"], ["predict", "M", "x.png", "--out", "o", "--alpha", "0.5"], ["ablate", "--data-root", "D",
             "--calibrate"], ["export", "M.pt", "--onnx", "m.onnx", "--split", "test"]):
    print(argv[0], main(argv), "torch" in sys.modules)
print("demo-data", main(["demo-data", "demo", "--train", "1", "--val", "1", "--size", "16"]), "torch" in sys.modules)
import resunet
print(resunet.Predictor.__module__, resunet.ResNetUNet.__name__, resunet.load.__name__, "torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if not line.startswith("wrote ")]
    assert said[-7:] == ["help 0 False", "train 2 False", "predict 2 False", "ablate 2 False", "export 2 False",
                         "demo-data 0 False", "resunet.predict ResNetUNet load True"], result.stdout
    assert result.stderr.count("\n") == 4 and "Traceback" not in result.stderr, result.stderr
