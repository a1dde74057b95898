"""Running the notebooks as experiments: their quick profile (`QUICK`), the paper profile's plan, and the
papermill runner behind ``sdm notebooks``.

Every notebook in `notebooks/` has one cell tagged ``parameters`` whose defaults are the paper's settings
(real SD2-1 weights, real datasets, GPU). The *quick* profile overrides them with a tiny random-weight model,
synthetic pairs and a few steps, so that everything runs offline on a CPU in seconds; its numbers only show that
the pipeline runs. The runner, the CLI and the tests all take the overrides from here.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# ---- profiles ------------------------------------------------------------------------------------------------
# Shared by every notebook's quick profile.
QUICK_SHARED: dict[str, Any] = {
    "model": "tiny",  # random-weight SD2-1 architecture at toy width
    "device": "cpu",
    "image_size": 64,
    "dataset": "synthetic",  # homography pairs of bundled scikit-image photographs
    "data_root": None,
    "progress": False,
}

# Per notebook (keyed by its two-digit number): what the quick profile sets beside QUICK_SHARED.
# Keys a notebook has no parameter for are not passed (papermill would only warn), see `profile_parameters`.
QUICK: dict[str, dict[str, Any]] = {
    "00": {"image_size": 128, "timestep": 50, "ensemble": 2, "n_points": 6, "interactive": False},
    "01": {
        "n_pairs": 6,
        "ensemble": 2,
        "dino": "tiny",
        "clip": "tiny",
        "captioner_trained_on": "synthetic",  # reads the captioner of the quick run of 02
    },
    "02": {
        "runs": [["captioner", "synthetic"], ["single", "synthetic"], ["class", "synthetic"], ["cpm", "synthetic"]],
        "data_roots": {"synthetic": None},
        "steps": 8,
        "batch_size": 2,
        "train_pairs": 16,
        "val_every": 4,
        "val_pairs": 4,
        "log_every": 1,
        "overwrite": True,  # `sdm notebooks --profile quick` may run again into the same folder
        "mixed_precision": "no",
        "dino": "tiny",
        "clip": "tiny",
    },
    "03": {  # reads the prompts of the quick run of 02
        "datasets": {"synthetic": None},
        "prompt_kinds": {"synthetic": ["single", "class", "cpm"]},
        "trained_on": {"synthetic": "synthetic"},
        "n_pairs": 6,
        "ensemble": 2,
        "dino": "tiny",
        "dino_size": 56,
    },
    "04": {
        "steps": 2,
        "batch_size": 2,
        "train_pairs": 8,
        "n_pairs": 4,
        "ensemble": 1,
        "mixed_precision": "no",
        "dino": "tiny",
    },
    "05": {  # reads the prompts of the quick run of 02
        "trained_on": "synthetic",
        "n_pairs": 4,
        "ensemble": 1,
        "timesteps": [10, 261, 700],
        "inversion_timesteps": [50, 261],
        "inversion_steps": 2,
    },
    "06": {  # reads the prompts of the quick run of 02
        "trained_on": "synthetic",
        "dino": "tiny",
        "inference_steps": 2,
        "n_categories": 2,
        "n_pairs": 2,
    },
    "07": {  # reads the prompts of the quick run of 02
        "trained_on": "synthetic",
        "image_size": 128,
        "ensemble": 1,
        "n_pairs": 2,
        "n_points": 3,
    },
    "08": {
        "n_pairs": 2,
        "steps": 5,
        "lr": 0.1,
        "num_embeddings": 2,
        "inference_crops": 2,
    },
    "09": {  # reads the prompts of the quick run of 02
        "hedlin_model": "tiny",
        "benchmarks": {"synthetic": ["synthetic", None, "test"]},
        "methods": ["dift", "dinov2", "single", "cpm", "hedlin"],
        "prompts_dir": None,
        "trained_on": "synthetic",
        "n_pairs": 4,
        "hedlin_pairs": 2,
        "ensemble": 1,
        "dino": "tiny",
        "dino_size": 56,
        "hedlin_size": 64,
        "attention_steps": 2,
        "attention_embeddings": 1,
        "attention_crops": 2,
    },
}
PROFILES = ("quick", "paper")
# Notebooks that read what another one wrote to results_dir (the prompts notebook 02 trains): the runner runs the
# upstream one first when both run.
READS_FROM: dict[str, str] = {"01": "02", "03": "02", "05": "02", "06": "02", "07": "02", "09": "02"}

# ---- the paper profile's plan ------------------------------------------------------------------------------------
# Throughputs of the README's benchmark table (one H200, random SD2-1-architecture weights, 768 px, measured
# 2026-11-22 before the fidelity changes), from which the paper profile's compute is estimated.
RATES = {
    "features_e8_images_per_s": 35.9,
    "features_e1_images_per_s": 99.6,
    "cpm_eval_pairs_per_s": 17.4,
    "train_steps_per_s_batch9": 4.95,
    # Hedlin et al.'s matcher at notebook 08's defaults (the authors' computation, float32, UNet batches of 10),
    # one 10-point pair on one H100 (benchmarks/results/attention_pair_h100_full.json): optimisation, target inference
    "attention_opt_s_per_pair": 153.1,
    "attention_inf_s_per_pair": 15.0,
}
# Sizes of the test splits used by the estimates (images: upper bounds, at most 2 per pair).
_SPLITS = {"spair_test_pairs": 12_234, "spair_test_images": 1_800, "pfpascal_test_pairs": 299, "pfwillow_test_pairs": 900}


def _paper_plan() -> list[tuple[str, str, float]]:
    """What the paper profile runs, per notebook: (notebook, what, estimated GPU-hours from `RATES`)."""
    r, n = RATES, _SPLITS
    img8 = n["spair_test_images"] / r["features_e8_images_per_s"]  # seconds for one per-image method on SPair test
    small = (2 * n["pfpascal_test_pairs"] + 2 * n["pfwillow_test_pairs"]) / r["features_e8_images_per_s"]
    cpm = lambda pairs: pairs / r["cpm_eval_pairs_per_s"]  # noqa: E731
    train = 30_000 / r["train_steps_per_s_batch9"]  # one 30,000-step run of 9 pairs (Single's rate; CPM is slower)
    rows = [
        ("00", "match points of one pair", 0.0),
        ("01", "empty/template/captioner prompts x DIFT and SD+DINO on SPair-71k test", 6 * img8 / 3600),
        ("02", "train Single, Class, CPM on SPair-71k and Single, CPM on PF-Pascal, 30,000 steps each; the captioner 1,000",
         (5 * train + 1000 / r["train_steps_per_s_batch9"]) / 3600),
        ("03", "Tables 2-3: DIFT, DINOv2, Single, Class, CPM on SPair-71k; DIFT, DINOv2, Single, CPM on PF-Pascal, PF-Willow",
         (3 * img8 + cpm(n["spair_test_pairs"]) + 2 * small + cpm(n["pfpascal_test_pairs"] + n["pfwillow_test_pairs"])) / 3600),
        ("04", "Fig. 3a: 6 CPM variants trained 30,000 steps and evaluated on SPair-71k test", 6 * (train + cpm(n["spair_test_pairs"])) / 3600),
        ("05", "Fig. 3b: 12 timesteps x 2 prompts, 4 up blocks x 2, DDIM inversion (4 t x 2 x 10 steps)",
         (24 * img8 + 8 * img8 + 80 * n["spair_test_images"] / r["features_e1_images_per_s"]) / 3600),
        ("06", "Figs. 4-5: 22 images (18 Class prompts, 4 CPM pairs), 50 DDIM steps x 2 (guidance); at least",
         22 * 100 / r["features_e1_images_per_s"] / 3600),  # a feature pass runs only part of the UNet: a lower bound
        ("07", "correlation maps of 3 pairs", 0.0),
        ("08", "Hedlin et al.'s matcher on PF-Willow: 100 sources optimised once, 900 targets (H100, float32 defaults)",
         (100 * r["attention_opt_s_per_pair"] + n["pfwillow_test_pairs"] * r["attention_inf_s_per_pair"]) / 3600),
        ("09", "leaderboard: DIFT, DINOv2, Single, Class, CPM on the SPair-71k test split (the other benchmarks, when present, "
         "add less), Hedlin et al. on 100 pairs of each benchmark; at least",
         (3 * img8 + cpm(n["spair_test_pairs"]) + 100 * (r["attention_opt_s_per_pair"] + r["attention_inf_s_per_pair"])) / 3600),
    ]
    return rows


def _plan_table(keys: Sequence[str] | None = None) -> str:
    """The paper profile's plan as text: per notebook what runs and its estimated GPU-hours, and the total."""
    rows = [row for row in _paper_plan() if keys is None or row[0] in keys]
    lines = ["paper profile: what runs and estimated GPU-hours on one H200 (the README's benchmark rows; an H100 takes longer)"]
    lines += [f"  {key}  {hours:7.2f} h  {what}" for key, what, hours in rows]
    lines.append(f"  total {sum(h for _, _, h in rows):6.1f} h (estimates; the README's 'Speed' table has the measured rates)")
    return "\n".join(lines)
