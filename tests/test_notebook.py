"""experiments/quickstart.ipynb runs top to bottom in a headless kernel, and
what it shows is right: the token-dropping MoE at capacity factor 0 matches the
dMoE, and the tiny LM learns (its cross-entropy falls).

No wall-clock assertion: the kernel's timeout only stops a hung run."""

import re
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_notebook_runs():
    """Catches a notebook whose training does not train (planted by hand:
    a learning rate of 0 leaves step 59 at the step-0 loss)."""
    notebook = nbformat.read(REPO / "experiments" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
    outputs = "".join(
        o.get("text", "")
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    assert (
        "capacity factor 0.0: dropped   0 of 512 assignments; 0.0% of token outputs differ"
        in outputs
    )
    match = re.search(r"cross-entropy: step 0 ([\d.]+) .* step 59 ([\d.]+)", outputs)
    assert match, outputs[-2000:]
    first, last = map(float, match.groups())
    assert first == pytest.approx(5.545, abs=0.15)  # untrained: ~log 256
    assert last < first - 1.5, (first, last)  # bytes frequencies alone give ~3.0 nats
    images = [
        o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(images) == 2
