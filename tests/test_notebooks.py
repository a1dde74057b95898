"""Every notebook through papermill on its quick profile (`sdm.runner.QUICK`), and the notebook hygiene rules.

The quick profile uses a tiny random-weight model on synthetic pairs: the checks are that each notebook runs,
writes its figures and results, and that the numbers are well formed, in range and labelled as coming from
random weights.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import pytest
import torch

from sdm.runner import (
    QUICK,
    QUICK_SHARED,
    READS_FROM,
    find_notebooks,
    notebook_key,
    notebook_parameters,
    profile_parameters,
    run_order,
)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = find_notebooks(REPO / "notebooks")

papermill = pytest.importorskip("papermill")


def _pck_ok(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 100.0


def _labelled(summary: dict[str, Any]) -> None:
    assert summary["random_weights"] is True
    assert summary["model"] == "tiny"
    assert "random" in summary["note"]


def _figures(figures: Path, *names: str) -> None:
    for name in names:
        assert (figures / name).stat().st_size > 1000, name


def check_00(figures: Path, results: Path) -> None:
    _figures(figures, "00_correspondences.png", "00_heatmaps.png")
    s = json.loads((results / "00_quickstart.json").read_text())
    _labelled(s)
    assert len(s["matched"]) == len(s["src_points"]) == len(s["true"]) == QUICK["00"]["n_points"]
    size = QUICK["00"]["image_size"]
    assert all(-0.5 <= c <= size - 0.5 for xy in s["matched"] for c in xy)
    assert _pck_ok(s["pck@0.1"]) and s["seconds"] > 0


def check_01(figures: Path, results: Path) -> None:
    _figures(figures, "01_prompt_types.png")
    s = json.loads((results / "01_prompt_types.json").read_text())
    _labelled(s)
    assert set(s["pck@0.1"]) == {"DIFT*", "SD+DINO*"}
    for row in s["pck@0.1"].values():
        assert set(row) == {"empty", "template", "captioner"} and all(_pck_ok(v) for v in row.values())
    assert s["prompt_labels"]["captioner"] == "captioner (trained on synthetic)"  # notebook 02's, not trained in 01
    assert s["dift_similarity"] == "dot" and s["fusion"]["similarity"] == "dot" and s["fusion"]["dino_input"] == "vae"
    assert all(_pck_ok(v) for table in s["pck"].values() for v in table.values())
    csv = (results / "01_prompt_types.csv").read_text().splitlines()
    assert len(csv) == 1 + 6 and csv[0].endswith(",all,mean of categories")  # both overall means (docs/protocols.md)


def check_02(figures: Path, results: Path) -> None:
    s = json.loads((results / "02_train.json").read_text())
    _labelled(s)
    runs = QUICK["02"]["runs"]
    assert list(s["runs"]) == [f"{kind}_{name}" for kind, name in runs]
    for kind, name in runs:
        _figures(figures, f"02_{kind}_{name}_curves.png")
        run = s["runs"][f"{kind}_{name}"]
        assert run["steps"] == QUICK["02"]["steps"] and run["loss_first"] > 0 and run["loss_last"] > 0
        assert run["val_pck"] and all(_pck_ok(v) for v in run["val_pck"].values())
        assert run["selected"] == "best" and run["best_step"] in {int(k) for k in run["val_pck"]}
        meta = json.loads((results / f"02_{kind}_{name}_prompt.json").read_text())
        assert meta["kind"] == kind and meta["trained_on"]["dataset"] == name and meta["trained_on"]["split"] == "trn"
        assert meta["trained_on"]["dino"] == ("random weights (tiny)" if kind == "cpm" else None)
        assert (results / f"02_{kind}_{name}_prompt.safetensors").is_file()
        log = (results / f"02_train_{kind}_{name}_log.csv").read_text().splitlines()
        assert log[0].startswith("# random weights") and log[1] == "step,loss,val_pck" and len(log) == 2 + QUICK["02"]["steps"]


def check_03(figures: Path, results: Path) -> None:
    _figures(figures, "03_synthetic_table.png", "03_overall.png")
    s = json.loads((results / "03_evaluate.json").read_text())
    _labelled(s)
    assert set(s["pck@0.1"]) == {"synthetic"} and s["n_pairs"] == {"synthetic": QUICK["03"]["n_pairs"]}
    methods = s["pck@0.1"]["synthetic"]
    learned = [m for m in methods if "trained on synthetic" in m]
    assert [m.split(" ")[0] for m in learned] == ["single", "class", "cpm"] and len(methods) == 5
    assert any(m.startswith("DIFT") for m in methods) and "DINOv2 (tiny, random weights)" in methods
    assert {Path(p).name for p in s["prompts"].values()} == {f"02_{k}_synthetic_prompt.safetensors" for k in ("single", "class", "cpm")}
    for row in methods.values():
        assert "all" in row and all(_pck_ok(v) for v in row.values())
    assert (results / "03_synthetic_pck.csv").read_text().splitlines()[0].endswith(",all")
    assert all(p["pairs"] == QUICK["03"]["n_pairs"] and p["random_weights"] for p in s["protocol"]["synthetic"].values())


def check_04(figures: Path, results: Path) -> None:
    from sdm.config import CPM_ABLATIONS

    _figures(figures, "04_cpm_ablation.png")
    s = json.loads((results / "04_cpm_ablation.json").read_text())
    _labelled(s)
    assert list(s["cases"]) == list(CPM_ABLATIONS)
    for case, row in s["cases"].items():
        assert row["config"] == CPM_ABLATIONS[case] and "trained here" in row["label"]
        assert all(_pck_ok(v) for k, v in row.items() if "@" in k) and row["seconds"] > 0


def check_05(figures: Path, results: Path) -> None:
    _figures(figures, "05_timestep.png", "05_up_block.png", "05_inversion.png")
    s = json.loads((results / "05_timestep_sweep.json").read_text())
    _labelled(s)
    assert s["ddim_add_noise_equals_ddpm"] is True
    q = QUICK["05"]
    for key, xs, n_series in (("timestep", q["timesteps"], 2), ("up_block", [0, 1, 2, 3], 2), ("inversion", q["inversion_timesteps"], 4)):
        curves = s[key]["pck@0.1"]
        assert len(curves) == n_series
        assert all(len(v) == len(xs) and all(_pck_ok(x) for x in v) for v in curves.values()), key
    assert all(len(shape) == 3 for shape in s["up_block"]["shape"].values())


def check_06(figures: Path, results: Path) -> None:
    _figures(figures, "06_class_prompts.png", "06_cpm_prompts.png")
    s = json.loads((results / "06_prompt_to_image.json").read_text())
    _labelled(s)
    assert s["class_prompt"] == "class (trained on synthetic)" and s["cpm_prompt"] == "cpm (trained on synthetic)"
    q = QUICK["06"]
    assert len(s["class_images"]) == q["n_categories"] and len(s["cpm_images"]) == q["n_pairs"]
    for stats in [*s["class_images"].values(), *s["cpm_images"].values()]:
        assert stats["size"] == [QUICK_SHARED["image_size"]] * 2 and 0 <= stats["mean"] <= 1 and stats["std"] >= 0


def check_07(figures: Path, results: Path) -> None:
    _figures(figures, "07_correlation_maps.png")
    s = json.loads((results / "07_correlation_maps.json").read_text())
    _labelled(s)
    assert len(s["methods"]) == 2 and s["n_pairs"] == QUICK["07"]["n_pairs"]
    for row in s["methods"].values():
        assert _pck_ok(row["pck@0.1"]) and row["points"] == QUICK["07"]["n_pairs"] * QUICK["07"]["n_points"]
        assert -1.0 <= row["mean_peak_cosine"] <= 1.0 + 1e-6


def check_08(figures: Path, results: Path) -> None:
    _figures(figures, "08_optimization.png", "08_attention_maps.png", "08_pck.png")
    s = json.loads((results / "08_attention.json").read_text())
    _labelled(s)
    assert s["n_pairs"] == QUICK["08"]["n_pairs"] and s["n_points"] >= 4
    assert all(_pck_ok(v) for v in s["pck"].values())
    assert s["loss_first"] > 0 and s["loss_last"] > 0 and s["seconds_per_point"] > 0


def check_09(figures: Path, results: Path) -> None:
    _figures(figures, "09_leaderboard_per_image.png", "09_leaderboard_per_point.png")
    s = json.loads((results / "09_leaderboard.json").read_text())
    _labelled(s)
    rows = s["rows"]
    assert {r["method"] for r in rows} == set(QUICK["09"]["methods"]) and {r["benchmark"] for r in rows} == {"synthetic"}
    assert all(_pck_ok(r["per image"]) and _pck_ok(r["per point"]) for r in rows)
    assert all(r["random weights"] is True for r in rows)  # every row of the quick profile says so
    assert {r["method"]: r["pairs"] for r in rows}["hedlin"] == QUICK["09"]["hedlin_pairs"]
    assert all(r["pairs"] == QUICK["09"]["n_pairs"] for r in rows if r["method"] != "hedlin") and s["skipped"] == {}
    table = pd.read_csv(results / "09_leaderboard.csv")
    assert len(table) == len(rows)


CHECKS: dict[str, Callable[[Path, Path], None]] = {name[-2:]: fn for name, fn in globals().items() if name.startswith("check_")}


# Notebooks that read what another one wrote (01, 03, 05, 06 and 07 use the prompts 02 trained) run after it, as in
# `sdm notebooks`; 02 runs once per test session.


def test_run_order_puts_readers_after_their_upstream() -> None:
    paths = [Path(f"{k}_x.ipynb") for k in ("00", "01", "02", "03", "04", "08")]
    assert [notebook_key(p) for p in run_order(paths)] == ["00", "02", "01", "03", "04", "08"]
    assert [notebook_key(p) for p in run_order(paths[:2])] == ["00", "01"]  # 02 not run: 01 reads what is there


@pytest.fixture(scope="session")
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return {}


def run(path: Path, tmp_path: Path, done: dict[str, tuple[Path, Path]] | None = None) -> tuple[Path, Path]:
    key = notebook_key(path)
    if done is not None and key in done:
        return done[key]
    figures, results = tmp_path / "figures", tmp_path / "results"
    if done is not None and key in READS_FROM:
        (upstream,) = [p for p in NOTEBOOKS if notebook_key(p) == READS_FROM[key]]
        (tmp_path / "upstream").mkdir()
        _, written = run(upstream, tmp_path / "upstream", done)
        shutil.copytree(written, results, dirs_exist_ok=True)
    papermill.execute_notebook(
        str(path),
        str(tmp_path / path.name),
        parameters=profile_parameters(path, "quick", figures, results),
        kernel_name="python3",
        cwd=str(REPO),
        progress_bar=False,
    )
    if done is not None and key in READS_FROM.values():
        done[key] = figures, results
    return figures, results


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_quick_profile(path: Path, tmp_path: Path, quick_runs: dict[str, tuple[Path, Path]]) -> None:
    check = CHECKS.get(notebook_key(path))
    assert check is not None, f"no check for {path.name}: add check_{notebook_key(path)} to this file"
    check(*run(path, tmp_path, quick_runs))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_clean(path: Path) -> None:
    """Committed notebooks carry no outputs or execution counts, and one `parameters` cell of plain assignments
    that sets where figures and results go; the quick profile only overrides parameters the notebook has."""
    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a cell has outputs (clear them before committing)"
            assert cell.execution_count is None, f"{path.name}: a cell has an execution count"
            assert "%matplotlib widget" not in cell.source and "pip install" not in cell.source
            assert ".cuda()" not in cell.source, f"{path.name}: use the device parameter, not .cuda()"
            lines = [line for line in cell.source.splitlines() if line.strip()]
            if "parameters" not in cell.metadata.get("tags", []):
                assert len(lines) <= 15, f"{path.name}: a code cell of {len(lines)} lines (at most 15: calls and plots; move logic to sdm)"
    assert nb.cells[0].cell_type == "markdown"
    params = notebook_parameters(path)
    assert set(papermill.inspect_notebook(str(path))) == set(params), "papermill cannot parse every parameter line"
    assert {"model", "device", "figures_dir", "results_dir"} <= set(params)
    assert params["model"] != "tiny" and params["device"] == "cuda", "defaults are the paper's settings"
    unknown = set(QUICK.get(notebook_key(path), {})) - set(params)
    assert not unknown, f"QUICK[{notebook_key(path)!r}] sets parameters {path.name} does not have: {unknown}"


def test_point_picker_follows_clicks_and_sliders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Notebook 00's picker: it draws the first source point at once; a click on the source image (ipyevents'
    message, as the browser sends it) draws the clicked pixel's match once; a slider redraws it too (the widget
    without a browser: tests/test_browser.py clicks in JupyterLab)."""
    from ipyevents import Event
    from ipywidgets.widgets.widget import _instances

    import sdm.viz
    from sdm.data import SyntheticPairs
    from sdm.notebooks import point_picker

    drawn: list[list[float]] = []
    monkeypatch.setattr(sdm.viz, "plot_correspondences", lambda src, trg, q, pred, **k: drawn.append(q[0].tolist() + pred[0].tolist()))
    pair = SyntheticPairs(n=1, image_size=64, seed=0, n_kps=3)[0]
    feats = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    box = point_picker(pair, feats[:1], feats[1:], (64, 64), "nearest", title="test")
    _hint, picture, sliders, _out = box.children
    x_slider, _y_slider = sliders.children
    assert drawn[0][:2] == [float(int(pair.src_kps[0, 0])), float(int(pair.src_kps[0, 1]))] and x_slider.max == 63
    clicks = [e for e in list(_instances.values()) if isinstance(e, Event) and e.source is picture]
    clicks[0]._handle_mouse_msg(None, {"event": "click", "dataX": 40, "dataY": 70}, [])  # y beyond the image: clamped
    assert [d[:2] for d in drawn[1:]] == [[40.0, 63.0]]
    x_slider.value = 10
    assert [d[:2] for d in drawn[2:]] == [[10.0, 63.0]]
    assert all(0 <= v <= 63 for d in drawn for v in d[2:])  # matches inside the target


