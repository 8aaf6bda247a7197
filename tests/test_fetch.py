"""Downloads from a real HTTP server on 127.0.0.1: progress, resume after a cut, checksum refusal,
conversion, and `clipn detect` finding the fetched weights with no --weights."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import OFFICIAL_CHECKPOINT, TINY_CONFIG, cli
from typer.testing import CliRunner

from clipn_cli.cli.app import app
from clipn_cli.errors import FetchError
from clipn_cli.fetch import download, pick_checkpoint
from clipn_cli.home import downloads_dir, get_default, read_header, weights_dir

DATA = OFFICIAL_CHECKPOINT.read_bytes()
SHA = hashlib.sha256(DATA).hexdigest()


class Server(ThreadingHTTPServer):
    """Serves `data` at any path with Range/If-Range support; `cut_after` drops the connection
    after that many body bytes of the next response. Counts body bytes sent and Range headers."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.data, self.etag = DATA, '"v1"'
        self.cut_after: int | None = None
        self.sent = 0
        self.ranges: list[str | None] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/clipn-tiny-official.pt"


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv, data = self.server, self.server.data
        requested = self.headers.get("Range")
        srv.ranges.append(requested)
        start = 0
        if requested and self.headers.get("If-Range", srv.etag) == srv.etag:
            start = int(requested.removeprefix("bytes=").split("-")[0])
        if start >= len(data) and requested:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", srv.etag)
        self.end_headers()
        body = data[start:]
        if srv.cut_after is not None:
            body, srv.cut_after = body[: srv.cut_after], None
            self.close_connection = True
        self.wfile.write(body)
        srv.sent += len(body)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_reports_progress_and_verifies(server: Server, tmp_path: Path) -> None:
    calls: list[tuple[int, int | None]] = []
    result = download(server.url, tmp_path / "ckpt.pt", sha256=SHA, progress=lambda d, t: calls.append((d, t)))
    assert result.path.read_bytes() == DATA and result.sha256 == SHA
    assert (result.resumed_from, result.received, result.size) == (0, len(DATA), len(DATA))
    assert calls[0] == (0, len(DATA)) and calls[-1] == (len(DATA), len(DATA))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and len(calls) >= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_resume_after_cut_downloads_only_the_rest(server: Server, tmp_path: Path) -> None:
    cut = len(DATA) * 2 // 5
    server.cut_after = cut
    with pytest.raises(FetchError, match=r"connection was lost after \d+ of \d+ bytes.*run the same command again"):
        download(server.url, tmp_path / "ckpt.pt")
    part = tmp_path / "ckpt.pt.part"
    assert part.stat().st_size == cut and not (tmp_path / "ckpt.pt").exists()

    server.sent = 0
    result = download(server.url, tmp_path / "ckpt.pt", sha256=SHA)
    assert server.ranges[-1] == f"bytes={cut}-"
    assert server.sent == len(DATA) - cut  # resumed, not downloaded again
    assert (result.resumed_from, result.received) == (cut, len(DATA) - cut)
    assert result.path.read_bytes() == DATA and not part.exists()


def test_changed_file_on_server_is_downloaded_again_not_spliced(server: Server, tmp_path: Path) -> None:
    server.cut_after = 1000
    with pytest.raises(FetchError):
        download(server.url, tmp_path / "ckpt.pt")
    server.data, server.etag, server.sent = DATA[::-1], '"v2"', 0
    result = download(server.url, tmp_path / "ckpt.pt")
    assert result.resumed_from == 0 and server.sent == len(DATA)
    assert result.path.read_bytes() == DATA[::-1]


