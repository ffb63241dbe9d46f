"""notebooks/colab_t4.ipynb runs top to bottom (CPU, the demo model), so it cannot rot (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # in the `test` extra: CI installs it
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def test_colab_notebook_runs_with_the_demo_model(tmp_path):
    nb = nbformat.read(ROOT / "notebooks/colab_t4.ipynb", as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source += '\nMODEL = "demo"\nMAX_NEW_TOKENS = 8\n'  # what papermill would inject
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = {i: "".join(o.get("text", "") for o in c.get("outputs", [])) for i, c in enumerate(nb.cells)
               if c.cell_type == "code"}
    text = "\n".join(outputs.values())
    assert "offload_engine" in text and "4/8 experts per layer" in text
    assert text.count(">>> ") == 2  # both chat turns ran
    assert "expert cache since loading" in text and "hit rate by layer" in text  # the /stats report
    assert "decode steps" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the profiler's hit-rate plot