REPO = Path(__file__).resolve().parents[1]


def notebook_key(path: str | Path) -> str:
    """'notebooks/03_evaluate.ipynb' -> '03'."""
    return Path(path).name.split("_", 1)[0]


def find_notebooks(notebooks_dir: str | Path | None = None) -> list[Path]:
    """The numbered notebooks (NN_*.ipynb), sorted."""
    folder = Path(notebooks_dir) if notebooks_dir is not None else _default_notebooks_dir()
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb") if p.is_file())


def run_order(paths: Sequence[Path]) -> list[Path]:
    """`paths` in number order, except that a notebook that reads another's results (`READS_FROM`) runs after it."""
    keys = {notebook_key(p) for p in paths}

    def place(path: Path) -> tuple[str, bool, str]:
        own = notebook_key(path)
        upstream = READS_FROM.get(own) if READS_FROM.get(own) in keys else None
        return (max(own, upstream or own), upstream is not None, own)  # right after its upstream at the latest

    return sorted(paths, key=place)


def _default_notebooks_dir() -> Path:
    """./notebooks when it exists (run from a checkout), else the one next to the package (editable install)."""
    here = Path("notebooks")
    return here if here.is_dir() else REPO / "notebooks"


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """Names and default values of the notebook's `parameters` cell (evaluated as plain assignments)."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path} must have exactly one cell tagged 'parameters'; it has {len(cells)}")
    values: dict[str, Any] = {}
    exec(compile(cells[0].source, str(path), "exec"), {}, values)
    return values


def profile_parameters(path: str | Path, profile: str, figures_dir: str | Path, results_dir: str | Path) -> dict[str, Any]:
    """The papermill parameters of one notebook under a profile (only names its parameters cell defines)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")
    known = notebook_parameters(path)
    params: dict[str, Any] = {}
    if profile == "quick":
        params.update(QUICK_SHARED)
        params.update(QUICK.get(notebook_key(path), {}))
    params.update(figures_dir=str(figures_dir), results_dir=str(results_dir))
    return {k: v for k, v in params.items() if k in known}


