"""The GPU tools as CI can run them: scripts/gpu_check.py's dry run on the CPU (every check's code, tiny shapes,
the Triton interpreter), its JSON report, the copy-stream overlap arithmetic it asserts on a GPU, and
`scripts/bench_kernels.py --traffic`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_timing import overlap_ms, union  # noqa: E402


def test_gpu_check_dry_run_writes_a_report_of_every_check(tmp_path):
    pytest.importorskip("triton")
    report = tmp_path / "report.json"
    configs = ['{"offload": {"prefetch": 1}}', '{"offload": {"prefetch": 0, "cpu_compute": "always"}}',
               '{"offload": {"prefetch": 9}}']
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--report",
                             str(report), "--new-tokens", "4", "--configs", *configs], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert "all checks passed (dry run" in result.stdout
    data = json.loads(report.read_text())
    statuses = {check["name"]: check["status"] for check in data["checks"]}
    assert set(statuses.values()) <= {"passed", "skipped"}
    for name in ("Triton kernels equal the reference kernels on the device", "quantize_checkpoint on the device",
                 "unquantized float32 engine = transformers' Mixtral", "engine float32: fused and reference greedy "
                 "tokens equal"):
        assert statuses[name] == "passed", name
    for name in ("long prefill within the memory plan", "5.9 GiB page-locked at its exact size",
                 "copy-ins and write-backs overlap ({\"offload\": {\"prefetch\": 1}})"):
        assert statuses[name] == "skipped", name  # decided on a GPU only
    copied, hybrid, refused = data["decode"]
    assert copied["tokens_per_s"] > 0 and copied["copy_in_ms"] > 0 and copied["write_back_ms"] > 0
    assert copied["cpu_computed_per_token"] == 0
    assert hybrid["tokens_per_s"] > 0 and hybrid["cpu_computed_per_token"] > 0  # every miss on the CPU, nothing copied
    assert hybrid["copy_in_ms"] == 0 and hybrid["h2d_bytes_per_token"] == 0 and "always" in hybrid["cpu_compute"]
    assert "prefetch" in refused["error"] and "tokens_per_s" not in refused  # a bad config is reported, not fatal
    assert data["device"].startswith("none") and data["timings"]["total"] > 0


def test_overlap_counts_only_time_both_copy_streams_were_busy():
    copies = {"copy-in": [(0.0, 2.0), (1.0, 3.0), (10.0, 11.0)], "write-back": [(2.5, 4.0), (10.5, 12.0)]}
    assert union(copies["copy-in"]) == [(0.0, 3.0), (10.0, 11.0)]
    assert overlap_ms(copies) == pytest.approx(0.5 + 0.5)
    assert overlap_ms({"copy-in": [(0.0, 1.0)], "write-back": [(1.0, 2.0)]}) == 0.0  # back to back: a chain


def test_bench_kernels_traffic_prints_what_the_kernels_load_per_layer():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), "--traffic"],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "computed (kernels/geometry.py), not measured" in result.stdout
    assert "| w1, w3 | 4 | 22.13 | 14.68 | 14.68 |" in result.stdout  # each packed byte loaded once
    assert "per layer: 109.1 MB of codes loaded, 16 launches" in result.stdout
