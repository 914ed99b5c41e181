import json
import math
import os
import time

import numpy as np
import pytest
import torch

from resunet.checkpoint import load_checkpoint
from resunet.train import (TrainingError, calibration_seconds, duration_seconds, epochs_within, make_optimizer,
                           refit_epochs, steady_epoch_seconds, train)

from conftest import tiny_config


# For tests of the loop's mechanics (not of what it learns): a quarter of the pixels and a lighter encoder.
SMALL = dict(size=32, encoder="resnet18")


def read_records(run):
    """metrics.jsonl as every JSON parser reads it: no bare NaN (VOC classes absent from the demo's val are null)."""
    def refuse(name):
        raise AssertionError(f"{name} in metrics.jsonl")
    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_the_fused_optimizer_steps_like_pytorchs_reference_loop(name):
    # Adam's weight decay is an L2 term in the gradient, AdamW's a separate shrink of the weights: the fused kernel
    # must keep that difference, and match the per-tensor loop to rounding over steps with changing gradients.
    torch.manual_seed(0)
    start = [torch.randn(300, 7), torch.randn(5)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(6)]

    def stepped(build):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = build(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        return optimizer, [p.detach() for p in params]

    reference_class, other_class = (torch.optim.AdamW, torch.optim.Adam) if name == "adamw" else \
        (torch.optim.Adam, torch.optim.AdamW)
    fused, ours = stepped(lambda ps: make_optimizer(name, ps, 0.05, 0.1, torch.device("cpu")))
    _, reference = stepped(lambda ps: reference_class(ps, lr=0.05, weight_decay=0.1, foreach=False))
    assert fused.param_groups[0]["fused"] is True
    for a, b, s in zip(ours, reference, start):
        assert not torch.equal(a, s)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The other rule moves the same weights elsewhere: the test tells Adam from AdamW.
    _, other = stepped(lambda ps: other_class(ps, lr=0.05, weight_decay=0.1))
    assert (other[0] - ours[0]).abs().max() > 1e-3


def test_training_lowers_loss_and_beats_the_all_background_baseline(trained_run):
    records = read_records(trained_run)
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1))
    assert None in next(r["val_iou"] for r in records if r["val_iou"])  # absent classes, as null
    assert records[-1]["train_loss"] < 0.6 * records[0]["train_loss"]
    scored = [r["val_miou"] for r in records if r["val_miou"] is not None]
    assert len(scored) == 10  # every other epoch
    best = max(scored)
    # Predicting background everywhere scores 0.144 here (bg IoU ~0.87 averaged with 0 for 5 object classes);
    # uniform guessing among 21 classes scores under 0.05.
    assert best > 0.22, [round(v, 3) for v in scored]
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


def test_eval_every_skips_evaluation_but_not_the_last_epoch(demo_root, ram_tmp, monkeypatch):
    import resunet.train

    drawn = []  # the epochs each drawing of curves.png shows
    plot = resunet.train.plot_curves
    monkeypatch.setattr(resunet.train, "plot_curves", lambda records, path: (drawn.append(
        [r["epoch"] for r in records]), plot(records, path)))
    monkeypatch.setattr(resunet.train, "CURVES_EVERY_S", 3600.0)
    out = ram_tmp / "sparse"
    train(tiny_config(demo_root, out, epochs=3, eval_every=2, **SMALL))
    assert [r["val_miou"] is not None for r in read_records(out)] == [False, True, True]
    assert (out / "curves.png").is_file() and (out / "best.pt").is_file()
    # Redrawn at most every CURVES_EVERY_S: after epoch 1, then once more when the run ends, with every epoch.
    assert drawn == [[1], [1, 2, 3]]


def test_curves_are_drawn_up_to_the_last_saved_epoch_when_the_run_stops_on_an_error(demo_root, ram_tmp,
                                                                                     monkeypatch):
    """A bad file, a diverged loss or a failed save ended the run with curves.png up to CURVES_EVERY_S behind
    metrics.jsonl: the catch-up drawing ran only when the loop ended normally (a helper's audit, 2026-12-07)."""
    import resunet.train

    drawn = []
    plot = resunet.train.plot_curves
    monkeypatch.setattr(resunet.train, "plot_curves", lambda records, path: (drawn.append(
        [r["epoch"] for r in records]), plot(records, path)))
    monkeypatch.setattr(resunet.train, "CURVES_EVERY_S", 3600.0)
    real_epoch = resunet.train.set_loader_epoch

    def diverged_in_epoch_3(loader, epoch, *args):
        if epoch == 3:
            raise TrainingError("loss became NaN in epoch 3 (a stand-in)")
        return real_epoch(loader, epoch, *args)

    monkeypatch.setattr(resunet.train, "set_loader_epoch", diverged_in_epoch_3)
    out = ram_tmp / "failed"
    with pytest.raises(TrainingError, match="a stand-in"):
        train(tiny_config(demo_root, out, epochs=4, **SMALL))
    assert [r["epoch"] for r in read_records(out)] == [1, 2]
    assert drawn == [[1], [1, 2]]  # after epoch 1, then at the failure: every saved epoch


def test_time_budget_arithmetic_by_hand():
    assert [duration_seconds(t) for t in ("50m", "1.5h", "90s", "120")] == [3000, 5400, 90, 120]
    for bad in ("abc", "0m", "-5m", "m", "inf", "nanh"):
        with pytest.raises(TrainingError, match="--time-budget"):
            duration_seconds(bad)
    # 3600 s, 400 s gone (setup and epoch 1), epochs of 250 s, evaluations of 50 s after epochs 3, 6, ... and the
    # last: 11 more end at epoch 12 after 400 + 11 · 250 + 4 · 50 = 3350 s; a 12th more would need 3650 s.
    assert epochs_within(3600, 400, 250, 50, 3, 100) == 12
    # Evaluated every epoch, the last one's evaluation counts once: 100 + 24 · (40 + 30) = 1780 s ≤ 1800 s, so 25
    # epochs (reserving it twice gave 24). Every third: 120 + 50 · 55 + 17 · 25 = 3295 s ≤ 3300 s, so 51.
    assert epochs_within(1800, 100, 40, 30, 1, 200) == 25
    assert epochs_within(3300, 120, 55, 25, 3, 200) == 51
    assert epochs_within(3300, 126, 55, 25, 3, 200) == 50  # 6 s more and the 51st no longer fits
    assert epochs_within(3600, 400, 250, 50, 3, 10) == 10  # --epochs stays the most
    assert epochs_within(60, 400, 250, 50, 3, 100) == 1  # over budget already: the first epoch is all
    # The re-fit after epoch 10: 2000 s gone, 7 more epochs of 200 s evaluated after 12, 15 and 17: 2000 + 1400 + 90
    # = 3490 s; an 8th more would need 3690 s.
    assert epochs_within(3600, 2000, 200, 30, 3, 20, done=10) == 17
    assert epochs_within(3600, 2000, 200, 30, 3, 12, done=10) == 12
    assert epochs_within(3600, 3500, 200, 30, 3, 20, done=10) == 10  # nothing more fits: the run ends here
    # --calibrate's 300 s after the last epoch: 10 more end at epoch 11, 400 + 2500 + 4 · 50 + 300 = 3400 s; an 11th
    # more would need 3950 s.
    assert epochs_within(3600, 400, 250, 50, 3, 100, after_s=300) == 11
    # Calibration's two passes over val run on the first process alone: under torchrun, each is `world` times the
    # sharded evaluation rank 0 timed (a helper's review: 2 evaluations reserved, 2 × world run)
    assert calibration_seconds(50, 1) == 100 and calibration_seconds(50, 4) == 400
    # Epoch 1 took 300 s, its second half (23 of 45 steps) 115 s: later epochs are timed at 115 · 45 / 23 = 225 s.
    assert steady_epoch_seconds(300, 115, 23, 45) == pytest.approx(225)
    assert steady_epoch_seconds(300, None, 23, 45) == 300  # no half timed (resumed past it): the whole epoch
    assert steady_epoch_seconds(300, 0.0, 0, 1) == 300  # one step per epoch: no second half to time


