"""Device and precision choices (runtime.py) on machines this suite does not run on, by their reported features."""

import io
import os

import pytest
import torch

from resunet import runtime


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                   ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_on_cuda_is_bf16_only_where_the_gpu_has_it(monkeypatch, capability, expected):
    # torch.cuda.is_bf16_supported() is true on a T4 or V100 too (emulated, far slower than fp16): auto picked bf16.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert runtime.resolve_precision("auto", torch.device("cuda:0")) is expected


def test_a_cuda_index_past_the_machines_gpus_is_one_line(monkeypatch):
    # torch accepts cuda:3 on a one-GPU machine; the run stopped at its first tensor with "invalid device ordinal".
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runtime.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(runtime.DeviceError, match=r"^--device cuda:3: this machine has 1 CUDA device\(s\), "
                                                  r"cuda:0..cuda:0$"):
        runtime.resolve_device("cuda:3")


def test_telling_an_out_of_memory_error_keeps_nothing_of_it():
    # is_out_of_memory sat under a cache (759e5c9): every error it was shown stayed referenced, with its traceback's
    # frames and the failed pass's tensors, so the memory predict freed after a photo too large stayed allocated.
    import gc
    import weakref

    def failed_pass():
        held = torch.zeros(1024)  # noqa: F841  (a tensor the traceback's frame holds)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    try:
        failed_pass()
    except RuntimeError as error:
        assert runtime.is_out_of_memory(error)
        assert not runtime.is_out_of_memory(RuntimeError("shape mismatch"))
        frame_tensor = weakref.ref(error.__traceback__.tb_next.tb_frame.f_locals["held"])
    gc.collect()
    assert frame_tensor() is None


def test_without_cpuinfo_bf16_is_the_cpus_own_not_onednns_emulation(monkeypatch):
    # oneDNN's "bf16 supported" is true on any AVX-512 CPU (a Skylake Xeon emulates bf16, slower than fp32).
    monkeypatch.setattr(runtime.platform, "machine", lambda: "AMD64")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset())
    monkeypatch.setattr(runtime, "cpu_vendor", lambda: "AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert runtime.cpu_bf16_pays() is expected
        assert runtime.resolve_precision("auto", torch.device("cpu")) is (torch.bfloat16 if expected else None)


@pytest.mark.parametrize("flags, vendor, expected", [
    (("avx512_bf16", "amx_bf16", "amx_tile"), "GenuineIntel", True),  # the AMX Xeon: bf16 2.9x fp32 in training
    (("avx512_bf16", "avx512_vnni"), "AuthenticAMD", True),  # the Zen 4: 2.0x
    (("avx512_bf16", "avx512_vnni"), "GenuineIntel", False),  # a Xeon with its AMX hidden: fp32 1.3-1.4x faster
    (("avx512_vnni",), "GenuineIntel", False), (("avx2",), "AuthenticAMD", False)])
def test_auto_precision_is_bf16_only_where_the_cpu_runs_it_faster(monkeypatch, flags, vendor, expected):
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(runtime, "cpu_vendor", lambda: vendor)
    assert runtime.cpu_bf16_pays() is expected
    assert runtime.resolve_precision("auto", torch.device("cpu")) is (torch.bfloat16 if expected else None)
    assert runtime.resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16  # asked for, it is given


def test_cpuinfo_fields_are_read_from_the_first_core(monkeypatch):
    cpuinfo = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
               "flags\t\t: fpu avx512_bf16 avx512_vnni\nflags_extra : x\n\nprocessor\t: 1\nvendor_id\t: Other\n")
    monkeypatch.setattr(runtime, "open", lambda path, *a, **k: io.StringIO(cpuinfo), raising=False)
    for cached in (runtime.cpuinfo_field, runtime.cpu_name, runtime.cpu_vendor):
        cached.cache_clear()
    try:
        assert runtime.cpu_flags() == frozenset({"fpu", "avx512_bf16", "avx512_vnni"})
        assert runtime.cpu_vendor() == "GenuineIntel"
        assert runtime.cpu_name() == "Intel(R) Xeon(R) Processor"
        assert runtime.cpuinfo_field("microcode") is None
    finally:
        monkeypatch.undo()
        for cached in (runtime.cpuinfo_field, runtime.cpu_name, runtime.cpu_vendor):
            cached.cache_clear()