def test_every_notebook_has_a_profile_and_a_check() -> None:
    keys = {notebook_key(p) for p in NOTEBOOKS}
    assert {f"{i:02d}" for i in range(10)} <= keys
    assert keys <= set(QUICK) and keys <= set(CHECKS)


@pytest.mark.notebooks
@pytest.mark.slow
def test_cli_runs_one_notebook(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdm.cli import main

    out = tmp_path / "tmp"
    assert main(["notebooks", "--only", "00", "--profile", "quick", "--out", str(out), "--notebooks", str(REPO / "notebooks")]) == 0
    text = capsys.readouterr().out
    assert "00_quickstart.ipynb" in text and "ok" in text and "random-weight" in text
    assert (out / "notebooks" / "quick" / "00_quickstart.ipynb").is_file()
    assert (out / "figures" / "00_correspondences.png").is_file()
    assert json.loads((out / "results" / "00_quickstart.json").read_text())["random_weights"] is True
    executed = nbformat.read(str(out / "notebooks" / "quick" / "00_quickstart.ipynb"), as_version=4)
    assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")


def test_only_rejects_unknown_notebook(tmp_path: Path) -> None:
    from sdm.runner import run_notebooks

    with pytest.raises(ValueError, match="no notebook"):
        run_notebooks("quick", ["99"], tmp_path, notebooks_dir=REPO / "notebooks", progress=False)


def test_pair_subset_spreads_over_the_dataset() -> None:
    from sdm.data import SyntheticPairs
    from sdm.notebooks import PairSubset, subset

    ds = SyntheticPairs(n=12, image_size=64, n_kps=3)
    sub = subset(ds, 4)
    assert isinstance(sub, PairSubset) and len(sub) == 4 and sub.indices == [0, 3, 6, 9]
    assert sub[1].pair_id == ds[3].pair_id and sub.categories == ds.categories and sub.image_size == ds.image_size
    sub.decode_images = False
    assert ds.decode_images is False
    ds.decode_images = True
    assert subset(ds, None) is ds and subset(ds, 50) is ds


def test_profiles_and_summary(tmp_path: Path) -> None:
    from sdm.runner import summary_table

    path = REPO / "notebooks" / "00_quickstart.ipynb"
    paper = profile_parameters(path, "paper", tmp_path / "f", tmp_path / "r")
    assert paper == {"figures_dir": str(tmp_path / "f"), "results_dir": str(tmp_path / "r")}
    quick = profile_parameters(path, "quick", "f", "r")
    assert quick["model"] == "tiny" and quick["interactive"] is False and "data_root" not in quick
    with pytest.raises(ValueError, match="profile"):
        profile_parameters(path, "fast", "f", "r")
    text = summary_table(
        [{"notebook": "00_x.ipynb", "status": "failed", "seconds": 1.5, "output": "o", "figures": ["a/00.png"], "results": ["r/sub/"], "error": "Boom: x"}]
    )
    assert "00_x.ipynb" in text and "00.png" in text and "sub/" in text and "Boom" in text and "0 ok" in text
