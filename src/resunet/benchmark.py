"""`resunet benchmark`: our training step, data path and Predictor against plain references, in one run, side by side.

What is measured, on the machine it runs on, and why:

1. Training (256×256 crops, batch 8, the seed's resnet34 U-Net, Adam, cross-entropy ignoring 255), end to end:
   - ours: the step of `train.py`'s loop (autocast in `runtime.resolve_precision("auto")`, channels_last where
     `runtime.use_channels_last` says so) fed by the cached data path (`build_cache` + `CachedLoader`, augmentation
     on the device);
   - seed-style: fp32 eager, NCHW, fed by a per-sample PIL `DataLoader` (PIL decode, random scale / crop / flip,
     torchvision v1 `ColorJitter`, `ToTensor`, `Normalize`; 2 worker processes) — what a seed script does. The
     workers run beside the training step and share its CPU cores, as they would in a real run;
   - with `--compile`: ours under `torch.compile` (compilation happens in the warm-up, outside the timed windows).
   Training speed is what a user pays for most, and the loader is part of it, so both are timed loader included.
2. The data path alone (images/s of augmented 256² batches): `CachedLoader` iterating over a built cache (the one-off
   cache build is reported separately) vs the seed-style PIL `DataLoader` over the same JPEG files.
3. The Predictor on 500×375 RGB uint8 arrays, one image per call (resize → forward → logits upsampled to the
   original size → argmax): ours (`resunet.Predictor`, precision "auto") vs
   `segmentation_models_pytorch.Unet("resnet34")` in fp32 eager under `torch.no_grad()` as its README shows, doing
   the same work at 256×352.
   On a CPU also our model exported by `resunet export` (the end-to-end graph: uint8 image in, class map out) in
   onnxruntime, fp32 and static INT8 (QDQ, per-channel weights, calibrated on 8 of the generated images): the
   deployment path, and the one that is fast on CPUs without bf16 (INT8 runs on AVX-512 VNNI).

Every figure is the MEDIAN images/s over repeated timed windows after warm-up calls (the per-window figures are kept
in the JSON). FLOPs per image are counted once with `torch.utils.flop_counter.FlopCounterMode` on meta-device copies
of the models (forward at the actual inference shape; forward + backward at 256² for training) and turned into
achieved GFLOP/s. Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU this process's peak RSS
(/proc/self/status's VmHWM, reset before each measurement through /proc/self/clear_refs). On CUDA the
training figure is also given as model-FLOPs utilisation: achieved / the peak measured with a bf16 matmul loop.

Targets depend on the CPU kind (`runtime.cpu_kind()`): predictor and training speed-ups over the references where the
CPU has bf16 arithmetic, none where it has not (nor where its bf16 runs no faster than fp32, `runtime.cpu_bf16_pays`:
there ours runs fp32 and the INT8 target of CPUs without bf16 applies, `target_kind`); the data path must be ≥ 20×
the PIL loader everywhere; on CUDA the training step must reach ≥ 35% MFU. The thread count is left as it is (the
same for ours and the references), and the PIL loaders get as many worker processes as our data path has threads
(`reference_workers`).

The data is generated: 48 JPEGs of 500×375 (textured backgrounds with shapes) and palette PNG masks in the VOC
layout, in a temporary folder removed at the end. `--quick` runs tiny windows: a smoke test, not a measurement.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import json
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torch.utils.flop_counter import FlopCounterMode

from . import runtime
from .data.cache import CachedLoader, DecodedCache, build_cache
from .data.classes import VOC_INFO
from .data.dataset import PairedDataset, open_dataset
from .data.demo import make_sample
from .data.transforms import data_threads, resize_short_side, resize_windows, sample_augment_params
from .model.unet import ResNetUNet
from .outputs import check_output_files, write_output
from .predict import Predictor
from .train import make_optimizer, train_step

try:
    import resource
except ImportError:  # Windows: peak memory is then not measured
    resource = None

SIZE = 256
SCALES = (0.5, 2.0)
JITTER = 0.2
IGNORE = 255
NUM_CLASSES = 21
IMAGE_W, IMAGE_H = 500, 375
SEED_WORKERS = 2
LR, WEIGHT_DECAY = 1e-4, 1e-5  # the seed recipe's Adam (TrainConfig defaults)

# Speed-up targets by CPU kind: (predictor vs smp, training vs seed-style); None: no speed target.
CPU_TARGETS: dict[str, tuple[float, float] | None] = {"amx": (4.0, 2.5), "avx512_bf16": (2.2, 1.7), "no-bf16": None}
# Where bf16 is missing, the INT8 ONNX file carries the inference target (issue 18): ≥ 2.5× smp fp32 eager.
INT8_TARGETS: dict[str, float] = {"no-bf16": 2.5}
DATA_PATH_TARGET = 20.0
CUDA_MFU_TARGET = 0.35


@dataclass(frozen=True)
class Plan:
    """Window counts and sizes. A window is one call of the timed function; `budget_s` caps a figure's timed windows
    (never fewer than `min_windows`) so the default run stays under 3 minutes on a slow or busy 2-core machine."""

    images: int = 48
    batch: int = 8
    train_steps: int = 2  # training steps per window
    train_warmup: int = 1  # windows (the first steps run slow: allocations, oneDNN primitive creation)
    train_windows: int = 7
    train_budget_s: float = 45.0
    data_warmup: int = 1  # passes over the data set (the seed-style workers start here)
    data_windows: int = 15  # short windows: many, so bursts of other work on the machine stay outliers
    data_window_s: float = 0.1  # each loader's window: whole passes lasting about this long, the same for both
    data_budget_s: float = 10.0
    predict_warmup: int = 3  # calls
    predict_windows: int = 11
    predict_images: int = 4  # images (one per call) per window
    predict_budget_s: float = 15.0
    min_windows: int = 3
    compile_warmup: int = 2  # windows; compilation happens in the first


DEFAULT_PLAN = Plan()
QUICK_PLAN = Plan(images=16, batch=2, train_steps=1, train_warmup=1, train_windows=2, train_budget_s=4.0,
                  data_warmup=1, data_windows=2, data_budget_s=2.0, predict_warmup=1, predict_windows=2,
                  predict_images=1, predict_budget_s=2.0, min_windows=2, compile_warmup=2)


def plan_for(device: torch.device, quick: bool) -> Plan:
    """The CPU plan; on a GPU, longer windows (a step there takes milliseconds, not seconds)."""
    plan = QUICK_PLAN if quick else DEFAULT_PLAN
    if device.type == "cuda" and not quick:
        plan = replace(plan, train_steps=10, predict_images=32)
    return plan


# ---- timing, memory, FLOPs ----------------------------------------------------------------------------------------


def timed_windows(
    fn: Callable[[], object],
    warmup: int,
    windows: int,
    images_per_call: int,
    sync: Callable[[], None] | None = None,
    min_windows: int = 3,
    budget_s: float | None = None,
) -> dict:
    """Call `fn` `warmup` times untimed, then time up to `windows` calls (one call = one window); stop early once
    `budget_s` of timed windows have passed and at least `min_windows` are done. images/s = median over windows."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    seconds: list[float] = []
    for _ in range(windows):
        started = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - started)
        if budget_s is not None and len(seconds) >= min_windows and sum(seconds) > budget_s:
            break
    rates = [images_per_call / s for s in seconds]
    median = statistics.median(rates)
    return {"images_per_s": median, "window_s": seconds, "window_images_per_s": rates,
            "images_per_window": images_per_call, "warmup_calls": warmup, "windows": len(seconds),
            "windows_planned": windows, "spread": (max(rates) - min(rates)) / median}


