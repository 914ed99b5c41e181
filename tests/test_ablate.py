"""`resunet ablate`: one row per option at the same budget, the seed row as the noise, rows kept and resumed."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from resunet.ablate import format_table, noise_and_verdicts, recipe, run_ablation
from resunet.cli import main
from resunet.train import TrainingError

from conftest import tiny_config


def row(option: str, miou: float, seed: int = 0) -> dict:
    return {"option": option, "seed": seed, "miou": miou, "boundary_miou": miou / 2, "ece": 0.05,
            "train_images_per_s": 10.0}


def test_verdicts_against_the_seed_noise_by_hand():
    rows = [row("baseline", 0.60), row("seed 1", 0.62, seed=1), row("loss focal", 0.615), row("mix cutmix", 0.63),
            row("loss dice", 0.57)]
    noise, verdicts = noise_and_verdicts(rows)
    assert noise == pytest.approx(0.02)
    # +1.5 points is inside a 2-point noise; +3 is a gain; -3 a loss.
    assert verdicts == ["", "", "inside the noise", "gain", "loss"]
    table = format_table(rows)
    assert "| loss focal | 61.50 | +1.50 | 30.75 | 5.00 | 10.00 | inside the noise |" in table
    assert "| mix cutmix | 63.00 | +3.00 |" in table
    assert "differs by 2.00 points" in table
    assert noise_and_verdicts([row("baseline", 0.6), row("loss dice", 0.5)])[1] == ["", "no noise estimate"]


def test_a_row_kept_from_another_cpu_names_it(tmp_path):
    """Found by a helper: a table of rows trained on several machines (rows kept from an earlier run) named this
    machine for all of them in its header, their img/s among them; each row's CPU was stored and never shown."""
    from resunet.ablate import write_tables
    from resunet.config import TrainConfig

    here = {"cpu": "Intel Xeon", "cpu_kind": "amx"}
    rows = [{**row("baseline", 0.60), **here}, {**row("seed 1", 0.62, seed=1), **here},
            {**row("loss focal", 0.615), "cpu": "AMD EPYC", "cpu_kind": "no-bf16"}, row("loss dice", 0.65)]
    write_tables(TrainConfig(data_root="d", epochs=15), rows, tmp_path)
    table = (tmp_path / "ablation.md").read_text()
    assert "final weights on val; Intel Xeon, amx (a row on another CPU names it)." in table
    assert "| baseline | 60.00 |" in table and "| seed 1 | 62.00 |" in table
    assert "| loss focal (AMD EPYC, no-bf16) | 61.50 |" in table
    assert "| loss dice (CPU not recorded) | 65.00 |" in table


