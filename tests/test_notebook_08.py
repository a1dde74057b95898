"""Runs notebooks/08_attention_correspondence.ipynb headless (papermill) on its quick profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

papermill = pytest.importorskip("papermill")

QUICK = dict(
    model="tiny",
    dataset="synthetic",
    data_root=None,
    n_pairs=2,
    device="cpu",
    image_size=64,
    steps=5,
    lr=0.1,
    num_embeddings=2,
    inference_crops=2,
    progress=False,
)


@pytest.mark.notebooks
def test_notebook_08_quick_profile(tmp_path: Path) -> None:
    figures, results = tmp_path / "figures", tmp_path / "results"
    papermill.execute_notebook(
        str(REPO / "notebooks" / "08_attention_correspondence.ipynb"),
        str(tmp_path / "08_out.ipynb"),
        parameters=dict(QUICK, figures_dir=str(figures), results_dir=str(results)),
        kernel_name="python3",
        cwd=str(REPO),
        progress_bar=False,
    )
    for name in ("08_optimization.png", "08_attention_maps.png", "08_pck.png"):
        assert (figures / name).stat().st_size > 1000, name
    summary = json.loads((results / "08_attention.json").read_text())
    assert summary["random_weights"] is True and summary["model"] == "tiny"
    assert summary["n_pairs"] == 2 and summary["n_points"] >= 4
    assert all(0.0 <= v <= 100.0 for v in summary["pck"].values())
    assert summary["loss_first"] > 0 and summary["loss_last"] > 0 and summary["seconds_per_point"] > 0
