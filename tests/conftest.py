"""Shared fixtures: one tiny generated dataset and one briefly trained run, built once per test session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from resunet.config import TrainConfig
from resunet.data.demo import make_demo_dataset
from resunet.train import train

SHARED = Path(__file__).resolve().parents[2] / "shared"


def tiny_config(data_root: Path, out: Path, **overrides) -> TrainConfig:
    """A seconds-long run: 32 px, batch 4, a ResNet18 from scratch (3 s for 2 epochs here, where the seed's ResNet34
    at 64 px took 4.9 s; half the checkpoint bytes), no progress bars, cache in the session's tmp dir. fp32: the same
    run on every CPU, and no bf16 encoder stage one pixel wide (oneDNN's NaN on the AMX Xeon, see predict.py)."""
    values = dict(data_root=str(data_root), out=str(out), epochs=2, batch_size=4, size=32, lr=1e-3, encoder="resnet18",
                  precision="fp32", optimizer="adamw", scale_min=0.75, scale_max=1.25, pretrained=False, workers=0,
                  progress=False, cache_dir=str(out.parent / "cache"))
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, train=48, val=8, size=64, seed=0)
    return root


def ram_dir(prefix: str) -> Path:
    """A fresh folder in RAM (tmpfs) where the machine has one, else on disk. Training writes and fsyncs an 80-320 MB
    checkpoint every epoch; on this project's machines those disk writes took a third of the suite's time."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=f"resunet-tests-{prefix}-", dir=base))


@pytest.fixture
def ram_tmp():
    path = ram_dir("test")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_run(demo_root) -> Path:
    """The seed model (resnet34, from scratch) trained for 20 short epochs: enough to segment the demo shapes, and a VOC
    sample photo into more than background (14 or 16 epochs segmented the shapes too, but not the photo). Evaluated
    every other epoch (each evaluation may also write a 107 MB best.pt). In fp32: the same model on every CPU, and at
    64 px bf16 autocast costs more than it saves where the CPU has no AMX."""
    root = ram_dir("trained")
    train(tiny_config(demo_root, root / "trained", encoder="resnet34", size=64, epochs=20, lr=2e-3,
                      scheduler="cosine", eval_every=2))
    yield root / "trained"
    shutil.rmtree(root, ignore_errors=True)


def shared_dir(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (the shared material sits beside the project root in our workplace)")
    return path


@pytest.fixture(scope="session")
def exported(trained_run, demo_root, tmp_path_factory) -> dict:
    """The trained run exported twice: end to end (verified, evaluated on val) and as the logits graph."""
    from resunet.export import run_export

    out = tmp_path_factory.mktemp("onnx")
    ckpt = trained_run / "best.pt"
    e2e = run_export(str(ckpt), str(out / "model.onnx"), data_root=str(demo_root), workers=0)
    logits = run_export(str(ckpt), str(out / "logits.onnx"), graph="logits", workers=0)
    return {"dir": out, "ckpt": ckpt, "e2e": e2e, "logits": logits}
