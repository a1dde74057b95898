"""Training run folders: the files a run leaves (`_RUN_FILES`), and the rule that a folder holding one is only
continued (resume) or cleared (overwrite) on request. Standard library only: the command line checks `--out`
before anything loads."""

from __future__ import annotations

import shutil
from pathlib import Path

CHECKPOINT = "checkpoint.pt"


class RunExistsError(FileExistsError):
    """The output folder already holds a training run."""


_RUN_FILES = (CHECKPOINT, "prompt.safetensors", "prompt.json", "best.safetensors", "best.json", "log.csv")


def existing_run(out: Path) -> list[str]:
    """The files of a training run that `out` already holds (empty: the folder is free)."""
    return [name for name in _RUN_FILES if (out / name).exists()]


def claim_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuses a folder holding another run's files unless resuming, or deletes them when overwriting."""
    found = existing_run(out)
    if not found or resume:
        return
    if not overwrite:
        raise RunExistsError(
            f"{out} already holds a training run ({', '.join(found)}): resume it (--resume / resume=True), "
            "clear it (--overwrite / overwrite=True), or choose another output folder (--out)"
        )
    for name in found:
        (out / name).unlink()
    shutil.rmtree(out / "sdm-train", ignore_errors=True)  # its tensorboard events


__all__ = ["CHECKPOINT", "RunExistsError", "claim_run_folder", "existing_run"]
