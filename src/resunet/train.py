"""Training: one loop you can read top to bottom.

    resunet train --data-root data/demo --out runs/demo                      # one process (CPU or one GPU)
    torchrun --nproc-per-node 4 -m resunet train --data-root DIR --out RUN  # DistributedDataParallel

Each epoch: train on the shuffled training split, evaluate on the validation split at original resolution (one
dataset-wide confusion matrix), step the scheduler, append a line to metrics.jsonl, write last.pt (and best.pt when
val mIoU improves), redraw curves.png. Data order and augmentation are seeded by (seed, epoch), so a run resumed
from last.pt follows exactly the path the uninterrupted run would have taken.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data.cache import CachedLoader, build_cache, default_cache_dir, estimate_cache_bytes
from .data.dataset import PairedDataset, open_dataset
from .data.images import DataError, read_mask
from .data.transforms import TrainTransform
from .doctor import check_data, format_findings, refusal
from .evaluate import evaluate_dataset
from .model.unet import ResNetUNet
from .predict import Predictor
from .runtime import (autocast, describe_device, distributed_env, precision_name, resolve_device, resolve_precision,
                      tune_cpu_allocator, use_channels_last)
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


PROGRESS_EVERY_S = 60.0


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


def check_data_first(cfg: TrainConfig, verbose: bool) -> None:
    """`resunet check-data` on the train and val splits: errors stop the run before anything is built or written,
    warnings are printed. The report is cached beside the decoded images, keyed by the files' sizes and modification
    times, so a re-run on an unchanged dataset (a resumed run too) reads no image."""
    cache_dir = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) / "check-data"
    report = check_data(cfg.data_root, [cfg.train_split, cfg.val_split], cfg.num_classes, cfg.ignore_index,
                        cfg.max_pixels, max(1, cfg.workers), cfg.train_split, cache_dir, verbose and cfg.progress)
    if verbose:
        pairs = sum(split["pairs"] for split in report.facts["splits"].values())
        print(f"data check{' (cached)' if report.from_cache else ''}: {pairs} pairs; "
              f"{format_findings(report.findings)}", flush=True)
    if report.errors:
        raise DataError(refusal(report, cfg.data_root))


def make_train_loader(cfg: TrainConfig, dataset: PairedDataset, mean, std, device, rank: int, world: int):
    """The cached (decode once, augment on device) or the simple (per-sample PIL) data path."""
    scales = (cfg.scale_min, cfg.scale_max)
    kind = cfg.data_path
    if kind == "auto":
        kind = "cached" if estimate_cache_bytes(dataset, cfg.size) < CACHE_LIMIT_BYTES else "simple"
    if kind == "cached":
        cache = build_cache(dataset, cfg.size, Path(cfg.cache_dir) if cfg.cache_dir else None, max(1, cfg.workers))
        loader = CachedLoader(cache, cfg.batch_size, cfg.size, scales, mean, std, dataset.info.ignore_index,
                              cfg.jitter, device, cfg.seed, rank, world, cfg.crop_size)
        return loader, "cached"
    transform = TrainTransform(cfg.size, scales, mean, std, dataset.info.ignore_index, cfg.jitter, cfg.crop_size)
    data = dataset.with_transform(transform)
    sampler = (DistributedSampler(data, world, rank, shuffle=True, seed=cfg.seed, drop_last=True) if world > 1
               else RandomSampler(data))
    loader = DataLoader(data, cfg.batch_size, sampler=sampler, num_workers=cfg.workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    return loader, "simple"


def set_loader_epoch(loader, epoch: int, seed: int) -> None:
    if isinstance(loader, CachedLoader):
        loader.set_epoch(epoch)
    elif isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    # Reseeding the global generator makes the simple path's shuffling and per-sample augmentation (and the
    # worker seeds derived from it) a function of (seed, epoch) as well.
    torch.manual_seed(epoch_seed(seed, epoch))


def make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max")
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def read_metrics(path: Path, up_to_epoch: int) -> list[dict]:
    """metrics.jsonl lines up to an epoch (a crash may have left lines past the checkpoint)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["epoch"] <= up_to_epoch]


