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


def test_window_soft_argmax_is_geoaware_sc_get_flow() -> None:
    """GeoAware-SC's window soft-argmax (utils/utils_correspondence.py:297-337, 226-256 of Junyi42/GeoAware-SC
    99fd6b6), written out here: scores outside the 15 x 15 window around the argmax multiplied by 0 (they stay in
    the softmax at score 0), softmax at beta 0.02, expectation of linspace(-1, 1) unnormalised by (g + 1)(n - 1)/2.
    A second peak far away pulls plain soft-argmax but not the window; a window cut by the border is clipped."""
    h, w = 20, 30
    scores = torch.full((h, w), -0.3)
    scores[4, 5], scores[4, 6], scores[15, 28] = 0.9, 0.88, 0.895  # the peak, a neighbour, a far rival

    def theirs(s: torch.Tensor, k: int, beta: float) -> torch.Tensor:
        iy, ix = divmod(int(s.flatten().argmax()), w)
        mask = torch.zeros_like(s)
        for dy in range(-k, k + 1):
            for dx in range(-k, k + 1):
                mask[min(max(iy + dy, 0), h - 1), min(max(ix + dx, 0), w - 1)] = 1
        p = torch.exp((s * mask - (s * mask).max()) / beta)
        p = p / p.sum()
        gx = (p.sum(0) * torch.linspace(-1, 1, w)).sum()
        gy = (p.sum(1) * torch.linspace(-1, 1, h)).sum()
        return torch.stack([(gx + 1) * (w - 1) / 2, (gy + 1) * (h - 1) / 2])

    got = matching.window_soft_argmax_2d(scores[None], temperature=0.02, window=7)[0]
    torch.testing.assert_close(got, theirs(scores, 7, 0.02), rtol=0, atol=1e-4)
    x = (5 + 6 * math.exp(-1)) / (1 + math.exp(-1))  # the peak and its neighbour, 0.02 apart at beta 0.02
    assert abs(float(got[0]) - x) < 1e-3 and abs(float(got[1]) - 4.0) < 1e-3  # the rival 23 cells away is outside
    plain = matching.soft_argmax_2d(scores[None], 0.02)[0]
    assert float(plain[0]) > 10  # without the window the rival pulls the match across
    edge = torch.full((h, w), -0.3)
    edge[0, 1], edge[2, 0] = 0.9, 0.85  # the window around (1, 0) is cut by two borders
    torch.testing.assert_close(matching.window_soft_argmax_2d(edge[None], 0.02, 7)[0], theirs(edge, 7, 0.02), rtol=0, atol=1e-4)


def test_window_matcher_reads_out_at_its_authors_temperature() -> None:
    """By name the window matcher uses GeoAware-SC's beta 0.02 (their soft_argmax default) and records its window;
    an explicit temperature wins; the other matchers keep SD4Match's 0.04."""
    from sdm.matching import MatchConfig

    assert MatchConfig("window_soft_argmax").temperature == 0.02 and MatchConfig("window_soft_argmax").params() == {"temperature": 0.02, "window": 7}
    assert MatchConfig("window_soft_argmax", temperature=0.05).temperature == 0.05 and MatchConfig().temperature == 0.04
    feats = torch.randn(1, 4, 6, 7, generator=torch.Generator().manual_seed(0))
    query = torch.tensor([[[2.0, 3.0]]])
    torch.testing.assert_close(
        matching.match(feats, feats, query, "window_soft_argmax"), matching.window_soft_argmax(feats, feats, query, temperature=0.02)
    )