def _reset_rss_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int | None:
    """This process's peak RSS: /proc/self/status's VmHWM on Linux, else getrusage's ru_maxrss. On Linux ru_maxrss
    never falls below the peak of the process that started this one (kept across exec, and not reset by clear_refs):
    launched from a 4 GB notebook kernel, every row read 4 GB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if resource is None:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _children_peak_rss() -> list[int]:
    """VmHWM of this process's live multiprocessing children (DataLoader workers)."""
    peaks = []
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            pass
    return peaks


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Fills the yielded dict with the peak memory of the block: CUDA allocator peak, or this process's peak RSS and
    its rise over the RSS at the block's start (`rise_bytes`): the allocator keeps freed blocks (tune_cpu_allocator),
    so a later block's peak carries what earlier blocks left; the rise is the block's own."""
    record: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield record
        torch.cuda.synchronize(device)
        record.update(kind="cuda_max_memory_allocated", bytes=int(torch.cuda.max_memory_allocated(device)))
        return
    reset = _reset_rss_peak()
    record["rss_at_start_bytes"] = _current_rss_bytes()
    yield record
    peak = _maxrss_bytes()
    record.update(kind="cpu_peak_rss_self" if reset else "cpu_peak_rss_self_lifetime", bytes=peak,
                  rise_bytes=max(0, peak - record["rss_at_start_bytes"]) if reset and peak is not None else None)


def count_flops(model: nn.Module, shape: tuple[int, ...], backward: bool = False) -> float:
    """FLOPs of one forward (+ backward) pass at `shape`, counted on meta tensors (no arithmetic is done)."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(torch.empty(shape, device="meta"))
        if backward:
            out.sum().backward()
    return float(counter.get_total_flops())


def measure_flops(batch: int, predict_shape: tuple[int, int], smp_shape: tuple[int, int]) -> dict:
    """FLOPs per image of the model parts: ours forward at 256² and at the Predictor's working size, ours forward +
    backward at 256² (training), smp's forward at its working size."""
    import segmentation_models_pytorch as smp

    with torch.device("meta"):
        ours = ResNetUNet(NUM_CLASSES, "resnet34", encoder_weights=None)
        reference = smp.Unet("resnet34", encoder_weights=None, classes=NUM_CLASSES)
    return {
        "ours_forward_256": count_flops(ours, (1, 3, SIZE, SIZE)),
        "ours_train_256": count_flops(ours, (batch, 3, SIZE, SIZE), backward=True) / batch,
        "ours_predict": count_flops(ours.eval(), (1, 3, *predict_shape)),
        "smp_predict": count_flops(reference.eval(), (1, 3, *smp_shape)),
        "shapes": {"train": [batch, 3, SIZE, SIZE], "ours_predict": [1, 3, *predict_shape],
                   "smp_predict": [1, 3, *smp_shape]},
    }