def test_ablation_trains_scores_keeps_and_refuses_another_recipe(demo_root, ram_tmp, monkeypatch):
    import resunet.ablate

    small = dict(epochs=1, size=32, encoder="resnet18", decoder_channels="32,16,8,8")
    base = tiny_config(demo_root, ram_tmp / "unused", **small)
    out = ram_tmp / "ablation"
    options = ["baseline", "loss focal"]
    scored = []  # each row's final scoring honours --no-progress as its training does (it drew an "eval" bar)
    monkeypatch.setattr(resunet.ablate, "run_evaluate",
                        lambda *a, run=resunet.ablate.run_evaluate, **k: scored.append(k["progress"]) or run(*a, **k))
    results = run_ablation(base, options, out)
    assert [r["option"] for r in results] == options and scored == [False, False]
    for r in results:
        folder = out / r["option"].replace(" ", "-")
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 1  # the budget: one epoch, evaluated once at its end
        # The row's score is the final weights' val mIoU, the figure training printed for its last epoch.
        assert r["miou"] == pytest.approx(metrics[-1]["val_miou"], abs=0.01)
        assert 0 <= r["boundary_miou"] <= 1 and 0 <= r["ece"] <= 1
        assert r["train_images_per_s"] == metrics[0]["train_images_per_s"]
    assert results[1]["recipe"]["loss"] == "focal" and results[0]["recipe"]["loss"] == "ce"
    written = json.loads((out / "ablation.json").read_text())
    assert [r["option"] for r in written["rows"]] == options
    assert "| loss focal |" in (out / "ablation.md").read_text()

    # Run again: finished rows are kept, not retrained.
    stamp = (out / "baseline" / "last.pt").stat().st_mtime_ns
    again = run_ablation(base, options, out)
    assert again == results and (out / "baseline" / "last.pt").stat().st_mtime_ns == stamp
    # The same data named by a relative path is the same recipe (train stores it absolute in last.pt).
    assert run_ablation(replace(base, data_root=os.path.relpath(demo_root)), options, out) == results
    # A new row stopped between finished ones: the table keeps the finished rows after it (it held the first alone).
    with monkeypatch.context() as patched:
        patched.setattr(resunet.ablate, "train", lambda cfg: {"stopped_by": "SIGTERM"})
        assert run_ablation(base, ["baseline", "ema 0.999", "loss focal"], out) == results[:1]
    assert [r["option"] for r in json.loads((out / "ablation.json").read_text())["rows"]] == options
    shutil.rmtree(out / "ema-0.999", ignore_errors=True)
    # A row stopped before scoring continues from its last.pt (here already at the budget: scored, not retrained).
    # Its final weights are scored: last.pt (best.pt may hold epoch 1 under --time-budget).
    (out / "loss-focal" / "result.json").unlink()
    (out / "loss-focal" / "best.pt").unlink()
    stamp = (out / "loss-focal" / "last.pt").stat().st_mtime_ns
    rescored = run_ablation(base, ["loss focal"], out)[0]
    assert rescored["miou"] == pytest.approx(results[1]["miou"], abs=1e-6)
    # The table keeps the baseline an earlier run finished: one row run again wrote a table of itself alone, with
    # no baseline to measure it against (a helper, 2026-12-06).
    assert [r["option"] for r in json.loads((out / "ablation.json").read_text())["rows"]] == ["loss focal", "baseline"]
    assert "| loss focal |" in (out / "ablation.md").read_text() and "| baseline |" in (out / "ablation.md").read_text()
    assert (out / "loss-focal" / "last.pt").stat().st_mtime_ns == stamp
    # A row stopped between its first two saves (best.pt written, last.pt not) starts again: train refuses a new run
    # in a folder that holds one, and the row was stuck (review, 2026-12-05).
    (out / "loss-focal" / "result.json").unlink()
    (out / "loss-focal" / "last.pt").rename(out / "loss-focal" / "best.pt")
    retrained = run_ablation(base, ["loss focal"], out)[0]
    assert retrained["miou"] == pytest.approx(results[1]["miou"], abs=1e-6)  # the same seed, the same row
    assert (out / "loss-focal" / "last.pt").is_file()
    with pytest.raises(TrainingError, match="already uses seed 1"):  # the noise row would repeat the baseline
        run_ablation(tiny_config(demo_root, ram_tmp / "unused", **{**small, "seed": 1}), ["seed 1"], out)
    # Another budget in the same folder would mix two recipes in one table: refused before any row trains (a new
    # row listed first was trained into the folder, then the table held it alone).
    table = (out / "ablation.md").read_text()
    with pytest.raises(TrainingError, match="epochs"), monkeypatch.context() as patched:
        patched.setattr(resunet.ablate, "train", lambda cfg: pytest.fail("trained before the refusal"))
        run_ablation(tiny_config(demo_root, ram_tmp / "unused", **{**small, "epochs": 2}), ["ema 0.999", "baseline"],
                     out)
    assert (out / "ablation.md").read_text() == table and not (out / "ema-0.999").exists()
    # ... and so with new rows alone: the folder's finished rows are of another recipe (a row of the new one was
    # trained beside them, and the table of four rows replaced by its own; a helper's audit, 2026-12-07)
    with pytest.raises(TrainingError, match=r"baseline: trained with another recipe \(lr differ\)"), \
            monkeypatch.context() as patched:
        patched.setattr(resunet.ablate, "train", lambda cfg: pytest.fail("trained before the refusal"))
        run_ablation(replace(base, lr=2e-4), ["scheduler poly"], out)
    assert (out / "ablation.md").read_text() == table and not (out / "scheduler-poly").exists()
    # A row that fails: the finished rows' table is written all the same.
    (out / "ablation.md").unlink()
    with pytest.raises(TrainingError, match="diverged"), monkeypatch.context() as patched:
        patched.setattr(resunet.ablate, "train", lambda cfg: (_ for _ in ()).throw(TrainingError("diverged")))
        run_ablation(base, ["baseline", "loss dice"], out)
    table = (out / "ablation.md").read_text()
    assert "| baseline |" in table and "loss dice" not in table


