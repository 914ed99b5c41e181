"""Training: one loop you can read top to bottom.

    resunet train --data-root data/demo --out runs/demo                      # one process (CPU or one GPU)
    torchrun --nproc-per-node 4 -m resunet train --data-root DIR --out RUN  # DistributedDataParallel

Each epoch: train on the shuffled training split, evaluate on the validation split at original resolution (one
dataset-wide confusion matrix), step the scheduler, append a line to metrics.jsonl, write last.pt (and best.pt when
val mIoU improves), redraw curves.png. Data order and augmentation are seeded by (seed, epoch), so a run resumed
from last.pt follows exactly the path the uninterrupted run would have taken.

Inside an epoch, last.pt is also written every --checkpoint-every steps or minutes and when SIGTERM or SIGINT
arrives (after the step in progress); it then holds the position too: the step, the loss summed so far and the
random state at the epoch's start. Resuming draws the epoch's first batches again and drops them, so the same
batches follow and the weights come out bit for bit as if the run had never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import difflib
import errno
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from .allocator import tune_cpu_allocator
from .calibration import bound_note, calibrate, ece_change
from .checkpoint import CheckpointError, checkpoint_classes, load_checkpoint, save_checkpoint, temporary_writer
from .config import TrainConfig, field_kinds
from .data.cache import CachedLoader, build_cache, cache_bytes, check_cache_writable, default_cache_dir
from .data.classes import ClassInfo, class_differences
from .data.dataset import (PairedDataset, data_locations, open_dataset, process_alive, worker_batches,
                           worker_ignores_ctrl_c)
from .data.images import DEFAULT_MAX_PIXELS, DataError, looked_at, one_line, read_mask
from .data.mixing import mix_batch
from .doctor import check_data, format_findings, refusal
from .evaluate import evaluate_dataset, strict_json
from .losses import LOSSES, SegmentationLoss
from .model.encoders import ENCODERS, WeightsUnavailableError, check_weights_file
from .model.unet import ResNetUNet
from .outputs import FolderLock, check_folder_apart, check_output_folder, replace_file
from .predict import Predictor
from .runtime import (DeviceError, autocast, describe_device, distributed_env, precision_name, resolve_device,
                      resolve_precision, use_channels_last)
from .tensorboard_log import TensorBoardLog, TensorBoardUnavailable, check_tensorboard
from .visualize import plot_curves

CACHE_LIMIT_BYTES = 20 * 1024**3


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100003 + epoch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm synchronised across processes, timm's way: the Lite encoders' BatchNormAct2d carries its ReLU6, and
    torch's own converter made it a plain SyncBatchNorm that never calls it (an almost linear encoder, trained and
    selected as that, then evaluated and exported with its activations back)."""
    from timm.layers import convert_sync_batchnorm  # timm: the Lite encoders' own library

    return convert_sync_batchnorm(model)


PROGRESS_EVERY_S = 60.0
# curves.png is redrawn at most this often (and when the run ends or stops): a drawing takes about 0.3 s, a fifth of
# an epoch on a small dataset; metrics.jsonl is written every epoch whatever this says.
CURVES_EVERY_S = 30.0


def draw_curves(records: list[dict], out: Path) -> float:
    """Draw RUN/curves.png; returns when it was drawn (a failed drawing counts: it is not retried every epoch)."""
    try:
        plot_curves(records, out / "curves.png")
    except DataError as error:  # the checkpoints are saved; a figure is not worth stopping for
        print(f"resunet: {error}; curves not drawn, training goes on", file=sys.stderr)
    return time.perf_counter()


def progress_line(epoch: int, epochs: int, step: int, steps: int, images: int, seconds: float) -> str:
    """What a log file gets instead of a progress bar: where the epoch is, images/s, and the epoch's ETA."""
    rate = images / max(seconds, 1e-9)
    remaining = (steps - step) * (seconds / max(step, 1))
    return (f"epoch {epoch}/{epochs}: step {step}/{steps}, {rate:.1f} img/s, epoch ETA "
            f"{int(remaining // 60)}m{int(remaining % 60):02d}s")


def class_weights(dataset: PairedDataset) -> torch.Tensor:
    """sqrt(median frequency / frequency) per class, from the training masks' pixel counts."""
    n = dataset.info.num_classes
    counts = np.zeros(n, dtype=np.int64)
    for path in dataset.mask_paths:
        mask = read_mask(path, dataset.info, dataset.max_pixels)
        counts += np.bincount(mask[mask < n].ravel(), minlength=n)[:n]
    freq = counts / max(counts.sum(), 1)
    present = freq > 0
    weights = np.ones(n)
    weights[present] = np.sqrt(np.median(freq[present]) / freq[present])
    return torch.tensor(weights / weights[present].mean(), dtype=torch.float32)


class SaidElsewhere(TrainingError):
    """Under torchrun, an error another process prints: this one ends with it unsaid (`quiet`)."""
    quiet = True


SETUP_ERRORS = (DataError, TrainingError, CheckpointError, WeightsUnavailableError, DeviceError)


def raise_once(failure: Exception | None, world: int, device: torch.device, main_process: bool) -> None:
    """Every process runs the same setup: if it failed on any, all stop, and the line is printed once: by the first
    process if it failed (the others met the same data and settings), else by each one that did (another node's
    disk, say), the rest ending quietly. A collective: every process must call it."""
    first_failed, any_failed = agree(world, device, failure is not None and main_process, failure is not None)
    if not any_failed:
        return
    if failure is not None and (main_process or not first_failed):
        raise failure
    raise SaidElsewhere(str(failure) if failure is not None else "another process failed; see its line")


@contextlib.contextmanager
def said_once(world: int, device: torch.device, main_process: bool):
    """A setup step every process runs (or the first alone, the others passing through): a SETUP_ERRORS failure in
    it, on any process, stops them all, said once (`raise_once`). A collective: every process must enter it."""
    failure = None
    try:
        yield
    except SETUP_ERRORS as error:
        failure = error
    raise_once(failure, world, device, main_process)


def check_data_first(cfg: TrainConfig, verbose: bool) -> None:
    """`resunet check-data` on the train and val splits: errors stop the run before anything is built or written,
    warnings are printed. The report is cached beside the decoded images, keyed by the files' sizes and times
    (modification and change), so a re-run on an unchanged dataset (a resumed run too) reads no image."""
    cache_dir = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) / "check-data"
    report = check_data(cfg.data_root, [cfg.train_split, cfg.val_split], cfg.num_classes, cfg.ignore_index,
                        cfg.max_pixels, max(1, cfg.workers), cfg.train_split, cache_dir, verbose and cfg.progress)
    if verbose:
        pairs = sum(split["pairs"] for split in report.facts["splits"].values())
        print(f"data check{' (cached)' if report.from_cache else ''}: {pairs} pairs; "
              f"{format_findings(report.findings)}", flush=True)
    if report.errors:  # the command it names checks what was checked here (it said "0 errors" for train_aug)
        splits = [cfg.train_split, cfg.val_split]
        flags = "".join([f" --split {shlex.join(splits)}" if splits != ["train", "val"] else "",
                         f" --num-classes {cfg.num_classes}" if cfg.num_classes is not None else "",
                         f" --ignore-index {cfg.ignore_index}" if cfg.ignore_index is not None else "",
                         f" --max-pixels {cfg.max_pixels}" if cfg.max_pixels != DEFAULT_MAX_PIXELS else ""])
        raise DataError(refusal(report, cfg.data_root, flags))
    if verbose and report.cache_note:  # the report only saves time next run: the run goes on without it
        print(f"resunet: warning: {report.cache_note}", file=sys.stderr, flush=True)


def check_cache_first(cfg: TrainConfig) -> None:
    """Refuse an unwritable --cache-dir (DataError, one line) before the data check reads every image, when the
    run would build the decoded-image cache. Anything else wrong with the data is left to the data check, which
    says it better; `train` checks the cache again once the data is open."""
    try:
        dataset = open_dataset(cfg.data_root, cfg.train_split, cfg.num_classes, cfg.ignore_index, cfg.max_pixels)
        kind = choose_data_path(cfg, dataset)
    except DataError:
        return
    if kind == "cached":
        check_cache_writable(dataset, cfg.size, Path(cfg.cache_dir) if cfg.cache_dir else None)


def choose_data_path(cfg: TrainConfig, dataset: PairedDataset) -> str:
    """"cached" or "simple" (--data-path auto: cached while the decoded images fit the cache limit)."""
    if cfg.data_path == "auto":
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
        return "cached" if cache_bytes(dataset, cfg.size, cache_dir) < CACHE_LIMIT_BYTES else "simple"
    return cfg.data_path


def make_train_loader(cfg: TrainConfig, dataset: PairedDataset, mean, std, device, rank: int, world: int,
                      kind: str | None = None):
    """The cached (decode once, augment on device) or the simple (per-sample PIL) data path."""
    scales = (cfg.scale_min, cfg.scale_max)
    kind = kind or choose_data_path(cfg, dataset)
    if kind == "cached":
        cache = build_cache(dataset, cfg.size, Path(cfg.cache_dir) if cfg.cache_dir else None, max(1, cfg.workers),
                            remove_stale=distributed_env()[1] == 0)  # one process per machine: its cache folder
        if cache.replaced:
            print(f"resunet: removed {len(cache.replaced)} stale decoded-image cache(s) of these files at this size "
                  f"({sum(size for _, size in cache.replaced) / 1e6:.0f} MB: {cache.replaced[0][0]}"
                  f"{', ...' if len(cache.replaced) > 1 else ''}), built before a file changed",
                  flush=True)
        if cache.abandoned:
            print(f"resunet: removed {len(cache.abandoned)} half-built decoded-image cache(s) left by builds that were "
                  f"killed ({sum(size for _, size in cache.abandoned) / 1e6:.0f} MB: {cache.abandoned[0][0]}"
                  f"{', ...' if len(cache.abandoned) > 1 else ''})", flush=True)
        loader = CachedLoader(cache, cfg.batch_size, cfg.size, scales, mean, std, dataset.info.ignore_index,
                              cfg.jitter, device, cfg.seed, rank, world, cfg.crop_size)
        return loader, "cached"
    from .data.sample_transforms import TrainTransform  # here: the cached path needs no torchvision

    transform = TrainTransform(cfg.size, scales, mean, std, dataset.info.ignore_index, cfg.jitter, cfg.crop_size)
    data = dataset.with_transform(transform)
    sampler = (DistributedSampler(data, world, rank, shuffle=True, seed=cfg.seed, drop_last=True) if world > 1
               else RandomSampler(data))
    loader = DataLoader(data, cfg.batch_size, sampler=sampler, num_workers=cfg.workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        worker_init_fn=worker_ignores_ctrl_c if cfg.workers else None)
    return loader, "simple"


