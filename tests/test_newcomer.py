"""A newcomer's first hour: every wrong input names its cause before anything heavy loads, and every number says
where it came from (random weights, the model really used, the code and machine that computed it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sdm
from sdm import cli
from sdm.cli import main
from sdm.data import SyntheticPairs
from sdm.prompt_meta import read_metadata

TINY_TRAIN = ["train", "--model", "tiny", "--image-size", "64", "--steps", "1", "--batch-size", "2", "--val-split", ""]


def error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line `sdm argv` ends with (argparse's usage errors or the CLI's own)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value.code) if isinstance(stop.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in message
    return message


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: the error must come before."""
    monkeypatch.setattr(cli, "_load_sd", lambda *a, **k: pytest.fail("a model was loaded before the argument error"))


@pytest.mark.parametrize("flag", ["--max-pairs", "--batch-size", "--ensemble", "--attention-steps"])
def test_counts_must_be_at_least_one(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert f"argument {flag}: must be at least 1; got 0" in error_of(["evaluate", flag, "0"], capsys)


def test_a_file_that_is_not_an_sdm_prompt_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None) -> None:
    (tmp_path / "notaprompt.safetensors").write_bytes(b"whatever")
    (tmp_path / "notaprompt.json").write_text('{"hello": 1}')
    message = error_of(["evaluate", "--model", "tiny", "--prompt", str(tmp_path / "notaprompt.safetensors")], capsys)
    assert str(tmp_path / "notaprompt.json") in message and "not an sdm prompt" in message
    assert "kind, model, embed_dim, shapes" in message and "import-prompt" in message


def test_a_run_folder_is_read_as_its_best_prompt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "single_A"
    assert main([*TINY_TRAIN, "--mixed-precision", "no", "--out", str(run)]) == 0
    capsys.readouterr()
    args = ["evaluate", "--model", "tiny", "--image-size", "64", "--ensemble", "1", "--max-pairs", "1", "--out", str(tmp_path / "r")]
    assert main([*args, "--prompt", str(run)]) == 0
    assert f"using {run / 'prompt'}.safetensors (the last step; no best.safetensors" in capsys.readouterr().err
    for name in ("best.safetensors", "best.json"):  # as a run with validation leaves it
        (run / name).write_bytes((run / name.replace("best", "prompt")).read_bytes())
    assert main([*args, "--prompt", str(run)]) == 0
    assert f"using {run / 'best'}.safetensors (the best validation)" in capsys.readouterr().err
    (written,) = {json.loads(p.read_text())["info"]["protocol"]["prompt_file"] for p in (tmp_path / "r").glob("*.json")} - {
        str(run / "prompt.safetensors")
    }
    assert written == str(run / "best.safetensors")


def test_a_split_the_dataset_lacks_names_the_ones_it_has(capsys: pytest.CaptureFixture[str], no_model: None) -> None:
    assert "--split trn2: synthetic has the split(s) trn, val, test; pass --split trn" in error_of([*TINY_TRAIN, "--split", "trn2"], capsys)
    message = error_of([*TINY_TRAIN[:-2], "--val-split", "valid"], capsys)
    assert "pass --val-split trn" in message and "--val-split ''" in message


def test_training_on_the_test_split_says_so_and_cpu_precision_is_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A CPU run asked for fp16 (the default) computes in float32: one plain note, no raw UserWarning, and the
    prompt's run record says float32, with the code and the machine."""
    with pytest.warns() as caught:
        assert main([*TINY_TRAIN, "--split", "test", "--out", str(tmp_path)]) == 0
    assert not [w for w in caught if "needs a GPU" in str(w.message)]
    captured = capsys.readouterr()
    err = captured.err + captured.out
    assert "warning: --split test: the prompt is trained on the test split" in err
    assert "note: mixed_precision 'fp16' needs a GPU: training in float32 on the cpu" in err
    run = read_metadata(tmp_path / "prompt").run
    assert run is not None and run["precision"] == "float32" and "git_commit" in run
    assert run["environment"]["device"] == "cpu" and run["environment"]["torch"].startswith("2.")


def test_notebook_parameters_are_checked_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    message = error_of(["notebooks", "--only", "03", "-p", "image_size", "abc", "--out", "unused"], capsys)
    assert "-p image_size 'abc': 03_evaluate.ipynb expects int (its default is 768)" in message
    assert "no notebook to run has the parameter(s) imagesize" in error_of(["notebooks", "-p", "imagesize", "64"], capsys)


def test_a_failed_notebook_keeps_its_whole_cause() -> None:
    from sdm.runner import failure_line

    class CellError(Exception):  # what papermill raises for a failing cell: the exception's name and message
        ename, evalue = "RuntimeError", "Could not load Stable Diffusion from 'x'.\nIf this machine is offline, pass --model FOLDER."

    line = failure_line(CellError("papermill's own text"))
    assert line == "RuntimeError: Could not load Stable Diffusion from 'x'. If this machine is offline, pass --model FOLDER."
    assert failure_line(ValueError("plain")) == "ValueError: plain"


def test_random_weights_are_labelled_where_a_python_user_looks() -> None:
    """Once per model, a warning; and evaluate's table says it in its header and attrs."""
    from sdm.evaluate import RANDOM_WEIGHTS_NOTE, evaluate
    from sdm.extractors import SDExtractor
    from sdm.models import RandomWeightsWarning
    from sdm.prompts import build_prompt

    with pytest.warns(RandomWeightsWarning, match="tiny has random weights"):
        sd = sdm.tiny_stable_diffusion(0)
    featurizer = sdm.SDFeaturizer(sd, image_size=64, ensemble=1)
    result = evaluate(SDExtractor(featurizer, build_prompt("empty", featurizer)), SyntheticPairs(n=2, image_size=64), progress=False)
    assert RANDOM_WEIGHTS_NOTE in result.table.columns.name and result.table.attrs["note"] == RANDOM_WEIGHTS_NOTE
    assert RANDOM_WEIGHTS_NOTE in result.table.to_string().splitlines()[0]
    env = result.info["environment"]
    assert env["device"] == "cpu" and {"git_dirty", "torch", "diffusers", "transformers", "accelerate"} <= set(env)


def test_a_vit_from_a_folder_has_unknown_weights(tmp_path: Path) -> None:
    from sdm.records import _combined, _vit_weights

    assert _vit_weights("random weights (tiny)") is True
    assert _vit_weights("facebook/dinov2-base") is False  # a hub id: the published trained weights
    assert _vit_weights(str(tmp_path)) == "unknown"  # a folder holds whatever was saved there
    assert _combined(False, "unknown") == "unknown" and _combined("unknown", True) is True and _combined(False, False) is False


def test_a_baseline_records_the_model_it_used(tmp_path: Path) -> None:
    assert main(["evaluate", "--baseline", "tiny", "--vit-size", "56", "--max-pairs", "1", "--image-size", "64", "--out", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("*.json")
    info = json.loads(written.read_text())["info"]
    assert info["model"] == "tiny" and info["protocol"]["random_weights"] is True