def test_a_relative_path_is_the_same_recipe_as_the_absolute_one_train_stores(demo_root, ram_tmp):
    """train stores --data-root and --encoder-weights absolute: a row stopped under a relative --encoder-weights
    was refused as another recipe when the same command was run again."""
    base = tiny_config(os.path.relpath(demo_root), ram_tmp / "unused", encoder_weights="w.pth")
    stored = {**base.to_dict(), "data_root": os.path.abspath(demo_root), "encoder_weights": os.path.abspath("w.pth")}
    assert recipe(base) == recipe(stored)
    assert recipe(replace(base, encoder_weights="v.pth")) != recipe(stored)
    # A VOC tree at any of its levels is one dataset (train reads the same files): it was two recipes.
    for level in (demo_root / "VOCdevkit", demo_root / "VOCdevkit" / "VOC2012"):
        assert recipe(replace(base, data_root=str(level))) == recipe(stored)
    assert recipe(replace(base, data_root=str(ram_tmp))) != recipe(stored)


def test_rows_listed_twice_or_changing_nothing_are_refused_before_training(demo_root, ram_tmp, monkeypatch):
    import resunet.ablate

    monkeypatch.setattr(resunet.ablate, "train", lambda cfg: pytest.fail("trained anyway"))
    base = tiny_config(demo_root, ram_tmp / "unused", epochs=1, loss="dice", ema=0.999)
    with pytest.raises(TrainingError, match=r"^ablation option\(s\) 'baseline', 'seed 1' listed twice; each row is"):
        run_ablation(base, ["baseline", "seed 1", "baseline", "loss focal", "seed 1"], ram_tmp / "twice")
    for option, flags in (("loss dice", "--loss dice"), ("ema 0.999", "--ema 0.999")):
        with pytest.raises(TrainingError, match=f"^ablation option '{option}' changes nothing: the train flags "
                                                f"already give {flags}; drop the row or change the base flag$"):
            run_ablation(base, ["baseline", option], ram_tmp / "noop")
    # Found by a helper: each row's settings were checked when its turn came, so --batch-size 1 trained every row up
    # to the mixes hours in, and a rerun with another batch size was then refused for the finished rows.
    single = tiny_config(demo_root, ram_tmp / "unused", epochs=1, batch_size=1, size=64, crop_size=64)
    with pytest.raises(TrainingError, match=r"^ablation option 'mix cutmix': --batch-size 1: must be 2 or more"):
        run_ablation(single, ["baseline", "mix cutmix"], ram_tmp / "single")
    assert not (ram_tmp / "single").exists()


