"""sdm.metrics: PCK, the thresholds and the per-image / per-point tables, on hand-computed cases."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sdm.metrics import pck, pck_table, pfpascal_threshold, pfwillow_threshold, point_records, spair_threshold


def test_pck_ground_truth_scores_one() -> None:
    gt = torch.rand(3, 5, 2) * 768
    assert pck(gt, gt, torch.tensor([100.0, 50.0, 10.0]), 0.05).all()


def test_pck_boundary_and_thresholds() -> None:
    gt = torch.zeros(1, 2, 2)
    pred = torch.tensor([[[3.0, 4.0], [6.0, 8.0]]])  # distances 5 and 10
    assert pck(pred, gt, 100.0, 0.05).tolist() == [[True, False]]  # 5 <= 5, 10 > 5
    assert pck(pred, gt, torch.tensor([100.0]), 0.1).tolist() == [[True, True]]
    # SPair: box (x1, y1, x2, y2) = (10, 20, 110, 70) -> max(100, 50)
    assert spair_threshold(torch.tensor([10.0, 20.0, 110.0, 70.0])) == 100.0
    # PF-Pascal: image (h, w) = (768, 768) -> 768
    assert pfpascal_threshold(torch.tensor([768, 768])) == 768
    # PF-Willow: x extent 30 - 5 = 25, y extent 40 - 0 = 40 -> 40; padded point ignored
    kps = torch.tensor([[5.0, 0.0], [30.0, 40.0], [20.0, 10.0], [999.0, 999.0]])
    assert pfwillow_threshold(kps, 3) == 40.0
    with pytest.raises(ValueError, match="positive"):
        pck(pred, gt, 0.0)


def test_pck_table_per_image_and_per_point() -> None:
    # pair a (cat): 1 of 1 correct; pair b (cat): 0 of 3; pair c (dog): 2 of 2
    pred = torch.tensor([[[0.0, 0.0], [0, 0], [0, 0]], [[50.0, 0], [50, 0], [50, 0]], [[1.0, 0], [0, 1], [0, 0]]])
    gt = torch.zeros(3, 3, 2)
    rec = point_records(pred, gt, [1, 3, 2], [100.0, 100.0, 100.0], ["cat", "cat", "dog"], ["a", "b", "c"])
    assert len(rec) == 6
    table = pck_table(rec, alphas=(0.1,))
    assert table.loc["cat", "per_image@0.1"] == pytest.approx(50.0)  # (1 + 0) / 2
    assert table.loc["cat", "per_point@0.1"] == pytest.approx(25.0)  # 1 / 4
    assert table.loc["dog", "per_image@0.1"] == pytest.approx(100.0)
    assert table.loc["all", "per_image@0.1"] == pytest.approx(200 / 3)
    assert table.loc["all", "per_point@0.1"] == pytest.approx(50.0)  # 3 / 6
    assert list(table.index) == ["cat", "dog", "all", "mean of categories"] and table.loc["all", "n_pairs"] == 3
    assert table.loc["mean of categories", "per_image@0.1"] == pytest.approx(75.0)  # (50 + 100) / 2
    with pytest.raises(ValueError, match="no keypoint records"):
        pck_table(pd.DataFrame(columns=rec.columns))