def measure_cuda_peak(device: torch.device, n: int = 8192, iters: int = 100) -> float:
    """Achieved matmul FLOP/s on this GPU in the precision training runs at (bf16, or fp16 before Ampere, where bf16
    is emulated and its peak far below the fp16 training's: an MFU over 100%): the denominator of MFU."""
    dtype = runtime.resolve_precision("auto", device) or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - started)


def _sync(device: torch.device) -> Callable[[], None] | None:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


# ---- data: the temporary dataset and the seed-style loader -----------------------------------------------------------


def make_jpeg_dataset(root: Path, count: int, seed: int = 0) -> PairedDataset:
    """`count` 500×375 JPEGs (textures + shapes) with palette PNG masks in the VOC layout; returns its train split."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = VOC_INFO.palette_bytes()
    names = [f"bench_{i:04d}" for i in range(count)]
    for name in names:
        image, mask = make_sample(rng, IMAGE_W)
        image.resize((IMAGE_W, IMAGE_H), Image.BILINEAR).save(voc / "JPEGImages" / f"{name}.jpg", quality=90)
        mask = mask.resize((IMAGE_W, IMAGE_H), Image.NEAREST).convert("P")
        mask.putpalette(palette)
        mask.save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names) + "\n")
    return open_dataset(root, "train")


class SeedStyleDataset(Dataset):
    """What a seed script does per sample: PIL decode, random scale of the shorter side, pad + random crop, flip,
    torchvision v1 ColorJitter on the PIL image, ToTensor, Normalize."""

    def __init__(self, dataset: PairedDataset, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        from torchvision import transforms

        self.image_paths, self.mask_paths = dataset.image_paths, dataset.mask_paths
        self.mean, self.std = mean, std
        self.jitter = transforms.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import transforms
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        image = Image.open(self.image_paths[index]).convert("RGB")
        mask = Image.open(self.mask_paths[index])
        short = int(SIZE * random.uniform(*SCALES))
        image = TF.resize(image, short, interpolation=InterpolationMode.BILINEAR)
        mask = TF.resize(mask, short, interpolation=InterpolationMode.NEAREST)
        pad_w, pad_h = max(0, SIZE - image.width), max(0, SIZE - image.height)
        if pad_w or pad_h:
            image = TF.pad(image, [0, 0, pad_w, pad_h], fill=0)
            mask = TF.pad(mask, [0, 0, pad_w, pad_h], fill=IGNORE)
        top, left, height, width = transforms.RandomCrop.get_params(image, (SIZE, SIZE))
        image, mask = TF.crop(image, top, left, height, width), TF.crop(mask, top, left, height, width)
        if random.random() < 0.5:
            image, mask = TF.hflip(image), TF.hflip(mask)
        image = self.jitter(image)
        tensor = TF.normalize(TF.to_tensor(image), self.mean, self.std)
        return tensor, torch.from_numpy(np.array(mask, dtype=np.int64))


def reference_workers(batch: int) -> int:
    """The PIL loader's worker processes: as many as our data path's threads (`data_threads`: one per core, up to
    the batch), the seed's 2 at least. With the seed's 2 on 8 cores our 8 threads met 2 processes, and the ratio
    measured the core count."""
    return max(SEED_WORKERS, data_threads(batch))


def seed_style_loader(dataset: PairedDataset, batch: int, mean, std) -> DataLoader:
    """The per-sample PIL DataLoader (`reference_workers`), shuffled; one long 'epoch' so workers start once (in
    the warm-up)."""
    data = SeedStyleDataset(dataset, mean, std)
    sampler = RandomSampler(data, num_samples=len(data) * 10_000)
    return DataLoader(data, batch, sampler=sampler, num_workers=reference_workers(batch), drop_last=True)


def cached_batches(loader: CachedLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Our loader's batches, epoch after epoch."""
    for epoch in itertools.count(1):
        loader.set_epoch(epoch)
        yield from loader


def _normalization() -> tuple[tuple[float, ...], tuple[float, ...]]:
    with torch.device("meta"):
        return ResNetUNet(NUM_CLASSES, "resnet34", encoder_weights=None).normalization


def _with_workers_memory(record: dict) -> dict:
    workers = _children_peak_rss()
    if workers:
        record["workers_peak_rss_bytes"] = workers  # each counts the pages it shares with this process
    return record


# ---- 2. the data path alone ----------------------------------------------------------------------------------------


def time_data_windows(batches: Iterator, per_pass: int, plan: Plan, sync: Callable[[], None] | None) -> dict:
    """`timed_windows` for a loader: after `plan.data_warmup` untimed passes over the data, one more pass is timed
    to size the windows: each window is the whole passes that last about `plan.data_window_s`. Both loaders get
    windows of about the same duration, so a fast loader's figure is not taken from a few milliseconds of the
    machine's time (where one burst of other work decides it) while the slow one's spans seconds."""
    sync = sync or (lambda: None)

    def one_pass() -> None:
        for _ in range(per_pass):
            next(batches)

    for _ in range(plan.data_warmup):
        one_pass()
    sync()
    started = time.perf_counter()
    one_pass()
    sync()
    passes = max(1, round(plan.data_window_s / (time.perf_counter() - started)))

    def window() -> None:
        for _ in range(passes):
            one_pass()

    result = timed_windows(window, 0, plan.data_windows, passes * per_pass * plan.batch, sync, plan.min_windows,
                           plan.data_budget_s)
    return {**result, "passes_per_window": passes, "warmup_calls": plan.data_warmup + 1}


