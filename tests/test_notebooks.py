"""The notebooks in notebooks/: stored without outputs, and each one runs top
to bottom headless (nbclient, kernel python3 from ipykernel) on the real model,
with every plot rendered.

The kernel gets `KERAS_LLM_WORKDIR` (one temporary directory for the four, in
order, also their working directory) for the files the notebooks write, so 04
reuses the export 03 wrote, as a user running them in turn would;
`KERAS_LLM_QUICK=1` (CI sets it in .ci/run) shortens the real-model runs, it
never skips a cell.
"""

import os
import pathlib
import tempfile

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = ["01_quickstart.ipynb", "02_optimize.ipynb", "03_export_and_serve.ipynb",
             "04_profile.ipynb"]
CELL_TIMEOUT_S = 1800  # a hang guard; the slowest cell (02: optimize) takes minutes
PLOT_TAG = "plot"  # cells tagged so must show at least one image/png output


def _read(name):
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def _listing():
    return sorted(p.name for p in REPO.iterdir()), sorted(p.name for p in NOTEBOOK_DIR.iterdir())


def test_every_notebook_is_listed_and_in_the_readme():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == NOTEBOOKS
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in NOTEBOOKS:
        assert f"(notebooks/{name})" in readme, name
    assert "KERAS_LLM_QUICK" in readme


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_notebook_has_no_outputs_and_plots_are_tagged(name):
    notebook = _read(name)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert any(PLOT_TAG in c.metadata.get("tags", []) for c in code)
    for cell in code:  # every cell that draws is checked for its image after a run
        if "plt.show()" in cell.source:
            assert PLOT_TAG in cell.metadata.get("tags", []), cell.source[:80]
    # TensorBoard's magics would start a server and wait: they stay in markdown.
    assert not any("%tensorboard" in c.source for c in code)


@pytest.fixture(scope="module")
def workdir():
    # Deleted afterwards: the notebooks write models of hundreds of MB.
    with tempfile.TemporaryDirectory(prefix="keras-llm-notebooks-") as path:
        yield pathlib.Path(path)


@pytest.mark.real_model
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_headless(name, workdir, tmp_path, monkeypatch):
    notebook = _read(name)
    monkeypatch.setenv("KERAS_LLM_WORKDIR", str(workdir))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws PNGs
    # The kernel (and any server it starts) imports this checkout, installed or not.
    path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    before = _listing()
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()  # raises CellExecutionError at the first cell that fails
    finally:
        nbformat.write(notebook, tmp_path / name)  # executed copy, for a look after a failure
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    for cell in code:
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source[:80]
        if PLOT_TAG in cell.metadata.get("tags", []):
            images = [o for o in cell.outputs
                      if o.output_type in ("display_data", "execute_result")
                      and "image/png" in o.get("data", {})]
            assert images, f"no image/png output from the plot cell: {cell.source[:80]}"
    assert _listing() == before  # nothing written into the checkout
