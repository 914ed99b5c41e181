"""Shared fixtures: one tiny generated dataset and one briefly trained run, built once per test session."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# `make test` runs two pytest-xdist workers (half the suite's time on two cores: much of it is waiting, on imports
# in subprocesses, servers and browsers). Each computes on its share of the cores: two workers of two threads each
# would fight over them. Set before torch is imported; subprocesses the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0))
                                                     // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

import pytest  # noqa: E402

from resunet.config import TrainConfig  # noqa: E402
from resunet.data.demo import make_demo_dataset  # noqa: E402
from resunet.train import train  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
BUILT_ONCE = "RESUNET_TESTS_BUILT_ONCE"  # the folder of what one test run builds once for all its workers


def tiny_config(data_root: Path, out: Path, **overrides) -> TrainConfig:
    """A seconds-long run: 32 px, batch 4, a ResNet18 from scratch (3 s for 2 epochs here, where the seed's ResNet34
    at 64 px took 4.9 s; half the checkpoint bytes), no progress bars, cache in the session's tmp dir. fp32: the same
    run on every CPU, and no bf16 encoder stage one pixel wide (oneDNN's NaN on the AMX Xeon, see predict.py)."""
    values = dict(data_root=str(data_root), out=str(out), epochs=2, batch_size=4, size=32, lr=1e-3, encoder="resnet18",
                  precision="fp32", optimizer="adamw", scale_min=0.75, scale_max=1.25, pretrained=False, workers=0,
                  progress=False, cache_dir=str(out.parent / "cache"))
    values.update(overrides)
    return TrainConfig(**values)


def ram_dir(prefix: str) -> Path:
    """A fresh folder in RAM (tmpfs) where the machine has one, else on disk. Training writes and fsyncs an 80-320 MB
    checkpoint every epoch; on this project's machines those disk writes took a third of the suite's time."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=f"resunet-tests-{prefix}-", dir=base))


def pytest_configure(config) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controlling process (or the only one): workers inherit it
        os.environ[BUILT_ONCE] = str(ram_dir("built-once"))


def pytest_unconfigure(config) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(BUILT_ONCE):
        shutil.rmtree(os.environ.pop(BUILT_ONCE), ignore_errors=True)


# The session's minute-long builds (the trained model, then its exports, which need it): the first worker to need one
# builds it while another that needs it waits on its lock, idle. Within each file the tests that need them run after
# the others, those needing the exports last, so a worker that would wait works meanwhile (test_user_errors' worker
# waited a minute on test_serve's build of the model, then half a minute on its exports).
BUILT_FIXTURES = ("trained_run", "exported")

# The files that take longest, longest first (worker-seconds in a run of 2026-12-07 on the AMD EPYC Zen 4): with
# `--no-loadscope-reorder` xdist hands files out in this order, the rest after them in their usual order, so the last
# files handed out are short and both workers finish together. xdist's own order, by test count, handed out
# test_distributed (7 tests, 100 s) near the end, and one worker idled while the other finished it.
# test_serve goes first: it builds the trained model at once, while the other worker runs tests that need none.
LONGEST_FILES = ("test_serve.py", "test_user_errors.py", "test_export.py", "test_train.py", "test_distributed.py",
                 "test_faults.py", "test_predict.py", "test_cli.py", "test_benchmark.py", "test_calibration.py",
                 "test_bad_inputs.py", "test_evaluate.py", "test_ablate.py", "test_download.py", "test_runtime.py")


def pytest_collection_modifyitems(config, items) -> None:
    files: dict[str, int] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], len(files))

    def file_rank(nodeid: str) -> tuple[int, int]:
        path = nodeid.split("::")[0]
        name = path.rsplit("/", 1)[-1]
        return (LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)), files[path]

    def built_rank(item) -> int:
        needs = set(getattr(item, "fixturenames", ()))
        return max((rank + 1 for rank, name in enumerate(BUILT_FIXTURES) if name in needs), default=0)

    items.sort(key=lambda item: (file_rank(item.nodeid), built_rank(item)))


def built_once(name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name`, built by `build` once per test run: the first worker to ask builds it while the others wait
    (a file lock), then all read it. Tests copy what they change. A failed build leaves nothing: the next asker
    builds again (and fails the same way, in its own test)."""
    base = Path(os.environ[BUILT_ONCE])
    folder = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (base / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                build(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            (base / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def demo_root() -> Path:
    return built_once("demo", lambda root: make_demo_dataset(root, train=48, val=8, size=64, seed=0))


@pytest.fixture
def ram_tmp():
    path = ram_dir("test")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_run(demo_root) -> Path:
    """The seed model (resnet34, from scratch) trained for 20 short epochs: enough to segment the demo shapes and to
    keep its INT8 export within a point of mIoU (14 or 16 epochs did not). Evaluated every other epoch (each
    evaluation may also write a 107 MB best.pt). In fp32, and at 64 px bf16 autocast costs more than it saves where
    the CPU has no AMX. The weights differ in their last digits with the thread count (one under `make test`'s
    workers, all cores in one process): tests ask what any such model does, not which pixels it gets right."""
    root = built_once("trained", lambda root: train(tiny_config(
        demo_root, root / "trained", encoder="resnet34", size=64, epochs=20, lr=2e-3, scheduler="cosine",
        eval_every=2)))
    return root / "trained"


def shared_dir(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (the shared material sits beside the project root in our workplace)")
    return path


@pytest.fixture(scope="session")
def exported(trained_run, demo_root) -> dict:
    """The trained run exported twice: end to end (verified, evaluated on val) and as the logits graph; each export's
    figures as run_export returned them (kept in JSON for the workers that did not build them)."""
    from resunet.export import run_export

    ckpt = trained_run / "best.pt"

    def export(out: Path) -> None:
        run_export(str(ckpt), str(out / "model.onnx"), data_root=str(demo_root), workers=0,
                   json_out=str(out / "e2e.json"))
        run_export(str(ckpt), str(out / "logits.onnx"), graph="logits", workers=0, json_out=str(out / "logits.json"))

    out = built_once("onnx", export)
    return {"dir": out, "ckpt": ckpt, **{name: json.loads((out / f"{name}.json").read_text())
                                         for name in ("e2e", "logits")}}
