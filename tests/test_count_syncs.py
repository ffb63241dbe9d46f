"""scripts/count_syncs.py as a user runs it: its markdown table stays whole on the terminal (issue 19, item 10)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_count_syncs_prints_an_unbroken_markdown_table():
    # stdout and stderr into one pipe, as a terminal shows them; one decode step keeps it quick.
    done = subprocess.run([sys.executable, str(REPO / "scripts/count_syncs.py"), "--steps", "1"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout
    lines = [line for line in done.stdout.replace("\r", "\n").splitlines() if line.strip()]
    first = next(i for i, line in enumerate(lines) if line.startswith("| prefetch |"))
    syncs, ops = lines[first:first + 5], lines[first + 5:first + 10]  # then the torch ops per layer, same rows
    assert syncs[1] == "|---|---|---|---|" and ops[0].startswith("| prefetch | torch ops"), "\n".join(lines)
    for table in (syncs, ops):
        assert [row.split("|")[1].strip() for row in table[2:]] == ["0", "1", "2"], "\n".join(lines)
        assert all(row.startswith("|") and row.endswith("|") for row in table), "\n".join(lines)
        assert len({row.count("|") for row in table}) == 1, "\n".join(lines)
    assert len(lines) == first + 10, "\n".join(lines)
