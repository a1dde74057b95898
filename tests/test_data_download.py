"""The downloader against a local HTTP server (no network here): resume with Range, size checks, extraction
into the loaders' layout, the offline failure, and the argparse wiring."""

from __future__ import annotations

import argparse
import io
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sdm.data import download as dl

PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes


class _Server:
    """Serves ``files`` (path -> bytes) with Range support and records the Range headers it saw."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        self.truncate_to: int | None = None  # send only this many bytes (simulates a dropped connection)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = outer.files.get(self.path)
                outer.ranges.append(self.headers.get("Range"))
                if body is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    status = 206
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                chunk = body[start:] if outer.truncate_to is None else body[start : outer.truncate_to]
                self.wfile.write(chunk)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_failure_is_clear(tmp_path: Path) -> None:
    remote = dl.Remote(f"http://127.0.0.1:{_free_port()}/SPair-71k.tar.gz", "SPair-71k.tar.gz")
    with pytest.raises(dl.DownloadError, match=r"(?s)cannot reach .*offline.*by hand"):
        dl.fetch(remote, tmp_path / "SPair-71k.tar.gz", timeout=5)
    assert not (tmp_path / "SPair-71k.tar.gz").exists()


def test_offline_download_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    source = dl.SOURCES["pfwillow"]
    monkeypatch.setitem(
        dl.SOURCES,
        "pfwillow",
        dl.Source(
            **{**source.__dict__, "archives": (dl.Remote(f"{dead}/PF-dataset.zip", "PF-dataset.zip"),)}
        ),
    )
    parser = argparse.ArgumentParser()
    dl.add_download_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["download", "pfwillow", "--root", str(tmp_path)])
    with pytest.raises(SystemExit, match="error: cannot reach"):
        args.func(args)


def test_fetch_resumes_with_range(server: _Server, tmp_path: Path) -> None:
    server.files["/big.bin"] = PAYLOAD
    dest = tmp_path / "big.bin"
    (tmp_path / "big.bin.part").write_bytes(PAYLOAD[:4000])
    assert dl.fetch(dl.Remote(f"{server.url}/big.bin", "big.bin", size=len(PAYLOAD)), dest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges == ["bytes=4000-"]
    assert not (tmp_path / "big.bin.part").exists()


def test_fetch_keeps_partial_file_on_short_read(server: _Server, tmp_path: Path) -> None:
    server.files["/big.bin"] = PAYLOAD
    server.truncate_to = 3000
    with pytest.raises(dl.DownloadError, match="run the command again to resume"):
        dl.fetch(dl.Remote(f"{server.url}/big.bin", "big.bin"), tmp_path / "big.bin")
    assert (tmp_path / "big.bin.part").stat().st_size == 3000
    server.truncate_to = None
    dl.fetch(dl.Remote(f"{server.url}/big.bin", "big.bin"), tmp_path / "big.bin")
    assert (tmp_path / "big.bin").read_bytes() == PAYLOAD and server.ranges[-1] == "bytes=3000-"


def test_fetch_checks_size_and_hash(server: _Server, tmp_path: Path) -> None:
    server.files["/f.bin"] = PAYLOAD
    with pytest.raises(dl.DownloadError, match="expected 99"):
        dl.fetch(dl.Remote(f"{server.url}/f.bin", "f.bin", size=99), tmp_path / "f.bin")
    with pytest.raises(dl.DownloadError, match="sha256"):
        dl.fetch(dl.Remote(f"{server.url}/f.bin", "f.bin", sha256="0" * 64), tmp_path / "f.bin")
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        dl.fetch(dl.Remote(f"{server.url}/missing.bin", "missing.bin"), tmp_path / "missing.bin")


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_download_spair_layout(server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/SPair-71k.tar.gz"] = _tar_gz(
        {
            "SPair-71k/JPEGImages/cat/a.jpg": b"jpg",
            "SPair-71k/PairAnnotation/test/x.json": b"{}",
            "SPair-71k/Layout/large/test.txt": b"x\n",
        }
    )
    source = dl.SOURCES["spair"]
    monkeypatch.setitem(
        dl.SOURCES,
        "spair",
        dl.Source(
            **{
                **source.__dict__,
                "archives": (dl.Remote(f"{server.url}/SPair-71k.tar.gz", "SPair-71k.tar.gz"),),
            }
        ),
    )
    folder = dl.download("spair", tmp_path)
    assert folder == tmp_path / "SPair-71k"
    assert (folder / "Layout/large/test.txt").read_bytes() == b"x\n"
    assert not (tmp_path / "SPair-71k.tar.gz").exists()
    n_requests = len(server.ranges)
    assert (
        dl.download("spair", tmp_path) == folder and len(server.ranges) == n_requests
    )  # complete: no traffic


def test_download_pfpascal_layout(server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/PF-dataset-PASCAL.zip"] = _zip(
        {
            "PF-dataset-PASCAL/JPEGImages/2008_000001.jpg": b"jpg",
            "PF-dataset-PASCAL/Annotations/cat/2008_000001.mat": b"mat",
            "__MACOSX/PF-dataset-PASCAL/._junk": b"junk",
        }
    )
    server.files["/test.csv"] = b"source_image,target_image,class\n"
    source = dl.SOURCES["pfpascal"]
    files = (
        dl.SingleFile(dl.Remote(f"{server.url}/test.csv", "test_pairs_pf_pascal.csv"), "test_pairs.csv"),
        dl.SingleFile(dl.Remote(f"{server.url}/absent.csv", "trn_pairs.csv"), "trn_pairs.csv", optional=True),
    )
    archives = (dl.Remote(f"{server.url}/PF-dataset-PASCAL.zip", "PF-dataset-PASCAL.zip"),)
    monkeypatch.setitem(
        dl.SOURCES, "pfpascal", dl.Source(**{**source.__dict__, "archives": archives, "files": files})
    )
    folder = dl.download("pfpascal", tmp_path)
    assert folder == tmp_path / "PF-Pascal"
    assert (folder / "PF-dataset-PASCAL/JPEGImages/2008_000001.jpg").is_file()
    assert (folder / "test_pairs.csv").is_file() and not (folder / "trn_pairs.csv").exists()
    assert not (tmp_path / "__MACOSX").exists() and not (folder / "__MACOSX").exists()


def test_archive_escaping_root_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip({"../outside.txt": b"x"}))
    with pytest.raises(dl.DownloadError, match="outside"):
        dl.extract(archive, tmp_path / "into")
    assert not (tmp_path / "outside.txt").exists()


def test_parser_choices() -> None:
    parser = argparse.ArgumentParser()
    dl.add_download_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["download", "spair"])
    assert (args.name, args.root, args.keep_archives, args.func) == ("spair", "data", False, dl.cmd_download)
    with pytest.raises(SystemExit):
        parser.parse_args(["download", "imagenet"])
