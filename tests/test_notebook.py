"""experiments/quickstart.ipynb runs top to bottom in a headless kernel."""

import time
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs():
    notebook = nbformat.read(REPO / "experiments" / "quickstart.ipynb", as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    elapsed = time.perf_counter() - start
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "capacity factor 0.0: dropped   0 of 512 assignments; 0.0% of token outputs differ" \
        in outputs
    assert "cross-entropy: step 0" in outputs
    images = [o for c in notebook.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2
    assert elapsed < 120, elapsed
