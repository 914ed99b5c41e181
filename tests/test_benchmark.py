"""`resunet benchmark --quick`: every section is there and the derived figures agree with the raw ones."""

from __future__ import annotations

import argparse
import json

import pytest

from resunet.benchmark import CPU_TARGETS, DEFAULT_PLAN, run_benchmark, time_data_windows


@pytest.mark.slow
def test_quick_benchmark_writes_consistent_json(tmp_path, capsys, exported, monkeypatch):
    import shutil

    # here, not for the module: the test of what is said without the extra ran only where the extra was installed
    pytest.importorskip("segmentation_models_pytorch")

    import resunet.export

    # The ONNX rows export a resnet34 U-Net; the session's exported file of the same architecture stands in for that
    # trace (about 20 s here). Quantisation, the sessions and the timing run as always.
    monkeypatch.setattr(resunet.export, "write_model_onnx",
                        lambda model, path, *args: shutil.copy(exported["dir"] / "model.onnx", path))
    path = tmp_path / "bench.json"
    run_benchmark(argparse.Namespace(json=str(path), quick=True, device="auto", compile=False))
    report = json.loads(path.read_text())
    table = capsys.readouterr().out
    assert "NOT a measurement" in table and "predictor_vs_smp" in table

    for key in ("device_name", "cpu_kind", "threads", "versions", "measurements", "flops", "ratios", "targets"):
        assert key in report, key
    for package in ("torch", "torchvision", "segmentation_models_pytorch", "timm"):
        assert report["versions"][package], package
    assert report["quick"] is True and report["threads"] >= 1

    sections = report["measurements"]
    pairs = {"training": ("ours", "seed_style"), "data_path": ("ours", "seed_style"), "predictor": ("ours", "smp")}
    for section, (ours, reference) in pairs.items():
        for key in (ours, reference):
            entry = sections[section][key]
            assert entry["images_per_s"] > 0, (section, key)
            assert len(entry["window_s"]) == entry["windows"] >= 2
            assert entry["peak_memory"]["bytes"] > 0
            memory = entry["peak_memory"]
            if memory["kind"] == "cpu_peak_rss_self":  # the block's own rise, not what earlier blocks left (a helper)
                assert memory["rise_bytes"] == max(0, memory["bytes"] - memory["rss_at_start_bytes"])
        expected = sections[section][ours]["images_per_s"] / sections[section][reference]["images_per_s"]
        assert report["ratios"][section] == pytest.approx(expected, rel=1e-9), section
    assert sections["data_path"]["cache_build_s"] > 0
    assert sections["data_path"]["resize_step_images_per_s"] > 0  # measured on the CPU, where the tests run

    flops = report["flops"]
    assert abs(flops["ours_forward_256"] - 14.29e9) <= 0.02 * 14.29e9
    assert 2.8 < flops["ours_train_256"] / flops["ours_forward_256"] < 3.1
    assert sections["training"]["ours"]["gflop_per_s"] == pytest.approx(
        sections["training"]["ours"]["images_per_s"] * flops["ours_train_256"] / 1e9)

    assert report["cpu_kind"] in CPU_TARGETS
    targets = {t["name"]: t for t in report["targets"]}
    assert set(targets) == {"predictor_vs_smp", "training_vs_seed_style", "data_path_vs_pil", "training_mfu",
                            "predictor_int8_vs_smp"}
    if report["device"] == "cpu":  # the exported model, fp32 and INT8, in onnxruntime: rows, ratios, the INT8 target
        for key in ("onnx_fp32", "onnx_int8"):
            entry = sections["predictor"][key]
            assert entry["images_per_s"] > 0 and len(entry["window_s"]) == entry["windows"] >= 2
            assert entry["threads"] == report["threads"]  # onnxruntime took every CPU, torch its own count
            assert report["ratios"][f"predictor_{key}"] == pytest.approx(
                entry["images_per_s"] / sections["predictor"]["smp"]["images_per_s"], rel=1e-9)
        assert "predictor_onnx_fp32_vs_smp" in table and "onnx_int8" in table
        int8 = targets["predictor_int8_vs_smp"]
        assert int8["applies"] == (report["cpu_kind"] == "no-bf16")
        assert int8["threshold"] == (2.5 if report["cpu_kind"] == "no-bf16" else None)
    assert targets["data_path_vs_pil"]["threshold"] == 20.0 and targets["data_path_vs_pil"]["applies"]
    speed = CPU_TARGETS[report["cpu_kind"]] if report["device"] == "cpu" else None
    assert targets["predictor_vs_smp"]["threshold"] == (speed[0] if speed else None)
    assert targets["training_vs_seed_style"]["threshold"] == (speed[1] if speed else None)
    assert targets["training_mfu"]["applies"] == (report["device"] == "cuda")
    assert all(t["passed"] is None for t in report["targets"])  # a quick run judges nothing


def test_data_windows_last_about_the_planned_time_whatever_the_loader_speed(monkeypatch):
    # A loader taking 4 ms per batch (on a fake clock, so the test is exact on any machine), 3 batches a pass: one
    # pass is 12 ms, so a 0.1 s window is round(8.3) = 8 passes of 3 batches × the plan's batch size images.
    import itertools
    import types
    from dataclasses import replace

    from resunet import benchmark

    now, calls = [0.0], itertools.count()
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def slow_batches():
        while True:
            next(calls)
            now[0] += 0.004
            yield None

    plan = replace(DEFAULT_PLAN, data_warmup=1, data_windows=3, min_windows=3, data_window_s=0.1, data_budget_s=60)
    result = time_data_windows(slow_batches(), 3, plan, None)
    assert result["passes_per_window"] == 8
    assert result["images_per_window"] == 8 * 3 * plan.batch and result["windows"] == 3
    assert next(calls) == 3 + 3 + 3 * 8 * 3  # warm-up pass, sizing pass, three windows: nothing else drawn
    assert result["window_s"] == pytest.approx([0.096] * 3)


def test_without_the_bench_extra_it_says_what_to_install_before_any_work(tmp_path, monkeypatch):
    # A plain `pip install resunet` has no segmentation_models_pytorch: a traceback came after the JPEG set was
    # written and the first measurements ran.
    import sys
    import tempfile

    from resunet.cli import main

    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)  # import fails as if not installed
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit, match=r"^resunet benchmark: error: it compares with segmentation_models_pytorch, "
                                         r"which is not installed: pip install 'resunet\[bench\]'"):
        main(["benchmark", "--quick", "--json", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()


def test_on_a_gpu_the_int8_target_is_said_to_be_for_cpu_runs():
    # On CUDA with a host CPU without bf16 it said "CPU kind no-bf16: INT8 target is for CPUs without bf16".
    import torch

    from resunet.benchmark import judge_targets

    ratios = {"predictor": 1.0, "training": 1.0, "data_path": 30.0}
    rows = {t["name"]: t for t in judge_targets("no-bf16", torch.device("cuda"), ratios, 0.5, False)}
    assert rows["predictor_int8_vs_smp"]["reason_not_judged"] == "the INT8 target is for CPU runs"
    rows = {t["name"]: t for t in judge_targets("amx", torch.device("cpu"), ratios, None, False)}
    assert rows["predictor_int8_vs_smp"]["reason_not_judged"] == "CPU kind amx: INT8 target is for CPUs without bf16"
