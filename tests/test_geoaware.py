"""GeoAware-SC's geometry-aware subset: their lists, the authors' reading of them, the rule, and its PCK on a
SPair-71k folder written by the test (values by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdm.data import SPair71k
from sdm.data.geoaware import AP10K_GEO_AWARE, SPAIR_GEO_AWARE, effective_groups, geo_aware_flags
from sdm.evaluate import evaluate_predictions, geo_aware_pck

# GeoAware-SC (github Junyi42/GeoAware-SC, 99fd6b6), utils/utils_geoware.py:6-43 and :45-53, as written there
# (their "+2" offsets kept), held here as data to compare with sdm's transcription.
THEIR_SPAIR = {
    "aeroplane": [0, 1, 2, 3, [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15], [16, 17], [18, 19], [20, 21], 22, 23, 24],
    "bicycle": [0, 1, [2, 3], 4, 5, [6, 7], 8, [9, 10], 11 + 2],
    "bird": [0, [1, 2], 3, 4, 5, 6, 7, 8, 9, [10, 11], [12, 13], [14, 15], 16],
    "boat": [0, [1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], 13],
    "bottle": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]],
    "bus": [[0, 1], [2, 3, 5, 6], [4, 7], [8 + 2, 11 + 2, 18 + 2, 21 + 2], [9 + 2, 12 + 2, 19 + 2, 22 + 2],
            [10 + 2, 13 + 2, 20 + 2, 23 + 2], [14 + 2, 15 + 2, 24 + 2, 25 + 2], [16 + 2, 17 + 2, 26 + 2, 27 + 2]],
    "car": [[0, 1], [2, 3, 6, 7], [4, 8], [5, 9], [10, 13, 20, 23], [11, 14, 21, 24], [12, 15, 22, 25], [16, 17, 26, 27], [18, 19, 28, 29]],
    "cat": [0, 1, [2, 3], 4, 5, 6, 7, 8, [9, 10, 11, 12], 13, 14],
    "chair": [[0, 1], [2, 3], [4, 5, 6, 7], [8, 9], [10, 11], [12, 13]],
    "cow": [0, 1, [2, 3], 4, 5, 6, 7, 8, [9, 10, 11, 12], 13, 14, [15, 16, 17, 18], [19, 20]],
    "dog": [0, 1, [2, 3], 4, 5, 6, 7, 8, [9, 10, 11, 12], 13, 14, 15],
    "horse": [0, 1, [2, 3], 4, 5, 6, 7, 8, 9, [10, 11, 12, 13], 14, 15, [16, 17, 18, 19]],
    "motorbike": [[0, 1], [2, 3], 4, 5, 6, 7, 8, 9, 10, 11, 12],
    "person": [0, 1, 2, 3, 4, 5, 6, 7, [8, 9], [10, 11], [12, 13], [14, 15], [16, 17], [18, 19]],
    "pottedplant": [[0, 1, 2, 3], [4, 5], [6, 8], 7],
    "sheep": [0, 1, [2, 3], 4, 5, 6, 7, 8, [9, 10, 11, 12], 13, 14, [15, 16, 17, 18], [19, 20]],
    "train": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15], [16, 17]],
    "tvmonitor": [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]],
}
THEIR_AP10K = [0, 1, 2, 3, 4, [5, 8], [6, 9, 12, 15], [7, 10, 13, 16], [11, 14]]


def test_lists_are_geoaware_scs_for_every_category() -> None:
    assert SPAIR_GEO_AWARE == THEIR_SPAIR
    assert AP10K_GEO_AWARE == THEIR_AP10K


def test_the_authors_reading_renumbers_in_list_order() -> None:
    """Junyi42/GeoAware-SC pck_train.py:97-102 renumbers the kept groups by counting through them; the points are ranked by id. By hand:
    AP-10K's shoulders [5, 8] become ids [5, 6], tvmonitor's outer corners [0, 2, 4, 6] become [0, 1, 2, 3]."""
    assert effective_groups(AP10K_GEO_AWARE, range(17)) == [[0], [1], [2], [3], [4], [5, 6], [7, 8, 9, 10], [11, 12, 13, 14], [15, 16]]
    assert effective_groups(AP10K_GEO_AWARE, range(17), "as-listed")[5:] == [[5, 8], [6, 9, 12, 15], [7, 10, 13, 16], [11, 14]]
    assert effective_groups(SPAIR_GEO_AWARE["tvmonitor"], range(16))[0] == [0, 1, 2, 3]
    # ids in ascending order: both readings agree, unused ids drop out (bicycle's 11 and 12 are never annotated)
    used = [*range(11), 13]
    assert effective_groups(SPAIR_GEO_AWARE["bicycle"], used) == effective_groups(SPAIR_GEO_AWARE["bicycle"], used, "as-listed")
    assert effective_groups(SPAIR_GEO_AWARE["bicycle"], used)[-1] == [13]
    # a group whose ids are partly unused: the authors' count continues over the kept ids only
    assert effective_groups([[0, 3], [1, 2]], [0, 1, 2]) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="as-listed"):
        effective_groups([0], [0], "mirrored")  # type: ignore[arg-type]


def test_rule_two_in_the_target_one_in_both() -> None:
    groups = [[2, 3], [4], [9, 10]]
    assert geo_aware_flags(groups, [2, 4, 9], {2, 3, 4, 9}) == [True, False, False]
    assert geo_aware_flags(groups, [2, 9], {2, 4, 9, 10}) == [False, True]
    assert geo_aware_flags(groups, [2, 3], {2, 3}) == [True, True]


def _write_spair(root: Path) -> None:
    """Two cat pairs over images A and B (40 x 40), all ids in the cat list; their visible ids: A {2, 4, 9, 10},
    B {2, 3, 4, 9}."""
    visible = {"A": {2: [5, 5], 4: [10, 10], 9: [20, 20], 10: [30, 30]}, "B": {2: [6, 6], 3: [8, 8], 4: [12, 12], 9: [22, 22]}}
    (root / "JPEGImages" / "cat").mkdir(parents=True)
    (root / "ImageAnnotation" / "cat").mkdir(parents=True)
    for name, kps in visible.items():
        Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(root / "JPEGImages" / "cat" / f"{name}.jpg")
        ann = {"kps": {str(i): kps.get(i) for i in range(15)}}
        (root / "ImageAnnotation" / "cat" / f"{name}.json").write_text(json.dumps(ann))
    pairs = {"p1:cat": ("A", "B", [2, 4, 9]), "p2:cat": ("B", "A", [2, 9])}
    (root / "PairAnnotation" / "test").mkdir(parents=True)
    for name, (src, trg, ids) in pairs.items():
        ann = {"src_imname": f"{src}.jpg", "trg_imname": f"{trg}.jpg", "category": "cat", "kps_ids": ids,
               "src_kps": [visible[src][i] for i in ids], "trg_kps": [visible[trg][i] for i in ids],
               "src_bndbox": [0, 0, 40, 40], "trg_bndbox": [0, 0, 40, 40]}  # fmt: skip
        (root / "PairAnnotation" / "test" / f"{name}.json").write_text(json.dumps(ann))
    (root / "Layout" / "large").mkdir(parents=True)
    (root / "Layout" / "large" / "test.txt").write_text("p1:cat\np2:cat\n")


def test_spair_geo_aware_pck_by_hand(tmp_path: Path) -> None:
    """Used ids {2, 3, 4, 9, 10}; groups [2, 3], [4], [9, 10]. p1 (target B sees 2, 3, 4, 9): point id 2 is in the
    subset; p2 (target A sees 2, 4, 9, 10): point id 9. The predictor hits p1's id 2 and misses everything else:
    subset PCK 1 of 2 points = 50 %, 2 of 5 points, both pairs."""
    _write_spair(tmp_path)
    data = SPair71k(tmp_path, image_size=40)
    assert data.geo_aware_flags() == {"p1:cat": [True, False, False], "p2:cat": [False, True]}

    def predict(batch):  # exact for p1's first point, 30 px off elsewhere
        out = batch.trg_kps + 30.0
        out[batch.pair_ids.index("p1:cat"), 0] = batch.trg_kps[batch.pair_ids.index("p1:cat"), 0]
        return out

    result = evaluate_predictions(data, predict, progress=False, decode_images=False)
    sub = geo_aware_pck(result, data)
    assert sub["per_point@0.1"] == pytest.approx(50.0) and sub["n_points"] == 2
    assert sub["per_image@0.1"] == pytest.approx(50.0)  # p1: 1 of 1, p2: 0 of 1; mean of the two pairs
    assert sub["points_share"] == pytest.approx(2 / 5) and sub["pairs_share"] == 1.0
    assert result.info["subsets"]["geo-aware (authors)"] == sub
    assert torch.isfinite(torch.tensor(sub["per_point@0.05"]))


def test_geo_aware_without_image_annotations_says_what_is_missing(tmp_path: Path) -> None:
    _write_spair(tmp_path)
    for f in (tmp_path / "ImageAnnotation" / "cat").iterdir():
        f.unlink()
    with pytest.raises(Exception, match=r"(?s)ImageAnnotation.*A\.json"):
        SPair71k(tmp_path, image_size=40).geo_aware_flags()


def test_subset_per_image_averages_pairs_that_have_subset_points() -> None:
    """By hand: pair a has subset points 0 (hit) and 1 (miss), pair b point 0 (hit), pair c none. Per point 2 of 3;
    per image (1/2 + 1) / 2 = 75 %, c left out (Junyi42/GeoAware-SC utils/eval_spair.py:364-367)."""
    import pandas as pd

    from sdm.evaluate import EvalResult, subset_pck

    records = pd.DataFrame({"pair_id": ["a", "a", "a", "b", "c"], "category": ["x"] * 5, "point": [0, 1, 2, 0, 0],
                            "dist": [0.0, 9.0, 0.0, 1.0, 0.0], "threshold": [10.0] * 5})  # fmt: skip
    result = EvalResult(pd.DataFrame(), records, {})
    sub = subset_pck(result, {"a": [True, True, False], "b": [True], "c": [False]}, "test", alphas=(0.1,))
    assert sub["per_point@0.1"] == pytest.approx(200 / 3) and sub["per_image@0.1"] == pytest.approx(75.0)
    assert sub["n_points"] == 3 and sub["pairs_share"] == pytest.approx(2 / 3)


def test_cli_reports_the_subset_beside_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdm.cli import main

    _write_spair(tmp_path / "spair")
    args = ["evaluate", "--model", "tiny", "--dataset", "spair", "--root", str(tmp_path / "spair"), "--image-size", "64",
            "--prompt", "empty", "--ensemble", "1", "--geo-aware", "as-listed", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "geometry-aware subset (as-listed) (random weights: only shows that the pipeline runs): " in out and "n_points 2" in out
    saved = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert json.dumps(saved).count("geo-aware (as-listed)") >= 1
