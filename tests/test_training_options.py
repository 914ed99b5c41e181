"""Training options off the seed recipe: poly schedule, EMA of the weights, scSE attention, decoder widths, CutMix
and ClassMix. Each against numbers worked out by hand, then all together through a real run and its exact resume."""

import io
import itertools
import json
import math

import pytest
import torch
from torch import nn

from resunet.checkpoint import load_checkpoint, model_from_checkpoint
from resunet.config import TrainConfig
from resunet.data.mixing import cutmix_box, mix_batch, other_images
from resunet.model.unet import SCSE, ResNetUNet
from resunet.train import (TrainingError, WeightAverage, decoder_widths, make_scheduler, rebase_schedule, set_epochs,
                           train)

from conftest import tiny_config
from test_faults import signal_after_step


def rates(cfg: TrainConfig, steps: int, changes: dict[int, int] | None = None, steps_per_epoch: int = 10):
    """The rate (--lr 1) at each of `steps` steps, the count of epochs set to changes[n] after n steps, as
    --time-budget's fit does (set_epochs); and the scheduler."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    lrs = []
    for step in range(1, steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        if step in (changes or {}):  # the next step's rate is already set
            set_epochs(cfg, scheduler, changes[step], step)
    return lrs, scheduler


def test_poly_schedule_with_warmup_by_hand():
    lrs, _ = rates(TrainConfig(data_root="x", scheduler="poly", epochs=2, warmup_epochs=0.5, lr=1.0), 20)
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # 20 steps, 5 of warm-up
    assert lrs[5:] == pytest.approx([(1 - k / 15) ** 0.9 for k in range(15)])


def test_a_time_budget_fit_shorter_than_the_warm_up_still_decays():
    # --epochs 10 --warmup-epochs 3 (10 steps an epoch), and a --time-budget that fits 2 epochs after epoch 1: every
    # step was warm-up and the rate only rose (to 20/30 of its peak). Now the warm-up ends at the fit (step 10) and
    # the cosine decays from the peak to 0 over the 10 steps left. (Decaying from the rate reached, 11/30, left a run
    # cut early and lengthened again at that fraction of --lr for good: an audit, 2026-12-06.)
    lrs, scheduler = rates(TrainConfig(data_root="x", scheduler="cosine", epochs=10, warmup_epochs=3, lr=1.0), 20,
                           {10: 2})
    assert lrs[:11] == pytest.approx([(k + 1) / 30 for k in range(11)])
    assert lrs[11:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (k - 10) / 10)) for k in range(11, 20)])
    # Saved and resumed (the run's stored count is the fitted 2): the same curve.
    resumed = make_scheduler(TrainConfig(data_root="x", scheduler="cosine", epochs=2, warmup_epochs=3, lr=1.0),
                             torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), steps_per_epoch=10)
    resumed.load_state_dict(scheduler.state_dict())
    assert [resumed.lr_lambdas[0](k) for k in range(11, 20)] == pytest.approx(lrs[11:])

    # --warmup-epochs 5 fitted to 10 epochs (the warm-up keeps its 50 steps), then cut to 5 after epoch 4, inside
    # the warm-up: its end would move to step 25, which step 41 is 0.64 of the way past; the warm-up ends at step 40
    # and the whole decay follows.
    cfg = TrainConfig(data_root="x", scheduler="poly", epochs=20, warmup_epochs=5, lr=1.0)
    lrs, scheduler = rates(cfg, 50, {10: 10, 40: 5})
    assert lrs[:41] == pytest.approx([(k + 1) / 50 for k in range(41)])
    assert lrs[41:] == pytest.approx([(1 - (k - 40) / 10) ** 0.9 for k in range(41, 50)])
    # Lengthened again to 8 epochs after step 45: the decay goes on from where it is, at the full --lr's scale.
    set_epochs(cfg, scheduler, 8, 45)
    assert scheduler.lr_lambdas[0](45) == pytest.approx(lrs[45])
    assert scheduler.lr_lambdas[0](46) == pytest.approx((1 - (0.5 + 0.5 * 1 / 35)) ** 0.9)


def test_a_changed_epoch_count_continues_the_decay_from_where_it_is():
    """--time-budget changes --epochs during the run. The cosine re-spanned in place jumped: down when the run
    shortened, up when it lengthened, so a re-fit could lengthen only early, and a machine that sped up later left
    its minutes unused (9 of 55 in a make camvid run). Now the decay goes on from how far along it is."""
    def recipe() -> TrainConfig:  # 10 steps of warm-up, then 90 of decay; lengthened to 20 epochs after epoch 5
        return TrainConfig(data_root="x", scheduler="cosine", epochs=10, warmup_epochs=1, lr=1.0)

    cfg = recipe()
    lrs, scheduler = rates(cfg, 200, {50: 20})
    # Until step 50, the cosine over 90 steps; from there the rest of it (4/9 of the way done) over 150 steps.
    cosine = [0.5 * (1 + math.cos(math.pi * p)) for p in [(k - 10) / 90 for k in range(10, 51)]
              + [4 / 9 + 5 / 9 * (k - 50) / 150 for k in range(51, 200)]]
    assert lrs[:10] == pytest.approx([(k + 1) / 10 for k in range(10)]) and lrs[10:] == pytest.approx(cosine)
    assert lrs[50] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 9)))  # set before the change: 0.587 either way
    assert lrs[51] == pytest.approx(0.5 * (1 + math.cos(math.pi * (4 / 9 + 5 / 9 / 150))))  # in place: 0.889
    assert max(abs(a - b) for a, b in zip(lrs[10:], lrs[11:])) < 0.02 and lrs[199] < 1e-4
    # Shortened after step 150 to 16 epochs: from there to 0 at step 160, no step down.
    set_epochs(cfg, scheduler, 16, 150)
    assert scheduler.lr_lambdas[0](150) == pytest.approx(lrs[150]) and scheduler.lr_lambdas[0](160) == 0

    state = rates(recipe(), 120, {50: 20})[1].state_dict()  # as saved 120 steps in
    # The anchor is saved with the schedule (plain numbers: checkpoints load with weights_only) and restored: a
    # resumed run goes on along the same curve, also with another number of steps an epoch (anchored in epochs).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert state["lr_lambdas"] == [{"anchor_epoch": 5.0, "anchor_progress": pytest.approx(4 / 9)}]
    for steps_per_epoch, resumed_step in ((10, 120), (5, 60)):
        resumed = TrainConfig(data_root="x", scheduler="cosine", epochs=20, warmup_epochs=1, lr=1.0)
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make_scheduler(resumed, optimizer, steps_per_epoch)
        scheduler.load_state_dict(state)
        rebase_schedule(scheduler, optimizer, resumed_step, announce=False)  # re-sets the rate if the count moved
        assert scheduler.base_lrs[0] * scheduler.lr_lambdas[0](resumed_step) == pytest.approx(lrs[120])
    # A checkpoint from before the anchor existed (LambdaLR saved None for a plain function): no anchor.
    scheduler = make_scheduler(resumed, optimizer, steps_per_epoch)
    scheduler.load_state_dict({**state, "lr_lambdas": [None]})
    assert scheduler.lr_lambdas[0].anchor_epoch == 0


def test_scse_by_hand():
    block = SCSE(32)
    for module in block.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
    x = torch.randn(2, 32, 5, 7)
    assert torch.allclose(block(x), x)  # both gates sigmoid(0) = 1/2: x/2 + x/2
    nn.init.constant_(block.spatial[0].bias, 50.0)  # the spatial gate fully open: x/2 + x
    assert torch.allclose(block(x), 1.5 * x)


def test_decoder_widths_and_attention_are_part_of_the_model_and_its_checkpoint():
    model = ResNetUNet(5, "resnet18", None, decoder_channels=(64, 32, 16, 8), attention="scse").eval()
    seed = ResNetUNet(5, "resnet18", None).eval()
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in seed.parameters())
    assert model.decoder[0].conv2[0].out_channels == 64 and isinstance(model.decoder[3].attention, SCSE)
    x = torch.randn(1, 3, 40, 56)
    assert model(x).shape == (1, 5, 40, 56)
    rebuilt = model_from_checkpoint({"model_config": model.config.to_dict(), "model": model.state_dict()}).eval()
    assert torch.equal(rebuilt(x), model(x))
    # a checkpoint written before these options existed still loads, as the seed architecture
    old = {k: v for k, v in seed.config.to_dict().items() if k != "attention"}
    assert isinstance(model_from_checkpoint({"model_config": old, "model": seed.state_dict()}).decoder[0].attention,
                      nn.Identity)
    assert decoder_widths("128,64,32,16") == (128, 64, 32, 16)
    for bad in ("128,64,32", "a,b,c,d", "128,64,0,16"):
        with pytest.raises(TrainingError, match="--decoder-channels"):
            decoder_widths(bad)


def test_weight_average_by_hand():
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].running_mean.fill_(2.0)
        model[1].num_batches_tracked.fill_(7)
    average.update(model)  # first update: decay min(0.5, 2/11) = 2/11 → 1 + (3 - 1)·9/11
    assert average.module[0].weight.item() == pytest.approx(1 + 2 * 9 / 11)
    assert average.module[1].running_mean.item() == pytest.approx(2 * 9 / 11)  # BN statistics are averaged too
    assert average.module[1].num_batches_tracked.item() == 7  # the counter is copied
    for _ in range(20):
        average.update(model)  # later the decay is 0.5: the average halves its distance to the weights each step
    assert average.module[0].weight.item() == pytest.approx(3.0, abs=1e-5)
    assert not average.module.training and not any(p.requires_grad for p in average.module.parameters())


def labelled_batch(n=6, size=16):
    """Every pixel of image i holds i in all channels; its mask holds i too, except an ignored stripe, in other
    columns in each image (in the same columns, an ignore label pasted as a class would not show)."""
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, size, size).clone()
    masks = torch.arange(n)[:, None, None].expand(n, size, size).clone()
    for i in range(n):
        masks[i, :, 2 * i:2 * i + 3] = 255
    masks[2, 8:] = 0  # image 2 holds two classes
    return images, masks


@pytest.mark.parametrize("kind", ["cutmix", "classmix"])
def test_mixing_moves_labels_with_their_pixels(kind):
    images, masks = labelled_batch()
    mixed, labels = mix_batch(images, masks, kind, 1.0, 255, torch.Generator().manual_seed(3))
    assert not torch.equal(mixed, images)  # something was pasted
    source = mixed[:, 0].long()  # which image each pixel came from
    assert torch.equal(mixed[:, 0], mixed[:, 2])  # whole pixels move, all channels together
    for i in range(len(images)):
        came = source[i]
        # Each pixel's label is the label that pixel had in its source image.
        assert torch.equal(labels[i], masks[came, torch.arange(16)[:, None], torch.arange(16)])
    if kind == "classmix":  # ignore is never a pasted class: no ignore where the image had a label
        assert not ((labels == 255) & (masks != 255)).any()
    again = mix_batch(images, masks, kind, 1.0, 255, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], mixed) and torch.equal(again[1], labels)  # the same draws, the same batch
    untouched = mix_batch(images, masks, kind, 0.0, 255, torch.Generator().manual_seed(3))
    assert torch.equal(untouched[0], images) and torch.equal(untouched[1], masks)


@pytest.mark.parametrize("n", [2, 3, 8])
def test_mix_prob_1_mixes_every_image_with_another(n):
    # A plain permutation paired about 1 image in n with itself, left unmixed: --mix-prob 1 mixed half a batch of 2.
    for order in itertools.permutations(range(n)) if n < 8 else [torch.randperm(n).tolist() for _ in range(50)]:
        partners = other_images(list(order))
        assert sorted(partners) == list(range(n)) and all(j != i for i, j in enumerate(partners)), order
    masks = torch.arange(n)[:, None, None].expand(n, 16, 16).clone()  # image i: all class i
    images = masks[:, None].expand(n, 3, 16, 16).float()
    for seed in range(10):  # ClassMix pastes all of a one-class partner
        mixed, labels = mix_batch(images, masks, "classmix", 1.0, 255, torch.Generator().manual_seed(seed))
        assert all((labels[i] != i).all() for i in range(n)), seed
        assert torch.equal(mixed[:, 0].long(), labels)


def test_cutmix_box_by_hand():
    box = cutmix_box(20, 40, 0.25, 0.5, 0.5)  # sides halved: 10 × 20, centred
    assert box.sum() == 200 and box[5:15, 10:30].all()
    corner = cutmix_box(20, 40, 0.25, 0.0, 1.0)  # centred on the top-right corner: clipped inside
    assert corner.sum() == 200 and corner[:10, 20:].all()


def test_all_options_train_and_resume_exactly(demo_root, ram_tmp, monkeypatch):
    # The largest seed: the mixing draws' key passes 2**64 from seed 180144 on, which crashed the first step
    options = dict(size=32, encoder="resnet18", precision="fp32", scheduler="poly", warmup_epochs=0.5, ema=0.9,
                   attention="scse", decoder_channels="64,32,16,8", mix="classmix", loss="ce+dice", epochs=1,
                   seed=2**32 - 1)
    whole = ram_tmp / "whole"
    train(tiny_config(demo_root, whole, **options))
    part = ram_tmp / "part"
    signal_after_step(monkeypatch, 5)  # SIGTERM at step 5 of 12
    assert train(tiny_config(demo_root, part, **options))["stopped_by"] == "SIGTERM"
    monkeypatch.undo()
    train(tiny_config(demo_root, part, resume=str(part / "last.pt"), **options))
    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(part / "last.pt")
    for key in ("model", "training_model"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    assert a["ema_updates"] == b["ema_updates"] == 12
    strip = lambda run: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "train_images_per_s")}
                         for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert strip(whole) == strip(part)
    # The saved "model" is the average (what was evaluated and selected), not the last training weights.
    assert any(not torch.equal(a["model"][k], a["training_model"][k]) for k in a["model"])
    assert a["model_config"]["attention"] == "scse" and a["model_config"]["decoder_channels"] == [64, 32, 16, 8]