def measure_data_ours(cache: DecodedCache, plan: Plan, device: torch.device) -> dict:
    mean, std = _normalization()
    loader = CachedLoader(cache, plan.batch, SIZE, SCALES, mean, std, IGNORE, JITTER, device, seed=0)
    batches = cached_batches(loader)
    with peak_memory(device) as memory:
        result = time_data_windows(batches, len(loader), plan, _sync(device))
    threads = f", {data_threads(plan.batch)} threads" if device.type == "cpu" else ""
    return {**result, "peak_memory": memory, "what": f"CachedLoader, augment on {device.type}{threads}"}


def measure_output_floor(plan: Plan, device: torch.device) -> float:
    """Images/s of merely writing the data path's output once (a float32 3×256² image per sample, one copy): no
    augmentation can beat this on the device, so it bounds what any data path can reach there."""
    source = torch.rand(plan.batch, 3, SIZE, SIZE, device=device)
    target = torch.empty_like(source)
    sync = _sync(device) or (lambda: None)
    for _ in range(3):
        target.copy_(source)
    sync()
    repeats = 50
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    sync()
    return repeats * plan.batch / (time.perf_counter() - started)


def measure_resize_step(cache: DecodedCache, plan: Plan) -> float | None:
    """Images/s of the CPU path's resize step alone, on one thread (`kernels.resize_window`, the antialiased bilinear
    resize of each crop's window at the recipe's random scales, one sample after another), or None off the CPU: how
    much of the data path's time the resize takes."""
    generator = torch.Generator().manual_seed(0)
    index = list(range(len(cache)))
    params = sample_augment_params(torch.from_numpy(cache.sizes), SIZE, SCALES, JITTER, generator)
    images = np.asarray(cache.images)
    resize_windows(images, index, params)  # warm-up
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        resize_windows(images, index, params)
        best = max(best, len(index) / (time.perf_counter() - started))
    return best