def test_the_cpu_kind_is_x86s_three_or_the_architecture(monkeypatch):
    # An ARM CPU (its /proc/cpuinfo has "Features", not "flags") was 'no-bf16', the Xeon kind with an INT8 target.
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset())
    assert runtime.cpu_kind() == "aarch64"
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    for flags, kind in ((("avx512_vnni",), "no-bf16"), (("avx512_bf16",), "avx512_bf16"),
                        (("avx512_bf16", "amx_bf16"), "amx")):
        monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
        assert runtime.cpu_kind() == kind
    monkeypatch.setattr(runtime.platform, "machine", lambda: "AMD64")  # Windows: no /proc/cpuinfo, the CPU's own say
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset())
    for avx512_bf16, amx, kind in ((False, False, "no-bf16"), (True, False, "avx512_bf16"), (True, True, "amx")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert runtime.cpu_kind() == kind


def test_cpu_threads_without_sched_getaffinity(monkeypatch):
    # macOS and Windows have no os.sched_getaffinity: every CPU prediction and the cached data path raised there.
    monkeypatch.delattr(os, "sched_getaffinity")
    assert runtime.available_cores() == os.cpu_count()
    assert runtime.cpu_threads(64) == min(torch.get_num_threads(), os.cpu_count())


@pytest.mark.parametrize("locators, cached_in_tmp", [("UserWideCacheLocator,UserProvidedCacheLocator", True),
                                                     ("UserWideCacheLocator", False)])
def test_kernels_compile_where_no_folder_beside_them_or_at_home_is_writable(tmp_path, locators, cached_in_tmp):
    """Found by a helper: a read-only install run by a user without a writable home (docker --user, a read-only root
    file system) stopped every command at import with numba's "no locator available". The kernels are then cached in
    the temporary folder, or compiled in the process. Simulated: numba told to look only at the user's cache (here a
    path under a file, which no one can write), and at the folder numba.config.CACHE_DIR names when it is set."""
    import os
    import subprocess
    import sys

    (tmp_path / "a-file").write_text("")
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": locators, "XDG_CACHE_HOME": str(tmp_path / "a-file" / "x"),
           "TMPDIR": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    script = ("import numpy as np\nfrom resunet.classmap import linear_taps\nfrom resunet.data import kernels\n"
              "first, second, _, weight = linear_taps(2, 4)\nprint(first.tolist(), weight.tolist())")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # PyTorch's bilinear taps for 2 → 4 pixels: sources at -0.25 (clamped to 0), 0.25, 0.75, 1.25
    assert result.stdout.split() == ["[0,", "0,", "0,", "1]", "[0.0,", "0.25,", "0.75,", "0.25]"]
    cached = list((tmp_path / f"resunet-numba-{os.getuid()}").rglob("*.nbi"))
    assert bool(cached) == cached_in_tmp


@pytest.mark.parametrize("setting", [None, ("MALLOC_TRIM_THRESHOLD_", "1000000"),
                                     ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")])
def test_the_allocator_is_tuned_unless_the_user_set_it(monkeypatch, setting):
    """Found by a helper: mallopt replaced a user's own glibc malloc settings (an RSS cap for a container), also
    inside an application that only built a Predictor."""
    import ctypes
    import sys

    from resunet import allocator

    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    for name in [n for n in os.environ if n.startswith("MALLOC_")] + ["GLIBC_TUNABLES"]:
        monkeypatch.delenv(name, raising=False)
    if setting:
        monkeypatch.setenv(*setting)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(sys, "platform", "linux")
    applied = allocator.tune_cpu_allocator.__wrapped__()
    assert applied == (setting is None)
    assert calls == ([(-3, 32 * 1024 * 1024), (-1, 1 << 30)] if setting is None else [])
