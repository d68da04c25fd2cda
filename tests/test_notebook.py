"""examples/tour.ipynb: committed with its outputs, and it runs from top to bottom (in a copy
of examples/, kernels as plain Python: the same code without LLVM time)."""
from __future__ import annotations

import shutil

import pytest

from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

TOUR = ROOT / "examples" / "tour.ipynb"


def test_the_tour_is_committed_with_its_outputs():
    nb = nbformat.read(TOUR, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 6 and all(c.outputs for c in code)
    kinds = {o.output_type for c in code for o in c.outputs}
    assert "error" not in kinds
    outputs = [o for c in code for o in c.outputs]
    assert any("text/markdown" in o.get("data", {}) for o in outputs)  # the derivation, rendered
    assert any("image/png" in o.get("data", {}) for o in outputs)      # the plot


def test_the_tour_runs(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("figures"))
    monkeypatch.setenv("NUMBA_DISABLE_JIT", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(TOUR, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path / "examples")}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "central difference" in text and "steps; J = " in text
