"""The `sdm` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SUBPROCESS_TIMEOUT
from PIL import Image

from sdm.cli import main
from sdm.records import protocol_id

REPO = Path(__file__).resolve().parents[1]


def _images(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.new("RGB", (120, 90), (250, 200, 10)).save(a)
    Image.new("RGB", (70, 100), (10, 80, 160)).save(b)
    return a, b


def test_match_tiny_writes_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _images(tmp_path)
    out = tmp_path / "figs" / "match.png"
    assert main(["match", str(a), str(b), "--points", "10,20; 100,80", "--model", "tiny", "--ensemble", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("->") == 2 and "figure written" in text
    assert out.stat().st_size > 1000
    assert Image.open(out).size[0] > 500


@pytest.mark.parametrize(
    "points, message",
    [("10;20", "cannot read point"), ("", "no points"), ("500,10", "outside the source image")],
)
def test_match_bad_points(tmp_path: Path, points: str, message: str) -> None:
    a, b = _images(tmp_path)
    with pytest.raises(SystemExit, match=message):
        main(["match", str(a), str(b), "--points", points, "--model", "tiny", "--out", str(tmp_path / "m.png")])


def test_match_missing_and_corrupt_image(tmp_path: Path) -> None:
    a, _ = _images(tmp_path)
    with pytest.raises(SystemExit, match="image not found"):
        main(["match", str(a), str(tmp_path / "nope.png"), "--points", "1,1", "--model", "tiny"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=f"cannot read image {bad}"):
        main(["match", str(a), str(bad), "--points", "1,1", "--model", "tiny"])


def test_console_script_help() -> None:
    out = subprocess.run([sys.executable, "-m", "sdm.cli", "--help"], capture_output=True, text=True, check=True, timeout=SUBPROCESS_TIMEOUT).stdout
    assert "match" in out


def test_help_and_argument_errors_load_no_torch() -> None:
    """`sdm --help`, every subcommand's `--help` and a mistyped flag answer from `sdm.config` alone: no torch,
    diffusers or transformers is imported (those take seconds; the parser takes milliseconds)."""
    script = (
        "import sys, contextlib, io\n"
        "from sdm.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['evaluate', '--help'], ['match', '--help'], ['download', '--help'],\n"
        "             ['notebooks', '--help'], ['import-prompt', '--help'], ['train', '--stpes', '3'], ['evaluate', '--matcher', 'x']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy', 'PIL', 'papermill') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=SUBPROCESS_TIMEOUT).stdout
    assert out.strip() == "[]"


def test_registries_hold_the_names_of_sdm_config() -> None:
    """The parser's choices come from `sdm.config`; each registry holds exactly those names, in that order."""
    from sdm import config
    from sdm.backbones import BACKBONES
    from sdm.data import DATASETS
    from sdm.matching import MATCHER_FUNCTIONS
    from sdm.metrics import THRESHOLDS
    from sdm.prompts import PROMPTS

    assert list(PROMPTS) == config.PROMPT_KINDS and set(config.LEARNED) <= set(PROMPTS)
    assert list(BACKBONES) == config.BACKBONE_NAMES
    assert list(DATASETS) == config.DATASET_NAMES
    assert list(THRESHOLDS) == config.THRESHOLD_MODES
    assert list(MATCHER_FUNCTIONS) == config.MATCHERS


