"""CUDA defaults decided without a GPU (issue 15): the demo's dtype, and where pre-quantized bytes were made."""

from __future__ import annotations

import json

import pytest
import torch

from offload_engine import cli, quantize_checkpoint
from offload_engine.checkpoint import DEMO_DIR


@pytest.mark.parametrize("capability,dtype", [((7, 5), "float16"), ((8, 0), "bfloat16")])
def test_demo_picks_float16_on_gpus_without_fast_bfloat16(monkeypatch, capability, dtype):
    if not (DEMO_DIR / "config.json").exists():
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