def test_a_re_fit_lengthens_only_with_an_epoch_to_spare():
    """At a pace on the edge of a count the re-fit moved it up and down by one after every epoch (51, 50, 51, ...).
    After epoch 20 of a 3300 s budget, 1300 s gone, evaluations of 10 s every third epoch (and the last): at 60 s an
    epoch 31 more end at 51 (1300 + 31 · 60 + 11 · 10 = 3270 s), a 32nd would need 3340 s; at 61 s 31 more need
    3301 s, so 50."""
    assert epochs_within(3300, 1300, 60, 10, 3, 55, done=20) == 51
    assert epochs_within(3300, 1300, 61, 10, 3, 55, done=20) == 50
    assert refit_epochs(51, 3300, 1300, 61, 10, 3, 55, done=20) == 50  # shorter at once: it would overrun
    # Back at 60 s the 51st fits with 30 s to spare, not an epoch's time: the count stays.
    assert refit_epochs(50, 3300, 1300, 60, 10, 3, 55, done=20) == 50
    assert refit_epochs(51, 3300, 1300, 60, 10, 3, 55, done=20) == 51
    # A machine that sped up to 55 s an epoch: 54 would fit (1300 + 34 · 55 + 12 · 10 = 3290 s); with 55 s kept
    # spare, 53 (1355 + 33 · 55 + 12 · 10 = 3290 s; 54 would need 3345 s).
    assert epochs_within(3300, 1300, 55, 10, 3, 55, done=20) == 54
    assert refit_epochs(50, 3300, 1300, 55, 10, 3, 55, done=20) == 53
    # Shortening is the plain fit, whatever the count was.
    assert refit_epochs(55, 3300, 1300, 55, 10, 3, 55, done=20) == 54


def slowed_saves(monkeypatch) -> list[float]:
    """Each checkpoint save made 0.4 s slower (a size the budget tests' bounds can tell from noise), and how long
    each took in all; curves.png not drawn (a first matplotlib figure, a second or more on a loaded CPU, would sit
    in the epoch's bookkeeping the bounds measure)."""
    import resunet.train

    slow_save, save_s = resunet.train.save_checkpoint, []

    def timed_slow_save(*args):
        start = time.perf_counter()
        time.sleep(0.4)
        slow_save(*args)
        save_s.append(time.perf_counter() - start)

    monkeypatch.setattr(resunet.train, "save_checkpoint", timed_slow_save)
    monkeypatch.setattr(resunet.train, "draw_curves", lambda records, out: time.perf_counter())
    return save_s


def test_training_on_the_val_images_is_warned(demo_root, ram_tmp, capsys):
    """`--train-split val --val-split val` passed the data check without a word (it checks the splits as one), and
    the run's val mIoU measured fitting, not new images (a helper's audit, 2026-12-07)."""
    train(tiny_config(demo_root, ram_tmp / "same", epochs=1, train_split="val", val_split="val"))
    assert ("resunet: warning: 8 of the 8 val images are training images too (--train-split val, --val-split val)"
            in capsys.readouterr().err)
    train(tiny_config(demo_root, ram_tmp / "apart", epochs=1))
    assert "training images too" not in capsys.readouterr().err


def test_a_time_budget_cuts_the_epochs_and_the_schedule_spans_them(demo_root, ram_tmp, capsys, monkeypatch):
    import resunet.train

    fits, paces, called = [], [], []  # what the loop measured; the fit itself is checked by hand above
    monkeypatch.setattr(resunet.train, "epochs_within",
                        lambda *args, **kw: called.append(time.perf_counter()) or fits.append((args, kw)) or 2)
    steady = resunet.train.steady_epoch_seconds
    monkeypatch.setattr(resunet.train, "steady_epoch_seconds",
                        lambda *args: paces.append((args, steady(*args))) or paces[-1][1])
    save_s = slowed_saves(monkeypatch)
    out = ram_tmp / "budget"
    started = time.perf_counter()
    train(tiny_config(demo_root, out, epochs=5, eval_every=3, scheduler="cosine", time_budget="1h", calibrate=True,
                      **SMALL))
    records = read_records(out)
    ((budget_s, elapsed_s, epoch_s, eval_s, eval_every, max_epochs), kw), = fits
    # --calibrate's two passes over val (the fit's, then the ECE after it) are budgeted: they overran it when not
    assert kw == {"done": 1, "after_s": 2 * eval_s}
    ((whole_epoch_s, second_half_s, _, _), steady_s), = paces
    assert (budget_s, eval_every, max_epochs) == (3600, 3, 5) and elapsed_s > whole_epoch_s + eval_s > 0
    # The clock counts the re-save of best.pt and last.pt that follows a changed count (at least 0.8 s here): the
    # time since train() began, plus that.
    assert elapsed_s - (called[0] - started) > 0.7
    # The fit is given the second half's pace, not the whole epoch's, plus epoch 1's saves (best.pt and last.pt,
    # 0.4 s more each here): left out, tiny epochs were fitted at about twice the count that fits.
    assert steady_s + sum(save_s[:2]) <= epoch_s < steady_s + sum(save_s[:2]) + 1.0
    assert second_half_s is None or 0 < second_half_s < whole_epoch_s
    # Two epochs, the first evaluated to time it; the cosine spans the two (lr 0 at the end), not the five.
    assert [r["val_miou"] is not None for r in records] == [True, True] and records[-1]["lr"] == 0
    assert load_checkpoint(out / "last.pt", tensors=False)["train_config"]["epochs"] == 2
    printed = capsys.readouterr().out
    assert "time budget 1h: epoch 1 took" in printed and f"then --calibrate about {2 * eval_s:.0f}s" in printed
    assert "calibrated " in printed
    # Saved again after the fit at epoch 1: a run resumed from there keeps the fitted count.
    assert load_checkpoint(out / "best.pt", tensors=False)["train_config"]["epochs"] == 2


