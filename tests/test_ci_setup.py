"""The set-up the README gives a CPU-only user is the one CI runs (issue 19 items 8 and 11): the README's command
for torch's CPU build names the tested torch and the index .ci/run installs it from, its "Tested with" line names
the versions of .ci/tested-versions.txt, setup.cfg admits every tested version, and .ci/run runs the README's test
command. A pin raised in one place and not the others fails here, not on a user's machine."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
from pathlib import Path

import pytest

packaging_requirements = pytest.importorskip("packaging.requirements")

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI_RUN = ROOT / ".ci" / "run"


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "tested-versions.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"tested-versions.txt: {line!r} is not name==version"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_the_readmes_cpu_torch_command_is_the_one_ci_runs():
    torch = pinned_versions()["torch"]
    index = re.search(r'^CPU_INDEX=\$\{OFFLOAD_CI_TORCH_INDEX:-(\S+)\}$', CI_RUN.read_text(), re.M)
    assert index, ".ci/run no longer names PyTorch's CPU index"
    assert index[1] == "https://download.pytorch.org/whl/cpu"
    command = f"pip install torch=={torch} --index-url {index[1]}"
    assert re.search(rf"^{re.escape(command)}$", README, re.M), f"README lacks the line `{command}`"
    assert re.search(r'pip install .*"torch==\$TORCH" --index-url "\$CPU_INDEX"', CI_RUN.read_text())


def test_the_readme_states_the_tested_versions():
    pins = pinned_versions()
    line = re.search(r"^Tested with torch (\S+) \(CPU\), transformers (\S+) and hqq (\S+), with the other versions in",
                     README, re.M)
    assert line, "README lacks its `Tested with ...` line"
    assert line.groups() == (pins["torch"], pins["transformers"], pins["hqq"])


def test_the_package_metadata_admits_every_tested_version():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    requirements = [*setup["options"]["install_requires"].split("\n"),
                    *setup["options.extras_require"]["test"].split("\n")]
    pins = pinned_versions()
    checked = 0
    for text in filter(None, (r.strip() for r in requirements)):
        requirement = packaging_requirements.Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), (text, pins[name])
            checked += 1
    assert checked >= 10
    for name in ("torch", "transformers", "hqq"):  # capped at the tested release line (README: "2.x, 5.x, 0.2.x")
        (text,) = [r for r in requirements if r.strip().startswith(name)]
        assert "<" in text, f"setup.cfg: {text.strip()} has no upper bound"


def test_ci_run_is_executable_and_runs_the_readmes_test_command():
    assert os.access(CI_RUN, os.X_OK)
    assert subprocess.run(["bash", "-n", str(CI_RUN)], capture_output=True).returncode == 0
    assert "HF_HUB_OFFLINE=1 python -m pytest -q\n" in README
    assert re.search(r"^HF_HUB_OFFLINE=1 python -m pytest -q \|", CI_RUN.read_text(), re.M)
    assert 'pip install --quiet -e ".[test]" -c "$TESTED"' in CI_RUN.read_text()
