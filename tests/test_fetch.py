"""Downloads from a real HTTP server on 127.0.0.1: progress, resume after a cut, checksum refusal,
conversion, and `clipn detect` finding the fetched weights with no --weights."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import OFFICIAL_CHECKPOINT, TINY_CONFIG, RawServer, cli

from clipn_cli.errors import FetchError
from clipn_cli.weights.fetch import pick_checkpoint
from clipn_cli.weights.http import FetchLimits, download
from clipn_cli.weights.home import downloads_dir, get_default, read_header, weights_dir

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

    out = cli("weights", "fetch", server.url, "--sha256", "ab" * 32, "--config", TINY_CONFIG)
    assert out.returncode == 2 and "sha256 mismatch" in out.stderr
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
    first = cli("weights", "fetch", server.url)
    assert first.returncode == 2, first.stderr
    assert "--config" in first.stderr and "the download is kept" in first.stderr
    kept = list(downloads_dir().glob("*.pt"))
    assert len(kept) == 1 and kept[0].read_bytes() == DATA

    sent = server.sent
    second = cli("weights", "fetch", server.url, "--config", TINY_CONFIG)
    assert second.returncode == 0, second.stderr
    assert server.sent == sent  # the kept download was converted, not fetched again
    assert list(downloads_dir().iterdir()) == []
    stored = weights_dir() / "clipn-tiny-official.safetensors"
    meta = read_header(stored)
    assert meta["fingerprint"] == read_header(tiny_weights)["fingerprint"]
    assert meta["source_url"] == server.url and meta["source_sha256"] == SHA
    assert get_default() == "clipn-tiny-official"

    listed = json.loads(cli("weights", "list", "--format", "json").stdout)
    row = next(r for r in listed["weights"] if r["name"] == "clipn-tiny-official")
    assert row["present"] and row["default"] and row["size"] == stored.stat().st_size

    args = ["detect", "--classes", "cat,horse,rocket", "--format", "json", str(images_dir)]
    plain = cli(*args)  # env: CLIPN_HOME, no CLIPN_WEIGHTS
    explicit = cli(*args, "--weights", tiny_weights)
    assert plain.returncode == 0 and explicit.returncode == 0, plain.stderr
    assert json.loads(plain.stdout) == json.loads(explicit.stdout) and len(json.loads(plain.stdout)) == 12


def test_fetch_again_is_a_no_op_unless_forced(server: Server) -> None:
    assert cli("weights", "fetch", server.url, "--name", "tiny", "--config", TINY_CONFIG).returncode == 0
    sent = server.sent
    again = cli("weights", "fetch", server.url, "--name", "tiny")
    assert again.returncode == 0 and "already here" in again.stderr and server.sent == sent
    forced = cli("weights", "fetch", server.url, "--name", "tiny", "--config", TINY_CONFIG, "--force")
    assert forced.returncode == 0 and server.sent == sent + len(DATA)


def test_forced_fetch_does_not_reuse_a_kept_download(server: Server) -> None:
    assert cli("weights", "fetch", server.url).returncode == 2  # no --config: the download is kept
    sent = server.sent
    forced = cli("weights", "fetch", server.url, "--config", TINY_CONFIG, "--force")
    assert forced.returncode == 0, forced.stderr
    assert server.sent == sent + len(DATA) and list(downloads_dir().iterdir()) == []


def test_pick_checkpoint_from_a_drive_folder_listing() -> None:
    files = [("a", "out.log"), ("b", "checkpoints/epoch_9.pt"), ("c", "checkpoints/epoch_10.pt"), ("d", "checkpoints/epoch_2.pt")]
    assert pick_checkpoint(files, "checkpoints/epoch_10.pt", "u") == "c"
    assert pick_checkpoint(files[:2] + files[3:], "checkpoints/epoch_10.pt", "u") == "b"
    with pytest.raises(FetchError, match="no checkpoints/epoch_10.pt"):
        pick_checkpoint(files[:1], "checkpoints/epoch_10.pt", "u")


class Hostile(RawServer):
    """The conftest raw-socket server answering every connection with `behave(conn)`, at a checkpoint's
    URL; each endless behaviour stops by itself after a bound (so old code fails an assertion instead of hanging)."""

    def __init__(self, behave: Callable[[socket.socket], None]) -> None:
        super().__init__(lambda conn, head: behave(conn), whole_request=False)

    @property
    def url(self) -> str:
        return super().url + "/epoch_10.pt"


def _drip(data: bytes, pause: float = 0.05) -> Callable[[socket.socket], None]:
    def behave(conn: socket.socket) -> None:
        for i in range(len(data)):
            conn.sendall(data[i : i + 1])
            time.sleep(pause)

    return behave


def _send(data: bytes, then_wait: float = 0.0) -> Callable[[socket.socket], None]:
    def behave(conn: socket.socket) -> None:
        conn.sendall(data)
        time.sleep(then_wait)

    return behave


def _endless(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    block = b"x" * 65536
    for _ in range(1024):  # 64 MiB, far past the cap the test sets
        conn.sendall(block)


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
HOSTILE = {
    "endless body, no Content-Length": (_endless, r"more than 100000 bytes \(CLIPN_FETCH_MAX_BYTES\)"),
    "body one byte at a time": (lambda c: (c.sendall(OK_HEAD), _drip(b"x" * 400)(c)), r"slower than 1000 bytes/s over 0.3 s"),
    "body stalls": (_send(OK_HEAD + b"abc", then_wait=30), r"no byte for 0.5 s \(CLIPN_FETCH_STALL_S\)"),
    "headers one byte at a time": (_drip(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"y" * 400), r"no complete reply within 1 s \(CLIPN_FETCH_HEADERS_S\)"),
    "no reply at all": (_send(b"", then_wait=30), r"no reply within the stall timeout"),
    "not HTTP": (_send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), r"the reply is not HTTP"),
    "closed without a reply": (_send(b""), r"closed the connection without a reply"),
    "70 KB header line": (_send(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"), r"header line longer than 64 KiB"),
    "200 header lines": (_send(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n"), r"not a valid HTTP reply: HTTPException: got more than 100 headers"),
    "Content-Length: ²": (_send(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nab"), r"invalid Content-Length '²'"),
    "Content-Length: -5": (_send(b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nab"), r"invalid Content-Length"),
    "Content-Length over the cap": (_send(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\nab"), r"offers 99999999999 bytes, more than the 100000 allowed"),
    "206 not asked for": (_send(b"HTTP/1.1 206 Partial\r\nContent-Range: bytes 5-9/10\r\nContent-Length: 5\r\n\r\nabcde"), r"a part of the file that was not asked for"),
}


@pytest.fixture
def fast_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits small enough that a hostile server is cut off in well under a second."""
    for name, value in {"CLIPN_FETCH_STALL_S": "0.5", "CLIPN_FETCH_HEADERS_S": "1", "CLIPN_FETCH_MIN_RATE": "1000",
                        "CLIPN_FETCH_WINDOW_S": "0.3", "CLIPN_FETCH_MAX_BYTES": "100000"}.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_server_is_one_line_naming_the_url(case: str, fast_limits: None, tmp_path: Path) -> None:
    behave, message = HOSTILE[case]
    server = Hostile(behave)
    with pytest.raises(FetchError, match=message) as info:
        download(server.url, tmp_path / "x.pt")
    text = str(info.value)
    assert server.url in text and "\n" not in text and len(text) < 600
    assert not (tmp_path / "x.pt").exists()