def test_a_time_budget_fits_again_after_each_epoch_and_the_decay_goes_on(demo_root, ram_tmp, capsys, monkeypatch):
    import resunet.train

    # Epoch 1's fit says 10 of --epochs 30; after epoch 2 (a fifth of the run: a re-fit used to lengthen only
    # within the first tenth, so a machine that sped up later left minutes unused) the re-fit may choose up
    # to 30 and says 25, and 25 again with an epoch's time kept spare; after epoch 3 it says 3: nothing more fits,
    # the run ends.
    fits, answers = [], iter([10, 25, 25, 3])
    called = []  # when each fit was made
    monkeypatch.setattr(resunet.train, "epochs_within",
                        lambda *args, **kw: called.append(time.perf_counter()) or fits.append((args, kw))
                        or next(answers))
    save_s = slowed_saves(monkeypatch)
    out = ram_tmp / "refit"
    started = time.perf_counter()
    train(tiny_config(demo_root, out, epochs=30, eval_every=3, scheduler="cosine", time_budget="1h", **SMALL))
    records = read_records(out)
    assert [(args[-1], kw) for args, kw in fits] == [(30, {"done": 1, "after_s": 0}), (30, {"done": 2, "after_s": 0}),
                                                     (30, {"done": 2, "after_s": 0}),
                                                     (30, {"done": 3, "after_s": 0})]  # no --calibrate to budget
    (budget_s, elapsed_s, pace_s, eval_s, eval_every, _), _ = fits[1]
    assert (budget_s, eval_every) == (3600, 3)
    assert fits[2][0] == (budget_s, elapsed_s + pace_s, pace_s, eval_s, eval_every, 30)  # the spare epoch's fit
    # The re-fit's pace is epoch 2's training time (the one epoch since the fit) plus the bookkeeping of the
    # epochs since (epoch 1's: two saves of at least 0.4 s, timed before the fit's own re-save), without evaluation;
    # its clock counts both epochs and epoch 1's evaluation.
    assert 0.8 < pace_s <= records[1]["seconds"] + sum(save_s[:2]) + 1.0 and eval_s > 0
    assert elapsed_s > records[0]["seconds"] + pace_s
    # ... and the bookkeeping of epoch 2 still to come after the re-fit (saves, curves: the mean so far, epoch 1's
    # here, its two saves and its drawing; left out, a run could overrun by a save): the time since train() began
    # is short of what it was told by that much.
    assert sum(save_s[:2]) - 0.1 <= elapsed_s - (called[1] - started) < sum(save_s[:2]) + 5
    # Three epochs: 1 evaluated for the fit, 3 as the last. The cosine (lr 1e-3, no warm-up, 12 steps an epoch)
    # spans 30 epochs during epoch 1; at each change of the count it goes on from how far along it is over the
    # steps then left: 1/30 of the way at step 12, over 10 epochs during epoch 2, over 25 during epoch 3 (the cut
    # to 3 came after its last step). Re-spanned in place (as before), the rate rose from 0.90 of its peak at
    # step 24 to 0.98 at step 25.
    assert [r["val_miou"] is not None for r in records] == [True, False, True]
    progress = [12 / 360]
    progress.append(progress[-1] + (1 - progress[-1]) * 12 / (120 - 12))
    progress.append(progress[-1] + (1 - progress[-1]) * 12 / (300 - 24))
    cosine = [1e-3 * 0.5 * (1 + math.cos(math.pi * p)) for p in progress]
    assert [r["lr"] for r in records] == pytest.approx(cosine, rel=1e-6)
    assert records[2]["lr"] < records[1]["lr"] < records[0]["lr"]
    # Each re-fit says which way the count went, after its epoch's line (which shows the new count), and one that
    # ends the run says its decay was cut short.
    printed = capsys.readouterr().out.splitlines()
    notes = [i for i, line in enumerate(printed) if "epochs now take" in line]
    assert [printed[i - 1][:12] for i in notes] == ["epoch   2/25", "epoch   3/3 "]
    assert printed[notes[0]].endswith("s; 25 epoch(s) fit, up from 10")
    assert printed[notes[1]].endswith("s; 3 epoch(s) fit, down from 25; the run ends with this epoch, its cosine "
                                      "schedule cut short (the learning rate never decayed to 0): a larger "
                                      "--time-budget lets it finish")
    # Where the decay was last re-planned is saved with the schedule: a resumed run goes on along the same curve.
    saved = load_checkpoint(out / "last.pt", tensors=False)["scheduler"]["lr_lambdas"]
    assert saved == [{"anchor_epoch": 3.0, "anchor_progress": pytest.approx(progress[2])}]
    assert load_checkpoint(out / "last.pt", tensors=False)["train_config"]["epochs"] == 3


def test_a_time_budget_too_small_for_two_epochs_says_the_schedule_never_decayed(demo_root, ram_tmp, capsys,
                                                                               monkeypatch):
    """A budget that fits epoch 1 alone ended the run at the warm-up's top or the peak rate, without a word."""
    import resunet.train

    monkeypatch.setattr(resunet.train, "epochs_within", lambda *args, **kw: 1)
    out = ram_tmp / "tiny-budget"
    train(tiny_config(demo_root, out, epochs=5, scheduler="cosine", time_budget="1h", **SMALL))
    assert len(read_records(out)) == 1 and read_records(out)[0]["lr"] > 0
    fit = [line for line in capsys.readouterr().out.splitlines() if line.startswith("time budget 1h: epoch 1 took")]
    assert len(fit) == 1 and fit[0].endswith("; 1 epoch(s) fit; the run ends with this epoch, its cosine schedule "
                                             "cut short (the learning rate never decayed to 0): a larger "
                                             "--time-budget lets it finish")