def test_ruff_clean() -> None:
    """Lint is part of the one test command; ruff is a dev dependency."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_train_then_evaluate_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    common = ["--model", "tiny", "--image-size", "64", "--dataset", "synthetic"]
    assert main(["train", *common, "--steps", "2", "--batch-size", "2", "--val-split", "", "--mixed-precision", "no", "--num-workers", "0", "--out", str(out)]) == 0
    assert (out / "prompt.safetensors").is_file()
    results = tmp_path / "results"
    assert main(["evaluate", *common, "--prompt", str(out / "prompt.safetensors"), "--ensemble", "1", "--out", str(results)]) == 0
    text = capsys.readouterr().out
    (written,) = results.glob("synthetic_test_single_t50_e1_*.json")  # named by the protocol's id
    assert "per_image@0.1" in text and "random weights" in text and written.stem.split("_")[-1] == protocol_id(
        json.loads(written.read_text())["info"]["protocol"]
    )
    # a subset check beside it gets its own name: nothing is replaced
    assert main(["evaluate", *common, "--prompt", str(out / "prompt.safetensors"), "--ensemble", "1", "--max-pairs", "4", "--out", str(results)]) == 0
    assert len(list(results.glob("*.json"))) == 2 and len(list(results.glob("*_4pairs_*.json"))) == 1
    # --similarity dot (the code's config/dift.py) is a different protocol: a third file, recording it
    assert main(["evaluate", *common, "--prompt", "empty", "--ensemble", "1", "--max-pairs", "4", "--similarity", "dot", "--out", str(results)]) == 0
    (dot,) = results.glob("synthetic_test_empty_*.json")
    assert json.loads(dot.read_text())["info"]["protocol"]["matcher_params"]["similarity"] == "dot"
    # the Kernel-Softmax parameters come from MatchConfig's fields: recorded, and a protocol of their own
    assert main(["evaluate", *common, "--prompt", "empty", "--ensemble", "1", "--max-pairs", "4", "--sigma", "3", "--temperature", "0.1", "--out", str(results)]) == 0
    params = [json.loads(f.read_text())["info"]["protocol"]["matcher_params"] for f in results.glob("synthetic_test_empty_*.json")]
    assert sorted(params, key=len) == [{"temperature": 0.1, "sigma": 3.0}, {"temperature": 0.04, "sigma": 7.0, "similarity": "dot"}]


def test_evaluate_bad_matcher_setting_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"^error: temperature and sigma must be positive; got temperature 0.04, sigma -1.0 \(--debug"):
        main(["evaluate", "--model", "tiny", "--dataset", "synthetic", "--image-size", "64", "--sigma", "-1", "--out", str(tmp_path)])


def test_evaluate_missing_dataset_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="sdm download pfwillow"):
        main(["evaluate", "--model", "tiny", "--dataset", "pfwillow", "--root", str(tmp_path / "nope")])


def test_evaluate_with_attention_matcher(tmp_path: Path) -> None:
    results = tmp_path / "results"
    args = ["evaluate", "--model", "tiny", "--dataset", "synthetic", "--matcher", "attention", "--max-pairs", "2", "--out", str(results)]
    assert main([*args, "--attention-steps", "3", "--attention-embeddings", "2", "--attention-crops", "2"]) == 0
    (written,) = results.glob("synthetic_test_attention_2pairs_*.json")
    protocol = json.loads(written.read_text())["info"]["protocol"]
    assert protocol["matcher"] == "attention" and protocol["random_weights"] and protocol["matcher_params"]["steps"] == 3


def test_every_config_field_is_an_option(tmp_path: Path) -> None:
    """Fields of TrainConfig and AttentionMatcherConfig without a hand-written flag get one derived from the
    dataclass (type, Literal choices) and reach the config."""
    results = tmp_path / "results"
    args = ["evaluate", "--model", "tiny", "--dataset", "synthetic", "--matcher", "attention", "--max-pairs", "1", "--out", str(results),
            "--attention-steps", "1", "--attention-embeddings", "1", "--attention-crops", "1", "--attention-noise", "gaussian",
            "--attention-loss-resolution", "map", "--attention-opt-timestep", "100"]  # fmt: skip
    assert main(args) == 0
    (written,) = results.glob("synthetic_test_attention_1pairs_*.json")
    params = json.loads(written.read_text())["info"]["protocol"]["matcher_params"]
    assert (params["noise"], params["loss_resolution"], params["opt_timestep"]) == ("gaussian", "map", 100)
    with pytest.raises(SystemExit):
        main([*args[:11], "--attention-noise", "pink"])  # not one of the Literal's choices

    out = tmp_path / "run"
    train = ["train", "--model", "tiny", "--image-size", "64", "--steps", "1", "--batch-size", "2", "--val-split", "", "--mixed-precision", "no",
             "--lr-linear", "0.5", "--val-matcher", "soft_argmax", "--log-every", "1", "--out", str(out)]  # fmt: skip
    assert main(train) == 0
    config = json.loads((out / "prompt.json").read_text())["train_config"]
    assert (config["lr_linear"], config["val_matcher"], config["log_every"]) == (0.5, "soft_argmax", 1)


def test_evaluate_decodes_in_worker_processes_only_for_a_gpu() -> None:
    """`sdm evaluate` without --num-workers: 4 DataLoader processes (at most the CPUs but one) when the batches carry
    images (pair-conditioned prompts) and the model runs on a GPU, so the next batches' images are decoded while it
    computes; none on the CPU, where they would compete with the model for the cores, and none for per-image
    prompts, whose batches carry only keypoints. A given number is kept."""
    import os

    from sdm.cli import _eval_workers

    assert _eval_workers(None, "cpu", decodes=True) == 0
    assert _eval_workers(None, "cuda:1", decodes=True) == min(4, max((os.cpu_count() or 1) - 1, 0))
    assert _eval_workers(None, "cuda", decodes=False) == 0
    assert _eval_workers(3, "cpu", decodes=False) == 3 and _eval_workers(0, "cuda", decodes=True) == 0
