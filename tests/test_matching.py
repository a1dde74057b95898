"""sdm.matching: coordinates, feature sampling and the matchers, on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import one_hot_maps

from sdm import matching
from sdm.features import SDFeaturizer


def test_coordinate_round_trip_align_corners() -> None:
    xy = torch.tensor([[0.0, 0.0], [767.0, 767.0], [383.5, 100.0]])
    f = matching.to_feature_coords(xy, 768, 48)
    torch.testing.assert_close(f[1], torch.tensor([47.0, 47.0]))
    torch.testing.assert_close(f[2, 0], torch.tensor(383.5 * 47 / 767))
    torch.testing.assert_close(matching.to_image_coords(f, 48, 768), xy)
    # non-square: (H, W) = (100, 200) -> (10, 20)
    g = matching.to_feature_coords(torch.tensor([[199.0, 99.0]]), (100, 200), (10, 20))
    torch.testing.assert_close(g, torch.tensor([[19.0, 9.0]]))


def test_sample_features_bilinear() -> None:
    feats = torch.arange(12.0).view(1, 1, 3, 4)  # value = 4 y + x
    xy = torch.tensor([[[0.0, 0.0], [3.0, 2.0], [1.5, 0.5]]])
    out = matching.sample_features(feats, xy)[0, :, 0]
    torch.testing.assert_close(out, torch.tensor([0.0, 11.0, 3.5]))


def test_matchers_find_the_one_hot_peak() -> None:
    src, trg, query = one_hot_maps()
    expected = query + torch.tensor([1.0, 2.0])
    torch.testing.assert_close(matching.nearest_neighbour(src, trg, query), expected)
    # cosine 1 at the peak and 0 elsewhere: with temperature 0.01 the soft-argmax sits on the peak
    torch.testing.assert_close(matching.soft_argmax(src, trg, query, temperature=0.01), expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(matching.kernel_soft_argmax(src, trg, query, temperature=0.01), expected, atol=1e-3, rtol=0)


def test_kernel_softmax_hand_computed() -> None:
    """Two cells of a 1 x 3 map: the kernel pulls the expectation toward the argmax."""
    scores = torch.tensor([[[[1.0, 0.0, 0.9]]]])  # 1 x 1 x 1 x 3 (h = 1, w = 3)
    t, s = 0.5, 1.0
    k = torch.tensor([1.0, math.exp(-1 / 2), math.exp(-4 / 2)])
    p = torch.softmax(scores.flatten() * k / t, 0)
    expected_x = float((p * torch.arange(3.0)).sum())
    got = matching.kernel_soft_argmax_2d(scores, temperature=t, sigma=s)
    torch.testing.assert_close(got[0, 0], torch.tensor([expected_x, 0.0]))
    plain = matching.soft_argmax_2d(scores, temperature=t)
    assert plain[0, 0, 0] > got[0, 0, 0]  # without the kernel the far 0.9 cell pulls harder


def test_dot_similarity_is_the_raw_inner_product() -> None:
    """similarity="dot" (the authors' ENABLE_L2_NORM = False): a long target vector beats a parallel one, and the
    softmax sees the unnormalised scores. Hand-made 1 x 3 target: cells (1, 0), (3, 3), (0, 1); query (1, 0)."""
    src = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]).view(1, 2, 1, 3)
    src = torch.cat([src, src], dim=2)  # 2 x 3 map, every cell (1, 0)
    trg = torch.tensor([[1.0, 3.0, 0.0], [0.0, 3.0, 1.0]]).view(1, 2, 1, 3)
    trg = torch.cat([trg, trg], dim=2)
    query = torch.tensor([[[0.0, 0.0]]])
    assert matching.nearest_neighbour(src, trg, query)[0, 0, 0] == 0  # cosine: 1 > 0.707 > 0
    assert matching.nearest_neighbour(src, trg, query, similarity="dot")[0, 0, 0] == 1  # dot: 3 > 1 > 0
    dots = torch.tensor([1.0, 3.0, 0.0])  # the inner products, by hand
    p = torch.softmax(dots / 2.0, 0)
    got = matching.soft_argmax(src, trg, query, temperature=2.0, similarity="dot")
    torch.testing.assert_close(got[0, 0], torch.tensor([float((p * torch.arange(3.0)).sum()), 0.5]))
    with pytest.raises(ValueError, match="unknown similarity"):
        matching.match(src, trg, query, similarity="l1")  # type: ignore[arg-type]


def test_matchers_on_non_square_targets() -> None:
    src = torch.randn(2, 8, 5, 7)
    trg = torch.randn(2, 8, 9, 4)
    query = torch.tensor([[[0.0, 0.0], [6.0, 4.0]], [[3.0, 2.5], [1.0, 1.0]]])
    for name in matching.MATCHERS:
        out = matching.match(src, trg, query, name)
        assert out.shape == (2, 2, 2)
        assert (out[..., 0] >= 0).all() and (out[..., 0] <= 3).all() and (out[..., 1] <= 8).all()


def test_matching_bad_input() -> None:
    src = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="no keypoints"):
        matching.nearest_neighbour(src, src, torch.zeros(1, 0, 2))
    with pytest.raises(ValueError, match="B x N x 2"):
        matching.nearest_neighbour(src, src, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="B x C x h x w"):
        matching.nearest_neighbour(src[0], src, torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="differ in B or C"):
        matching.nearest_neighbour(src, torch.randn(1, 9, 5, 5), torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="unknown matcher"):
        matching.match(src, src, torch.zeros(1, 1, 2), "best")  # type: ignore[arg-type]


def test_match_points_end_to_end(featurizer: SDFeaturizer) -> None:
    from PIL import Image

    img = Image.new("RGB", (80, 60), (30, 120, 200))
    out, heat = matching.match_points(featurizer, img, img.resize((40, 90)), torch.tensor([[0.0, 0.0], [79.0, 59.0]]))
    assert out.shape == (2, 2) and heat.shape == (4, 4)
    assert (out[:, 0] <= 40).all() and (out[:, 1] <= 90).all()
    with pytest.raises(ValueError, match="outside the source image"):
        matching.match_points(featurizer, img, img, torch.tensor([[80.0, 10.0]]))
