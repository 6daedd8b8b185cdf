"""Every notebook executes, top to bottom, at tiny settings (so none can rot)."""

import glob
import json
import os
import sys

import nbformat
import pytest
from helpers import DEADLINE_S, REPO, framework_config
from nbclient import NotebookClient

from simco_jax import train

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory):
    """A smoke training run (4 steps) whose checkpoint the analysis notebook restores."""
    workdir = str(tmp_path_factory.mktemp("notebook_run"))
    train.train_and_evaluate(framework_config("simco", max_steps=4), workdir)
    return workdir


@pytest.fixture()
def kernel_env(tmp_path, monkeypatch):
    """A 'python3' kernel spec that runs *this* interpreter, found first on JUPYTER_PATH."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("SIMCO_NOTEBOOK_SMOKE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws PNGs


def test_notebooks_are_stored_without_outputs():
    assert {os.path.basename(p) for p in NOTEBOOKS} >= {
        "ablations.ipynb",
        "dual_temperature_analysis.ipynb",
    }
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path


@pytest.mark.parametrize("name", [os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes(name, kernel_env, checkpoint_run, monkeypatch):
    # As the README runs them: paths relative to the repository root, while the kernel runs in
    # notebooks/ (as under Jupyter), where neither path exists.
    checkpoint = os.path.relpath(checkpoint_run, REPO)
    results = os.path.join("notebooks", "example_results")
    for path in (checkpoint, results):
        assert not os.path.exists(os.path.join(REPO, "notebooks", path))
    monkeypatch.setenv("SIMCO_CHECKPOINT", checkpoint)
    monkeypatch.setenv("SIMCO_SWEEP_RESULTS", results)
    notebook = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=None,  # no cell deadline: a loaded machine may be slow; a failure raises
        startup_timeout=int(DEADLINE_S),
        resources={"metadata": {"path": os.path.join(REPO, "notebooks")}},
    )
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
    text = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    images = sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    expected_figures = {"dual_temperature_analysis.ipynb": 2, "ablations.ipynb": 4}
    assert images >= expected_figures.get(name, 1), f"{name} drew {images} figures"
    if name == "dual_temperature_analysis.ipynb":
        assert "autodiff == scalar x vector" in text
        assert "InfoNCE (dt_m=1): effective fraction" in text  # the checkpoint section ran
    else:  # the example tables, found through the relative path
        assert "batch_size: " in text and "rows, columns" in text
