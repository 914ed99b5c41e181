"""Where and how to run: device, numeric precision, memory layout, and the CPU we are on.

bf16 autocast + channels_last is chosen automatically where the hardware's bf16 arithmetic is faster than fp32: CUDA
GPUs with bf16, and x86 CPUs with AMX or AMD's AVX512-BF16 (measured on this model: 2.6x inference / 2.0x training on
an AMD EPYC with avx512_bf16, 5.7x / 3.1x on a Xeon with AMX, over fp32 eager), not an Intel CPU with AVX512-BF16 and
no AMX (`cpu_bf16_pays`). In fp32, channels_last only where it was measured to pay (`use_channels_last`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class DeviceError(ValueError):
    """A --device this machine does not have or torch does not know, or a --device, --precision or --threads a model
    file cannot run with: the user's input, reported in one line."""


def parse_device(name: str) -> torch.device:
    """torch's device for a --device name (not "auto"); DeviceError for a name that is no device ("CPU", "gpu")."""
    try:
        return torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name}: not a device (auto, cpu, cuda, cuda:1, ...)") from None


def check_precision(precision: str) -> None:
    """DeviceError for a --precision name that is none (float32, from Python), .pt and .onnx alike."""
    if precision not in PRECISIONS:
        raise DeviceError(f"--precision {precision}: one of {', '.join(PRECISIONS)}")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        # torch accepts any index here; the run would stop at its first tensor, after the data check and cache.
        raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {name}: resunet runs on cpu or cuda")
    return device


def is_out_of_memory(error: BaseException) -> bool:
    """A device that could not hold what a pass asked of it: torch's OutOfMemoryError on a GPU; on the CPU the
    allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError)
                                                        and "can't allocate memory" in str(error))


@functools.cache
def cpuinfo_field(key: str) -> str | None:
    """The first core's `key` line in /proc/cpuinfo ("flags", "model name", "vendor_id"); None where there is none
    (not Linux, or an architecture that names it otherwise)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, colon, value = line.partition(":")
                if colon and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    return frozenset((cpuinfo_field("flags") or "").split())


@functools.cache
def cpu_name() -> str:
    return cpuinfo_field("model name") or platform.processor() or "unknown CPU"


@functools.cache
def cpu_vendor() -> str:
    """'GenuineIntel', 'AuthenticAMD', ...; on Windows platform.processor() names it; '' where nothing does."""
    return cpuinfo_field("vendor_id") or platform.processor() or ""


def cpu_kind() -> str:
    """'amx' (Intel AMX tiles), 'avx512_bf16' (e.g. AMD Zen 4), 'no-bf16' (an x86 CPU without either), or, on
    another architecture, its name ('aarch64', 'arm64'): the benchmark's targets and the auto precision were measured
    on the three x86 kinds only (an ARM CPU with bf16 was called 'no-bf16', and given that kind's INT8 target)."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return machine or "unknown"
    flags = cpu_flags()
    # No /proc/cpuinfo (not Linux): the CPU's own bf16 instructions. oneDNN's "bf16 supported" is true on any
    # AVX-512 CPU, where it emulates bf16 slower than fp32.
    if "amx_bf16" in flags or (not flags and torch.cpu._is_amx_tile_supported()):
        return "amx"
    if "avx512_bf16" in flags or (not flags and torch.cpu._is_avx512_bf16_supported()):
        return "avx512_bf16"
    return "no-bf16"


def cpu_bf16_pays() -> bool:
    """Whether bf16 autocast runs faster than fp32 on this CPU: the rule behind `--precision auto` and `make camvid`'s
    working size. Yes with AMX tiles, and with avx512_bf16 on AMD's Zen 4 (its training step 2.0x, inference 2.6x
    fp32's) and Zen 5 (`make camvid`'s step 1.8x at 320 crops, inference 1.5x). No on an Intel CPU with avx512_bf16
    but no AMX (a Xeon whose hypervisor hides its AMX, family 6 model 207): there `make camvid`'s training step ran
    0.71-0.77x fp32's speed at 256-288 crops, one CamVid photo's inference 0.84x (benchmarks/precision_speed.py,
    RESULTS.md)."""
    kind = cpu_kind()
    return kind == "amx" or (kind == "avx512_bf16" and "GenuineIntel" not in cpu_vendor())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    check_precision(precision)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        # bf16 hardware from Ampere (compute capability 8) on; torch's is_bf16_supported() is also true where it is
        # only emulated (T4, V100), much slower than fp16 there.
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return torch.bfloat16 if cpu_bf16_pays() else None


def use_channels_last(device: torch.device, dtype: torch.dtype | None, encoder: str, training: bool) -> bool:
    """NHWC memory layout: always in reduced precision and on CUDA (oneDNN and cuDNN run NHWC convolutions fastest
    there), and for inference in fp32 on a CPU too. For training in fp32 on a CPU only with the EfficientNet-Lite
    encoders, whose depthwise convolutions gain from it: on a 2-core AMD EPYC Zen 3 without AVX-512, Lite0's training
    step 1.14-1.28x and inference 1.34-1.43x, ResNet34's inference 1.18-1.22x but its training step 0.88-0.95x
    (the weight gradients of its wide 3x3 convolutions are slower in NHWC; benchmarks/layout_speed.py)."""
    return dtype is not None or device.type == "cuda" or not training or encoder.startswith("efficientnet-lite")


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def cpu_threads(pieces: int) -> int:
    """Threads for a nogil CPU kernel split into `pieces` independent parts (the data path's samples, the class
    map's row bands): as many as PyTorch uses for the model and this process may run on, one per piece at most."""
    return max(1, min(pieces, torch.get_num_threads(), available_cores()))


def available_cores() -> int:
    """The cores this process may run on (its affinity where the platform has one: not macOS or Windows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class HelperThreads:
    """A pool of helper threads for nogil CPU kernels, created on first need and grown when a call wants more."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pool: ThreadPoolExecutor | None = None

    def run(self, calls: Sequence[Callable[[], object]]) -> None:
        """Run calls[0] on the calling thread and the others on helpers; return when all are done (a helper's
        exception is raised here)."""
        helpers = len(calls) - 1
        if helpers > 0 and (self.pool is None or self.pool._max_workers < helpers):
            self.pool = ThreadPoolExecutor(helpers, thread_name_prefix=self.name)
        futures = [self.pool.submit(call) for call in calls[1:]]
        calls[0]()
        for future in futures:
            future.result()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({cpu_kind()}, {torch.get_num_threads()} threads)"


def distributed_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def cached_kernel(**options) -> Callable:
    """numba.njit(cache=True, **options), its machine code kept where numba finds a writable folder (beside the module,
    or the user's cache), else in the temporary folder, else compiled in each process: a read-only install run by a
    user without a writable home (docker --user, a read-only root file system) stopped every command at import with
    numba's "no locator available"."""
    import numba

    def decorate(function: Callable) -> Callable:
        while True:
            try:
                return numba.njit(cache=True, **options)(function)
            except RuntimeError as error:
                if "no locator available" not in str(error):
                    raise
            if numba.config.CACHE_DIR:  # the user's own (NUMBA_CACHE_DIR) or the temporary folder failed too
                return numba.njit(cache=False, **options)(function)
            import tempfile

            numba.config.CACHE_DIR = os.path.join(tempfile.gettempdir(), f"resunet-numba-{os.getuid()}")

    return decorate