def _check_parameters(paths: Sequence[Path], parameters: dict[str, Any]) -> None:
    """Fails before anything runs when a parameter is in no notebook's `parameters` cell, or its value is not of
    the type of the default there (an int for an int, a number for a float, a list for a list, ...; any value
    where the default is None)."""
    defaults: dict[str, list[tuple[str, Any]]] = {}
    for path in paths:
        for name, value in notebook_parameters(path).items():
            defaults.setdefault(name, []).append((path.name, value))
    unknown = sorted(set(parameters) - set(defaults))
    if unknown:
        raise ValueError(f"no notebook to run has the parameter(s) {', '.join(unknown)}")
    for name, value in parameters.items():
        for notebook, default in defaults[name]:
            if not _fits(value, default):
                raise ValueError(
                    f"-p {name} {value!r}: {notebook} expects {type(default).__name__} (its default is {default!r}); "
                    "values are read as Python literals: 768, 0.5, True, None, 'text', [1, 2]"
                )


def _fits(value: Any, default: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def failure_line(err: BaseException) -> str:
    """One line saying why a notebook failed: the failing cell's exception with its whole message (a cause given
    over several lines stays whole), or the error itself."""
    name, value = getattr(err, "ename", None), getattr(err, "evalue", None)  # papermill's PapermillExecutionError
    if name is None:
        name, value = type(err).__name__, str(err)
    return f"{name}: {' '.join(str(value).split())}"


# ---- runner ------------------------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[Path, int]:
    if not folder.is_dir():
        return {}
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _written(before: dict[Path, int], folder: Path) -> list[str]:
    """Files of `folder` new or rewritten since `before`; a sub-folder's files count as the sub-folder."""
    after = _snapshot(folder)
    changed = {p.relative_to(folder) for p, m in after.items() if before.get(p) != m}
    return sorted({str(folder / rel.parts[0]) + "/" if len(rel.parts) > 1 else str(folder / rel) for rel in changed})


def _select(root: Path, only: Sequence[str] | None) -> list[Path]:
    """The numbered notebooks in `root` that `only` names (numbers or name prefixes; None: all)."""
    paths = find_notebooks(root)
    if only:
        wanted = [str(o).removesuffix(".ipynb") for o in only]
        wanted = [w.zfill(2) if w.isdigit() else w for w in wanted]
        paths = [p for p in paths if any(p.stem == w or p.stem.startswith(w + "_") or notebook_key(p) == w for w in wanted)]
        if not paths:
            raise ValueError(f"no notebook in {root} matches {list(only)}")
    if not paths:
        raise FileNotFoundError(f"no numbered notebooks (NN_*.ipynb) in {root}")
    return paths


def run_notebooks(
    profile: str = "quick",
    only: Sequence[str] | None = None,
    out_dir: str | Path = "runs",
    *,
    notebooks_dir: str | Path | None = None,
    parameters: dict[str, Any] | None = None,
    kernel_name: str = "python3",
    progress: bool = True,
    stop_on_error: bool = False,
) -> list[dict[str, Any]]:
    """Runs the numbered notebooks with papermill and returns one summary dict per notebook.

    Args:
        profile: "quick" (tiny random-weight model, synthetic pairs, CPU, seconds per notebook; figures and
            results go under out_dir) or "paper" (the notebooks' own defaults: the paper's settings; figures
            and results go to the repository's figures/ and results/).
        only: notebook numbers or name prefixes ("03", "3", "03_evaluate"); None: all.
        out_dir: executed notebooks go to <out_dir>/notebooks/<profile> (quick: figures and results also go to
            <out_dir>/figures, <out_dir>/results).
        parameters: extra overrides for every notebook (only names a notebook defines are passed).
        stop_on_error: raise the first failure instead of recording it and going on.

    Each summary: notebook, status ("ok" or "failed"), seconds, output (the executed notebook), figures and
    results (files written or rewritten by the run), error (a one-line reason, or "").
    """
    import papermill
    from tqdm.auto import tqdm

    root = Path(notebooks_dir) if notebooks_dir is not None else _default_notebooks_dir()
    paths = _select(root, only)
    _check_parameters(paths, parameters or {})
    paths = run_order(paths)
    out = Path(out_dir)
    repo = root.resolve().parent
    if profile == "quick":
        figures_dir, results_dir = out / "figures", out / "results"
    else:
        figures_dir, results_dir = repo / "figures", repo / "results"
    executed = out / "notebooks" / profile  # the two profiles' executed notebooks never replace each other
    executed.mkdir(parents=True, exist_ok=True)
    summaries: list[dict[str, Any]] = []
    bar = tqdm(paths, desc=f"notebooks ({profile})", unit="nb", disable=not progress)
    for path in bar:
        bar.set_postfix_str(path.name)
        params = profile_parameters(path, profile, figures_dir.resolve(), results_dir.resolve())
        params.update({k: v for k, v in (parameters or {}).items() if k in notebook_parameters(path)})
        before_f, before_r = _snapshot(figures_dir), _snapshot(results_dir)
        output = executed / path.name
        start = time.perf_counter()
        status, error = "ok", ""
        try:
            papermill.execute_notebook(
                str(path), str(output), parameters=params, kernel_name=kernel_name, cwd=str(repo), progress_bar=False
            )
        except Exception as err:  # papermill raises PapermillExecutionError for a failing cell, others for setup
            if stop_on_error:
                raise
            status, error = "failed", failure_line(err)
        summaries.append(dict(
            notebook=path.name, status=status, seconds=round(time.perf_counter() - start, 1), output=str(output),
            figures=_written(before_f, figures_dir), results=_written(before_r, results_dir), error=error,
        ))  # fmt: skip
    bar.close()
    return summaries


def summary_table(summaries: list[dict[str, Any]]) -> str:
    """A plain-text table of what ran, how long it took and what it wrote."""
    rows = [("notebook", "status", "seconds", "figures", "results")]
    for s in summaries:
        figs = ", ".join(Path(f).name + ("/" if f.endswith("/") else "") for f in s["figures"]) or "-"
        res = ", ".join(Path(f).name + ("/" if f.endswith("/") else "") for f in s["results"]) or "-"
        rows.append((s["notebook"], s["status"], f"{s['seconds']:.1f}", figs, res))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    total = sum(s["seconds"] for s in summaries)
    lines.append(f"{len(summaries)} notebooks, {sum(s['status'] == 'ok' for s in summaries)} ok, {total:.0f} s")
    for s in summaries:
        if s["error"]:
            lines.append(f"{s['notebook']}: {s['error']}")
    return "\n".join(lines)


def _cmd_notebooks(args: argparse.Namespace) -> int:
    try:
        import papermill  # noqa: F401
    except ImportError:
        raise SystemExit('error: the notebook runner needs papermill: pip install -e ".[notebooks]"') from None
    parameters = {name: _parse_value(value) for name, value in args.parameter or []}
    if args.profile == "paper" or args.plan:
        keys = None if not args.only else [str(o).removesuffix(".ipynb")[:2].zfill(2) for o in args.only]
        print(_plan_table(keys))
        if args.plan:
            return 0
    try:
        summaries = run_notebooks(args.profile, args.only, args.out, notebooks_dir=args.notebooks, parameters=parameters)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    print(summary_table(summaries))
    if args.profile == "quick":
        print("quick profile: tiny random-weight model on synthetic pairs; its numbers only show that the pipeline runs")
    print(f"executed notebooks in {Path(args.out) / 'notebooks' / args.profile}")
    return 0 if all(s["status"] == "ok" for s in summaries) else 1


def add_notebooks_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `sdm notebooks`."""
    p = subparsers.add_parser(
        "notebooks",
        help="run the notebooks headless (papermill)",
        description="Runs notebooks/NN_*.ipynb with papermill. quick: tiny random-weight model, synthetic pairs, "
        "CPU, figures and results under --out; paper: the paper's settings, figures/ and results/ of the repository.",
    )
    p.add_argument("--profile", choices=PROFILES, default="quick")
    p.add_argument("--only", nargs="+", default=None, metavar="NN", help="notebook numbers, e.g. --only 00 03")
    p.add_argument("--out", default="runs", help="folder for executed notebooks (and quick-profile figures/results)")
    p.add_argument("--notebooks", default=None, help="folder of the notebooks (default: ./notebooks)")
    p.add_argument(
        "-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
        help="set a parameter in every notebook that has it, as papermill -p (e.g. -p model FOLDER -p device cuda:1)",
    )
    p.add_argument("--plan", action="store_true", help="print what the paper profile runs and its compute estimate, then stop")
    p.set_defaults(func=_cmd_notebooks)


def _parse_value(text: str) -> Any:
    """A -p value as papermill reads it: a Python literal (number, None, True, list, dict) or else the string."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


__all__ = [
    "PROFILES",
    "QUICK",
    "QUICK_SHARED",
    "RATES",
    "READS_FROM",
    "REPO",
    "add_notebooks_parser",
    "failure_line",
    "find_notebooks",
    "notebook_key",
    "notebook_parameters",
    "profile_parameters",
    "run_notebooks",
    "run_order",
    "summary_table",
]
