"""The analysis notebook runs top to bottom, headless, on the shipped data, and saves its plots."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_compare_runs_notebook_executes_and_saves_its_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_NOTEBOOK_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("RECSYS_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    monkeypatch.delenv("RECSYS_NOTEBOOK_RUNS", raising=False)
    notebook = nbformat.read(ROOT / "notebooks" / "compare_runs.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    ).execute()
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    assert figures == {"training_curves.png", "ndcg_by_slice.png", "per_user_differences.png"}
    outputs = "".join(
        str(output.get("data", {}).get("text/markdown", ""))
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )
    assert "Paired comparison against `sasrec`" in outputs