def test_a_row_that_changes_the_loss_leaves_out_the_base_losss_own_setting(demo_root, ram_tmp):
    """`ablate --loss ohem --ohem-keep 0.1` refused every other loss's row: "--ohem-keep 0.1: must be left out
    without --loss ohem" (a helper, 2026-12-07). The row of another loss takes that setting's default; the baseline
    and the rows that keep the loss keep it."""
    from resunet.ablate import row_config
    from resunet.train import check_settings

    ohem = tiny_config(demo_root, ram_tmp / "unused", epochs=1, loss="ohem", ohem_keep=0.1, mix="cutmix",
                       mix_prob=0.9)
    for name, keep, prob in (("baseline", 0.1, 0.9), ("loss focal", 0.25, 0.9), ("mix classmix", 0.1, 0.9),
                             ("loss dice", 0.25, 0.9)):
        row = row_config(ohem, name)
        check_settings(row)
        assert (row.ohem_keep, row.mix_prob) == (keep, prob), name
    focal = replace(ohem, loss="focal", ohem_keep=0.25, focal_gamma=3.0, mix="none", mix_prob=0.5)
    assert row_config(focal, "loss dice").focal_gamma == 2.0 and row_config(focal, "ema 0.999").focal_gamma == 3.0
    check_settings(row_config(focal, "loss dice"))
    # A row an earlier version trained stored the base's setting: the same recipe, not refused as another one
    stored = {**row_config(ohem, "loss dice").to_dict(), "ohem_keep": 0.1, "decoder_channels": "256, 128, 64, 32"}
    assert recipe(stored) == recipe(row_config(ohem, "loss dice"))
    weighted = replace(ohem, class_weights="sqrt-inv-freq")  # the Lovász row leaves out the weights it ignores
    assert row_config(weighted, "loss lovasz").class_weights == "none"
    assert row_config(weighted, "loss dice").class_weights == "sqrt-inv-freq"
    check_settings(row_config(weighted, "loss lovasz"))
    # The base's own unused setting is still refused (the rows leave it out, so it would go unsaid)
    with pytest.raises(TrainingError, match=r"^--focal-gamma 3.0: must be left out without --loss focal"):
        run_ablation(replace(focal, loss="dice"), ["baseline", "ema 0.999"], ram_tmp / "unused")


def test_a_damaged_result_file_is_one_line_or_left_out_of_the_table(demo_root, ram_tmp, monkeypatch):
    """Found by a helper: a result.json cut short or edited was a JSONDecodeError traceback before any training, even
    for a row not asked for (earlier rows are read for the table)."""
    import resunet.ablate
    from resunet.ablate import earlier_rows, row_folder

    monkeypatch.setattr(resunet.ablate, "train", lambda cfg: pytest.fail("trained anyway"))
    base = tiny_config(demo_root, ram_tmp / "unused", epochs=1)
    out = ram_tmp / "ablation"
    for text in ("{", "null", '{"option": "loss focal"}'):
        (out / row_folder("loss focal")).mkdir(parents=True, exist_ok=True)
        (out / row_folder("loss focal") / "result.json").write_text(text)
        with pytest.raises(TrainingError, match=r"result.json: not a finished row's result \(.*missing\); remove it "
                                                r"to score the row again from its last.pt$"):
            run_ablation(base, ["loss focal"], out)
        assert earlier_rows(base, ["baseline"], out) == []  # not asked for: left out of the table, not a traceback


