"""`sdm download {spair,pfpascal,pfwillow,cub}`: fetch a benchmark from its official source into the loaders' layout.

Downloads are resumable (an interrupted file stays as ``<name>.part`` and the next run asks the server for
the rest with an HTTP Range request), checked against the size the server announces (Content-Length /
Content-Range) and, where recorded below, a known size and sha256. No sizes or hashes are recorded yet:
this code was written on a machine without network access, so the server's own Content-Length is the
only size check until someone fills them in from a verified download.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from tqdm import tqdm

from .layouts import CUB_LAYOUT, PFPASCAL_LAYOUT, PFWILLOW_LAYOUT, SPAIR_LAYOUT

DownloadName = Literal["spair", "pfpascal", "pfwillow", "cub"]
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


class DownloadError(RuntimeError):
    """A download or extraction failed; the message says what to do (retry, or get the file by hand)."""


@dataclass(frozen=True)
class Remote:
    """One file to fetch. ``size`` (bytes) and ``sha256`` are checked when known (None = not recorded)."""

    url: str
    filename: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class SingleFile:
    """A file saved into the dataset folder as ``save_as``; an ``optional`` one only warns when it fails."""

    remote: Remote
    save_as: str
    optional: bool = False


@dataclass(frozen=True)
class Source:
    """A dataset: its folder under the download root, archives extracted into that folder, single files
    saved inside it, and paths (relative to the folder) that prove the archives' layout is complete."""

    folder: str
    archives: tuple[Remote, ...]
    required: tuple[str, ...]
    layout: str
    terms: str
    files: tuple[SingleFile, ...] = ()


_PROPOSAL_FLOW = "https://www.di.ens.fr/willow/research/proposalflow/dataset"
# Pair lists of Rocco et al. (CNNGeometric / WeakAlign), the standard PF-Pascal val/test and PF-Willow splits.
_CNNGEOMETRIC = "https://www.di.ens.fr/willow/research/cnngeometric/other_resources"

SOURCES: dict[str, Source] = {
    "spair": Source(
        folder="SPair-71k",
        # the archive's top-level folder is SPair-71k/, so it is extracted into the download root itself
        archives=(Remote("http://cvlab.postech.ac.kr/research/SPair-71k/data/SPair-71k.tar.gz", "SPair-71k.tar.gz"),),
        required=("JPEGImages", "PairAnnotation/test", "Layout/large/test.txt"),
        layout=SPAIR_LAYOUT,
        terms="SPair-71k (Min et al. 2019): images from PASCAL VOC 2012 (Flickr terms); annotations for research use.",
    ),
    "pfpascal": Source(
        folder="PF-Pascal",
        archives=(Remote(f"{_PROPOSAL_FLOW}/PF-dataset-PASCAL.zip", "PF-dataset-PASCAL.zip"),),
        files=(
            SingleFile(
                Remote(f"{_CNNGEOMETRIC}/test_pairs_pf_pascal.csv", "test_pairs_pf_pascal.csv"),
                "test_pairs.csv",
            ),
            SingleFile(
                Remote(f"{_CNNGEOMETRIC}/val_pairs_pf_pascal.csv", "val_pairs_pf_pascal.csv"), "val_pairs.csv"
            ),
            # The 2,941-pair trn list with its flip column is shared on Google Drive by the SCNet/DHPF line of
            # work (Drive serves small files directly at this address); optional, as Drive may refuse scripts.
            SingleFile(
                Remote(
                    "https://drive.google.com/uc?export=download&id=111tpXshLiJ4qudBHoGK3HbMSNr9vVRq9",
                    "trn_pairs.csv",
                ),
                "trn_pairs.csv",
                optional=True,
            ),
        ),
        required=("PF-dataset-PASCAL/JPEGImages", "PF-dataset-PASCAL/Annotations"),
        layout=PFPASCAL_LAYOUT,
        terms="PF-Pascal (Ham et al. 2016/2018): images from PASCAL VOC; annotations for research use.",
    ),
    "pfwillow": Source(
        folder="PF-Willow",
        archives=(Remote(f"{_PROPOSAL_FLOW}/PF-dataset.zip", "PF-dataset.zip"),),
        files=(SingleFile(Remote(f"{_CNNGEOMETRIC}/test_pairs_pf.csv", "test_pairs_pf.csv"), "test_pairs.csv"),),
        required=("PF-dataset",),
        layout=PFWILLOW_LAYOUT,
        terms="PF-Willow (Ham et al. 2016): for research use.",
    ),
    "cub": Source(
        folder="CUB_200_2011",
        # the archive's top-level folder is CUB_200_2011/, so it is extracted into the download root itself
        archives=(Remote("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz", "CUB_200_2011.tgz"),),
        required=("images", "images.txt", "parts/part_locs.txt", "bounding_boxes.txt"),
        layout=CUB_LAYOUT,
        terms="CUB-200-2011 (Wah et al. 2011, Caltech): for non-commercial research and educational use; images from Flickr.",
    ),
}