def set_loader_epoch(loader, epoch: int, seed: int, rank: int = 0) -> None:
    if isinstance(loader, CachedLoader):
        loader.set_epoch(epoch)
    elif isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    # Reseeding the global generator makes the simple path's shuffling and per-sample augmentation (and the
    # worker seeds derived from it) a function of (seed, epoch) as well, and of the rank: under torchrun every
    # process drew the same scales, crops, flips and jitter for its k-th sample (the cached path adds the rank too).
    # The CPU generator keeps a seed's low 32 bits: the rank's offset must change those.
    torch.manual_seed(epoch_seed(seed, epoch) + rank * 1_000_003)


PER_STEP_SCHEDULERS = ("cosine", "poly")
SETUP_TIMEOUT = datetime.timedelta(minutes=60)  # torchrun: how long a process waits for the others' setup steps


def make_optimizer(name: str, params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam or AdamW, as one fused kernel per step where PyTorch has one for the device: on the CPU the default
    per-tensor loop makes about ten passes over the weights (56 ms against 20 ms a step for the ResNet34 U-Net on a
    Zen 3), a sixth of a training step at 64² crops. A run resumed from an older checkpoint keeps the loop it had."""
    optimizer_class = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    fused = device.type in ("cpu", "cuda")
    return optimizer_class(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def scale_learning_rate(optimizer, scheduler, ratio: float) -> None:
    """Scale a resumed run's learning rate, where the schedule stands now and everything it will still do."""
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    if hasattr(scheduler, "base_lrs"):  # LambdaLR (cosine, poly); ReduceLROnPlateau works from the group's lr
        scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]


def rebase_schedule(scheduler, optimizer, steps_done: int, announce: bool) -> None:
    """A resumed per-step schedule counts the steps this run would have taken to get here. Another process count
    or training set gives an epoch another number of steps: counted in the old ones, cosine reached 0 epochs early
    (or never). The same count (the usual resume) changes nothing."""
    if scheduler.last_epoch == steps_done:
        return
    if announce:
        print(f"resunet: the schedule is re-based from {scheduler.last_epoch} to {steps_done} steps done (an epoch "
              "takes another number of steps now: another process count or training set), so it still ends with "
              "the last epoch", flush=True)
    scheduler.last_epoch = steps_done
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(steps_done)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max")
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    class Curve:
        """The factor of --lr at a step: a linear warm-up, then the cosine or poly decay to 0 at the last step of
        --epochs. --time-budget changes the count during the run, through `respan`: from there the decay plays its
        rest, from how far along it is, over the steps then left, so the rate neither jumps down when the run
        shortens nor up when it lengthens (a curve re-spanned in place did both: a run of 46 epochs, one of
        warm-up, lengthened to 55 half-way rose from 0.52 to 0.64 of its peak). A count that leaves no room for the
        warm-up ends it there: the rate steps up to its peak and the whole decay follows (decaying from the rate
        reached instead kept a run that was cut early, then lengthened again, at a fraction of --lr for good). The
        anchor is this object's one state, saved and restored with the scheduler's (LambdaLR keeps a callable
        object's attributes), in epochs, so that a resume with another number of steps an epoch keeps it in place."""

        def __init__(self) -> None:
            self.anchor_epoch, self.anchor_progress = 0.0, 0.0  # where the count last changed (0: never)

        def ramp_and_total(self, epochs: int | None = None) -> tuple[int, int]:
            total = max(1, (epochs or cfg.epochs) * steps_per_epoch)
            # No more epochs than the warm-up (check_settings keeps it under --epochs, but not a --time-budget fit):
            # half warm-up, half decay, not a rate that only rises. `respan` itself ends such a warm-up where it is;
            # this halving still serves the comparison there, and a run saved by an earlier version (no anchor).
            return (warmup if warmup < total else total // 2), total

        def progress(self, step: int) -> float | None:
            """How far along the decay `step` is, 0 to 1; None within the warm-up."""
            ramp, total = self.ramp_and_total()
            anchor = round(self.anchor_epoch * steps_per_epoch)
            if self.anchor_epoch and step >= anchor:
                return min(1.0, self.anchor_progress + (1 - self.anchor_progress) * (step - anchor)
                           / max(1, total - anchor))
            if step < ramp:
                return None
            return min(1.0, (step - ramp) / max(1, total - ramp))

        def respan(self, step: int, epochs: int) -> None:
            """The run will end after `epochs`, not --epochs, `step` steps in (before cfg.epochs changes)."""
            progress = self.progress(step)
            if progress is None and self.ramp_and_total(epochs)[0] != self.ramp_and_total()[0]:
                # a count that leaves no room for the warm-up would move its end: it ends here, the decay begins
                self.anchor_epoch, self.anchor_progress = step / steps_per_epoch, 0.0
            elif progress:  # in the decay (in a warm-up that keeps its length, or at its end, nothing moves)
                self.anchor_epoch, self.anchor_progress = step / steps_per_epoch, progress

        def __call__(self, step: int) -> float:
            progress = self.progress(step)
            if progress is None:
                return (step + 1) / self.ramp_and_total()[0]
            if cfg.scheduler == "poly":
                return (1 - progress) ** 0.9
            return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, Curve())


def set_epochs(cfg: TrainConfig, scheduler, epochs: int, steps_done: int) -> None:
    """--time-budget's fit: the run now ends after `epochs`, `steps_done` steps in; a cosine or poly schedule's
    decay goes on from where it is to 0 at the new end."""
    if cfg.scheduler in PER_STEP_SCHEDULERS:
        scheduler.lr_lambdas[0].respan(steps_done, epochs)
    cfg.epochs = epochs


def train_step(model, images, masks, criterion, optimizer, scaler, device, dtype, channels_last: bool) -> torch.Tensor:
    """One optimisation step; returns the (detached) loss. `resunet benchmark` times exactly this."""
    images = images.to(device, non_blocking=True)
    masks = masks.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, dtype):
        logits = model(images)
    loss = criterion(logits.float(), masks)  # the loss in fp32 whatever the autocast dtype
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def rng_state() -> dict:
    state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(state[1].astype(np.int64)),
            "numpy_pos": int(state[2]), "python": random.getstate()}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))


class WeightAverage:
    """--ema DECAY: an exponential moving average of the weights and the BatchNorm statistics, updated after every
    optimisation step. It is the model evaluated, selected and saved. As TensorFlow's ExponentialMovingAverage does
    with num_updates, the decay ramps up ((1 + t) / (10 + t) until that reaches DECAY, at t = 8990 for 0.999), so the
    average does not drag the random decoder along."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, current in zip(self.module.state_dict().values(), model.state_dict().values()):
            if average.dtype.is_floating_point:
                average.lerp_(current, 1 - decay)
            else:  # BatchNorm's step counter
                average.copy_(current)


def decoder_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 4 or min(widths) < 1:
        raise TrainingError(f"--decoder-channels {text}: four positive widths, deepest block first (256,128,64,32)")
    return widths


def write_atomically(path: Path, text: str) -> None:
    """A process killed mid-write leaves the old file or the new one, never half a line (`replace_file`); so does a
    power cut: the text is on disk before the rename (XFS and ext4 may otherwise keep the rename and an empty file,
    and a resume read that as no history and rewrote metrics.jsonl without the epochs before it)."""
    path = Path(os.path.realpath(path))

    def save(where: Path) -> None:
        with open(where, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())

    try:
        replace_file(path, save)
    except OSError as error:  # a full disk, a read-only folder: the checkpoints already saved stay as they are
        raise TrainingError(f"{path}: could not write it ({error.strerror or error}); the previous {path.name} is "
                            f"{'intact' if path.exists() else 'absent'}; {write_advice(error, path.parent)}") from None


def write_advice(error: OSError, out: Path) -> str:
    """How a failed write inside a run folder ends its error line: what to fix, and whether there is a run to resume."""
    fix = "make it writable" if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "free some space"
    return go_on_after(fix, out)


def go_on_after(fix: str, out: Path) -> str:
    """`fix`, then how the run in `out` goes on: from last.pt, or from best.pt where last.pt was never written (its
    first save failed after best.pt's: "start again" was then refused, the folder holding a run, and --overwrite the
    one way offered, which deleted the finished epoch; each holds the whole training state), else anew."""
    point = next((out / name for name in ("last.pt", "best.pt") if (out / name).is_file()), None)
    return f"{fix} and resume from {point}" if point is not None else f"{fix} and start again"


def checkpoint_interval(text: str | None) -> tuple[int | None, float | None]:
    """--checkpoint-every: "500" → every 500 steps; "10m" → every 600 seconds; None → at epoch ends only."""
    if not text:
        return None, None
    try:
        value = float(text[:-1]) * 60 if text.endswith("m") else int(text)
    except ValueError:
        value = 0
    if not 0 < value < math.inf:  # nan too
        raise TrainingError(f"--checkpoint-every {text}: give a number of steps (500) or of minutes (10m)")
    return (None, value) if text.endswith("m") else (value, None)


def duration_seconds(text: str) -> float:
    """--time-budget: "50m", "1.5h", "3000s" or "3000" (seconds)."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except ValueError:
        value = 0
    if not 0 < value < math.inf:
        raise TrainingError(f"--time-budget {text}: give a duration such as 50m, 1.5h or 3000s")
    return value