def test_sha256_mismatch_is_refused_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="sha256 mismatch.*deleted"):
        download(server.url, tmp_path / "ckpt.pt", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []

    out = CliRunner().invoke(app, ["weights", "fetch", server.url, "--sha256", "ab" * 32, "--config", str(TINY_CONFIG)])
    assert out.exit_code == 2 and "sha256 mismatch" in out.output
    assert not weights_dir().exists() or list(weights_dir().iterdir()) == []
    assert list(downloads_dir().iterdir()) == []


def test_unreachable_server_says_what_to_do_by_hand(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/epoch_10.pt"
    with pytest.raises(FetchError, match=r"cannot download .*in a browser.*clipn weights add FILE --name NAME"):
        download(url, tmp_path / "x.pt")


def test_fetch_converts_and_detect_uses_it_without_weights(server: Server, tiny_weights: Path, images_dir: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(app, ["weights", "fetch", server.url])
    assert first.exit_code == 2, first.output
    assert "--config" in first.output and "the download is kept" in first.output
    kept = list(downloads_dir().glob("*.pt"))
    assert len(kept) == 1 and kept[0].read_bytes() == DATA

    sent = server.sent
    second = runner.invoke(app, ["weights", "fetch", server.url, "--config", str(TINY_CONFIG)])
    assert second.exit_code == 0, second.output
    assert server.sent == sent  # the kept download was converted, not fetched again
    assert list(downloads_dir().iterdir()) == []
    stored = weights_dir() / "clipn-tiny-official.safetensors"
    meta = read_header(stored)
    assert meta["fingerprint"] == read_header(tiny_weights)["fingerprint"]
    assert meta["source_url"] == server.url and meta["source_sha256"] == SHA
    assert get_default() == "clipn-tiny-official"

    listed = json.loads(runner.invoke(app, ["weights", "list", "--format", "json"]).stdout)
    row = next(r for r in listed["weights"] if r["name"] == "clipn-tiny-official")
    assert row["present"] and row["default"] and row["size"] == stored.stat().st_size

    args = ["detect", "--classes", "cat,horse,rocket", "--format", "json", str(images_dir)]
    plain = cli(*args)  # env: CLIPN_HOME, no CLIPN_WEIGHTS
    explicit = runner.invoke(app, [*args, "--weights", str(tiny_weights)])
    assert plain.returncode == 0 and explicit.exit_code == 0, plain.stderr
    assert json.loads(plain.stdout) == json.loads(explicit.stdout) and len(json.loads(plain.stdout)) == 12


def test_fetch_again_is_a_no_op_unless_forced(server: Server) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["weights", "fetch", server.url, "--name", "tiny", "--config", str(TINY_CONFIG)]).exit_code == 0
    sent = server.sent
    again = runner.invoke(app, ["weights", "fetch", server.url, "--name", "tiny"])
    assert again.exit_code == 0 and "already here" in again.output and server.sent == sent
    forced = runner.invoke(app, ["weights", "fetch", server.url, "--name", "tiny", "--config", str(TINY_CONFIG), "--force"])
    assert forced.exit_code == 0 and server.sent == sent + len(DATA)


def test_forced_fetch_does_not_reuse_a_kept_download(server: Server) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["weights", "fetch", server.url]).exit_code == 2  # no --config: the download is kept
    sent = server.sent
    forced = runner.invoke(app, ["weights", "fetch", server.url, "--config", str(TINY_CONFIG), "--force"])
    assert forced.exit_code == 0, forced.output
    assert server.sent == sent + len(DATA) and list(downloads_dir().iterdir()) == []


def test_pick_checkpoint_from_a_drive_folder_listing() -> None:
    files = [("a", "out.log"), ("b", "checkpoints/epoch_9.pt"), ("c", "checkpoints/epoch_10.pt"), ("d", "checkpoints/epoch_2.pt")]
    assert pick_checkpoint(files, "checkpoints/epoch_10.pt", "u") == "c"
    assert pick_checkpoint(files[:2] + files[3:], "checkpoints/epoch_10.pt", "u") == "b"
    with pytest.raises(FetchError, match="no checkpoints/epoch_10.pt"):
        pick_checkpoint(files[:1], "checkpoints/epoch_10.pt", "u")