def measure_data_seed(dataset: PairedDataset, plan: Plan, device: torch.device) -> dict:
    mean, std = _normalization()
    batches = iter(seed_style_loader(dataset, plan.batch, mean, std))
    to_device = ((images.to(device), masks.to(device)) for images, masks in batches)
    with peak_memory(device) as memory:
        result = time_data_windows(to_device, len(dataset) // plan.batch, plan, _sync(device))
        _with_workers_memory(memory)
    del to_device, batches  # the last references to the loader's iterator: stops the workers
    return {**result, "peak_memory": memory,
            "what": f"PIL per-sample DataLoader, {reference_workers(plan.batch)} workers"}


# ---- 1. training -----------------------------------------------------------------------------------------------------


def measure_train_ours(cache: DecodedCache, plan: Plan, device: torch.device, compile: bool = False) -> dict:
    """train.py's step and optimizer: autocast at the auto precision, channels_last, CachedLoader batches."""
    torch.manual_seed(0)
    dtype = runtime.resolve_precision("auto", device)
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if device.type == "cuda":  # as train.py sets them; restored below so the references run with the defaults
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = ResNetUNet(NUM_CLASSES, "resnet34", encoder_weights=None).to(device)
    mean, std = model.normalization
    channels_last = runtime.use_channels_last(device, dtype, model.config.encoder, training=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batches = cached_batches(CachedLoader(cache, plan.batch, SIZE, SCALES, mean, std, IGNORE, JITTER, device, seed=0))
    optimizer = make_optimizer("adam", model.parameters(), LR, WEIGHT_DECAY, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE)
    step_model = torch.compile(model) if compile else model
    model.train()

    def step() -> None:
        images, masks = next(batches)
        train_step(step_model, images, masks, criterion, optimizer, scaler, device, dtype, channels_last)

    def window() -> None:
        for _ in range(plan.train_steps):
            step()

    try:
        with peak_memory(device) as memory:
            warmup = plan.compile_warmup if compile else plan.train_warmup
            result = timed_windows(window, warmup, plan.train_windows, plan.train_steps * plan.batch, _sync(device),
                                   plan.min_windows, None if compile else plan.train_budget_s)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    what = f"{runtime.precision_name(dtype)}{' channels_last' if channels_last else ''}, CachedLoader"
    return {**result, "peak_memory": memory, "what": what + (", torch.compile" if compile else ""),
            "precision": runtime.precision_name(dtype), "channels_last": channels_last}


def measure_train_seed(dataset: PairedDataset, plan: Plan, device: torch.device) -> dict:
    """fp32 eager, NCHW, the per-sample PIL DataLoader: end to end, loader included."""
    torch.manual_seed(0)
    model = ResNetUNet(NUM_CLASSES, "resnet34", encoder_weights=None).to(device)
    mean, std = model.normalization
    batches = iter(seed_style_loader(dataset, plan.batch, mean, std))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE)
    model.train()

    def step() -> None:
        images, masks = next(batches)
        images, masks = images.to(device), masks.to(device)
        loss = criterion(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def window() -> None:
        for _ in range(plan.train_steps):
            step()

    with peak_memory(device) as memory:
        result = timed_windows(window, plan.train_warmup, plan.train_windows, plan.train_steps * plan.batch,
                               _sync(device), plan.min_windows, plan.train_budget_s)
        _with_workers_memory(memory)
    del batches
    return {**result, "peak_memory": memory,
            "what": f"fp32 eager NCHW, PIL DataLoader {reference_workers(plan.batch)} workers",
            "precision": "fp32", "channels_last": False}


# ---- 3. the predictor ------------------------------------------------------------------------------------------------


def smp_working_size(height: int, width: int) -> tuple[int, int]:
    """Our working size (shorter side 256), each side rounded to a multiple of 32 as smp's Unet needs."""
    h, w = resize_short_side(height, width, SIZE)
    return max(32, round(h / 32) * 32), max(32, round(w / 32) * 32)


def _predict_windows(predict: Callable[[np.ndarray], np.ndarray], images: list[np.ndarray], plan: Plan,
                     device: torch.device) -> dict:
    stream = itertools.cycle(images)

    def window() -> None:
        for _ in range(plan.predict_images):
            predict(next(stream))

    with peak_memory(device) as memory:
        result = timed_windows(window, plan.predict_warmup, plan.predict_windows, plan.predict_images, _sync(device),
                               plan.min_windows, plan.predict_budget_s)
    return {**result, "peak_memory": memory}


def measure_predictor_ours(images: list[np.ndarray], plan: Plan, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = ResNetUNet(NUM_CLASSES, "resnet34", encoder_weights=None)
    mean, std = model.normalization
    predictor = Predictor(model, VOC_INFO, SIZE, mean, std, device, "auto", fold_bn=True)  # as from_checkpoint builds it
    mask = predictor.predict(images[0])
    assert mask.shape == images[0].shape[:2], mask.shape
    result = _predict_windows(predictor.predict, images, plan, device)
    precision = runtime.precision_name(predictor.dtype)
    return {**result, "what": f"resunet.Predictor, {precision}{' channels_last' if predictor.channels_last else ''}, BN folded",
            "precision": precision, "channels_last": predictor.channels_last}


def measure_predictor_smp(images: list[np.ndarray], plan: Plan, device: torch.device) -> dict:
    """smp's Unet as its README uses it: fp32 eager, eval, no_grad; the same resize / upsample / argmax around it."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.Unet("resnet34", encoder_weights=None, classes=NUM_CLASSES).to(device).eval()
    mean, std = _normalization()
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def predict(array: np.ndarray) -> np.ndarray:
        height, width = array.shape[:2]
        with torch.no_grad():
            x = torch.from_numpy(array).permute(2, 0, 1)[None].to(device).float().div_(255)
            x = F.interpolate(x, size=smp_working_size(height, width), mode="bilinear", align_corners=False,
                              antialias=True)
            logits = model((x - mean_t) / std_t)
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()

    assert predict(images[0]).shape == images[0].shape[:2]
    result = _predict_windows(predict, images, plan, device)
    return {**result, "what": "smp.Unet resnet34, fp32 eager NCHW, no_grad", "precision": "fp32",
            "channels_last": False}


def measure_predictor_onnx(images: list[np.ndarray], plan: Plan, tmp: Path) -> dict:
    """Our resnet34 U-Net exported end to end (fp32), then quantised to INT8, each run by `OnnxPredictor`."""
    from .export import metadata_for, prepare_network, quantize_int8, set_metadata, write_model_onnx
    from .onnx_predictor import OnnxPredictor

    torch.manual_seed(0)
    model = prepare_network(ResNetUNet(NUM_CLASSES, "resnet34", encoder_weights=None))
    mean, std = model.normalization
    fp32_path, int8_path = tmp / "bench.onnx", tmp / "bench.int8.onnx"
    started = time.perf_counter()
    write_model_onnx(model, fp32_path, "end-to-end", SIZE, mean, std)
    set_metadata(fp32_path, metadata_for(VOC_INFO, SIZE, mean, std, "resnet34", "end-to-end", "none"))
    export_s = time.perf_counter() - started
    started = time.perf_counter()
    quantize_int8(fp32_path, int8_path, images[:8], "end-to-end", None)
    quantize_s = time.perf_counter() - started
    results = {}
    for key, path, what in (("onnx_fp32", fp32_path, "onnxruntime fp32, end-to-end graph"),
                            ("onnx_int8", int8_path, "onnxruntime INT8 QDQ, end-to-end graph")):
        predictor = OnnxPredictor(path, threads=torch.get_num_threads())  # the torch rows' (onnxruntime: every CPU)
        assert predictor.predict(images[0]).shape == images[0].shape[:2]
        results[key] = {**_predict_windows(predictor.predict, images, plan, torch.device("cpu")), "what": what,
                        "precision": "int8" if "int8" in key else "fp32", "channels_last": False,
                        "threads": predictor.session.get_session_options().intra_op_num_threads}
        del predictor
    results["onnx_fp32"]["export_s"], results["onnx_int8"]["quantize_s"] = export_s, quantize_s
    return results


# ---- the run --------------------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_busy_fraction(seconds: float = 0.5) -> float | None:
    """How busy all CPUs are over `seconds` while we sleep (from /proc/stat): other work competing with us."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def target_kind(kind: str) -> str:
    """The CPU kind whose targets apply: that of CPUs without bf16 where the CPU's bf16 runs no faster than fp32, as
    on an Intel Xeon whose AMX its hypervisor hides (ours then runs fp32: `--precision auto`)."""
    return "no-bf16" if kind == "avx512_bf16" and not runtime.cpu_bf16_pays() else kind


def judge_targets(kind: str, device: torch.device, ratios: dict, mfu: float | None, quick: bool) -> list[dict]:
    # INT8 target: only where it applies (CPUs without bf16); elsewhere the row is measured and shown, not judged.
    """One entry per target: its threshold, the figure, whether it applies here, and PASS/FAIL (None: not judged)."""
    speed = CPU_TARGETS.get(kind) if device.type == "cpu" else None
    why_not = "quick run: not a measurement" if quick else None
    rows = []

    def add(name: str, value: float | None, threshold: float | None, applies: bool, note: str) -> None:
        judged = applies and not quick and value is not None
        # a full run's figure missing: its section failed (the ONNX rows), not a quick run
        unmeasured = None if quick else "not measured: its section failed"
        rows.append({"name": name, "value": value, "threshold": threshold, "applies": applies, "note": note,
                     "passed": (value >= threshold) if judged else None,
                     "reason_not_judged": None if judged else (why_not or unmeasured if applies else note)})

    if device.type == "cpu":
        speed_note = f"CPU kind {kind}" if speed else f"CPU kind {kind}: no speed target"
    else:
        speed_note = "speed-up targets are by CPU kind, for CPU runs"
    add("predictor_vs_smp", ratios["predictor"], speed[0] if speed else None, speed is not None, speed_note)
    add("training_vs_seed_style", ratios["training"], speed[1] if speed else None, speed is not None, speed_note)
    add("data_path_vs_pil", ratios["data_path"], DATA_PATH_TARGET, True, "all devices")
    int8 = INT8_TARGETS.get(kind) if device.type == "cpu" else None
    int8_note = (f"CPU kind {kind}" if int8 else f"CPU kind {kind}: INT8 target is for CPUs without bf16"
                 if device.type == "cpu" else "the INT8 target is for CPU runs")
    add("predictor_int8_vs_smp", ratios.get("predictor_onnx_int8"), int8, int8 is not None, int8_note)
    add("training_mfu", mfu, CUDA_MFU_TARGET, device.type == "cuda", "CUDA only")
    return rows


def _threshold(target: dict) -> str:
    if target["name"] == "training_mfu":
        return f"{100 * target['threshold']:.0f}%"
    return f"{target['threshold']:g}×"


def _mb(record: dict) -> str:
    if record.get("bytes") is None:
        return "      n/a"
    rise = f" (+{record['rise_bytes'] / 2**20:.0f} MB its own)" if record.get("rise_bytes") is not None else ""
    return f"{record['bytes'] / 2**20:7.0f} MB{rise}"


def format_report(report: dict) -> str:
    lines = []
    quick = report["quick"]
    title = "resunet benchmark" + ("  [QUICK: tiny windows, a smoke test, NOT a measurement]" if quick else "")
    lines += [title, "=" * len(title)]
    lines.append(f"device     {report['device_description']}")
    if report["device"] == "cpu":
        kind = report["cpu_kind"]
        if report["target_kind"] != kind:
            kind += f" (its bf16 runs no faster than fp32 here: targets of {report['target_kind']})"
        lines.append(f"CPU        {report['cpu_name']}, kind {kind}, {report['threads']} torch threads")
    lines.append(f"versions   torch {report['versions']['torch']}, torchvision {report['versions']['torchvision']}, "
                 f"smp {report['versions']['segmentation_models_pytorch']}, timm {report['versions']['timm']}")
    applying = [f"{t['name']} ≥ {_threshold(t)}" for t in report["targets"] if t["applies"]]
    not_here = [f"{t['name']} ({t['note']})" for t in report["targets"] if not t["applies"]]
    lines.append(f"targets    {', '.join(applying)}" + (f"; n/a here: {', '.join(not_here)}" if not_here else ""))
    reset = report["measurements"]["data_path"]["ours"]["peak_memory"].get("kind") == "cpu_peak_rss_self"
    memory_kind = ("CUDA max_memory_allocated" if report["device"] == "cuda"
                   else "peak RSS of this process (VmHWM, reset per measurement)" if reset
                   else "peak RSS of this process over its life so far (not resettable here: rows carry earlier ones)")
    lines.append(f"memory     {memory_kind}")
    busy = report.get("cpu_busy_before_start")
    if busy is not None and busy > 0.25:
        lines.append(f"WARNING    the CPUs were {100 * busy:.0f}% busy with other work just before the run: "
                     "competing processes make these figures understate this machine")
    lines.append("")
    header = f"{'measurement':<20}{'variant':<56}{'img/s':>9}{'spread':>8}{'win':>5}{'GFLOP/s':>9}{'peak mem':>11}"
    lines += [header, "-" * len(header)]
    sections = report["measurements"]
    labels = {"training": f"training {SIZE}² b{report['plan']['batch']}", "data_path": f"data path {SIZE}²",
              "predictor": f"predictor {IMAGE_W}×{IMAGE_H}"}
    for section, label in labels.items():
        for key, entry in sections[section].items():
            if key.endswith("_error"):  # a section that failed (ours_compiled, onnx): why, in one line
                lines.append(f"{label:<20}{key.removesuffix('_error')}: failed ({entry[:60]})")
                label = ""
            if not isinstance(entry, dict) or "images_per_s" not in entry:
                continue
            gflops = f"{entry['gflop_per_s']:9.1f}" if entry.get("gflop_per_s") else f"{'-':>9}"
            variant = f"{key}: {entry['what']}"
            lines.append(f"{label:<20}{variant[:55]:<56}{entry['images_per_s']:9.2f}{100 * entry['spread']:7.0f}%"
                         f"{entry['windows']:5d}{gflops}{_mb(entry['peak_memory']):>11}")
            label = ""
    data = sections["data_path"]
    lines.append("")
    lines.append(f"cache build (one-off, not in the data path figure): {data['cache_build_s']:.2f} s for "
                 f"{report['plan']['images']} images")
    floor = data["output_copy_floor_images_per_s"]
    lines.append(f"data path ceiling here: one plain copy of the float32 output batch runs at {floor:,.0f} img/s "
                 f"= {floor / data['seed_style']['images_per_s']:.1f}× the PIL loader")
    resize = data.get("resize_step_images_per_s")
    if resize:
        lines.append(f"data path share here: its antialiased resize step alone, on one thread (best of 5 passes), "
                     f"runs at {resize:,.0f} img/s = {resize / data['seed_style']['images_per_s']:.1f}× the PIL "
                     f"loader")
    flops = report["flops"]
    lines.append(f"model FLOPs/image: ours fwd 256² {flops['ours_forward_256'] / 1e9:.2f} G, train 256² "
                 f"{flops['ours_train_256'] / 1e9:.2f} G, predict {flops['ours_predict'] / 1e9:.2f} G "
                 f"(at {flops['shapes']['ours_predict'][2]}×{flops['shapes']['ours_predict'][3]}); smp predict "
                 f"{flops['smp_predict'] / 1e9:.2f} G (at {flops['shapes']['smp_predict'][2]}×"
                 f"{flops['shapes']['smp_predict'][3]})")
    workers = sections["training"]["seed_style"]["peak_memory"].get("workers_peak_rss_bytes")
    if workers:
        lines.append(f"seed-style loader workers: peak RSS {', '.join(f'{w / 2**20:.0f}' for w in workers)} MB each "
                     "(incl. pages shared with this process), not in the table")
    if report.get("cuda_peak_flops"):
        lines.append(f"CUDA bf16 matmul peak {report['cuda_peak_flops'] / 1e12:.1f} TFLOP/s; training MFU "
                     f"{100 * report['mfu']['ours']:.1f}% ours, {100 * report['mfu']['seed_style']:.1f}% seed-style")
    lines.append("")
    lines.append("ratios (ours / reference) and targets")
    for target in report["targets"]:
        value = target["value"]
        if target["name"] == "training_mfu":
            shown = f"{100 * value:.1f}%" if value is not None else "n/a"
        else:
            shown = f"{value:.2f}×" if value is not None else "n/a"
        threshold = f"≥ {_threshold(target)}" if target["threshold"] is not None else "none"
        if target["passed"] is None:
            verdict = ("n/a" if not target["applies"] else "not judged (quick)" if quick
                       else "not measured (its section failed)")
        else:
            verdict = "PASS" if target["passed"] else "FAIL"
        lines.append(f"  {target['name']:<24}{shown:>10}   target {threshold:<8} {verdict}"
                     + ("" if target["applies"] else f"  ({target['note']})"))
    if "predictor_onnx_fp32" in report["ratios"]:
        lines.append(f"  {'predictor_onnx_fp32_vs_smp':<26}{report['ratios']['predictor_onnx_fp32']:>8.2f}×   "
                     "(onnxruntime fp32; no target)")
    if "training_compiled" in report["ratios"]:
        compiled = report["ratios"]["training_compiled"]
        lines.append(f"  {'training_compiled_vs_seed':<26}{compiled:>8.2f}×   (torch.compile; no target)")
    lines.append("")
    lines.append(f"wall time {report['wall_s']:.1f} s" + ("  [QUICK: not a measurement]" if quick else ""))
    return "\n".join(lines)


def say(text: str) -> None:
    """Progress on stderr, so stdout is the table alone."""
    print(f"  … {text}", file=sys.stderr, flush=True)


def run_benchmark(args) -> dict:
    """`resunet benchmark`: measure, print the table, write `args.json` if given; returns the report."""
    started = time.perf_counter()
    check_output_files([("--json", getattr(args, "json", None))])  # before the minutes of measuring
    try:  # the side-by-side comparison's other half: an extra, not a dependency of resunet itself
        import segmentation_models_pytorch  # noqa: F401
    except ImportError:
        raise SystemExit("resunet benchmark: error: it compares with segmentation_models_pytorch, which is not "
                         "installed: pip install 'resunet[bench]' (make benchmark installs it)") from None
    quick = bool(getattr(args, "quick", False))
    device = runtime.resolve_device(getattr(args, "device", "auto") or "auto")
    plan = plan_for(device, quick)
    compile = bool(getattr(args, "compile", False))
    kind = runtime.cpu_kind()
    report: dict = {
        "quick": quick, "device": device.type, "device_description": runtime.describe_device(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else runtime.cpu_name(),
        "cpu_name": runtime.cpu_name(), "cpu_kind": kind, "target_kind": target_kind(kind),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "torchvision": _version("torchvision"),
                     "segmentation_models_pytorch": _version("segmentation_models_pytorch")
                     or _version("segmentation-models-pytorch"),
                     "timm": _version("timm"), "resunet": _version("resunet")},
        "plan": asdict(plan), "setup_s": {}, "cpu_count": os.cpu_count(), "load_average_start": _load_average(),
        "cpu_busy_before_start": cpu_busy_fraction(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="resunet-bench-"))
    try:
        t = time.perf_counter()
        say(f"writing {plan.images} JPEGs {IMAGE_W}×{IMAGE_H} to {tmp}")
        dataset = make_jpeg_dataset(tmp / "data", plan.images)
        report["setup_s"]["dataset"] = time.perf_counter() - t
        images = [dataset.load(i).image for i in range(min(8, len(dataset)))]
        smp_size = smp_working_size(IMAGE_H, IMAGE_W)
        t = time.perf_counter()
        flops = measure_flops(plan.batch, resize_short_side(IMAGE_H, IMAGE_W, SIZE), smp_size)
        report["setup_s"]["flops"] = time.perf_counter() - t
        report["flops"] = flops

        # 2. data path (builds the cache the training measurement then reuses)
        say("data path")
        t = time.perf_counter()
        cache = build_cache(dataset, SIZE, tmp / "cache", workers=2)
        cache_build_s = time.perf_counter() - t
        data = {"ours": measure_data_ours(cache, plan, device), "seed_style": measure_data_seed(dataset, plan, device),
                "cache_build_s": cache_build_s, "output_copy_floor_images_per_s": measure_output_floor(plan, device),
                "resize_step_images_per_s": measure_resize_step(cache, plan) if device.type == "cpu" else None}

        # 3. predictor
        say("predictor")
        predictor = {"ours": measure_predictor_ours(images, plan, device),
                     "smp": measure_predictor_smp(images, plan, device)}
        predictor["ours"]["gflop_per_s"] = predictor["ours"]["images_per_s"] * flops["ours_predict"] / 1e9
        predictor["smp"]["gflop_per_s"] = predictor["smp"]["images_per_s"] * flops["smp_predict"] / 1e9
        if device.type == "cpu":
            say("predictor: ONNX export, INT8 calibration, onnxruntime fp32 and INT8")
            try:
                predictor.update(measure_predictor_onnx(images, plan, tmp))
            except Exception as error:  # ~350 MB of temporary files (a small /tmp), onnxruntime: the rest still stands
                predictor["onnx_error"] = f"{type(error).__name__}: {error}"
            for key in ("onnx_fp32", "onnx_int8"):
                if key in predictor:
                    predictor[key]["gflop_per_s"] = predictor[key]["images_per_s"] * flops["ours_predict"] / 1e9

        # 1. training
        say("training: ours")
        training = {"ours": measure_train_ours(cache, plan, device)}
        say("training: seed-style")
        training["seed_style"] = measure_train_seed(dataset, plan, device)
        if compile:
            say("training: ours + torch.compile (compiling in the warm-up)")
            try:
                training["ours_compiled"] = measure_train_ours(cache, plan, device, compile=True)
            except Exception as error:  # compile needs a working toolchain; the other figures still stand
                training["ours_compiled_error"] = f"{type(error).__name__}: {error}"
        for entry in training.values():
            if isinstance(entry, dict):
                entry["gflop_per_s"] = entry["images_per_s"] * flops["ours_train_256"] / 1e9
        del cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    report["measurements"] = {"training": training, "data_path": data, "predictor": predictor}
    report["ratios"] = {
        "training": training["ours"]["images_per_s"] / training["seed_style"]["images_per_s"],
        "data_path": data["ours"]["images_per_s"] / data["seed_style"]["images_per_s"],
        "predictor": predictor["ours"]["images_per_s"] / predictor["smp"]["images_per_s"],
    }
    for key in ("onnx_fp32", "onnx_int8"):
        if key in predictor:
            report["ratios"][f"predictor_{key}"] = predictor[key]["images_per_s"] / predictor["smp"]["images_per_s"]
    if "ours_compiled" in training:
        report["ratios"]["training_compiled"] = (training["ours_compiled"]["images_per_s"]
                                                 / training["seed_style"]["images_per_s"])
    mfu = None
    if device.type == "cuda":
        peak = measure_cuda_peak(device)
        report["cuda_peak_flops"] = peak
        report["mfu"] = {key: entry["gflop_per_s"] * 1e9 / peak for key, entry in training.items()
                         if isinstance(entry, dict)}
        mfu = report["mfu"]["ours"]
    report["targets"] = judge_targets(report["target_kind"], device, report["ratios"], mfu, quick)
    report["load_average_end"] = _load_average()
    report["wall_s"] = time.perf_counter() - started
    print(format_report(report), flush=True)
    if getattr(args, "json", None):
        path = Path(args.json)
        write_output(path, json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return report