def _manual_hint(remote: Remote, dest: Path) -> str:
    return f"Download {remote.url} by hand and save it as {dest}, then run the command again (see data/README.md)."


def _total_from_headers(status: int, headers: object, have: int) -> int | None:
    """The file's full size from a 206 Content-Range ("bytes a-b/total") or a 200 Content-Length."""
    get = getattr(headers, "get", lambda _k, _d=None: None)
    if status == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", str(get("Content-Range", "")).strip())
        if m is None or int(m.group(1)) != have:
            raise DownloadError(
                f"server answered a resume request with an unexpected Content-Range: {get('Content-Range')!r}"
            )
        return None if m.group(3) == "*" else int(m.group(3))
    length = get("Content-Length")
    return int(length) if length is not None and str(length).isdigit() else None


def fetch(remote: Remote, dest: Path, timeout: float = _TIMEOUT_S) -> Path:
    """Download ``remote`` to ``dest`` (resuming ``dest.part``), check it, and return ``dest``."""
    dest = Path(dest)
    if dest.is_file() and (remote.size is None or dest.stat().st_size == remote.size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    response = _open(remote, dest, have, timeout)
    total: int | None = have if response is None else None
    if response is not None:
        with response:
            status = getattr(response, "status", 200)
            if status != 206:
                have = 0  # the server ignored the Range header: start over
            total = _total_from_headers(status, response.headers, have)
            _stream(remote, dest, response, part, have, total)
    _verify(remote, part, total)
    part.replace(dest)
    return dest


def _open(remote: Remote, dest: Path, have: int, timeout: float) -> Any:
    """The server's response, asking for the bytes after the `have` already there; None when the .part file is
    already whole (HTTP 416)."""
    headers = {"User-Agent": "sdm-download/0.1"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(remote.url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the .part file is already whole
            return None
        raise DownloadError(f"{remote.url}: HTTP {err.code} {err.reason}. {_manual_hint(remote, dest)}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot reach {remote.url} ({reason}); are you offline? {_manual_hint(remote, dest)}") from err


def _stream(remote: Remote, dest: Path, response: Any, part: Path, have: int, total: int | None) -> None:
    """Appends the response's body to `part` (after its first `have` bytes), with a progress bar."""
    if "text/html" in str(response.headers.get("Content-Type", "")) and not remote.filename.endswith(".html"):
        raise DownloadError(f"{remote.url} returned a web page instead of {remote.filename}. {_manual_hint(remote, dest)}")
    try:
        with (
            open(part, "ab" if have else "wb") as out,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=remote.filename) as bar,
        ):
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:
        raise DownloadError(f"{remote.url}: interrupted ({err}); {part} keeps what arrived, run the command again to resume") from err


def _verify(remote: Remote, part: Path, total: int | None) -> None:
    """Checks the downloaded size against the server's and the recorded one, and the recorded sha256; a file
    that fails a recorded check is removed."""
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"{remote.url}: got {size} of {total} bytes; run the command again to resume")
    if remote.size is not None and size != remote.size:
        part.unlink()
        raise DownloadError(f"{remote.url}: {size} bytes, expected {remote.size}; the partial file was removed")
    if remote.sha256 is not None:
        digest = hashlib.sha256()
        with open(part, "rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
        if digest.hexdigest() != remote.sha256:
            part.unlink()
            raise DownloadError(f"{remote.url}: sha256 {digest.hexdigest()} does not match {remote.sha256}; file removed")


def _safe_target(base: Path, member: str) -> Path | None:
    """Where an archive member goes under ``base``; None for macOS metadata; error for paths escaping base."""
    parts = Path(member).parts
    if not parts or parts[0] == "__MACOSX" or Path(member).name == ".DS_Store":
        return None
    target = (base / member).resolve()
    if not target.is_relative_to(base.resolve()):
        raise DownloadError(f"archive member {member!r} would be written outside {base}; archive rejected")
    return target


def extract(archive: Path, into: Path) -> None:
    """Extract a .zip or .tar(.gz) archive into ``into``, skipping macOS metadata and unsafe paths."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    target = _safe_target(into, info.filename)
                    if target is None or info.is_dir():
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    target = _safe_target(into, member.name)
                    if target is None or not member.isfile():  # regular files only: no links or devices
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(member)
                    if src is None:
                        continue
                    with src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        else:
            raise DownloadError(
                f"{archive} is neither a zip nor a tar archive; delete it and run the command again"
            )
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise DownloadError(f"{archive} is corrupt ({err}); delete it and run the command again") from err


def download(name: DownloadName, root: str | Path = "data", keep_archives: bool = False) -> Path:
    """Fetch dataset ``name`` into ``<root>/<folder>`` and return that folder (the loader's root).

    Parts already in place are skipped, so an interrupted or failed run can simply be repeated. Archives are
    removed after extraction unless ``keep_archives``. A failed optional file only prints a warning.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(SOURCES)}")
    source = SOURCES[name]
    root = Path(root)
    folder = root / source.folder
    if not all((folder / p).exists() for p in source.required):
        folder.mkdir(parents=True, exist_ok=True)
        for remote in source.archives:
            archive = fetch(remote, root / remote.filename)
            # An archive holding the dataset folder itself at its top (SPair-71k/, CUB_200_2011/ beside attributes.txt) goes into root.
            extract(archive, root if source.folder in _top_level(archive) else folder)
            if not keep_archives:
                archive.unlink()
        missing = [p for p in source.required if not (folder / p).exists()]
        if missing:
            raise DownloadError(
                f"after extraction, {folder} lacks {missing}; expected layout:\n{source.layout.rstrip()}\n"
                "The archive's layout may have changed: arrange the files by hand (see data/README.md)."
            )
    for single in source.files:
        try:
            fetch(single.remote, folder / single.save_as)
        except DownloadError as err:
            if not single.optional:
                raise
            print(f"warning: optional file {single.save_as} not downloaded: {err}")
    return folder


def _top_level(archive: Path) -> set[str]:
    """First path components of the archive's members (macOS metadata ignored)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
    else:
        try:
            with tarfile.open(archive) as tf:
                names = tf.getnames()
        except tarfile.TarError as err:
            raise DownloadError(f"{archive} is corrupt ({err}); delete it and run the command again") from err
    return {Path(n).parts[0] for n in names if Path(n).parts and Path(n).parts[0] not in ("__MACOSX", ".")}


def cmd_download(args: argparse.Namespace) -> int:
    """Entry point of `sdm download`."""
    try:
        folder = download(args.name, args.root, keep_archives=args.keep_archives)
    except DownloadError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{args.name}: ready at {folder}")
    print(SOURCES[args.name].terms)
    return 0


def add_download_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `download {spair,pfpascal,pfwillow,cub} [--root data/]` on an argparse subparsers object
    (its handler is set as ``func``)."""
    p = subparsers.add_parser(
        "download", help="download a benchmark (SPair-71k, PF-Pascal, PF-Willow, CUB-200-2011) into --root"
    )
    p.add_argument("name", choices=list(get_args(DownloadName)))
    p.add_argument(
        "--root",
        default="data",
        help="download root; the dataset lands in <root>/<its folder> (default: data)",
    )
    p.add_argument(
        "--keep-archives", action="store_true", help="keep the .zip/.tar.gz files after extraction"
    )
    p.set_defaults(func=cmd_download)
    return p


__all__ = [
    "SOURCES",
    "DownloadError",
    "Remote",
    "SingleFile",
    "Source",
    "add_download_parser",
    "cmd_download",
    "download",
    "extract",
    "fetch",
]