def epochs_within(budget_s: float, elapsed_s: float, epoch_s: float, eval_s: float, eval_every: int,
                  max_epochs: int, done: int = 1, after_s: float = 0.0) -> int:
    """How many epochs in all fit a time budget, `done` of them already trained: each further epoch costs its
    training time, the epochs on the --eval-every grid and the last one an evaluation too, and `after_s` runs after
    the last (--calibrate's passes over val)."""
    left = budget_s - elapsed_s - after_s

    def cost(more: int) -> float:  # `more` epochs after `done`, counted as the loop runs them
        last = done + more
        evaluations = last // eval_every - done // eval_every + (more > 0 and last % eval_every != 0)
        return more * epoch_s + evaluations * eval_s

    # A first guess with every epoch paying its share of an evaluation, then corrected: the last epoch's
    # evaluation counts once whether or not it falls on the grid (a guess that reserved it twice left an epoch out).
    more = max(0, min(max_epochs - done, int(max(0.0, left - eval_s) // (epoch_s + eval_s / eval_every))))
    while more > 0 and cost(more) > left:
        more -= 1
    while done + more < max_epochs and cost(more + 1) <= left:
        more += 1
    return max(done, done + more)


def refit_epochs(current: int, budget_s: float, elapsed_s: float, epoch_s: float, eval_s: float, eval_every: int,
                 max_epochs: int, done: int, after_s: float = 0.0) -> int:
    """A --time-budget re-fit of a run planned for `current` epochs (arguments as `epochs_within`'s): fewer as soon
    as they would overrun the budget, more only with an epoch's time to spare. At a pace on the edge of a count, a
    second's change in the pace moved the count up and down by one after every epoch (`make camvid` on the AMX Xeon:
    51, 50, 51, ..., a line each time)."""
    fit = epochs_within(budget_s, elapsed_s, epoch_s, eval_s, eval_every, max_epochs, done=done, after_s=after_s)
    if fit <= current:
        return fit
    return max(current, epochs_within(budget_s, elapsed_s + epoch_s, epoch_s, eval_s, eval_every, max_epochs,
                                      done=done, after_s=after_s))


def calibration_seconds(eval_s: float, world: int) -> float:
    """What --calibrate takes after the last epoch: a pass over val for the fit and one for the ECE after it (they
    overran the budget by that much when left out), each run by the first process alone over the whole split, where
    `eval_s` timed one process's share of the sharded evaluation (under torchrun a reserve of 2 × eval_s was short
    by 2 × (world - 1) evaluations)."""
    return 2 * eval_s * world


def budget_end_note(fitted: int, epoch: int, cfg: TrainConfig) -> str:
    """What a --time-budget fit (before `cfg.epochs` takes it) that ends the run with the epoch just trained means
    for its learning rate: a cosine or poly schedule's decay was cut short, or never began (a budget too small for
    two epochs ended at the warm-up's or the peak rate, without a word)."""
    if fitted > epoch or fitted >= cfg.epochs or cfg.scheduler not in PER_STEP_SCHEDULERS:
        return ""
    return (f"; the run ends with this epoch, its {cfg.scheduler} schedule cut short (the learning rate never decayed "
            "to 0): a larger --time-budget lets it finish")


def steady_epoch_seconds(epoch_s: float, second_half_s: float | None, second_half_steps: int,
                         steps_per_epoch: int) -> float:
    """An epoch's time at the pace of epoch 1's second half: its first half pays once for warm-up (JIT compiles,
    the first touches of the data cache and of the allocator's blocks), about 15% of epoch 1 on a 2-core EPYC, and
    a fit on the whole epoch would leave that share of the budget unspent. The whole epoch when no half was timed."""
    if second_half_s is None or second_half_steps <= 0:
        return epoch_s
    return second_half_s * steps_per_epoch / second_half_steps


# How long a repeated signal is taken for torchrun's copy of the first: it passes it on within milliseconds, but a
# process deep in one long native call (a backward pass on a slow CPU) runs Python's handler only when it returns.
TORCHRUN_REPEAT_S = 10.0


class StopSignal:
    """SIGTERM (a preempted cloud machine, a scheduler's time limit) and SIGINT (Ctrl-C) ask the loop to stop: it
    finishes the step in progress, saves last.pt with the position inside the epoch, and returns. A second signal
    stops at once (KeyboardInterrupt), leaving the last save. Under torchrun (`repeat_s` > 0) the same signal again
    within `repeat_s` seconds is the same request: torchrun passes on to its processes the Ctrl-C or `kill -- -PGID`
    they also got from the process group, and taken as a second signal it stopped them at once, without the save."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    clock = staticmethod(time.monotonic)

    def __init__(self, announce: bool = True, repeat_s: float = 0.0) -> None:
        self.name: str | None = None
        self.announce = announce
        self.repeat_s = repeat_s
        self.received_at = -math.inf
        self.previous: dict = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.name is not None:
            if name == self.name and self.clock() - self.received_at < self.repeat_s:
                return
            raise KeyboardInterrupt
        self.name, self.received_at = name, self.clock()
        if self.announce:
            again = f"again after {self.repeat_s:.0f}s" if self.repeat_s else "again"
            print(f"{self.name}: finishing the current step, then saving last.pt ({again} to stop at once)",
                  file=sys.stderr, flush=True)


def data_signature(dataset: PairedDataset, root: str | Path | None = None) -> dict:
    """What a resumed run compares to tell whether its data changed: the image count, and a digest of each file's
    path and size, the path taken under the folder all the split's files share (not the root, nor the times:
    --data-root may move on resume, or name VOC's data/, VOCdevkit or VOC2012 alike). `root`: under it instead,
    as runs saved before 2026-12-06 did."""
    files = dataset.image_paths + dataset.mask_paths
    under = root if root is not None or not files else os.path.commonpath([Path(path).parent for path in files])
    digest = hashlib.sha256()
    for path in files:
        try:
            size = path.stat().st_size
        except OSError:  # a symlink loop or a dangling link: one line naming it (a traceback with --skip-data-check)
            looked_at(path)
            raise
        digest.update(os.fsencode(f"{os.path.relpath(path, under)}:{size}\n"))
    return {"images": len(dataset), "digest": digest.hexdigest()[:16]}


def epoch_span(first: int, last: int, step: int = 0, steps: int = 0, fitted_by: str | None = None) -> str:
    """The epochs a run trains, for its first and last lines, the first from step `step` of `steps` when resumed
    mid-epoch; a resumed run already past --epochs trains none. `fitted_by`: the --time-budget that set --epochs
    (the user gave another number: "--epochs 1" alone read as a mistake)."""
    if first > last:
        begun = f" and epoch {first} begun (step {step}/{steps})" if step else ""
        fitted = f", as --time-budget {fitted_by} fitted it" if fitted_by else ""
        return f"no epoch to train: {first - 1} already done{begun} (--epochs {last}{fitted}; give more to continue)"
    return f"epochs {first}..{last}" + (f" (epoch {first} from step {step}/{steps})" if step else "")


def absolute_paths(cfg: TrainConfig) -> dict:
    """The config's paths as a resumed run must read them, from whatever folder it is started in."""
    return {name: os.path.abspath(value) for name in ("data_root", "cache_dir", "encoder_weights")
            if (value := getattr(cfg, name))}


# What a resumed run may change: how long, where the data lies, how it runs and the learning rate (the way out of a
# diverged run). --calibrate is what happens after training (to best.pt), not part of the recipe; --encoder-weights
# is where the first run's encoder started, not read again on resume.
RESUME_CHANGEABLE = frozenset({"epochs", "workers", "progress", "device", "cache_dir", "max_pixels", "skip_data_check",
                               "checkpoint_every", "tensorboard", "data_root", "lr", "resume", "calibrate",
                               "encoder_weights", "overwrite"})
# What a run writes in its folder; `--overwrite` removes them before a new run starts there.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "curves.png")


CONFIG_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def stored_settings(checkpoint: str | Path) -> tuple[dict, str]:
    """Every TrainConfig field of the run a checkpoint belongs to (the default for one an older file lacks), and
    the run's folder."""
    stored = load_checkpoint(checkpoint, tensors=False).get("train_config")  # train() reads the weights
    if stored is None:
        raise TrainingError(f"{checkpoint}: holds no training settings; resume from a run's last.pt")
    run_dir = str(Path(os.path.realpath(checkpoint)).parent)  # a link to RUN/last.pt resumes in RUN
    return {**CONFIG_DEFAULTS, **{k: v for k, v in stored.items() if k in CONFIG_DEFAULTS}}, run_dir


def resumed_config(checkpoint: str | Path, changes: dict) -> TrainConfig:
    """The settings of the run `checkpoint` belongs to, with `changes` (TrainConfig fields) made where a resumed run
    may change (RESUME_CHANGEABLE); another change is refused in one line. A setting in `changes` counts even at its
    default value (`--workers 2` resumes with 2); one left out keeps the stored value."""
    stored, run_dir = stored_settings(checkpoint)
    changes = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in changes.items()}
    if "out" in changes and Path(changes.pop("out")).resolve() != Path(run_dir).resolve():
        raise TrainingError(f"--out: a resumed run stays in its folder ({run_dir}); leave --out out, or copy the "
                            "folder first")
    unknown = [name for name in changes if name not in stored]
    if unknown:
        raise TrainingError(f"{unknown[0]}: not a training setting")
    if any(stored[name] is None for name in ("num_classes", "ignore_index") if name in changes):
        # The run's own value, read from its classes.json when it started, is no change (refused as one: "the run
        # was started without --ignore-index"; a helper's audit, 2026-12-07)
        classes = checkpoint_classes(load_checkpoint(checkpoint, tensors=False))
        for name, value in (("num_classes", classes.num_classes), ("ignore_index", classes.ignore_index)):
            if stored[name] is None and changes.get(name, object()) == value:
                del changes[name]
    # Compared as TrainConfig keeps them: time_budget=3000 is the stored "3000", decoder_channels=(256, 128, 64, 32)
    # the stored "256,128,64,32" (both were refused as changes).
    given, before = TrainConfig(**{**stored, **changes}).to_dict(), TrainConfig(**stored).to_dict()
    for name, value in list(changes.items()):
        if name in RESUME_CHANGEABLE:
            continue
        if given[name] == before[name] or same_duration(given, before, name):
            del changes[name]  # the run's own value in other words (--time-budget 15 for 15s): it keeps its own
            continue
        if isinstance(value, bool):  # a switch has one flag, the one given: --no-pretrained, --calibrate
            flag = f"--{'' if value else 'no-'}{name.replace('_', '-')}"
            raise TrainingError(f"{flag}: cannot change on --resume (the run was started without it); start a "
                                "new run with another --out")
        flag = f"--{name.replace('_', '-')}"
        was = f"was started without {flag}" if stored[name] is None else f"trains with {stored[name]}"
        raise TrainingError(f"{flag} {value}: cannot change on --resume (the run {was}); start a new run with "
                            "another --out")
    # --overwrite belongs to the start of a run, not to its settings: a run started with it resumes without it.
    return TrainConfig(**{**stored, **changes, "resume": os.fspath(checkpoint), "out": run_dir,
                          "overwrite": changes.get("overwrite", False)})


def same_duration(given: dict, before: dict, name: str) -> bool:
    """Whether `name` is --time-budget at the run's own duration in other words (15 for 15s, 0.25m)."""
    if name != "time_budget" or not isinstance(given[name], str) or not isinstance(before[name], str):
        return False
    try:
        return duration_seconds(given[name]) == duration_seconds(before[name])
    except TrainingError:
        return False


def resume(checkpoint: str | Path, **changes) -> dict:
    """Python's `resunet train --resume CHECKPOINT [flags]`: the run goes on in its folder with its own recipe;
    `changes` are TrainConfig fields that may change (epochs=80, lr=1e-4, data_root=..., workers=0, ...)."""
    return train(resumed_config(checkpoint, changes))


def check_resumed_settings(cfg: TrainConfig) -> None:
    """A TrainConfig built by hand with `resume=` (not by `resume` or the CLI) must be its run's recipe, in its
    folder: otherwise a run went on in ./runs/train, or under another loss or schedule, or failed on a KeyError deep
    in the optimiser's state."""
    stored, run_dir = stored_settings(cfg.resume)
    how = f"resunet.train.resume({os.fspath(cfg.resume)!r}, epochs=...) keeps the run's recipe and folder"
    if Path(cfg.out).resolve() != Path(run_dir).resolve():
        raise TrainingError(f"out={cfg.out!r}: a resumed run stays in its folder ({run_dir}); {how}")
    before = TrainConfig(**stored).to_dict()  # as the run's own config keeps them (widths stored with spaces)
    for name, value in cfg.to_dict().items():
        if name not in RESUME_CHANGEABLE | {"out"} and value != before[name]:
            was = f"was started without {name}" if stored[name] is None else f"trains with {stored[name]!r}"
            raise TrainingError(f"{name}={value!r}: the run {was}, and it cannot change on resume; {how}")


def check_not_behind(resume: str | Path, state: dict, out: Path) -> None:
    """Refuse a resume from a checkpoint older than the run's last.pt (`--resume RUN/best.pt`): the run would go
    back to it and overwrite last.pt, the work since then lost."""
    last = out / "last.pt"
    if not last.is_file() or os.path.samefile(last, resume):
        return
    try:
        newer = load_checkpoint(last, tensors=False)
    except CheckpointError as error:  # a half-copied run folder: the file asked for is not the one that failed
        raise TrainingError(f"--resume {resume}: {last}, which the run would overwrite, is not readable ({error}); "
                            f"move it aside if it is damaged, then resume from {Path(resume).name}") from None

    def point(payload: dict) -> tuple[int, int]:
        return payload.get("epoch", 0), (payload.get("position") or {}).get("step", 0)

    def said(payload: dict) -> str:  # a checkpoint saved inside an epoch holds the epochs before it and some steps
        epoch, step = point(payload)
        return f"epoch {epoch}" + (f" and {step} step(s) of epoch {epoch + 1}" if step else "")

    if point(newer) > point(state):
        raise TrainingError(f"{resume}: holds {said(state)}, but {last} is further on ({said(newer)}); resuming "
                            f"would overwrite it. Resume from {last}, or copy {Path(resume).name} into another folder "
                            "to branch from it")


def check_new_run_folder(cfg: TrainConfig) -> None:
    """A new run in a folder that holds one would replace its checkpoints and metrics, epoch by epoch (a run stopped
    and started again without --resume): refused unless asked for with --overwrite."""
    if cfg.resume:
        if cfg.overwrite:
            raise TrainingError("--overwrite starts a new run, --resume goes on with one: give one of them")
        return
    out = Path(cfg.out)
    held = [name for name in ("last.pt", "best.pt") if (out / name).is_file()]
    if held and not cfg.overwrite:
        go_on = f"go on with it with --resume {out / held[0]}, "
        raise TrainingError(f"--out {out}: holds a run already ({' and '.join(held)}); {go_on}start it over with "
                            "--overwrite, or give another --out")


def check_same_classes(resume: str | Path, state: dict, info: ClassInfo, data_root: str) -> None:
    """A resumed run's dataset must label as its checkpoint does: a classes.json edited since (two classes swapped,
    another ignore label) reads the same masks as other classes, and the run went on without a word."""
    differ = class_differences(ClassInfo.from_dict(state["classes"], str(resume), distinct_colours=False), info)
    if differ is None:
        return
    raise TrainingError(f"--resume {resume}: {data_root} now gives other classes than the run was trained on "
                        f"({differ}); a run keeps its labels: restore the dataset's classes.json, or start a new run "
                        "with another --out")


def last_good_save(out: Path) -> str:
    """What a diverged run leaves behind, for its error line."""
    last = out / "last.pt"
    if last.is_file():
        return (f"weights not saved over {last} (it holds the last good save); resume from it with a lower --lr, "
                "or check the data (resunet check-data)")
    return "no checkpoint was saved yet; lower --lr or check the data (resunet check-data)"


def stop_line(signal_name: str, where: str, out: Path, world: int = 1, held: str = "it") -> str:
    """What stopped, where, and the command that resumes it: under torchrun, with as many processes (a save inside
    an epoch needs them: each one's share of the data depends on the count)."""
    launcher = f"torchrun --nproc-per-node {world} -m resunet" if world > 1 else "resunet"
    return (f"{signal_name}: stopped {where}; {out / 'last.pt'} holds {held}. "
            f"Resume with: {launcher} train --resume {out / 'last.pt'}")


def agree(world: int, device: torch.device, *flags: bool) -> list[bool]:
    """Every process acts on a flag any of them raised: a signal or a clock reaches them at different steps."""
    if world == 1:
        return list(flags)
    tensor = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def broadcast_int(value: int, world: int, device: torch.device) -> int:
    """Rank 0's value on every process (under torchrun); the value itself in a single process."""
    if world == 1:
        return value
    tensor = torch.tensor([value], device=device)
    dist.broadcast(tensor, 0)
    return int(tensor)


def share_buffers(model: nn.Module, world: int) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every process, before a sharded evaluation: without
    SyncBatchNorm (the CPU) each process's last steps updated them from its own batches, so each shard was scored by
    a slightly different model and the val mIoU recorded (and the best.pt chosen by it) was not the saved model's.
    DistributedDataParallel does the same at the start of the next training forward."""
    if world == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)


def position_state(epoch: int, step: int, loss_sum: torch.Tensor, world: int, timed_images: int,
                   timed_seconds: float, seconds: float, epoch_rng: dict) -> dict:
    """Where a run stands inside an epoch; with the weights and optimiser, all a resumed run needs to continue at
    that step exactly. Every process's loss sum is kept (the epoch's mean loss is over all of them)."""
    if world > 1:
        sums = [torch.zeros_like(loss_sum) for _ in range(world)]
        dist.all_gather(sums, loss_sum)
        loss_sums = torch.stack(sums).cpu()
    else:
        loss_sums = loss_sum.detach().cpu()[None]
    return {"epoch": epoch, "step": step, "loss_sums": loss_sums, "timed_images": timed_images,
            "timed_seconds": timed_seconds, "seconds": seconds, "rng": epoch_rng}


def read_metrics(path: Path, up_to_epoch: int) -> list[dict]:
    """metrics.jsonl lines up to an epoch (a crash may have left lines past the checkpoint)."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            epoch = int(record["epoch"])
            # what the curves draw: a line that lacked one passed here and stopped the resumed run at its first
            # drawing with a KeyError traceback, at every resume
            for key in ("train_loss", "lr"):
                if isinstance(record[key], bool) or not isinstance(record[key], (int, float)):
                    raise TypeError(f"{key} {record[key]!r} is not a number")
            if not (record.get("val_miou") is None or isinstance(record["val_miou"], (int, float))):
                raise TypeError(f"val_miou {record['val_miou']!r} is not a number")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError) as error:  # edited by hand
            raise TrainingError(f"{path}: line {number} is not an epoch's record ({error}); fix or remove it, the "
                                "checkpoints do not depend on it") from None
        if epoch <= up_to_epoch:
            records.append(record)
    return records