def test_unknown_option_is_one_line(demo_root, capsys):
    assert main(["ablate", "--data-root", str(demo_root), "--options", "baseline; loss hinge"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resunet ablate: error: unknown ablation option(s) 'loss hinge'") and "\n" not in err


def test_a_signal_stops_the_ablation_without_scoring_the_row(demo_root, ram_tmp, monkeypatch, capsys):
    import resunet.ablate

    monkeypatch.setattr(resunet.ablate, "train", lambda cfg: {"stopped_by": "SIGTERM"})
    base = tiny_config(demo_root, ram_tmp / "unused", epochs=1)
    (ram_tmp / "ablation").mkdir()
    (ram_tmp / "ablation" / "ablation.md").write_text("an earlier run's table\n")
    assert run_ablation(base, ["baseline", "loss focal"], ram_tmp / "ablation") == []
    assert not (ram_tmp / "ablation" / "baseline" / "result.json").exists()
    # No row finished: the earlier table stays (it was replaced by an empty one).
    assert (ram_tmp / "ablation" / "ablation.md").read_text() == "an earlier run's table\n"
    out = capsys.readouterr().out
    assert "stopped in row 'baseline'; run the same command again to continue it and the rows after it" in out
    assert "would continue this row alone, with no table" in out
    assert main(["ablate", "--data-root", str(demo_root), "--out", str(ram_tmp / "ablation"), "--options",
                 "baseline; loss focal;"]) == 130  # stopped (the trailing ';' is no row of its own)
    # A signal during the row's final evaluation: the row is trained, not scored, and the ablation stops there.
    monkeypatch.setattr(resunet.ablate, "train", lambda cfg: {"stopped_by": None, "stop_requested": "SIGTERM"})
    assert run_ablation(base, ["baseline", "loss focal"], ram_tmp / "ablation") == []
    assert "stopped in row 'baseline'" in capsys.readouterr().out


def test_a_row_is_scored_under_the_recipes_max_pixels_and_evaluated_as_its_schedule_needs(demo_root, ram_tmp,
                                                                                          monkeypatch, capsys):
    """A row trained under --max-pixels above the default was then scored under the default: every row trained and
    failed to score, again on each rerun. --eval-every was replaced without a word; a plateau schedule steps on the
    evaluations, so its rows keep them, and with another schedule the flag is refused (review, 2026-12-06)."""
    import resunet.ablate
    from resunet.ablate import plan_row, run_row

    def trained(cfg):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1.0, "lr": 0.0, '
                                                      '"train_images_per_s": 2.0}\n')
        return {"stopped_by": None}

    scored = {}
    monkeypatch.setattr(resunet.ablate, "train", trained)
    monkeypatch.setattr(resunet.ablate, "run_evaluate",
                        lambda *args, **kw: scored.update(kw) or {"miou": 0.5, "boundary_miou": 0.4, "ece": 0.1})
    base = tiny_config(demo_root, ram_tmp / "unused", epochs=4, eval_every=2, max_pixels=70_000_000)
    cfg, result = plan_row(base, "baseline", ram_tmp / "ablation")
    assert run_row("baseline", cfg, result)["miou"] == 0.5 and scored["max_pixels"] == 70_000_000
    assert cfg.eval_every == 2  # tiny_config's --scheduler plateau
    assert plan_row(replace(base, scheduler="cosine"), "baseline", ram_tmp / "cosine")[0].eval_every == 4
    assert main(["ablate", "--data-root", str(demo_root), "--scheduler", "cosine", "--eval-every", "2",
                 "--out", str(ram_tmp / "refused")]) == 2
    assert "--eval-every: ablate scores each row's final weights once" in capsys.readouterr().err
    assert not (ram_tmp / "refused").exists()


def test_an_ablation_folder_another_ablation_is_writing_is_refused(demo_root, ram_tmp, monkeypatch):
    """Two ablations in one --out each planned their rows once at the start: a row the other finished meanwhile was
    still planned as "start over", its files deleted and trained again (a helper's review, 2026-12-07)."""
    import resunet.ablate
    from resunet.outputs import FolderLock

    out = ram_tmp / "ablation"
    out.mkdir()
    monkeypatch.setattr(resunet.ablate, "train", lambda cfg: pytest.fail("a row trained beside the other ablation"))
    with FolderLock(out) as other, pytest.raises(TrainingError, match=rf"^--out {out}: another resunet ablate is "
                                                                    r"writing there; wait for it to end"):
        assert other.held
        run_ablation(tiny_config(demo_root, ram_tmp / "unused", epochs=1), ["baseline"], out)
    assert list(out.iterdir()) == []