def test_validation_runs_in_eval_mode_and_leaves_batchnorm_statistics_alone(demo_root, ram_tmp, monkeypatch):
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
    train(tiny_config(demo_root, ram_tmp / "run", epochs=2, **SMALL))
    assert seen == [True, True]


def test_compile_trains_the_same_weights_and_saves_the_plain_model(demo_root, ram_tmp, monkeypatch):
    # --compile wraps the training model in torch.compile. Inductor would spend minutes compiling C++ here, so
    # the test gives torch.compile the "eager" backend: TorchDynamo still captures the model's graph and the
    # training steps run through it, with the same arithmetic as the plain run, bit for bit in fp32. The
    # checkpoint must hold the plain model's weights (no "_orig_mod." prefixes), loadable without compiling.
    real_compile, compiled, graph_runs = torch.compile, [], []

    def counting(graph, example_inputs):  # the "eager" backend, counting the captured graph's training calls
        def run(*args):
            graph_runs.append(torch.is_grad_enabled())
            return graph.forward(*args)
        return run

    def eager_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend=counting)

    monkeypatch.setattr(torch, "compile", eager_compile)
    settings = dict(epochs=1, precision="fp32", batch_size=4, **SMALL)
    train(tiny_config(demo_root, ram_tmp / "compiled", compile=True, **settings))
    assert len(compiled) == 1
    # The steps ran through the compiled model (training with the plain one passed the checks below as well)
    steps = load_checkpoint(ram_tmp / "compiled" / "last.pt")["scheduler"]["last_epoch"]
    assert steps >= 1 and graph_runs.count(True) >= steps
    train(tiny_config(demo_root, ram_tmp / "plain", **settings))
    assert len(compiled) == 1  # the plain run did not compile
    a, b = load_checkpoint(ram_tmp / "compiled" / "last.pt"), load_checkpoint(ram_tmp / "plain" / "last.pt")
    assert set(a["model"]) == set(b["model"]) and not any(k.startswith("_orig_mod") for k in a["model"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["train_config"]["compile"] is True
    assert read_records(ram_tmp / "compiled")[0]["train_images_per_s"] > 0  # measured from the second step on


def test_progress_line_by_hand():
    from resunet.train import progress_line

    # 10 of 40 steps took 20 s (40 images): 2.0 img/s, 30 steps × 2 s left = 1 min.
    assert progress_line(3, 55, 10, 40, 40, 20.0) == "epoch 3/55: step 10/40, 2.0 img/s, epoch ETA 1m00s"


def test_a_log_file_gets_progress_lines_not_bar_fragments(demo_root, ram_tmp, monkeypatch, capsys):
    import resunet.train as train_module

    monkeypatch.setattr(train_module, "PROGRESS_EVERY_S", 0.0)  # a line after every step
    train(tiny_config(demo_root, ram_tmp / "run", epochs=1, progress=True, **SMALL))
    captured = capsys.readouterr()  # not a terminal, like a server's log file
    assert "\r" not in captured.out + captured.err
    steps = [line for line in captured.out.splitlines() if line.startswith("epoch 1/1: step ")]
    assert steps[0].startswith("epoch 1/1: step 1/12, ") and steps[-1].startswith("epoch 1/1: step 12/12, ")
    assert "img/s, epoch ETA" in steps[0]


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(demo_root, ram_tmp, monkeypatch):
    import errno

    import resunet.checkpoint as checkpoint_module
    from resunet.checkpoint import CheckpointError

    run = ram_tmp / "run"
    train(tiny_config(demo_root, run, epochs=1, **SMALL))
    before = (run / "last.pt").read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # most of the bytes go out, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    from test_cache import killed_pid

    (run / ".notes.tmpl").write_text("mine")  # the user's, beside a save's leftover from a killed process
    (run / f".last.pt.tmp{killed_pid()}").write_bytes(b"half")  # named as before 2026-12-07
    (run / f".best.pt.tmp{killed_pid()}-0123abcd").write_bytes(b"half")
    # and a file another process is still writing (an export's ONNX file, for minutes): it failed at its end
    (run / f".model.onnx.tmp{os.getppid()}").write_bytes(b"being written")
    (run / f".model.int8.onnx.tmp{os.getppid()}-4567cdef").write_bytes(b"being written")
    with pytest.raises(CheckpointError) as error:
        train(tiny_config(demo_root, run, epochs=2, resume=str(run / "last.pt"), **SMALL))
    message = str(error.value)
    assert "No space left on device" in message and "the previous last.pt is intact" in message
    assert message.endswith(f"free some space and resume from {run / 'last.pt'}")
    assert (run / "last.pt").read_bytes() == before  # untouched, and it still loads
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    # No temporary file left behind, the leftover removed, the user's file kept (".*.tmp*" matched it too)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [
        f".model.int8.onnx.tmp{os.getppid()}-4567cdef", f".model.onnx.tmp{os.getppid()}", ".notes.tmpl"]
    # The first save of a run: nothing to resume from ("no best.pt was written; ... resume from it" said so)
    with pytest.raises(CheckpointError) as error:
        train(tiny_config(demo_root, ram_tmp / "fresh", epochs=1, **SMALL))
    assert str(error.value).endswith("no best.pt was written; free some space and start again")
    # The first last.pt alone fails, after best.pt was saved: best.pt holds the run, and is named to go on with
    # ("start again" was refused, the folder holding a run, and only --overwrite offered: a helper, 2026-12-07).
    fresh = ram_tmp / "fresh"

    def last_pt_disk_full(obj, f, *args, **kwargs):
        if ".last.pt." in str(getattr(f, "name", "")):
            disk_full(obj, f, *args, **kwargs)
        real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(checkpoint_module.torch, "save", last_pt_disk_full)
    with pytest.raises(CheckpointError) as error:
        train(tiny_config(demo_root, fresh, epochs=2, **SMALL))
    assert str(error.value).endswith(f"no last.pt was written; free some space and resume from {fresh / 'best.pt'}")
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    with pytest.raises(TrainingError, match=rf"holds a run already \(best.pt\); go on with it with --resume "
                                            rf"{fresh / 'best.pt'}, start it over"):
        train(tiny_config(demo_root, fresh, epochs=2, **SMALL))
    train(tiny_config(demo_root, fresh, epochs=2, resume=str(fresh / "best.pt"), **SMALL))
    assert load_checkpoint(fresh / "last.pt")["epoch"] == 2


def test_a_val_file_that_goes_bad_mid_run_is_named_and_the_checkpoint_kept(demo_root, ram_tmp, capsys):
    import shutil

    from resunet.cli import main

    data = ram_tmp / "data"
    shutil.copytree(demo_root, data)
    run = ram_tmp / "run"
    args = ["--out", str(run), "--batch-size", "4", "--size", "32", "--encoder", "resnet18", "--no-pretrained",
            "--workers", "0", "--no-progress", "--cache-dir", str(ram_tmp / "cache")]
    assert main(["train", "--data-root", str(data), "--epochs", "1", *args]) == 0
    before = (run / "last.pt").read_bytes()
    # After the cache was built: a val image is truncated on disk; the resumed run reads it at its evaluation.
    val_names = (data / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split()
    broken = data / "VOCdevkit/VOC2012/JPEGImages" / f"{val_names[0]}.jpg"
    broken.write_bytes(broken.read_bytes()[:300])
    capsys.readouterr()
    assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "2", "--skip-data-check", *args[9:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(broken) in err[0] and "cut short" in err[0], err
    assert "epoch 2's training is saved" in err[0]
    saved = load_checkpoint(run / "last.pt", tensors=False)  # epoch 1, and epoch 2's steps: its evaluation to come
    assert saved["epoch"] == 1 and saved["position"]["step"] == 12 and (run / "last.pt").read_bytes() != before


def test_tensorboard_event_files_hold_the_run(demo_root, ram_tmp):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from resunet.data.classes import VOC_INFO
    from resunet.data.dataset import open_dataset
    from resunet.tensorboard_log import PREVIEW_HEIGHT, _to_height

    from torch.utils.tensorboard import SummaryWriter

    run = ram_tmp / "run"
    # A run killed before its first save leaves events no checkpoint records: the new run's curves drop them
    # (they zigzagged through them).
    orphaned = SummaryWriter(str(run / "tensorboard"))
    orphaned.add_scalar("train/loss", 99.0, 10)
    orphaned.close()
    train(tiny_config(demo_root, run, epochs=2, tensorboard=True, scheduler="cosine", **SMALL))
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalar = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]
    records = read_records(run)
    # 12 steps per epoch: epoch values at steps 12 and 24, the loss every 10 steps.
    assert scalar("val/mIoU") == [(12 * r["epoch"], pytest.approx(r["val_miou"])) for r in records]
    assert scalar("train/epoch_loss") == [(12 * r["epoch"], pytest.approx(r["train_loss"])) for r in records]
    assert [step for step, _ in scalar("train/loss")] == [10, 20] and 99.0 not in dict(scalar("train/loss")).values()
    lrs = scalar("train/lr")
    assert lrs[0][1] > lrs[1][1] > 0  # cosine decay
    iou = records[-1]["val_iou"]
    assert scalar("val/IoU/background") == [(12, pytest.approx(records[0]["val_iou"][0])), (24, pytest.approx(iou[0]))]
    scored = {f"val/IoU/{VOC_INFO.names[i]}" for r in records for i, v in enumerate(r["val_iou"]) if v is not None}
    assert set(events.Tags()["scalars"]) == scored | {"train/loss", "train/lr", "train/epoch_loss",
                                                      "train/images_per_s", "val/mIoU", "val/pixel_accuracy"}
    # The preview: 4 val images, each row image | ground truth | prediction, in the class colours.
    images = events.Images("val/predictions")
    assert [e.step for e in images] == [12, 24]
    from io import BytesIO

    from PIL import Image

    sheet = np.asarray(Image.open(BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    assert sheet.shape == (4 * PREVIEW_HEIGHT, 3 * PREVIEW_HEIGHT, 3)  # the demo images are square
    sample = open_dataset(demo_root, "val").load(0)
    truth = _to_height(VOC_INFO.colour_lut()[sample.mask], PREVIEW_HEIGHT)
    assert np.array_equal(sheet[:PREVIEW_HEIGHT, PREVIEW_HEIGHT:2 * PREVIEW_HEIGHT], truth)

    # Resumed for a third epoch: the finished epochs' events stay; only those past the resume point are dropped.
    train(tiny_config(demo_root, run, epochs=3, tensorboard=True, scheduler="cosine", resume=str(run / "last.pt"),
                      **SMALL))
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val/mIoU")] == [12, 24, 36]
    assert [e.step for e in events.Scalars("train/loss")] == [10, 20, 30]
    assert [e.step for e in events.Images("val/predictions")] == [12, 24, 36]


def test_tensorboard_keeps_the_events_up_to_a_failure(demo_root, ram_tmp, monkeypatch):
    """Found by a helper: the writer was closed only after a run that ended well, and it flushes every 2 minutes, so a
    diverged run lost the loss points before the NaN, the ones a user opens TensorBoard to see."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import resunet.train as train_module

    real_step, steps = train_module.train_step, []

    def step(*args, **kwargs):
        steps.append(1)
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if len(steps) == 31 else loss  # 12 steps an epoch: epoch 3's seventh

    monkeypatch.setattr(train_module, "train_step", step)
    real_close, closed = train_module.TensorBoardLog.close, []
    monkeypatch.setattr(train_module.TensorBoardLog, "close", lambda board: closed.append(1) or real_close(board))
    run = ram_tmp / "run"
    with pytest.raises(TrainingError, match="the loss became NaN or infinite by step 7 of epoch 3"):
        train(tiny_config(demo_root, run, epochs=3, tensorboard=True, **SMALL))
    assert closed == [1]  # flushed and its writer thread ended, as after a run that ends well
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [10, 20, 30]  # 30: after epoch 2's flush


def test_tensorboard_missing_is_one_line_naming_the_extra(demo_root, ram_tmp, monkeypatch):
    import sys

    import resunet.train as train_module
    from resunet.tensorboard_log import TensorBoardLog, TensorBoardUnavailable

    run = ram_tmp / "run"
    train(tiny_config(demo_root, run, epochs=1, **SMALL))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    with pytest.raises(TensorBoardUnavailable, match=r"pip install 'resunet\[tensorboard\]'"):
        TensorBoardLog(ram_tmp / "tb", 0)
    # Found by a helper: train said so only after the data check, the cache build and --overwrite's removal of the
    # earlier run, which was then gone with no new run in its place. Refused before any work now.
    stamp = (run / "last.pt").stat().st_mtime_ns
    monkeypatch.setattr(train_module, "check_data", lambda *args, **kwargs: pytest.fail("the data was checked"))
    with pytest.raises(TrainingError, match=r"^--tensorboard needs the tensorboard package"):
        train(tiny_config(demo_root, run, epochs=1, overwrite=True, tensorboard=True, **SMALL))
    assert (run / "last.pt").stat().st_mtime_ns == stamp and (run / "best.pt").is_file()


def test_resuming_a_finished_run_says_there_is_nothing_to_train(demo_root, ram_tmp, capsys):
    run = ram_tmp / "run"
    train(tiny_config(demo_root, run, epochs=1, **SMALL))
    stamp = (run / "last.pt").stat().st_mtime_ns
    capsys.readouterr()
    result = train(tiny_config(demo_root, run, epochs=1, resume=str(run / "last.pt"), **SMALL))
    out = capsys.readouterr().out
    assert result["stopped_by"] is None and "epochs 2..1" not in out
    assert "; no epoch to train: 1 already done (--epochs 1; give more to continue)" in out
    assert "done: no epoch to train" in out and (run / "last.pt").stat().st_mtime_ns == stamp
    # Fitted by --time-budget, --epochs is not the number the user gave: the line says what set it (2026-12-07)
    fitted = ram_tmp / "fitted"
    train(tiny_config(demo_root, fitted, epochs=5, time_budget="1s", **SMALL))  # one epoch fits, not five
    assert load_checkpoint(fitted / "last.pt")["train_config"]["epochs"] == 1
    capsys.readouterr()
    train(tiny_config(demo_root, fitted, epochs=1, time_budget="1s", resume=str(fitted / "last.pt"), **SMALL))
    assert ("; no epoch to train: 1 already done (--epochs 1, as --time-budget 1s fitted it; give more to continue)"
            in capsys.readouterr().out)
    # An --epochs given on resume is the user's, not the budget's (a review): the budget fitted 3 here, 1 is given
    payload = torch.load(fitted / "last.pt", map_location="cpu", weights_only=True)
    payload["train_config"]["epochs"] = 3
    torch.save(payload, fitted / "last.pt")
    train(tiny_config(demo_root, fitted, epochs=1, time_budget="1s", resume=str(fitted / "last.pt"), **SMALL))
    assert "; no epoch to train: 1 already done (--epochs 1; give more to continue)" in capsys.readouterr().out


def test_a_run_resumed_where_auto_means_fp16_starts_its_loss_scale(ram_tmp, monkeypatch):
    # A run started on a CPU or an Ampere GPU saves an empty (disabled) scaler; resumed on a T4, where auto means fp16,
    # loading it raised "The source state dict is empty" with a traceback.
    import resunet.train
    from resunet.data.demo import make_demo_dataset
    from resunet.train import train

    make_demo_dataset(ram_tmp / "data", train=8, val=2, size=32, seed=0)
    run = ram_tmp / "run"
    settings = dict(encoder="resnet18", batch_size=4, size=32)
    monkeypatch.setattr(resunet.train, "resolve_precision", lambda precision, device: None)
    train(tiny_config(ram_tmp / "data", run, epochs=1, **settings))
    assert load_checkpoint(run / "last.pt")["scaler"] == {}
    monkeypatch.setattr(resunet.train, "resolve_precision", lambda precision, device: torch.float16)
    train(tiny_config(ram_tmp / "data", run, epochs=2, resume=str(run / "last.pt"), **settings))
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and state["scaler"]["scale"] > 0  # fp16's scaler ran and was saved


def test_a_new_run_in_a_folder_that_holds_one_is_refused_unless_asked_to_overwrite(demo_root, ram_tmp, monkeypatch):
    """A run started again without --resume (or another recipe into the same --out) replaced last.pt, best.pt and
    metrics.jsonl of the run there without a word (found by a helper, 2026-12-05)."""
    from dataclasses import replace

    import resunet.train
    from resunet.train import RUN_FILES, resumed_config

    run = ram_tmp / "run"
    train(tiny_config(demo_root, run, epochs=2, **SMALL))
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1.old").write_bytes(b"the old run's curves")
    kept = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png")}
    with pytest.raises(TrainingError, match=(
            rf"^--out {run}: holds a run already \(last.pt and best.pt\); go on with it with --resume "
            rf"{run / 'last.pt'}, start it over with --overwrite, or give another --out$")):
        train(tiny_config(demo_root, run, epochs=1, loss="dice", **SMALL))
    assert {name: (run / name).read_bytes() for name in kept} == kept
    # A bad value is said first: --time-budget 0 was said only once --overwrite was given (a helper, 2026-12-07).
    with pytest.raises(TrainingError, match=r"^--time-budget 0: give a duration"):
        train(tiny_config(demo_root, run, epochs=1, time_budget="0", **SMALL))
    (run / "last.pt").unlink()
    with pytest.raises(TrainingError, match=r"holds a run already \(best.pt\); go on with it with --resume "
                                            rf"{run / 'best.pt'}, start it over with --overwrite"):
        train(tiny_config(demo_root, run, epochs=1, **SMALL))
    # --overwrite: the old run's files go once the new run is ready to train (a stop after that leaves none of them
    # beside the new run's), and not before (a refused run keeps them).
    with pytest.raises(TrainingError, match="--epochs"):
        train(tiny_config(demo_root, run, epochs=0, overwrite=True, **SMALL))
    assert (run / "best.pt").is_file() and (run / "metrics.jsonl").is_file()

    def stop(*args, **kwargs):
        raise RuntimeError("stopped before the first epoch")

    # after the data path, model, optimiser and class weights are ready: the run is ready
    monkeypatch.setattr(resunet.train, "SegmentationLoss", stop)
    with pytest.raises(RuntimeError, match="stopped before"):
        train(tiny_config(demo_root, run, epochs=1, overwrite=True, **SMALL))
    assert run.is_dir() and not [name for name in RUN_FILES if (run / name).exists()]
    assert not (run / "tensorboard").exists()  # its events would mix with the new run's (review, 2026-12-05)
    monkeypatch.undo()
    train(tiny_config(demo_root, run, epochs=1, overwrite=True, loss="dice", **SMALL))
    assert len(read_records(run)) == 1 and load_checkpoint(run / "last.pt")["train_config"]["loss"] == "dice"
    # It starts a run; it is not a setting of the run: resuming it is plain --resume, and both at once is refused.
    resumed = resumed_config(run / "last.pt", {"epochs": 2})
    assert resumed.overwrite is False
    with pytest.raises(TrainingError, match="^--overwrite starts a new run, --resume goes on with one: give one"):
        train(replace(resumed, overwrite=True))


def test_a_resume_refuses_a_dataset_that_now_labels_other_classes(demo_root, ram_tmp):
    """classes.json edited between a run and its resume (two classes swapped): the masks were read as other classes
    and the run went on without a word (found by a helper, 2026-12-05). Stands in: the run's stored classes edited."""
    from resunet.checkpoint import save_checkpoint

    run = ram_tmp / "run"
    train(tiny_config(demo_root, run, epochs=1, eval_every=1, **SMALL))
    state = load_checkpoint(run / "last.pt")
    names = state["classes"]["classes"]
    names[1], names[15] = names[15], names[1]
    save_checkpoint(state, run / "last.pt")
    with pytest.raises(TrainingError, match=(
            rf"^--resume {run / 'last.pt'}: {demo_root} now gives other classes than the run was trained on \(names "
            r"differ; class 1: 'person' → 'aeroplane'\); a run keeps its labels: restore the dataset's classes.json")):
        train(tiny_config(demo_root, run, epochs=2, resume=str(run / "last.pt"), **SMALL))
    names[1], names[15] = names[15], names[1]
    state["classes"]["ignore_index"] = 254
    save_checkpoint(state, run / "last.pt")
    with pytest.raises(TrainingError, match=r"\(ignore label differ\)"):
        train(tiny_config(demo_root, run, epochs=2, resume=str(run / "last.pt"), **SMALL))


def test_an_unreadable_last_pt_beside_the_checkpoint_resumed_is_named_with_what_to_do(demo_root, ram_tmp):
    """`--resume RUN/best.pt` with a truncated RUN/last.pt (a half-copied folder) said only that last.pt was not a
    readable checkpoint: not why it was read, nor what to do (found by a helper, 2026-12-05)."""
    run = ram_tmp / "run"
    train(tiny_config(demo_root, run, epochs=1, **SMALL))
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])
    with pytest.raises(TrainingError, match=(
            rf"^--resume {run / 'best.pt'}: {last}, which the run would overwrite, is not readable \(.*\); move it "
            r"aside if it is damaged, then resume from best.pt$")):
        train(tiny_config(demo_root, run, epochs=2, resume=str(run / "best.pt"), **SMALL))
    assert len(last.read_bytes()) == 5000


def test_the_start_up_line_says_what_a_mid_epoch_checkpoint_leaves_to_train():
    """A checkpoint saved at step 5/16 of epoch 3, resumed with --epochs 2, said "no epoch to train: 2 already done
    (--epochs 2; give more to continue) (epoch 3 from step 5/16)", as if it would train epoch 3 after all."""
    from resunet.train import epoch_span

    assert epoch_span(3, 2, 5, 16) == ("no epoch to train: 2 already done and epoch 3 begun (step 5/16) (--epochs 2; "
                                       "give more to continue)")
    assert epoch_span(3, 4, 5, 16) == "epochs 3..4 (epoch 3 from step 5/16)"
    assert epoch_span(3, 4) == "epochs 3..4"
    assert epoch_span(3, 2) == "no epoch to train: 2 already done (--epochs 2; give more to continue)"


def test_a_run_killed_before_its_time_budget_fit_fits_when_resumed(demo_root, ram_tmp, capsys, monkeypatch):
    """Epoch 1's last.pt is saved before the fit and again after it. A process killed between the two left a last.pt
    holding --epochs, and its resume never fitted: it trained on to --epochs (an audit, 2026-12-06). The save now
    says whether the fit was made, and a resume from one made before it fits at the end of its first epoch."""
    import resunet.train

    def killed(*args, **kw):
        raise KeyboardInterrupt  # as if the process died here, after epoch 1's saves

    monkeypatch.setattr(resunet.train, "epochs_within", killed)
    out = ram_tmp / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(demo_root, out, epochs=30, scheduler="cosine", time_budget="1h", **SMALL))
    saved = load_checkpoint(out / "last.pt", tensors=False)
    assert (saved["epoch"], saved["train_config"]["epochs"], saved["budget_fitted"]) == (1, 30, False)
    fits = []
    monkeypatch.setattr(resunet.train, "epochs_within", lambda *args, **kw: fits.append((args, kw)) or 3)
    capsys.readouterr()
    from resunet.train import resumed_config
    train(resumed_config(out / "last.pt", {}))
    printed = capsys.readouterr().out
    assert "time budget 1h: epoch 2 took" in printed and "3 epoch(s) fit" in printed
    assert [(args[5], kw["done"]) for args, kw in fits] == [(30, 2)]  # at most --epochs, two done
    assert [r["epoch"] for r in read_records(out)] == [1, 2, 3] and read_records(out)[-1]["lr"] == 0
    assert load_checkpoint(out / "last.pt", tensors=False)["budget_fitted"] is True


def test_a_time_budget_run_resumed_twice_keeps_its_first_fit(demo_root, ram_tmp, capsys, monkeypatch):
    """The fit is made once: a resumed run does not re-fit (its clock restarted). But a resumed run saved "not
    fitted yet", so a second resume fitted again at the end of its first epoch, against a clock started there
    (a helper's review, 2026-12-06)."""
    import resunet.train
    from resunet.train import resumed_config
    from test_faults import signal_after_step

    fits = []
    monkeypatch.setattr(resunet.train, "epochs_within", lambda *args, **kw: fits.append(kw["done"]) or 4)
    out = ram_tmp / "twice"
    steps = 12  # an epoch of the demo's train split at batch 4
    signal_after_step(monkeypatch, steps + 3)  # inside epoch 2, after epoch 1's fit
    assert train(tiny_config(demo_root, out, epochs=30, scheduler="cosine", time_budget="1h",
                             **SMALL))["stopped_by"] == "SIGTERM"
    assert fits == [1] and load_checkpoint(out / "last.pt", tensors=False)["train_config"]["epochs"] == 4
    signal_after_step(monkeypatch, steps + 3)  # resumed inside epoch 2: stopped inside epoch 3
    assert train(resumed_config(out / "last.pt", {}))["stopped_by"] == "SIGTERM"
    assert load_checkpoint(out / "last.pt", tensors=False)["budget_fitted"] is True
    capsys.readouterr()
    train(resumed_config(out / "last.pt", {}))
    assert "epoch(s) fit" not in capsys.readouterr().out  # (the signals' counters are past their steps)
    assert fits == [1] and [r["epoch"] for r in read_records(out)] == [1, 2, 3, 4]


def test_a_time_budget_fit_within_the_warm_up_is_resumed(demo_root, ram_tmp, capsys, monkeypatch):
    """A --time-budget run fitted to no more epochs than its warm-up (make_scheduler then halves the warm-up) could
    not be resumed: the resume checked --warmup-epochs against the fitted count, a flag the user never changed
    (review, 2026-12-06)."""
    import resunet.train
    from resunet.train import resumed_config

    monkeypatch.setattr(resunet.train, "epochs_within", lambda *args, **kw: 2)
    out = ram_tmp / "warm"
    train(tiny_config(demo_root, out, epochs=10, scheduler="cosine", warmup_epochs=3, time_budget="1h", **SMALL))
    assert load_checkpoint(out / "last.pt", tensors=False)["train_config"]["epochs"] == 2
    with pytest.raises(TrainingError, match=r"--warmup-epochs 3.0: must be 0 or more, and fewer than --epochs \(2\)"):
        train(tiny_config(demo_root, ram_tmp / "new", epochs=2, scheduler="cosine", warmup_epochs=3, **SMALL))
    capsys.readouterr()
    train(resumed_config(out / "last.pt", {}))
    assert "no epoch to train: 2 already done" in capsys.readouterr().out


def test_the_data_signature_is_the_same_from_any_level_of_a_voc_tree(demo_root, ram_tmp, capsys):
    """--data-root may name the folder holding VOCdevkit, VOCdevkit or VOC2012 (README); a run resumed with another
    of them said its train and val data had changed, its best val mIoU measured on an old split (review,
    2026-12-06). Runs saved before keep their digest under the root they were given."""
    from resunet.data.dataset import open_dataset
    from resunet.train import data_signature, resumed_config

    inner = demo_root / "VOCdevkit" / "VOC2012"
    assert data_signature(open_dataset(demo_root, "val")) == data_signature(open_dataset(inner, "val"))
    run = ram_tmp / "run"
    train(tiny_config(demo_root, run, epochs=1, **SMALL))
    capsys.readouterr()
    train(resumed_config(run / "last.pt", {"epochs": 2, "data_root": str(inner)}))
    printed = capsys.readouterr().out
    assert "epoch   2/2" in printed and "data changed" not in printed
    # A last.pt from before: its digest taken under the --data-root it was given.
    state = load_checkpoint(run / "last.pt")
    state["data"] = {split: data_signature(open_dataset(demo_root, split), demo_root) for split in ("train", "val")}
    assert state["data"]["val"] != data_signature(open_dataset(demo_root, "val"))
    from resunet.checkpoint import save_checkpoint

    save_checkpoint(state, run / "last.pt")
    train(resumed_config(run / "last.pt", {"epochs": 3, "data_root": str(demo_root)}))
    printed = capsys.readouterr().out
    assert "epoch   3/3" in printed and "data changed" not in printed
    # A file really changed is still said.
    state = load_checkpoint(run / "last.pt")
    state["data"]["val"]["digest"] = "0" * 16
    save_checkpoint(state, run / "last.pt")
    train(resumed_config(run / "last.pt", {"epochs": 4}))
    assert "the val data changed since" in capsys.readouterr().out


def test_the_simple_path_draws_other_augmentations_on_each_process(demo_root):
    """Under torchrun the simple data path reseeded the global generator with (seed, epoch) alone: every process drew
    the same scales, crops, flips and jitter for its k-th sample (the cached path adds the rank). A single process
    draws as before."""
    from resunet.data.dataset import open_dataset
    from resunet.train import epoch_seed, make_train_loader, set_loader_epoch

    cfg = tiny_config(demo_root, demo_root / "unused", data_path="simple")
    dataset = open_dataset(demo_root, "train")
    loader, kind = make_train_loader(cfg, dataset, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"), 0, 1, "simple")
    assert kind == "simple"
    draws = []  # one loader over the whole split (its sampler draws from the same generator): the ranks' generators
    for rank in (0, 1, 0):
        set_loader_epoch(loader, 3, cfg.seed, rank)
        draws.append(next(iter(loader))[0])
    assert not torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    set_loader_epoch(loader, 3, cfg.seed)
    assert torch.initial_seed() == epoch_seed(cfg.seed, 3)


def test_a_resume_that_changes_the_epochs_of_a_per_step_schedule_says_where_the_rate_goes(demo_root, ram_tmp, capsys):
    """A finished cosine run (its rate at 0) resumed with more --epochs is stretched over them: the rate rose again,
    to a quarter of its peak for 2 → 3 epochs, without a word (an audit, 2026-12-06)."""
    from resunet.train import resumed_config

    run = ram_tmp / "run"
    train(tiny_config(demo_root, run, epochs=2, scheduler="cosine", **SMALL))
    capsys.readouterr()
    train(resumed_config(run / "last.pt", {"epochs": 3}))
    printed = capsys.readouterr().out
    assert ("resunet: --epochs 3 (the run was set to 2): the cosine schedule now spans 3 epochs, so the learning rate "
            "goes on at 0.00025 (it was 0)") in printed, printed
    assert len(read_records(run)) == 3
    train(resumed_config(run / "last.pt", {"epochs": 3}))  # the same count: nothing to say
    assert "schedule now spans" not in capsys.readouterr().out


def test_train_leaves_the_callers_generators_and_speed_flags_as_it_found_them(demo_root, ram_tmp):
    """From a notebook: train reseeded the global random generators (the caller's draws after it were train's) and,
    on a GPU, left cudnn.benchmark and TF32 on for the caller's later fp32 work (a helper, 2026-12-06)."""
    import random

    import numpy as np

    from resunet.train import caller_state_kept

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected = draws()
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    train(tiny_config(demo_root, ram_tmp / "run", epochs=1, **SMALL))
    assert draws() == expected
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with caller_state_kept():  # what train sets on a GPU (a CPU run sets none of it)
        torch.backends.cudnn.benchmark = not flags[0]
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32) == flags


def test_a_run_folder_another_training_is_writing_is_refused_and_freed_however_a_run_ends(demo_root, ram_tmp,
                                                                                         monkeypatch):
    """`make camvid` started twice, or a --resume while the run still goes: both wrote last.pt, best.pt and
    metrics.jsonl, each replacing the other's epoch by epoch (a helper's review, 2026-12-07). The folder is locked
    while a run writes it (flock on the folder; a lock taken through another opening here, as another process's)."""
    import resunet.train as train_module
    from resunet.outputs import FolderLock

    run = ram_tmp / "run"
    run.mkdir()
    with FolderLock(run) as other:
        assert other.held
        with pytest.raises(TrainingError, match=rf"^--out {run}: another resunet train is writing there \(the run, "
                                                r"or a resume of it, is still going\); wait for it to end, or give "
                                                r"another --out$"):
            train(tiny_config(demo_root, run, epochs=1))
    assert list(run.iterdir()) == []  # nothing written
    # Freed when a run fails too, its traceback kept (as a notebook keeps the last one)
    monkeypatch.setattr(train_module, "train_step", lambda *args: (_ for _ in ()).throw(KeyError("boom")))
    with pytest.raises(KeyError) as failed:
        train(tiny_config(demo_root, run, epochs=1))
    with FolderLock(run) as after:
        assert after.held and failed.traceback
