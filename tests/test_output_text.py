"""What the tools print agrees with what they do and with the README (issue 19, item 10): a full disk during a
conversion is named (file, space needed), plan_memory.py prints the README's table, quantize.py's help states
the peak disk the streamed conversion keeps to (measured in test_hub_conversion.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICK = {"dtype": "float32", "quant": {"attention": {"bits": 4, "group_size": 64, "optimize": False},
                                       "experts": {"bits": 2, "group_size": 16, "optimize": False}}}

# quantize.py run as a user runs it, except that the disk fills up at the 6th write (after the 4 file headers).
FULL_DISK = """
import errno, os, runpy, sys
real, calls = os.pwrite, [0]
def pwrite(fd, data, offset):
    calls[0] += 1
    if calls[0] >= 6:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd, data, offset)
os.pwrite = pwrite
sys.argv = ["scripts/quantize.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_a_full_disk_names_the_file_and_the_space_needed_then_the_conversion_resumes(tiny_dir, tmp_path):
    config = tmp_path / "quick.json"  # YAML is a superset of JSON
    config.write_text(json.dumps(QUICK))
    args = [str(tiny_dir), str(tmp_path / "out"), "--config", str(config), "--device", "cpu", "--quiet"]
    full = subprocess.run([sys.executable, "-c", FULL_DISK, *args], capture_output=True, text=True, env=env(),
                          cwd=REPO, timeout=300)
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert full.returncode == 2 and len(lines) == 1, full.stderr[-3000:]
    line = lines[0]
    assert re.search(r"error: the disk is full: writing \S+/\.out\.partial-\w+/(layer-\d{3}|trunk)\.safetensors "
                     r"failed", line), line
    number, unit = re.search(r"needs about ([\d.]+) (MB|GB) more", line).groups()
    assert "run the same command again" in line
    resumed = subprocess.run([sys.executable, "scripts/quantize.py", *args], capture_output=True, text=True,
                             env=env(), cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "out" / "offload_manifest.json").exists()
    output = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert 0 < float(number) * {"MB": 1e6, "GB": 1e9}[unit] <= output  # what was left to write, at most all of it


def table_rows(text: str, header_start: str) -> list[str]:
    """The markdown table whose header line starts with `header_start`: its lines."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_plan_memory_prints_the_readme_table():
    done = subprocess.run([sys.executable, "scripts/plan_memory.py"], capture_output=True, text=True, env=env(),
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = table_rows(done.stdout, "| config |")
    assert len(printed) == 9  # header, rule, the four GPU configs (three with and without room for every expert)
    assert table_rows((REPO / "README.md").read_text(encoding="utf-8"), "| config | free VRAM |") == printed


def test_quantize_help_states_the_peak_disk_the_readme_states():
    done = subprocess.run([sys.executable, "scripts/quantize.py", "--help"], capture_output=True, text=True,
                          env=env(), cwd=REPO, timeout=120)
    assert done.returncode == 0
    help_text = " ".join(done.stdout.split())
    assert "peak disk: the output plus one shard" in help_text
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert "Peak disk (streamed) = output + one shard" in readme
    run_doc = " ".join((REPO / "offload_engine/convert/run.py").read_text(encoding="utf-8").split())
    assert "peak disk is the output plus one shard" in run_doc
