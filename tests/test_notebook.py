"""The analysis notebook runs top to bottom, headless, on the shipped data, and saves its plots."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def execute(name: str, timeout: int) -> str:
    """Run notebooks/<name> headless from its folder; its markdown outputs, joined."""
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    ).execute()
    outputs = "".join(
        str(output.get("data", {}).get("text/markdown", ""))
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )
    return outputs


def test_compare_runs_notebook_executes_and_saves_its_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_NOTEBOOK_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("RECSYS_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    monkeypatch.delenv("RECSYS_NOTEBOOK_RUNS", raising=False)
    outputs = execute("compare_runs.ipynb", timeout=900)
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    assert figures == {"training_curves.png", "ndcg_by_slice.png", "per_user_differences.png"}
    assert "Paired comparison against `sasrec`" in outputs


def test_browse_buy_notebook_executes_on_small_data_and_compares_variants(
    tmp_path, monkeypatch, retailrocket_files
):
    import numpy as np
    import pandas as pd

    shared = tmp_path / "shared"
    retailrocket_files(shared / "retailrocket_mb")
    # Two variants of two seeds each, as per_user.parquet files the study's runs would write.
    runs = tmp_path / "runs"
    rng = np.random.default_rng(0)
    for variant, shift in (("browse_buy_purchases", 0), ("browse_buy_typed", 3)):
        for seed in (1, 2):
            run = runs / f"{variant}_{seed}"
            run.mkdir(parents=True)
            ranks = rng.integers(1, 40, 50) + 10 - shift
            ndcg = np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0.0)
            pd.DataFrame(
                {
                    "user_id": np.arange(50),
                    "target_item_id": np.arange(50),
                    "rank": ranks,
                    "ndcg@10": ndcg,
                    "hr@10": (ranks <= 10).astype(float),
                }
            ).to_parquet(run / "per_user.parquet")
            (run / "config.yaml").write_text(f"seed: {seed}\nexperiment: {variant}\n")
            (run / "overrides.yaml").write_text(f"- experiment={variant}\n- seed={seed}\n")
    monkeypatch.setenv("RECSYS_SHARED_DATA", str(shared))
    monkeypatch.setenv("RECSYS_BROWSE_BUY_RUNS", str(runs))
    monkeypatch.setenv("RECSYS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RECSYS_NOTEBOOK_FIGURES", str(tmp_path / "figures"))
    outputs = execute("browse_buy.ipynb", timeout=600)
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"purchases_browsed_before.png"}
    assert "Paired comparison against `experiment=browse_buy_purchases (2 seeds)`" in outputs
    assert "experiment=browse_buy_typed (2 seeds)" in outputs


def test_offline_online_notebook_executes_and_saves_its_figures(tmp_path, monkeypatch):
    import numpy as np
    import pandas as pd

    # Two runs on the same 300 users (B puts the target higher more often) and A's pre-period.
    rng = np.random.default_rng(0)
    users, targets = np.arange(300), rng.integers(0, 500, 300)
    paths = []
    for name, lift in (("a", 0.2), ("b", 0.5), ("a_pre", 0.2)):
        lists, ranks = [], []
        for target in targets:
            items = [int(i) for i in rng.choice(np.setdiff1d(np.arange(500), [target]), 20, replace=False)]
            rank = int(rng.integers(1, 21)) if rng.random() < lift else 100
            if rank <= 20:
                items[rank - 1] = int(target)
            lists.append(items)
            ranks.append(rank)
        ranks = np.asarray(ranks)
        path = tmp_path / name
        path.mkdir()
        pd.DataFrame(
            {
                "user_id": users,
                "target_item_id": targets,
                "rank": ranks,
                "ndcg@10": np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0.0),
                "top_item_ids": lists,
            }
        ).to_parquet(path / "per_user.parquet")
        paths.append(str(path))
    monkeypatch.setenv("RECSYS_OFFLINE_ONLINE_RUNS", ",".join(paths))
    monkeypatch.setenv("RECSYS_NOTEBOOK_FIGURES", str(tmp_path / "figures"))
    outputs = execute("offline_online.ipynb", timeout=300)
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    assert figures == {"preference_share.png", "power_curves.png", "cuped_gain.png"}
    assert "Users needed for power 0.8" in outputs and "CUPED" in outputs
