"""CUDA paths decided without a GPU (issues 15, 21): the demo's dtype, where pre-quantized bytes were made, the CPU
tests on a machine that has a GPU, and a failed page-lock (torch.cuda.cudart faked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload_engine import cli, quantize_checkpoint
from offload_engine.checkpoint import DEMO_DIR

from conftest import REAL_CUDA


@pytest.mark.parametrize("capability,dtype", [((7, 5), "float16"), ((8, 0), "bfloat16")])
def test_demo_picks_float16_on_gpus_without_fast_bfloat16(monkeypatch, capability, dtype):
    if not (DEMO_DIR / "config.json").exists():
        pytest.skip("the demo model is not installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)  # T4: 7.5, A100: 8.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    setup = cli.resolve_setup(cli.build_parser().parse_args(["--demo", "--device", "cuda"]))
    assert setup.config["dtype"] == dtype
    setup = cli.resolve_setup(cli.build_parser().parse_args(["--demo", "--device", "cpu"]))
    assert setup.config["dtype"] == "bfloat16"


def test_manifest_records_where_the_bytes_were_quantized(tiny_dir, tmp_path):
    quant = {"quant": {"attention": {"bits": 4, "group_size": 64}, "experts": {"bits": 2, "group_size": 16}}}
    dst = quantize_checkpoint(tiny_dir, tmp_path / "q", quant, progress=False, device="cpu")
    assert json.loads((dst / "offload_manifest.json").read_text())["quantized_on"] == "cpu"


# CPU tests that pass no device (so `load()` / `offload-chat` would pick the GPU), from the files issue 21 names.
CPU_TESTS_WITHOUT_A_DEVICE = [
    "tests/test_host_memory.py::test_cache_allocates_what_the_plan_says",
    "tests/test_stream_protocol.py::test_demand_copies_go_before_speculation_and_before_compute",
    "tests/test_kernels.py::test_auto_picks_the_fused_kernels_on_cpu_and_unquantized_models_need_none",
    "tests/test_cli.py::test_no_stats_prints_no_stats_line",
    "tests/test_cuda_defaults.py::test_a_fake_gpu_is_seen_and_the_cpu_still_pinned",
]


def test_cpu_tests_pin_the_cpu_on_a_machine_with_a_gpu():
    """The suite as a GPU machine runs it: torch claims a GPU for the whole session (`--fake-cuda-available`),
    and tests that pass no device still run on the CPU (tests/conftest.py pins it unless a test is marked cuda)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--fake-cuda-available",
                             *CPU_TESTS_WITHOUT_A_DEVICE], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"{len(CPU_TESTS_WITHOUT_A_DEVICE)} passed" in result.stdout, result.stdout[-2000:]


def test_a_fake_gpu_is_seen_and_the_cpu_still_pinned(request, monkeypatch):
    """Run by the test above: the session's fake GPU is what torch reports, yet this unmarked test sees the CPU."""
    if not request.config.getoption("--fake-cuda-available"):
        pytest.skip("meaningful only under --fake-cuda-available (run by test_cpu_tests_pin_the_cpu_...)")
    from offload_engine.loader import resolve_device

    assert resolve_device(None) == torch.device("cpu") and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    if (DEMO_DIR / "config.json").exists():
        assert cli.resolve_setup(cli.build_parser().parse_args(["--demo"])).device == torch.device("cpu")
    monkeypatch.undo()  # without conftest's pin, the fake GPU would be the default
    assert torch.cuda.is_available() and resolve_device(None) == torch.device("cuda")


class FakeCudart:
    """torch.cuda.cudart() as a CPU test sees it: cudaHostRegister answers `error`; every call is logged."""

    def __init__(self, error: int):
        self.error, self.calls = error, []

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        self.calls.append(("register", nbytes))
        return self.error

    def cudaHostUnregister(self, ptr: int) -> int:
        self.calls.append(("unregister",))
        return 0

    def cudaGetLastError(self) -> int:
        self.calls.append(("clear",))
        return self.error

    def cudaGetErrorString(self, error: int) -> str:
        return "out of memory"


def test_a_failed_page_lock_allocates_nothing_on_the_gpu_and_clears_the_cuda_error(monkeypatch):
    from offload_engine.errors import one_line, user_error_types
    from offload_engine.expert_cache import ExpertCache
    from offload_engine.streams import HostLockError, HostStreams

    cudart = FakeCudart(error=2)  # cudaErrorMemoryAllocation
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    # Locking comes first: had the device slots been allocated before, this CPU build would fail there instead.
    with pytest.raises(HostLockError) as caught:
        ExpertCache(num_layers=32, num_experts=8, expert_nbytes=2**20, experts_on_device=5, prefetch=1,
                    device=torch.device("cuda"), streams=HostStreams())
    assert cudart.calls == [("register", 32 * 3 * 2**20), ("clear",)]
    message = one_line(caught.value)
    assert message == str(caught.value) and isinstance(caught.value, user_error_types())
    assert "0.09 GiB" in message and "32 layers x 3 experts x 1.0 MiB" in message and "out of memory" in message
    assert "offload.experts_on_device" in message


@pytest.mark.skipif(REAL_CUDA, reason="stands in a CPU build's failing CUDA allocation for a full GPU")
def test_a_failed_slot_allocation_unlocks_the_host_memory(monkeypatch):
    from offload_engine.expert_cache import ExpertCache
    from offload_engine.streams import HostStreams

    cudart = FakeCudart(error=0)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    with pytest.raises((RuntimeError, AssertionError)):  # torch without CUDA cannot allocate on "cuda"
        ExpertCache(num_layers=2, num_experts=8, expert_nbytes=4096, experts_on_device=5, prefetch=1,
                    device=torch.device("cuda"), streams=HostStreams())
    assert cudart.calls == [("register", 2 * 3 * 4096), ("unregister",)]


def test_the_cuda_error_is_cleared_in_libcudart_when_torch_has_no_binding_for_it(monkeypatch):
    """torch before 2.10 binds no cudaGetLastError: the error is cleared in the libcudart torch loaded."""
    import ctypes

    from offload_engine import streams

    class Library:
        def __init__(self, path: str):
            self.path = path

        def cudaGetLastError(self) -> int:
            cleared.append(self.path)
            return 2

    class OldCudart:
        pass

    cleared = []
    monkeypatch.setattr(streams, "_loaded_cudart_paths", lambda: {"/site-packages/torch/lib/libcudart-9a8b.so.12"})
    monkeypatch.setattr(ctypes, "CDLL", Library)
    streams.clear_cuda_error(OldCudart())
    assert cleared == ["/site-packages/torch/lib/libcudart-9a8b.so.12"]
    streams.clear_cuda_error(FakeCudart(error=2))  # the binding, when torch has it
    assert len(cleared) == 1