def test_hostile_server_through_the_cli_exits_2(fast_limits: None) -> None:
    for behave, message in (HOSTILE["not HTTP"], HOSTILE["endless body, no Content-Length"]):
        server = Hostile(behave)
        out = cli("weights", "fetch", server.url)
        assert out.returncode == 2, out.stderr
        assert re.search(message, out.stderr) and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and server.url in out.stderr


def test_tls_to_a_plain_server_is_one_line(fast_limits: None, tmp_path: Path) -> None:
    server = Hostile(_send(OK_HEAD))
    url = server.url.replace("http://", "https://")
    with pytest.raises(FetchError, match=r"cannot download https://127\.0\.0\.1:\d+/epoch_10\.pt \(.*SSL") as info:
        download(url, tmp_path / "x.pt")
    assert "\n" not in str(info.value)


def test_fetch_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert FetchLimits.from_env() == FetchLimits(60.0, 120.0, 1024.0, 60.0, 16 << 30)
    monkeypatch.setenv("CLIPN_FETCH_STALL_S", "2.5")
    assert FetchLimits.from_env().stall == 2.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        monkeypatch.setenv("CLIPN_FETCH_STALL_S", bad)
        with pytest.raises(FetchError, match=r"\$CLIPN_FETCH_STALL_S must be a positive number"):
            FetchLimits.from_env()


def test_a_body_cut_short_without_content_length_is_not_complete(fast_limits: None, tmp_path: Path) -> None:
    """A stall with no Content-Length must not pass for the end of the file."""
    server = Hostile(_send(b"HTTP/1.1 200 OK\r\n\r\npartial", then_wait=30))
    with pytest.raises(FetchError, match="no byte for 0.5 s"):
        download(server.url, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists() and (tmp_path / "x.pt.part").read_bytes() == b"partial"
