"""`torchrun --nproc-per-node 2 -m resunet train` on the CPU (gloo): DDP, sharded evaluation, one writer."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resunet.checkpoint import checkpoint_classes, load_checkpoint, model_from_checkpoint, save_checkpoint
from resunet.data.dataset import open_dataset
from resunet.evaluate import evaluate_dataset
from resunet.predict import Predictor


BUILD_COUNTER = """
import os
if os.environ.get("RESUNET_TEST_BUILDS"):  # each decoded-cache build, by process: the test counts them
    import resunet.data.cache as cache
    fill = cache._fill_cache

    def counted(*args, **kwargs):
        with open(os.environ["RESUNET_TEST_BUILDS"], "a") as log:
            log.write(f"{os.getpid()}\\n")
        return fill(*args, **kwargs)

    cache._fill_cache = counted
"""


def test_torchrun_two_processes_match_one_process_evaluation(demo_root, ram_tmp):
    run = ram_tmp / "ddp"  # in RAM, as the other training tests: each run fsyncs some 400 MB of checkpoints
    # Each process built the whole decoded cache at once (one copy each, the last renames dropped): now the first
    # process of the machine builds it and the other opens it (review, 2026-12-06).
    (ram_tmp / "hook").mkdir()
    (ram_tmp / "hook" / "sitecustomize.py").write_text(BUILD_COUNTER)
    builds = ram_tmp / "builds.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESUNET_TEST_BUILDS": str(builds),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ram_tmp / "hook"), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "resunet", "train", "--data-root", str(demo_root), "--out", str(run), "--epochs", "2",
               "--batch-size", "4", "--size", "64", "--no-pretrained", "--workers", "0", "--precision", "fp32",
               "--cache-dir", str(ram_tmp / "cache"), "--no-progress", "--encoder", "resnet18", "--lr", "1e-3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert len(builds.read_text().split()) == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2  # one process writes logs and checkpoints
    assert result.stdout.count("epoch   2/2") == 1
    # The DDP run evaluated val split in two shards and summed the confusion matrices; one process evaluating the
    # same checkpoint on the same data must get the same numbers. Each process's last steps update BatchNorm's
    # statistics from its own batches (no SyncBatchNorm on the CPU): the second shard was scored with the second
    # process's (on demo data, 25.88% recorded for a 25.76% model) until rank 0's were shared before evaluating.
    payload = load_checkpoint(run / "last.pt")
    norm = payload["normalization"]
    predictor = Predictor(model_from_checkpoint(payload), checkpoint_classes(payload), 64, norm["mean"], norm["std"],
                          "cpu", "fp32", channels_last=False)  # the training-time one: BN unfolded, NCHW as trained
    single = evaluate_dataset(predictor, open_dataset(demo_root, "val"), workers=0, progress=False).compute()
    assert abs(single["miou"] - records[-1]["val_miou"]) < 1e-9
    assert all(abs(a - b) < 1e-9 for a, b in zip(single["iou"], records[-1]["val_iou"]) if a == a)
    assert abs(single["pixel_accuracy"] - records[-1]["val_pixel_accuracy"]) < 1e-9

    # A checkpoint saved inside an epoch by another process count: every process refused it, each in its own line.
    payload["position"] = {"epoch": 3, "step": 1, "loss_sums": [0.0]}
    save_checkpoint(payload, ram_tmp / "one.pt")
    resume = [*command[:command.index("train") + 1], "--resume", str(ram_tmp / "one.pt"), "--epochs", "3"]
    result = subprocess.run(resume, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert result.stderr.count("resunet train: error: ") == 1, result.stderr[-3000:]
    assert "saved inside epoch 3 by 1 process(es); resume it with as many" in result.stderr


def test_an_error_every_process_meets_is_said_once(demo_root, tmp_path):
    """torchrun printed the same error line once per process (and ran the data check on each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "resunet", "train", "--data-root", str(demo_root), "--out", str(tmp_path / "run"), "--epochs",
               "1", "--batch-size", "30", "--size", "64", "--no-pretrained", "--workers", "0", "--precision", "fp32",
               "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert result.stderr.count("resunet train: error: ") == 1, result.stderr[-3000:]
    assert "48 training images, fewer than one batch of 60" in result.stderr
    assert result.stdout.count("data check") == 1, result.stdout  # run by the first process alone


def test_a_flag_a_folder_or_a_bad_file_under_torchrun_is_one_line_and_leaves_nothing(demo_root, tmp_path):
    """A refused flag was said once per process; an --out only the first process makes (a file in the way) left the
    second a gloo traceback; a bad file found by the cache build (--skip-data-check) was said twice and left an
    empty run folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    masks = data / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    bad = sorted(masks.glob("*.png"))[0]
    bad.write_bytes(bad.read_bytes()[:120])  # its header reads, its pixels do not
    (tmp_path / "file").write_text("in the way")

    def torchrun(root, out, *extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "resunet", "train", "--data-root", str(root), "--out", str(out), "--epochs", "1",
                   "--batch-size", "4", "--size", "64", "--no-pretrained", "--workers", "0", "--precision", "fp32",
                   "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--encoder", "resnet18", *extra]
        if "--encoder-weights" in extra:  # weights to start from: not random
            command.remove("--no-pretrained")
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode != 0
        assert result.stderr.count("resunet train: error: ") == 1, result.stderr[-3000:]
        # torchrun reports its failed process with a traceback of its own, after "failed (exitcode: 2)"
        ours = result.stderr.split("failed (exitcode")[0]
        assert "Traceback" not in ours and "[rank" not in result.stderr, result.stderr[-3000:]
        return result.stderr

    assert "--epochs 0: must be at least 1" in torchrun(demo_root, tmp_path / "a", "--epochs", "0")
    assert "missing.pth: encoder weights file not found" in torchrun(demo_root, tmp_path / "a", "--encoder-weights",
                                                                     str(tmp_path / "missing.pth"))
    assert f"--out {tmp_path / 'file' / 'run'}: cannot make the run folder" in torchrun(demo_root,
                                                                                        tmp_path / "file" / "run")
    assert f"{bad}" in torchrun(data, tmp_path / "b", "--skip-data-check")
    assert not (tmp_path / "b").exists()


def test_a_setup_error_on_another_process_alone_is_printed_by_that_process(monkeypatch):
    """(Another node's disk lacking a file, say.) The first process, which did not fail, stops quietly; the one
    that failed prints its line. When the first failed too, it alone prints."""
    import pytest

    import resunet.train as train_module
    from resunet.data.images import DataError

    missing = DataError("/data/x.png: not found")
    monkeypatch.setattr(train_module, "agree", lambda world, device, *flags: [False, True])  # only another failed
    with pytest.raises(train_module.SaidElsewhere) as quiet:
        train_module.raise_once(None, 2, "cpu", main_process=True)
    assert quiet.value.quiet
    with pytest.raises(DataError) as loud:
        train_module.raise_once(missing, 2, "cpu", main_process=False)
    assert loud.value is missing and not getattr(loud.value, "quiet", False)
    monkeypatch.setattr(train_module, "agree", lambda world, device, *flags: [True, True])  # the first failed
    with pytest.raises(train_module.SaidElsewhere):
        train_module.raise_once(missing, 2, "cpu", main_process=False)
    monkeypatch.undo()
    train_module.raise_once(None, 1, "cpu", main_process=True)  # nothing failed: nothing raised


@pytest.mark.parametrize("processes", [2, 1])
def test_ctrl_c_to_a_torchrun_job_saves_its_position(demo_root, ram_tmp, processes):
    """Ctrl-C reaches the whole process group, and torchrun passes the same SIGINT on to its processes a moment
    later: taken as a second signal ("stop at once"), it stopped them without the save (4 runs in 6). Here a third
    copy comes 50 ms later, after the first has been handled, as torchrun's does when its processes are busy. One
    process under torchrun gets the copies too (it had no window for them: a helper's review, 2026-12-07)."""
    run, log_path = ram_tmp / "ddp", ram_tmp / "ddp.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "resunet", "train", "--data-root", str(demo_root), "--out", str(run), "--epochs", "3",
               "--batch-size", "2", "--size", "64", "--no-pretrained", "--workers", "0", "--precision", "fp32",
               "--cache-dir", str(ram_tmp / "cache"), "--no-progress", "--encoder", "resnet18"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "epoch   1/3" not in log_path.read_text():  # epoch 1 saved: the signals land in epoch 2
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.02)
        workers = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
                   and (entry / "stat").exists() and parent_of(entry) == proc.pid]
        assert len(workers) == processes
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C; torchrun passes it on at once
        time.sleep(0.05)
        for pid in workers:  # and a copy that comes late
            os.kill(pid, signal.SIGINT)
        proc.wait(timeout=120)  # torchrun's own exit status: it re-raises the signal it got
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert "SIGINT: stopped " in text and "resunet train: interrupted" not in text, text[-3000:]
    state = load_checkpoint(run / "last.pt", tensors=False)
    assert state["epoch"] >= 2 or state["position"]["epoch"] == 2, text[-3000:]


def parent_of(proc_entry: Path) -> int | None:
    try:  # "pid (name) state ppid ...": the name may hold spaces and brackets
        return int((proc_entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_torchrun_passing_on_the_signal_is_not_a_second_one(monkeypatch):
    import resunet.train as train_module

    clock = [100.0]
    monkeypatch.setattr(train_module.StopSignal, "clock", staticmethod(lambda: clock[0]))
    stop = train_module.StopSignal(announce=False, repeat_s=10.0)
    stop.handle(signal.SIGINT, None)
    clock[0] += 0.5
    stop.handle(signal.SIGINT, None)  # torchrun's copy: still the first request
    assert stop.name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):  # another signal is a second request
        stop.handle(signal.SIGTERM, None)
    clock[0] += 10
    with pytest.raises(KeyboardInterrupt):  # the same one 10 s later: the user's second Ctrl-C
        stop.handle(signal.SIGINT, None)
    single = train_module.StopSignal(announce=False)  # one process: any second signal stops at once
    single.handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        single.handle(signal.SIGINT, None)


@pytest.mark.parametrize("local_rank", [0, 3])
def test_more_processes_than_gpus_is_one_line_from_every_process(demo_root, tmp_path, monkeypatch, local_rank):
    """torchrun --nproc-per-node 4 on a two-GPU machine: ranks 2 and 3 stopped in a traceback ("invalid device
    ordinal") and ranks 0 and 1 waited in the process group until its timeout (a helper's review, 2026-12-06).
    Every process now stops before the group is made; the first on the machine says why."""
    import torch

    from conftest import tiny_config
    from resunet.runtime import DeviceError
    from resunet.train import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in {"WORLD_SIZE": 4, "RANK": local_rank, "LOCAL_RANK": local_rank, "LOCAL_WORLD_SIZE": 4}.items():
        monkeypatch.setenv(name, str(value))
    with pytest.raises(DeviceError, match=r"^torchrun --nproc-per-node 4: this machine has 2 CUDA device\(s\), one a "
                                          r"process; give --nproc-per-node 2 or fewer$") as stopped:
        train(tiny_config(demo_root, tmp_path / "run", device="cuda"))
    assert getattr(stopped.value, "quiet", False) is (local_rank != 0)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("encoder", ["efficientnet-lite0", "resnet18"])
def test_synchronised_batchnorm_keeps_every_activation(encoder):
    """Found by a helper: torch's converter turned the Lite encoders' BatchNormAct2d (BatchNorm with its ReLU6) into a
    plain SyncBatchNorm that never calls the activation, so a multi-GPU run trained an almost linear encoder. In eval
    mode without a process group SyncBatchNorm is ordinary BatchNorm: the converted model must compute the same."""
    import torch
    from torch import nn

    from resunet.model.unet import ResNetUNet
    from resunet.train import sync_batchnorm

    torch.manual_seed(0)
    model = ResNetUNet(3, encoder, None).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        converted = sync_batchnorm(model).eval()
        assert torch.allclose(converted(x), expected, atol=1e-6)
    kinds = [type(module) for module in converted.modules()]
    assert nn.BatchNorm2d not in kinds and nn.SyncBatchNorm in kinds  # every BatchNorm synchronised
