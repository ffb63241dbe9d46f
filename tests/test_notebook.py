"""notebooks/colab_t4.ipynb runs top to bottom (CPU, the demo model), so it cannot rot (issue 13), and it runs as
on Colab: from the clone's parent directory (issue 19: a clone named `offload_engine` there was imported as an
empty namespace package instead of the installed package)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import torch

import offload_engine
from offload_engine.config import load_config
from offload_engine.loader import demo_config

nbformat = pytest.importorskip("nbformat")  # in the `test` extra: CI installs it
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def test_colab_notebook_runs_with_the_demo_model_from_the_clones_parent(tmp_path, monkeypatch):
    """The kernel starts in a Colab-like /content holding the clone (`offload-engine`, as the README says) and
    a folder named offload_engine (a clone under the name the README used to give, or anything else): the
    install cell must import the clone's package, not that folder."""
    content = tmp_path / "content"
    content.mkdir()
    (content / "offload-engine").symlink_to(ROOT, target_is_directory=True)
    (content / "offload_engine").symlink_to(ROOT, target_is_directory=True)
    try:
        version("offload_engine")
        # Installed (CI: `pip install -e .`): the kernel finds the package as a user's does, through the install,
        # not through a PYTHONPATH entry (which would win over the folder in the working directory by itself).
        monkeypatch.delenv("PYTHONPATH", raising=False)
    except PackageNotFoundError:
        pass  # the install cell would pip-install: keep PYTHONPATH, the test then cannot show the shadowing

    nb = nbformat.read(ROOT / "notebooks/colab_t4.ipynb", as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source += '\nMODEL = "demo"\nMAX_NEW_TOKENS = 8\n'  # what papermill would inject
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(content)}}).execute()
    outputs = {i: "".join(o.get("text", "") for o in c.get("outputs", [])) for i, c in enumerate(nb.cells)
               if c.cell_type == "code"}
    text = "\n".join(outputs.values())
    assert f"from {content / 'offload-engine' / 'offload_engine' / '__init__.py'}" in text
    assert "4/8 experts per layer" in text
    assert text.count(">>> ") == 2  # both chat turns ran
    assert "expert cache since loading" in text and "hit rate by layer" in text  # the /stats report
    assert "decode steps" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the profiler's hit-rate plot


def test_the_notebooks_demo_is_the_demos_one_set_up(monkeypatch, capsys, one_thread):
    """MODEL = "demo" in the notebook loads the demo as offload-chat --demo and load("demo") do (issue 19 item 2: one
    name, one set-up): the load cell leaves the config to the package instead of spelling out a set-up of its own
    (which, on a T4, also loaded bfloat16 and converted it to float16 with a warning where the demo's set-up asks for
    float16)."""
    nb = nbformat.read(ROOT / "notebooks/colab_t4.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and "engine = load(" in c.source]
    calls, real_load = [], offload_engine.load

    def recording_load(model, config=None, device=None, progress=True):
        calls.append((model, config))
        return real_load(model, config=config, device=device, progress=False)

    monkeypatch.setattr(offload_engine, "load", recording_load)
    namespace = {"MODEL": "demo", "CONFIG": "t4-16gb"}
    exec(compile(cell.source, "colab_t4.ipynb: load cell", "exec"), namespace)
    assert calls == [("demo", None)], calls  # the package's demo set-up (loader.demo_config), not the notebook's
    loaded = namespace["engine"].config.to_dict()
    planned = load_config(demo_config(torch.device("cpu"))).to_dict()
    assert {key: loaded["offload"][key] for key in ("experts_on_device", "prefetch", "policy")} == {
        key: planned["offload"][key] for key in ("experts_on_device", "prefetch", "policy")}
    assert "4/8 experts per layer on the device, prefetch 1" in capsys.readouterr().out
