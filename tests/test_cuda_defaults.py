"""CUDA defaults decided without a GPU (issues 15, 21): the demo's dtype, where pre-quantized bytes were made, and
the CPU tests on a machine that has a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload_engine import cli
from offload_engine.prequantized import quantize_checkpoint


@pytest.mark.parametrize("capability,dtype", [((7, 5), "float16"), ((8, 0), "bfloat16")])
def test_demo_picks_float16_on_gpus_without_fast_bfloat16(monkeypatch, capability, dtype):
    if not (cli.demo_dir() / "config.json").exists():
        pytest.skip("the demo model is not installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)  # T4: 7.5, A100: 8.0
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
    from offload_engine.engine import default_device

    assert default_device() == torch.device("cpu") and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    if (cli.demo_dir() / "config.json").exists():
        assert cli.resolve_setup(cli.build_parser().parse_args(["--demo"])).device == torch.device("cpu")
    monkeypatch.undo()  # without conftest's pin, the fake GPU would be the default
    assert torch.cuda.is_available() and default_device() == torch.device("cuda")