def train(cfg: TrainConfig) -> dict:
    # ---- setup: processes, device, precision --------------------------------------------------------------------
    rank, local_rank, world = distributed_env()
    tune_cpu_allocator()
    device = resolve_device(cfg.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_process = rank == 0
    dtype = resolve_precision(cfg.precision, device)
    channels_last = use_channels_last(device, dtype)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    if not cfg.skip_data_check:
        check_data_first(cfg, main_process)
    out = Path(cfg.out)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)

    # ---- data and model ----------------------------------------------------------------------------------------
    train_set = open_dataset(cfg.data_root, cfg.train_split, cfg.num_classes, cfg.ignore_index, cfg.max_pixels)
    val_set = open_dataset(cfg.data_root, cfg.val_split, cfg.num_classes, cfg.ignore_index, cfg.max_pixels)
    info = train_set.info
    if len(train_set) < cfg.batch_size * world:
        raise DataError(f"{cfg.data_root}: {len(train_set)} training images, fewer than one batch of "
                        f"{cfg.batch_size * world}")
    weights = cfg.encoder_weights or ("imagenet" if cfg.pretrained and not cfg.resume else None)
    model = ResNetUNet(info.num_classes, cfg.encoder, weights).to(device)
    mean, std = model.normalization
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # PyTorch's SyncBatchNorm runs on GPUs only
    loader, data_path = make_train_loader(cfg, train_set, mean, std, device, rank, world)
    optimizer_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(cfg, optimizer, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_weights = class_weights(train_set).to(device) if cfg.class_weights == "sqrt-inv-freq" else None
    criterion = nn.CrossEntropyLoss(weight=loss_weights, ignore_index=info.ignore_index)

    start_epoch, best_miou = 1, -1.0
    if cfg.resume:
        state = load_checkpoint(cfg.resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        start_epoch, best_miou = state["epoch"] + 1, state["best_miou"]
    records = read_metrics(out / "metrics.jsonl", start_epoch - 1) if main_process else []

    raw_model = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(model) if cfg.compile else model
    predictor = Predictor(raw_model, info, cfg.size, mean, std, device, precision_name(dtype))
    if main_process:
        print(f"resunet: {len(train_set)} train / {len(val_set)} val images ({train_set.description}), "
              f"{info.num_classes} classes; {cfg.encoder} "
              f"({'pretrained: ' + str(weights) if weights else 'random init'}); {describe_device(device)}, "
              f"{precision_name(dtype)}{', channels_last' if channels_last else ''}, {world} process(es), "
              f"{data_path} data path; epochs {start_epoch}..{cfg.epochs}", flush=True)

    # ---- the loop ------------------------------------------------------------------------------------------------
    run_started = time.perf_counter()
    scores: dict = {}
    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        model.train()
        set_loader_epoch(loader, epoch, cfg.seed)
        loss_sum = torch.zeros((), device=device)
        steps, timed_images, timed_seconds = 0, 0, 0.0
        # A bar on a terminal; in a log file or pipe, a plain line every PROGRESS_EVERY_S instead of `\r` fragments.
        on_terminal = sys.stderr.isatty()
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and main_process and on_terminal))
        log_progress = cfg.progress and main_process and not on_terminal
        last_line = time.perf_counter()
        for images, masks in bar:
            step_started = time.perf_counter()
            loss_sum += train_step(step_model, images, masks, criterion, optimizer, scaler, device, dtype, channels_last)
            if cfg.scheduler == "cosine":
                scheduler.step()
            steps += 1
            if steps > 1 or not cfg.compile:  # keep torch.compile's warm-up out of the throughput
                timed_images += images.shape[0]
                timed_seconds += time.perf_counter() - step_started
            if log_progress and time.perf_counter() - last_line >= PROGRESS_EVERY_S:
                last_line = time.perf_counter()
                print(progress_line(epoch, cfg.epochs, steps, len(loader), timed_images, timed_seconds), flush=True)
        train_loss = float(loss_sum) / max(steps, 1)
        if world > 1:
            reduced = torch.tensor([train_loss], device=device)
            dist.all_reduce(reduced)
            train_loss = float(reduced) / world
        if not math.isfinite(train_loss):
            raise TrainingError(f"loss became {train_loss} in epoch {epoch}; weights not saved over "
                                f"{out / 'last.pt'} (last good epoch {epoch - 1}); lower --lr or check the data")

        evaluated = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
        if evaluated:
            matrix = evaluate_dataset(predictor, val_set, cfg.batch_size, cfg.workers, rank, world, cfg.progress)
            scores = matrix.compute()
        model.train()
        if cfg.scheduler == "plateau" and evaluated:
            scheduler.step(scores["miou"])
        improved = evaluated and scores["miou"] > best_miou
        if improved:
            best_miou = scores["miou"]
        seconds = time.perf_counter() - started
        record = {"epoch": epoch, "train_loss": train_loss, "val_miou": scores.get("miou") if evaluated else None,
                  "val_pixel_accuracy": scores.get("pixel_accuracy") if evaluated else None,
                  "val_iou": scores.get("iou") if evaluated else None, "lr": optimizer.param_groups[0]["lr"],
                  "seconds": round(seconds, 2),
                  "train_images_per_s": round(timed_images * world / max(timed_seconds, 1e-9), 2)}

        if main_process:
            records.append(record)
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            payload = {
                "model_config": raw_model.config.to_dict(), "classes": info.to_dict(), "input_size": cfg.size,
                "normalization": {"mean": list(mean), "std": list(std)}, "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "best_miou": best_miou, "rng": rng_state(),
                "train_config": cfg.to_dict(), "metrics": record,
            }
            save_checkpoint(payload, out / "last.pt")
            if improved:
                save_checkpoint(payload, out / "best.pt")
            plot_curves(records, out / "curves.png")
            miou = f"val mIoU {100 * record['val_miou']:6.2f}%" if evaluated else "val mIoU    n/a"
            print(f"epoch {epoch:3d}/{cfg.epochs}  loss {train_loss:.4f}  {miou}  lr {record['lr']:.2e}  "
                  f"{record['train_images_per_s']:6.1f} img/s  {seconds:5.1f}s{'  [best]' if improved else ''}",
                  flush=True)

    if main_process:
        print(f"done: epochs {start_epoch}..{cfg.epochs} in {(time.perf_counter() - run_started) / 60:.1f} min, "
              f"best val mIoU {100 * best_miou:.2f}% ({out / 'best.pt'})", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"best_miou": best_miou, "last": records[-1] if records else None, "out": str(out)}