def check_types(cfg: TrainConfig) -> None:
    """From Python, settings arrive as given, not parsed by the flags: each must be of its field's type and, where
    its flag takes a fixed list, one of that list. A typo fell back to another optimizer, scheduler, mix, class
    weighting or data path without a word, and a number given as text failed deep in the run."""
    names = {bool: "True or False", int: "a whole number", float: "a number", str: "text"}
    for f in fields(cfg):
        value, kinds = getattr(cfg, f.name), field_kinds()[f.name]
        flag = f"--{f.name.replace('_', '-')}"
        if value is None and (type(None) in kinds or f.default is None):
            continue
        if not any(isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
                   for kind in kinds if kind is not type(None)):
            expected = " or ".join(names[kind] for kind in kinds if kind in names)
            raise TrainingError(f"{flag} {value!r}: must be {expected}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            close = difflib.get_close_matches(str(value).lower(), choices, n=1, cutoff=0.5)
            meant = f"did you mean {close[0]}? " if close else ""
            raise TrainingError(f"{flag} {value!r}: unknown; {meant}choose from {', '.join(choices)}")


def check_settings(cfg: TrainConfig) -> None:
    """Refuse settings that make no sense before any work starts, in one line naming the flag."""
    if cfg.tensorboard:  # refused after the data check and cache build, and after --overwrite removed the old run
        try:
            check_tensorboard()
        except TensorBoardUnavailable as error:
            raise TrainingError(str(error)) from None
    per_step = cfg.scheduler in PER_STEP_SCHEDULERS  # their warm-up must leave room for the decay
    # ... of --epochs; a resumed --time-budget run's epochs are its fit, which may hold no more than the warm-up
    # (make_scheduler then halves it), and its warm-up was checked against --epochs when it started
    fitted = cfg.resume is not None and cfg.time_budget is not None
    warmup_most = cfg.epochs if per_step and not fitted else math.inf
    warmup_expected = f"0 or more, and fewer than --epochs ({cfg.epochs})" if per_step else "0 or more"
    rules = [
        ("epochs", cfg.epochs >= 1, "at least 1"),
        ("batch-size", cfg.batch_size >= 1, "at least 1"),
        ("eval-every", cfg.eval_every >= 1, "at least 1"),
        ("size", cfg.size >= 1, "a positive number of pixels"),
        ("crop-size", cfg.crop_size is None or cfg.crop_size >= 1, "a positive number of pixels"),
        ("lr", cfg.lr > 0 and math.isfinite(cfg.lr), "a positive number"),
        ("weight-decay", 0 <= cfg.weight_decay < math.inf, "0 or more"),
        ("warmup-epochs", 0 <= cfg.warmup_epochs < warmup_most, warmup_expected),
        ("warmup-epochs", per_step or cfg.warmup_epochs == 0,
         f"0 with --scheduler {cfg.scheduler}: a warm-up is part of the cosine and poly schedules"),
        ("workers", cfg.workers >= 0, "0 or more"),
        ("scale-max", math.isfinite(cfg.scale_max), "a finite number"),
        ("scale-min", 0 < cfg.scale_min <= cfg.scale_max, f"positive and at most --scale-max ({cfg.scale_max})"),
        ("jitter", 0 <= cfg.jitter < math.inf, "0 or more"),
        ("mix-prob", 0 <= cfg.mix_prob <= 1, "a share between 0 and 1"),
        ("batch-size", cfg.mix == "none" or cfg.batch_size >= 2,
         f"2 or more with --mix {cfg.mix}: an image is mixed with another image of its batch"),
        ("loss", cfg.loss in LOSSES, f"one of {', '.join(LOSSES)}"),
        ("focal-gamma", 0 <= cfg.focal_gamma < math.inf, "0 or more"),
        ("ohem-keep", 0 < cfg.ohem_keep <= 1, "a fraction in (0, 1]: the share of the valid pixels kept"),
        # An option of a loss or --mix not chosen changed nothing, yet was stored, and a --resume refused to change
        # it ("the run trains with 5.0"); a resumed run's settings are its own
        ("focal-gamma", cfg.resume or cfg.loss == "focal" or cfg.focal_gamma == CONFIG_DEFAULTS["focal_gamma"],
         "left out without --loss focal, the only loss that uses it"),
        ("ohem-keep", cfg.resume or cfg.loss == "ohem" or cfg.ohem_keep == CONFIG_DEFAULTS["ohem_keep"],
         "left out without --loss ohem, the only loss that uses it"),
        ("mix-prob", cfg.resume or cfg.mix != "none" or cfg.mix_prob == CONFIG_DEFAULTS["mix_prob"],
         "left out without --mix cutmix or classmix"),
        ("class-weights", cfg.resume or cfg.loss != "lovasz" or cfg.class_weights == CONFIG_DEFAULTS["class_weights"],
         "left out with --loss lovasz, whose class average is unweighted (ce+lovasz weights its cross-entropy)"),
        ("ema", 0 <= cfg.ema < 1, "a decay in [0, 1), e.g. 0.999 (0: off)"),
        ("seed", 0 <= cfg.seed < 2**32, "an integer from 0 to 2**32 - 1"),
        ("num-classes", cfg.num_classes is None or cfg.num_classes >= 1, "at least 1"),
        ("max-pixels", cfg.max_pixels >= 1, "at least 1"),
    ]
    for flag, holds, expected in rules:
        if not holds:
            raise TrainingError(f"--{flag} {getattr(cfg, flag.replace('-', '_'))}: must be {expected}")
    if cfg.encoder not in ENCODERS:
        close = difflib.get_close_matches(cfg.encoder, ENCODERS, n=1)
        meant = f"did you mean {close[0]}? " if close else ""
        raise TrainingError(f"--encoder {cfg.encoder}: unknown; {meant}choose from {', '.join(ENCODERS)}")
    if cfg.encoder_weights and not cfg.pretrained and not cfg.resume:
        raise TrainingError(f"--encoder-weights {cfg.encoder_weights} with --no-pretrained: the encoder would not "
                            "start from random weights; give the file alone, or --no-pretrained alone")
    if cfg.encoder_weights and not cfg.resume:  # missing: found now, not after the data check and cache build
        check_weights_file(cfg.encoder_weights)
    decoder_widths(cfg.decoder_channels)
    checkpoint_interval(cfg.checkpoint_every)
    crop = cfg.crop_size or cfg.size
    if cfg.batch_size == 1 and crop <= 32:  # the encoder's last level is 1×1: BatchNorm sees one value per channel
        raise TrainingError(f"--batch-size 1 with a {crop}-pixel crop: the encoder's deepest features are 1×1, and "
                            "BatchNorm cannot train on one value per channel; use --batch-size 2 or a crop over 32")


def check_one_gpu_each(processes: int) -> None:
    """Asked by every process of a machine alike, so all stop: those past the last GPU met "invalid device ordinal"
    in a traceback, and the others waited in the process group until its timeout."""
    gpus = torch.cuda.device_count()
    if processes > gpus:
        raise DeviceError(f"torchrun --nproc-per-node {processes}: this machine has {gpus} CUDA device(s), one a "
                          f"process; give --nproc-per-node {gpus} or fewer")


@contextlib.contextmanager
def caller_state_kept() -> Iterator[None]:
    """`train` from a notebook or a script leaves the process's global state as it found it: the speed flags it sets
    on a GPU (cudnn.benchmark; TF32 for fp32 matmuls and convolutions, so the caller's later fp32 work ran at TF32
    precision without a word) and the random generators it seeds (the caller's draws after it were train's)."""
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    generators = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                  torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        random.setstate(generators[0])
        np.random.set_state(generators[1])
        torch.set_rng_state(generators[2])
        if generators[3] is not None:
            torch.cuda.set_rng_state_all(generators[3])


@caller_state_kept()
def train(cfg: TrainConfig) -> dict:
    """Train (or resume) the run `cfg` describes; its folder is locked while it runs, however the run ends."""
    with contextlib.ExitStack() as held:
        return run_training(cfg, held)


def run_training(cfg: TrainConfig, held: contextlib.ExitStack) -> dict:
    """`train`'s body; `held` keeps the run folder's lock until train returns or raises (a traceback kept by a
    notebook would otherwise keep the lock, and refuse the next run in the folder)."""
    if cfg.data_root is None:
        raise TrainingError("data_root (--data-root): required, the dataset folder")
    rank, local_rank, world = distributed_env()
    try:
        check_types(cfg)
        if cfg.resume:
            check_resumed_settings(cfg)
            # "data root is not a folder" did not say it may be given anew; a --data-root given is the user's own
            if not Path(cfg.data_root).is_dir() and cfg.data_root == stored_settings(cfg.resume)[0]["data_root"]:
                raise DataError(f"{cfg.data_root}: the run's data root is not a folder; if the dataset moved, give its "
                                "new place with --data-root (a resumed run may read its data from anywhere)")
        check_settings(cfg)
        # every value first: a bad --time-budget was said only once --overwrite had been given for the folder
        budget_s = duration_seconds(cfg.time_budget) if cfg.time_budget else None
        check_new_run_folder(cfg)
        device = resolve_device(cfg.device)
        if world > 1 and device.type == "cuda":  # each process takes the GPU of its local rank
            check_one_gpu_each(int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)))
    except SETUP_ERRORS as error:  # before the processes can agree: each met it; the first on each machine says it
        if local_rank != 0:
            error.quiet = True
        raise
    # ---- setup: processes, device, precision --------------------------------------------------------------------
    cfg = replace(cfg)  # a copy: --time-budget sets its epochs
    most_epochs = cfg.epochs  # --epochs: what a --time-budget fit may choose at most
    setup_started = time.perf_counter()
    save_every_steps, save_every_s = checkpoint_interval(cfg.checkpoint_every)
    tune_cpu_allocator()
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        # The processes wait in a collective while the first runs the data check and each machine's first builds
        # the decoded cache: minutes on a large dataset, past NCCL's default 10-minute timeout (gloo's is 30). It
        # bounds every collective: a process that hangs in training is found after as long.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=SETUP_TIMEOUT)
    main_process = rank == 0
    dtype = resolve_precision(cfg.precision, device)
    channels_last = use_channels_last(device, dtype, cfg.encoder, training=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    if not cfg.skip_data_check:  # on the first process alone; the others wait for its verdict
        with said_once(world, device, main_process):
            if main_process:
                check_cache_first(cfg)
                check_data_first(cfg, verbose=True)
    # ---- data, checked before the run folder is made: a refused run leaves nothing behind ------------------------
    with said_once(world, device, main_process):
        train_set = open_dataset(cfg.data_root, cfg.train_split, cfg.num_classes, cfg.ignore_index, cfg.max_pixels)
        val_set = open_dataset(cfg.data_root, cfg.val_split, cfg.num_classes, cfg.ignore_index, cfg.max_pixels)
        info = train_set.info
        # A run written into train/images left curves.png and its checkpoints to be read as images, and every later
        # run, its own resume too, refused the dataset (a helper, 2026-12-06).
        check_folder_apart("--out", cfg.out, data_locations(cfg.data_root)[0])
        if len(train_set) < cfg.batch_size * world:
            raise DataError(f"{cfg.data_root}: {len(train_set)} training images, fewer than one batch of "
                            f"{cfg.batch_size * world}")
        shared = main_process and len({*map(os.path.realpath, train_set.image_paths)}
                                      & {*map(os.path.realpath, val_set.image_paths)})
        if shared:  # --train-split val --val-split val passed the data check without a word
            print(f"resunet: warning: {shared} of the {len(val_set)} val images are training images too "
                  f"(--train-split {cfg.train_split}, --val-split {cfg.val_split}): their val mIoU measures how the "
                  "model fits what it trained on, not how it does on new images", file=sys.stderr, flush=True)
        data_path = choose_data_path(cfg, train_set)
        if data_path == "cached":  # an unwritable --cache-dir is one line now, not a traceback once the run began
            check_cache_writable(train_set, cfg.size, Path(cfg.cache_dir) if cfg.cache_dir else None)
    # Built before the run folder is made, so weights that cannot be had or do not fit leave nothing behind. A
    # resumed run's weights come from its checkpoint: the encoder's start file is not read again (it may be gone).
    weights = None if cfg.resume else cfg.encoder_weights or ("imagenet" if cfg.pretrained else None)
    with said_once(world, device, main_process):  # weights that cannot be had or do not fit
        model = ResNetUNet(info.num_classes, cfg.encoder, weights,
                           decoder_channels=decoder_widths(cfg.decoder_channels), attention=cfg.attention).to(device)
    out = Path(cfg.out)
    made_out = not out.exists()
    with said_once(world, device, main_process):  # made by the first process: the others stop too, quietly
        if main_process:
            try:
                out.mkdir(parents=True, exist_ok=True)
                check_output_folder("--out", out)  # a folder it cannot write in: found now, not after an epoch
            except OSError as error:  # a file in the way, a read-only parent
                raise TrainingError(f"--out {out}: cannot make the run folder ({error.strerror or error})") from None
            except DataError as error:
                raise TrainingError(str(error)) from None
            # Another train (or --resume, or an ablate row) writing here would replace this run's checkpoints and
            # metrics epoch by epoch, and this one theirs (`make camvid` started twice was taken without a word)
            if not held.enter_context(FolderLock(out)).held:
                raise TrainingError(f"--out {out}: another resunet train is writing there (the run, or a resume of "
                                    "it, is still going); wait for it to end, or give another --out")

    # ---- model ---------------------------------------------------------------------------------------------------
    mean, std = model.normalization
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and device.type == "cuda":
        model = sync_batchnorm(model)  # PyTorch's SyncBatchNorm runs on GPUs only
    # Under torchrun each machine's first process builds the decoded cache, then the others open it: all of them
    # building at once decoded the split once per process, into as many copies (a full disk where one fits).
    # Two turns for every process whatever its data path (each decides it from its own disk: they may differ).
    @contextlib.contextmanager
    def refused_leaves_nothing() -> Iterator[None]:
        """A setup step after the run folder was made: refused, the run leaves nothing (the folder, if still empty)."""
        try:
            yield
        except SETUP_ERRORS:
            if main_process and made_out:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only if still empty
            raise

    builds = data_path != "cached" or local_rank == 0
    for turn in (1, 2) if world > 1 else (1,):
        # the cache build reads every image: with --skip-data-check, a bad one is found here
        with said_once(world, device, main_process), refused_leaves_nothing():
            if builds == (turn == 1):
                loader, data_path = make_train_loader(cfg, train_set, mean, std, device, rank, world, data_path)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, device)
    scheduler = make_scheduler(cfg, optimizer, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_weights = None
    if cfg.class_weights == "sqrt-inv-freq":
        # Every training mask read: with --skip-data-check on the simple data path, a bad one is found here first
        with said_once(world, device, main_process), refused_leaves_nothing():
            loss_weights = class_weights(train_set).to(device)
    # The earlier run's files go only now that this one's data, model and class weights (every mask read) are ready
    if cfg.overwrite and main_process:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)  # its curves would mix with the new run's
    criterion = SegmentationLoss(cfg.loss, loss_weights, info.ignore_index, cfg.focal_gamma, cfg.ohem_keep)
    average = WeightAverage(model, cfg.ema) if cfg.ema else None
    start_epoch, best_miou, position = 1, -1.0, None
    with said_once(world, device, main_process):  # a checkpoint that does not fit: every process meets it
        if cfg.resume:
            state = load_checkpoint(cfg.resume)
            if not {"optimizer", "scheduler", "train_config"} <= state.keys():
                raise CheckpointError(f"{cfg.resume}: holds no training state (optimiser, schedule); resume from a "
                                      "run's last.pt")
            try:
                model.load_state_dict(state.get("training_model", state["model"]))  # with --ema, "model" is the average
                if average is not None:
                    average.module.load_state_dict(state["model"])
            except RuntimeError as error:  # another class count (classes.json changed) or other architecture flags
                detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
                raise CheckpointError(f"{cfg.resume}: its weights do not fit the model this run builds from "
                                      f"{cfg.data_root} ({detail})") from None
            if average is not None:
                average.updates = state["ema_updates"]
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            stored_lr = state["train_config"]["lr"]
            if cfg.lr != stored_lr:  # `--resume ... --lr`: the way out of a diverged run
                scale_learning_rate(optimizer, scheduler, cfg.lr / stored_lr)
                if main_process:
                    print(f"resunet: learning rate {stored_lr:g} → {cfg.lr:g} from here on (the schedule scaled "
                          "with it)", flush=True)
            if state["scaler"]:  # empty from a run without fp16: a run resumed where "auto" means fp16 starts its scale
                scaler.load_state_dict(state["scaler"])
            restore_rng(state["rng"])
            start_epoch, best_miou = state["epoch"] + 1, state["best_miou"]
            position = state.get("position")  # saved inside an epoch: continue at that step
            if position is not None and len(position["loss_sums"]) != world:
                raise TrainingError(f"{cfg.resume}: saved inside epoch {position['epoch']} by "
                                    f"{len(position['loss_sums'])} process(es); resume it with as many (each one's "
                                    f"share of the data depends on the count), or from an epoch's end")
    with said_once(world, device, main_process), refused_leaves_nothing():
        data_now = {"train": data_signature(train_set), "val": data_signature(val_set)}
    if cfg.resume:
        with said_once(world, device, main_process):
            check_same_classes(cfg.resume, state, info, cfg.data_root)
            check_not_behind(cfg.resume, state, out)
        saved = state.get("data", data_now)
        changed = [split for split, dataset in (("train", train_set), ("val", val_set))
                   if saved[split] != data_now[split] and saved[split] != data_signature(dataset, cfg.data_root)]
        if changed and main_process:
            was = ", ".join(f"{state['data'][split]['images']} → {data_now[split]['images']} {split}"
                            for split in changed)
            print(f"resunet: the {' and '.join(changed)} data changed since {cfg.resume} was saved ({was} images, or "
                  f"files edited); the run goes on with the data as it is now"
                  + ("; its best val mIoU so far was measured on the old val split"
                     if "val" in changed and state.get("best_miou", -1.0) >= 0 else ""),
                  flush=True)
        # The saved step counts batches in the old data's order, which another image count reshuffles.
        resized = "train" in changed and data_now["train"]["images"] != state["data"]["train"]["images"]
        if position is not None and (resized or position["step"] > len(loader)):
            if main_process:
                print(f"resunet: epoch {position['epoch']} starts again from its first step (it was saved at step "
                      f"{position['step']} of the old training data)", flush=True)
            position = None
    if cfg.resume and cfg.scheduler in PER_STEP_SCHEDULERS:
        steps_done = (start_epoch - 1) * len(loader) + (position["step"] if position else 0)
        rebase_schedule(scheduler, optimizer, steps_done, main_process)
        stored_epochs = state["train_config"]["epochs"]
        if cfg.epochs != stored_epochs and main_process:  # a finished cosine at 0 would rise again without a word
            going_on = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](steps_done)
            print(f"resunet: --epochs {cfg.epochs} (the run was set to {stored_epochs}): the {cfg.scheduler} schedule "
                  f"now spans {cfg.epochs} epochs, so the learning rate goes on at {going_on:.3g} (it was "
                  f"{optimizer.param_groups[0]['lr']:.3g})", flush=True)
    records = read_metrics(out / "metrics.jsonl", start_epoch - 1) if main_process else []
    if main_process:
        for stale in out.glob(".*.tmp*"):  # left by a process killed while it saved
            # not one still being written (an export's ONNX files, for minutes, in the run folder)
            if (writer := temporary_writer(stale)) is not None and not process_alive(writer):
                stale.unlink(missing_ok=True)

    raw_model = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(model) if cfg.compile else model
    evaluated_model = average.module if average is not None else raw_model  # also the one saved as "model"
    # Validation runs the model being trained: it keeps the training layout (an NHWC conversion here would be
    # done in place and slow the training steps that follow).
    predictor = Predictor(evaluated_model, info, cfg.size, mean, std, device, precision_name(dtype),
                          channels_last=channels_last)
    steps_per_epoch = len(loader)
    global_step = (start_epoch - 1) * steps_per_epoch + (position["step"] if position else 0)
    board = None
    with said_once(world, device, main_process):  # the first process alone writes: the others stop quietly
        if cfg.tensorboard and main_process:
            try:
                board = TensorBoardLog(out / "tensorboard", global_step)
            except TensorBoardUnavailable as error:
                raise TrainingError(str(error)) from None
    # The --epochs the budget set, not one given on resume (the budget fitted 3, --epochs 2 given: "as fitted" misled)
    fitted_by = (cfg.time_budget if cfg.resume and state.get("budget_fitted")
                 and cfg.epochs == state.get("train_config", {}).get("epochs") else None)
    if main_process:
        origin = f"weights from {cfg.resume}" if cfg.resume else f"pretrained: {weights}" if weights else "random init"
        print(f"resunet: {len(train_set)} train / {len(val_set)} val images ({train_set.description}), "
              f"{info.num_classes} classes; {cfg.encoder} ({origin}); {describe_device(device)}, "
              f"{precision_name(dtype)}{', channels_last' if channels_last else ''}, {world} process(es), "
              f"{data_path} data path; "
              f"{epoch_span(start_epoch, cfg.epochs, position['step'] if position else 0, steps_per_epoch, fitted_by)}",
              flush=True)

    def save_run(path: Path, epochs_done: int, rng: dict, **extra) -> None:
        # A failed save of best.pt or last.pt leaves the previous last.pt, if any, to resume from.
        advice = go_on_after("free some space", out)
        save_checkpoint({
            "model_config": raw_model.config.to_dict(), "classes": info.to_dict(), "input_size": cfg.size,
            "normalization": {"mean": list(mean), "std": list(std)}, "model": evaluated_model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epochs_done, "best_miou": best_miou, "rng": rng,
            "train_config": {**cfg.to_dict(), **absolute_paths(cfg)}, "data": data_now,
            "budget_fitted": budget_fitted or fitted_before, **extra,
            **({"training_model": raw_model.state_dict(), "ema_updates": average.updates} if average else {}),
        }, path, advice)

    # ---- the loop ------------------------------------------------------------------------------------------------
    run_started = last_save = time.perf_counter()
    scores: dict = {}
    # --time-budget: fitted at epoch 1, then re-fitted; an epoch costs its training steps plus its bookkeeping
    # (metrics, checkpoints, curves, TensorBoard), timed apart, and a share of an evaluation
    budget_fitted, epoch_seconds, bookkeeping_seconds, eval_s, calibration_s = False, [], [], 0.0, 0.0
    # Fitted at the end of epoch 1, or of the first epoch resumed from a save made before the fit (killed between
    # epoch 1's saves and the fit's: that run had trained on to --epochs); older checkpoints count as fitted.
    # A fit made before a resume stays made in this process's saves (it saved False: the next resume fitted again).
    fitted_before = bool(cfg.resume) and state.get("budget_fitted") is not False
    fit_epoch = start_epoch if cfg.resume and not fitted_before else 1
    stopped_by = late_stop = None
    curves_drawn, curves_behind = -math.inf, False

    def save_inside_epoch(seconds: float) -> None:
        """last.pt at the current step of the current epoch, `seconds` into it: a resume continues there."""
        inside = position_state(epoch, steps, loss_sum, world, timed_images, timed_seconds, seconds, epoch_rng)
        if main_process:
            save_run(out / "last.pt", epoch - 1, epoch_rng, position=inside)

    def keep_steps_then_raise(error: DataError, kept: str, seconds: float) -> NoReturn:
        """A file found unreadable only now (--skip-data-check, or changed since the check) costs what
        it stopped, not the epoch's steps before it: saved, then the one-line error."""
        if world > 1:  # the save gathers from every process, and the others are not here
            raise error
        save_inside_epoch(seconds)
        raise DataError(f"{one_line(error)}; {kept} saved: mend the file (or remove the image and its mask, "
                        f"and its line in a VOC split list), then resunet train --resume {out / 'last.pt'}"
                        ) from None

    # The cache's read lock goes with the loop, however it ends: a process that trains again (ablate, a notebook)
    # may hold this run's objects for a while, and a later build must be free to remove the copy once it is stale.
    cache_read = contextlib.closing(loader.cache) if isinstance(loader, CachedLoader) else contextlib.nullcontext()
    # Closed however the run ends (a diverged loss, a bad file, a full disk): the writer flushes every 2 minutes, and
    # the events up to the failure are the ones a user opens TensorBoard to see
    board_written = contextlib.closing(board) if board is not None else contextlib.nullcontext()
    # torchrun's copies of the signal reach one process of its own too (TORCHELASTIC_RUN_ID: set by torchrun)
    repeat_s = TORCHRUN_REPEAT_S if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ else 0.0

    @contextlib.contextmanager
    def curves_caught_up() -> Iterator[None]:
        """curves.png up to the last saved epoch however the loop ends: a bad file, a diverged loss or a failed save
        left it up to CURVES_EVERY_S behind metrics.jsonl (the README says it is drawn when the run ends or stops)."""
        try:
            yield
        except BaseException:
            if curves_behind:
                with contextlib.suppress(Exception):  # the error that stopped the run is the one to report
                    draw_curves(records, out)
            raise
        if curves_behind:
            draw_curves(records, out)

    with StopSignal(announce=main_process, repeat_s=repeat_s) as stop, cache_read, board_written, curves_caught_up():
        for epoch in range(start_epoch, cfg.epochs + 1):
            if epoch > cfg.epochs:  # --time-budget shortened the run
                break
            started = time.perf_counter()
            half_mark = None  # set when the epoch's first half is done (--time-budget's fit)
            model.train()
            resumed, position = position, None
            if resumed is not None:
                restore_rng(resumed["rng"])  # rank 0's; the torch generator is then reseeded for this process's rank
            set_loader_epoch(loader, epoch, cfg.seed, rank)
            epoch_rng = rng_state()  # where this epoch's random draws start: a save inside it replays from here
            if resumed is not None:
                steps, loss_sum = resumed["step"], resumed["loss_sums"][rank].to(device)
                timed_images, timed_seconds = resumed["timed_images"], resumed["timed_seconds"]
                started -= resumed["seconds"]
            else:
                steps, loss_sum, timed_images, timed_seconds = 0, torch.zeros((), device=device), 0, 0.0
            with worker_batches(loader) as batches:  # its workers end with the epoch, however it ends
                if steps < steps_per_epoch:  # saved after its last step, the epoch goes straight to its evaluation
                    for _ in range(steps):  # the batches trained on before that save, drawn again and dropped
                        next(batches)
                # A bar on a terminal; in a log file or pipe, a plain line every PROGRESS_EVERY_S, no `\r` fragments.
                on_terminal = sys.stderr.isatty()
                bar = tqdm(total=steps_per_epoch, initial=steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                           disable=not (cfg.progress and main_process and on_terminal))
                log_progress = cfg.progress and main_process and not on_terminal
                last_line = time.perf_counter()
                stop_now = unsaved = False
                while steps < steps_per_epoch and not stop_now:
                    try:
                        images, masks = next(batches)
                    except DataError as error:
                        keep_steps_then_raise(error, f"the {steps} step(s) of epoch {epoch} before it are",
                                              time.perf_counter() - started)
                    except RuntimeError:
                        if stop.name is None:
                            raise
                        # The signal reached the loader's worker processes too, while this one waited for a batch:
                        # the steps since the last save are saved as a stop after a step would save them. Under
                        # torchrun the others are not here to gather from: last.pt keeps its last save.
                        stop_now = True
                        if world == 1:
                            save_inside_epoch(time.perf_counter() - started)
                        else:
                            unsaved = True
                        break
                    step_started = time.perf_counter()
                    if cfg.mix != "none":  # draws seeded by (seed, epoch, step, rank): a resumed run mixes the same
                        key = (epoch_seed(cfg.seed, epoch) * 1_000_003 + steps) * 1024 + rank
                        draws = torch.Generator().manual_seed(key % 2**64)  # over 2**64 from seed 180144 on
                        images, masks = mix_batch(images, masks, cfg.mix, cfg.mix_prob, info.ignore_index, draws)
                    loss = train_step(step_model, images, masks, criterion, optimizer, scaler, device, dtype,
                                      channels_last)
                    if average is not None:
                        average.update(raw_model)
                    loss_sum += loss
                    if cfg.scheduler in PER_STEP_SCHEDULERS:
                        scheduler.step()
                    steps += 1
                    global_step += 1
                    bar.update()
                    if steps == steps_per_epoch // 2:
                        half_mark = time.perf_counter()
                    if steps > 1 or not cfg.compile:  # keep torch.compile's warm-up out of the throughput
                        timed_images += images.shape[0]
                        timed_seconds += time.perf_counter() - step_started
                    if board is not None:
                        board.step(global_step, loss, optimizer.param_groups[0]["lr"])
                    if log_progress and time.perf_counter() - last_line >= PROGRESS_EVERY_S:
                        last_line = time.perf_counter()
                        print(progress_line(epoch, cfg.epochs, steps, steps_per_epoch, timed_images, timed_seconds),
                              flush=True)
                    due = (bool(save_every_steps) and global_step % save_every_steps == 0) or (
                        bool(save_every_s) and time.perf_counter() - last_save >= save_every_s)
                    # A NaN is looked for after every step on the CPU (free) and under torchrun (the flags are shared
                    # anyway), every 100 steps on one GPU (it costs a synchronisation), and before any save.
                    look = device.type == "cpu" or world > 1 or steps % 100 == 0 or due or stop.name is not None
                    diverged = look and not bool(torch.isfinite(loss_sum))
                    due, stop_now, diverged = agree(world, device, due, stop.name is not None, diverged)
                    if diverged:
                        raise TrainingError(f"the loss became NaN or infinite by step {steps} of epoch {epoch}; "
                                            f"{last_good_save(out)}")
                    if stop_now or (due and steps < steps_per_epoch):  # an epoch's end saves anyway
                        save_inside_epoch(time.perf_counter() - started)
                        last_save = time.perf_counter()
                bar.close()
            if stop_now:
                stopped_by = stop.name or "a signal to another process"
                if main_process:
                    print(stop_line(stopped_by, f"at step {steps}/{steps_per_epoch} of epoch {epoch}", out, world,
                                    held="its last save before that" if unsaved else "it"), flush=True)
                break

            train_loss = float(loss_sum) / max(steps, 1)
            if world > 1:
                reduced = torch.tensor([train_loss], device=device)
                dist.all_reduce(reduced)
                train_loss = float(reduced) / world
            if not math.isfinite(train_loss):
                raise TrainingError(f"the loss became {train_loss} in epoch {epoch}; {last_good_save(out)}")

            # --time-budget, after epoch 1's fit: the pace can drift (a shared machine, epoch 1's second half
            # faster or slower than later epochs), so each later epoch fits again at the pace of the last three.
            # It shortens the run if it would overrun and lengthens it (up to --epochs) if an epoch's time is left
            # over (`refit_epochs`), the decay going on from where it is (`set_epochs`). Not after a resume: its
            # clock restarted.
            refit_note = None  # printed after this epoch's line, which shows the new count
            if budget_fitted and epoch < cfg.epochs:
                epoch_seconds.append(time.perf_counter() - started)
                bookkeeping_s = statistics.fmean(bookkeeping_seconds[-3:])
                pace_s = statistics.fmean(epoch_seconds[-3:]) + bookkeeping_s
                # this epoch's evaluation and saves, still to come
                pending_s = (eval_s if epoch % cfg.eval_every == 0 else 0.0) + bookkeeping_s
                elapsed_s = time.perf_counter() - setup_started + pending_s
                refit = refit_epochs(cfg.epochs, budget_s, elapsed_s, pace_s, eval_s, cfg.eval_every, most_epochs,
                                     done=epoch, after_s=calibration_s)
                refit = broadcast_int(refit, world, device)
                if refit != cfg.epochs:
                    refit_note = (f"time budget {cfg.time_budget}: epochs now take {pace_s:.0f}s; {refit} epoch(s) "
                                  f"fit, {'up' if refit > cfg.epochs else 'down'} from {cfg.epochs}"
                                  f"{budget_end_note(refit, epoch, cfg)}")
                    set_epochs(cfg, scheduler, refit, epoch * steps_per_epoch)

            fit_budget = budget_s is not None and epoch == fit_epoch
            evaluated = epoch % cfg.eval_every == 0 or epoch == cfg.epochs or fit_budget
            if evaluated:
                eval_started = time.perf_counter()
                share_buffers(evaluated_model, world)
                try:
                    # A signal stops the pass too: a scheduler's grace period (torchrun's, Slurm's, a spot
                    # machine's: ~30 s) can be shorter than a whole evaluation and its saves
                    matrix = evaluate_dataset(predictor, val_set, cfg.batch_size, cfg.workers, rank, world,
                                              cfg.progress, stop=lambda: agree(world, device, stop.name is not None)[0])
                except DataError as error:  # saved as the epoch's last step: a resume evaluates it
                    keep_steps_then_raise(error, f"epoch {epoch}'s training is", eval_started - started)
                if matrix is None:  # the same save: the epoch's training, evaluated on resuming
                    save_inside_epoch(eval_started - started)
                    stopped_by = stop.name or "a signal to another process"
                    if main_process:
                        print(stop_line(stopped_by, f"evaluating epoch {epoch}", out, world,
                                        held=f"its {steps} training steps"), flush=True)
                    break
                scores = matrix.compute()
                eval_s = time.perf_counter() - eval_started
                if fit_budget:  # fitted once epoch 1's bookkeeping is timed too (below)
                    epoch_s = eval_started - started
                    steady_s = steady_epoch_seconds(
                        epoch_s, None if half_mark is None else eval_started - half_mark,
                        steps_per_epoch - steps_per_epoch // 2, steps_per_epoch)
            model.train()
            if cfg.scheduler == "plateau" and evaluated:
                scheduler.step(scores["miou"])
            improved = evaluated and scores["miou"] > best_miou
            if improved:
                best_miou = scores["miou"]
            seconds = time.perf_counter() - started
            record = {"epoch": epoch, "train_loss": train_loss,
                      "val_miou": scores.get("miou") if evaluated else None,
                      "val_pixel_accuracy": scores.get("pixel_accuracy") if evaluated else None,
                      "val_iou": scores.get("iou") if evaluated else None, "lr": optimizer.param_groups[0]["lr"],
                      "seconds": round(seconds, 2),
                      "train_images_per_s": round(timed_images * world / max(timed_seconds, 1e-9), 2)}

            bookkeeping_started = time.perf_counter()
            if main_process:
                records.append(record)
                # strict: NaN (a class absent from val) as null, which every JSON parser reads
                write_atomically(out / "metrics.jsonl", "".join(strict_json(r, indent=None) + "\n" for r in records))
                # best.pt before last.pt: killed between the two, a resumed run repeats this epoch and writes
                # best.pt again, where the other order would lose the improvement for good.
                rng = rng_state()
                if improved:
                    save_run(out / "best.pt", epoch, rng, metrics=record)
                save_run(out / "last.pt", epoch, rng, metrics=record)
                last_save = time.perf_counter()
                curves_behind = True
                if last_save - curves_drawn >= CURVES_EVERY_S:
                    curves_drawn, curves_behind = draw_curves(records, out), False
                if board is not None:
                    board.epoch(global_step, record, info.names)
                    if evaluated:
                        board.predictions(global_step, predictor, val_set)
                miou = f"val mIoU {100 * record['val_miou']:6.2f}%" if evaluated else "val mIoU    n/a"
                print(f"epoch {epoch:3d}/{cfg.epochs}  loss {train_loss:.4f}  {miou}  lr {record['lr']:.2e}  "
                      f"{record['train_images_per_s']:6.1f} img/s  {seconds:5.1f}s{'  [best]' if improved else ''}",
                      flush=True)
                if refit_note:
                    print(refit_note, flush=True)
            bookkeeping_seconds.append(time.perf_counter() - bookkeeping_started)
            if fit_budget:  # every process takes rank 0's figure, so all stop at the same epoch
                calibration_s = calibration_seconds(eval_s, world) if cfg.calibrate else 0.0
                # The clock counts the re-save that follows the fit too (as long as the epoch's own saves).
                fitted = epochs_within(budget_s, time.perf_counter() - setup_started + bookkeeping_seconds[-1],
                                       steady_s + bookkeeping_seconds[-1], eval_s, cfg.eval_every, cfg.epochs,
                                       done=epoch, after_s=calibration_s)
                fitted = broadcast_int(fitted, world, device)
                budget_fitted = True
                if main_process:
                    pace = (f"{steady_s:.0f}s at the pace of its second half" if half_mark is not None
                            else "its second half not timed alone: the run resumed past its middle")
                    after = f", then --calibrate about {calibration_s:.0f}s" if cfg.calibrate else ""
                    print(f"time budget {cfg.time_budget}: epoch {epoch} took {epoch_s:.0f}s ({pace}), its evaluation "
                          f"{eval_s:.0f}s and its saves {bookkeeping_seconds[-1]:.0f}s{after}; {fitted} epoch(s) fit"
                          f"{budget_end_note(fitted, epoch, cfg)}", flush=True)
                if fitted != cfg.epochs:
                    set_epochs(cfg, scheduler, fitted, epoch * steps_per_epoch)
                if main_process:  # the checkpoints carry the fit (the count, and that it was made): a resume keeps it
                    if improved:
                        save_run(out / "best.pt", epoch, rng, metrics=record)
                    save_run(out / "last.pt", epoch, rng, metrics=record)
            if evaluated and math.isnan(scores["miou"]):  # --skip-data-check let an unlabelled val split through
                raise TrainingError(f"{val_set.description}: every val pixel is the ignore label {info.ignore_index}, "
                                    "so mIoU is undefined and no best.pt can be chosen; fix the val masks (resunet "
                                    f"check-data finds them); last.pt of epoch {epoch} is saved")
            if agree(world, device, stop.name is not None)[0]:  # it came while evaluating
                if epoch == cfg.epochs:  # nothing left to stop: the run is complete; the caller is told (ablate)
                    late_stop = stop.name or "a signal to another process"
                    break
                stopped_by = stop.name or "a signal to another process"
                if main_process:
                    print(stop_line(stopped_by, f"after epoch {epoch}", out, world), flush=True)
                break

    if main_process and late_stop is not None and cfg.calibrate:  # the run is whole; the signal asked to stop
        pixels = f" --max-pixels {cfg.max_pixels}" if cfg.max_pixels != DEFAULT_MAX_PIXELS else ""  # as trained
        print(f"{late_stop}: --calibrate left out; resunet calibrate {out / 'best.pt'} --data-root {cfg.data_root} "
              f"--split {cfg.val_split}{pixels} does it", flush=True)
    if main_process and stopped_by is None and late_stop is None and cfg.calibrate:
        best = out / "best.pt"
        fitted = calibrate(best, val_set, Predictor.from_checkpoint(best, cfg.device, cfg.precision))
        if fitted["stored"]:
            print(f"calibrated {best}: temperature {fitted['temperature']:.3f}, {ece_change(fitted)} on "
                  f"{cfg.val_split}", flush=True)
        else:
            reset = (f", and its temperature {fitted['stored_temperature']:.3f}, worse here, is reset to 1"
                     if fitted["reset"] else "")
            print(f"not calibrated {best}: temperature {fitted['temperature']:.3f} would raise the "
                  f"{ece_change(fitted)} on {cfg.val_split}; not stored{reset}", flush=True)
        if note := bound_note(fitted["temperature"]):
            print(f"  {note}", flush=True)
    if main_process and stopped_by is None:
        minutes = (time.perf_counter() - run_started) / 60
        print(f"done: {epoch_span(start_epoch, cfg.epochs, fitted_by=fitted_by)} in {minutes:.1f} min, "
              f"best val mIoU {100 * best_miou:.2f}% ({out / 'best.pt'})", flush=True)
    if world > 1:
        # A late copy of the signal that stopped the run (torchrun's) is not a second one here either.
        with stop if stop.name is not None else contextlib.nullcontext():
            dist.barrier()
            dist.destroy_process_group()
    return {"best_miou": best_miou, "last": records[-1] if records else None, "out": str(out),
            "stopped_by": stopped_by, "stop_requested": stopped_by or late_stop}
