"""Evaluation protocols: threshold modes and frames against values computed by hand, Hedlin et al.'s padded
PF-Willow threshold, spread subsets, and the protocol record in every result file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA, SUBPROCESS_TIMEOUT
from PIL import Image

from sdm.data import PFWillow, SPair71k, spread_subset
from sdm.evaluate import evaluate_predictions
from sdm.metrics import CATEGORY_MEAN, THRESHOLDS, pair_facts, threshold_of

WILLOW = SHARED_DATA / "pf-willow"
SPAIR = SHARED_DATA / "spair-mini"
needs_willow = pytest.mark.skipif(not WILLOW.is_dir(), reason="the PF-Willow test set is not at ../shared/data/pf-willow")
needs_spair = pytest.mark.skipif(not SPAIR.is_dir(), reason="the SPair mini set is not at ../shared/data/spair-mini")


def facts(ds, i: int, frame: str = "resized"):
    p = ds[i]
    return pair_facts(p.src_kps, p.trg_kps, p.extra, p.src_size, p.trg_size, tuple(ds.image_size), frame)  # type: ignore[arg-type]


@needs_willow
def test_pfwillow_modes_by_hand() -> None:
    ds = PFWillow(WILLOW, image_size=512)
    ds.decode_images = False
    raw = pd.read_csv(WILLOW / "test_pairs.csv")
    row = raw.iloc[0]
    xb, yb = row.iloc[22:32].to_numpy(float), row.iloc[32:42].to_numpy(float)
    w, h = Image.open(WILLOW / "PF-dataset" / row.iloc[1].split("/", 1)[1]).size
    x, y = xb * 512 / w, yb * 512 / h  # the target points in the 512 x 512 input
    f = facts(ds, 0)
    assert threshold_of(f, "kps-extent") == pytest.approx(max(x.max() - x.min(), y.max() - y.min()), rel=1e-5)
    assert threshold_of(f, "kps-extent-hedlin") == pytest.approx(max(x.max(), y.max()) + 1, rel=1e-5)
    assert threshold_of(f, "image") == 512
    assert threshold_of(facts(ds, 0, "original"), "kps-extent") == pytest.approx(max(np.ptp(xb), np.ptp(yb)), rel=1e-5)
    assert threshold_of(facts(ds, 0, "original"), "image") == max(w, h)
    with pytest.raises(ValueError, match="no target bounding boxes"):
        threshold_of(f, "trg-bbox")


@needs_willow
def test_hedlin_padded_threshold_is_about_1_28x_on_pf_willow() -> None:
    """Hedlin et al. pad the 10 points with -1 to 40 and take the extent over the padding too
    (eval/pfwillow.py:52,60-69): over the 900 pairs at 512 px the threshold grows by about 1.28x."""
    ds = PFWillow(WILLOW, image_size=512)
    ratios = []
    for i in range(len(ds)):
        _, trg, _ = ds.keypoints(i)
        padded = torch.cat([trg, torch.full((30, 2), -1.0)])  # their padding, written out
        hedlin = (padded.max(0).values - padded.min(0).values).max()
        ratios.append(float(hedlin / (trg.max(0).values - trg.min(0).values).max()))
    assert 1.2 < np.mean(ratios) < 1.36
    f = facts(ds, 5)
    assert threshold_of(f, "kps-extent-hedlin") / threshold_of(f, "kps-extent") == pytest.approx(ratios[5], rel=1e-5)


@needs_spair
def test_spair_modes_by_hand() -> None:
    ds = SPair71k(SPAIR, split="test", image_size=768)
    ds.decode_images = False
    p = ds[0]
    ann = json.loads(next((SPAIR / "PairAnnotation" / "test").glob(f"{p.pair_id}*.json")).read_text())
    (sw, sh), (tw, th) = p.src_size, p.trg_size
    tb, sb = np.array(ann["trg_bndbox"], float), np.array(ann["src_bndbox"], float)
    assert threshold_of(facts(ds, 0), "trg-bbox") == pytest.approx(max((tb[2] - tb[0]) * 768 / tw, (tb[3] - tb[1]) * 768 / th), rel=1e-5)
    assert threshold_of(facts(ds, 0), "src-bbox") == pytest.approx(max((sb[2] - sb[0]) * 768 / sw, (sb[3] - sb[1]) * 768 / sh), rel=1e-5)
    assert threshold_of(facts(ds, 0, "original"), "trg-bbox") == pytest.approx(max(tb[2] - tb[0], tb[3] - tb[1]), rel=1e-5)
    assert threshold_of(facts(ds, 0), "image") == 768


def test_every_mode_is_documented() -> None:
    assert set(THRESHOLDS) == {"trg-bbox", "src-bbox", "trg-bbox-xscale", "image", "kps-extent", "kps-extent-hedlin"}
    doc = (Path(__file__).parents[1] / "docs" / "protocols.md").read_text()
    assert all(f"`{name}`" in doc for name in THRESHOLDS)


@needs_willow
def test_subsets_spread_over_categories_and_results_carry_the_protocol(tmp_path: Path) -> None:
    ds = PFWillow(WILLOW, image_size=512)
    sub = spread_subset(ds, 100)
    ds.decode_images = False
    assert len({sub[i].category for i in range(len(sub))}) == 10  # the first 100 pairs cover 2 categories
    ds.decode_images = True
    noisy = lambda batch: batch.trg_kps + 30.0  # noqa: E731
    res = evaluate_predictions(ds, noisy, max_pairs=100, batch_size=50, progress=False, decode_images=False)
    assert res.table.loc["all", "n_pairs"] == 100 and len(res.table) == 12
    per_cat = res.table.drop(index=["all", CATEGORY_MEAN])
    assert res.table.loc[CATEGORY_MEAN, "per_image@0.1"] == pytest.approx(per_cat["per_image@0.1"].mean())
    protocol = res.info["protocol"]
    assert protocol["threshold"] == "kps-extent" and protocol["frame"] == "resized" and "spread" in protocol["subset"]
    hedlin = evaluate_predictions(ds, noisy, max_pairs=100, batch_size=50, progress=False, decode_images=False, threshold="kps-extent-hedlin")
    assert hedlin.table.loc["all", "per_image@0.1"] > res.table.loc["all", "per_image@0.1"] + 5  # a larger threshold
    res.save(tmp_path, "r")
    for name in ("r_pck.csv", "r_points.csv"):
        first = (tmp_path / name).read_text().splitlines()[0]
        assert first.startswith("# protocol: ") and json.loads(first[len("# protocol: "):])["threshold"] == "kps-extent"
    assert pd.read_csv(tmp_path / "r_pck.csv", comment="#", index_col=0).loc["all", "n_pairs"] == 100
    assert json.loads((tmp_path / "r.json").read_text())["info"]["protocol"]["pairs"] == 100


@needs_willow
def test_cli_refuses_a_threshold_mode_the_dataset_cannot_give() -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sdm.cli", "evaluate", "--dataset", "pfwillow", "--root", str(WILLOW), "--threshold", "trg-bbox", "--model", "tiny"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: --threshold trg-bbox: this dataset has no target bounding boxes: choose another threshold mode (see sdm.metrics.THRESHOLDS)"
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["class", "cpm"])  # per-image features (cached in groups) and per-pair features
def test_two_process_evaluation_equals_one_process(tmp_path: Path, prompt: str) -> None:
    """`accelerate launch` with 2 CPU processes (gloo) gives the single-process result to the last digit."""
    import os
    import subprocess
    import sys

    args = ["evaluate", "--model", "tiny", "--prompt", prompt, "--dataset", "synthetic", "--max-pairs", "10", "--batch-size", "3"]
    args += ["--ensemble", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # kernels round differently with other thread counts
    one = subprocess.run([sys.executable, "-m", "sdm.cli", *args, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    two = subprocess.run([*launch, "-m", "sdm.cli", *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("results written") == 1  # only the main process writes
    (a,), (b,) = (list((tmp_path / d).glob("*_points.csv")) for d in ("one", "two"))
    assert a.read_text() == b.read_text()  # every point's error, and the protocol header
    assert a.with_name(a.name.replace("_points", "_pck")).read_text() == b.with_name(b.name.replace("_points", "_pck")).read_text()
    records = pd.read_csv(b, comment="#")
    assert len(records.pair_id.unique()) == 10


@needs_willow
def test_the_same_predictions_under_the_standard_and_hedlin_thresholds() -> None:
    """Notebook 08 scores one set of predictions under both protocols (`stored_predictor`); with every prediction
    30 px off, PCK@0.1 is the share of pairs whose threshold is at least 300 px, counted here by hand."""
    from sdm.metrics import HEDLIN_PROTOCOL
    from sdm.predictors import stored_predictor

    ds = PFWillow(WILLOW, image_size=512)
    pairs = spread_subset(ds, 60)
    pairs.decode_images = False
    preds, want = {}, {}
    standard, theirs = HEDLIN_PROTOCOL["pfwillow"]
    for i in range(len(pairs)):
        p = pairs[i]
        preds[p.pair_id] = p.trg_kps + torch.tensor([30.0, 0.0])
        for mode in (standard, theirs):
            want.setdefault(mode, []).append(100.0 * (30.0 <= 0.1 * threshold_of(facts(pairs, i), mode)))
    pairs.decode_images = True
    for mode in (standard, theirs):
        res = evaluate_predictions(pairs, stored_predictor(preds), threshold=mode, decode_images=False, progress=False)
        assert res.table.loc["all", "per_image@0.1"] == pytest.approx(np.mean(want[mode]))
    assert np.mean(want[theirs]) > np.mean(want[standard])  # the padded extent is larger


def test_weights_fingerprint_hashes_each_parameters_name_shape_and_first_values() -> None:
    """The protocol's "weights": blake2b (8 bytes) over every parameter in order: "name:shape", then its first 64
    values as float32 bytes. Recomputed here parameter by parameter; sdm copies them to the host in one piece."""
    import hashlib

    from sdm.records import _model_fingerprint

    torch.manual_seed(0)
    a, b = torch.nn.Linear(10, 9), torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LayerNorm(4))
    b.half()  # other dtypes are hashed as float32
    h = hashlib.blake2b(digest_size=8)
    for module in (a, b):
        for name, param in module.named_parameters():
            h.update(f"{name}:{tuple(param.shape)}".encode())
            h.update(param.detach().reshape(-1)[:64].float().numpy().tobytes())
    assert _model_fingerprint(a, b) == h.hexdigest()
    assert _model_fingerprint(b, a) != h.hexdigest()  # the order of the modules counts
