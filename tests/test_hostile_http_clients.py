"""clipn's two HTTP clients against a hostile server on 127.0.0.1 (raw sockets): `detect --server`
(serve/client.py) and the weights download (weights/http.py). Each endless behaviour of the server
stops by itself after a bound, so old code fails an assertion instead of hanging."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from clipn_cli.errors import FetchError
from clipn_cli.inputs.sources import InputItem
from clipn_cli.serve.client import ServerError, remote_records, server_info
from clipn_cli.weights.http import download
from conftest import RawServer as Hostile
from conftest import cli

Behave = Callable[[socket.socket, bytes], None]
INFO = {"classes": ["a", "b"], "limits": {"max_upload_mb": 16}, "calibration_alpha": None}


def record(path: str) -> dict:
    return {"path": path, "verdict": "ID", "rule": "ctw", "class": "a", "class_index": 0}


def answer(body: bytes, status: bytes = b"200 OK", headers: bytes = b"Content-Type: application/json\r\n") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + headers + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body


def send(data: bytes, then_wait: float = 0.0) -> Behave:
    return lambda conn, head: (conn.sendall(data), time.sleep(then_wait))


def drip(data: bytes, pause: float = 0.1) -> Behave:
    """`data` a byte at a time; 40 bytes at most (4 s), then the connection closes."""
    def behave(conn: socket.socket, head: bytes) -> None:
        for i in range(min(len(data), 40)):
            conn.sendall(data[i : i + 1])
            time.sleep(pause)
    return behave


def endless(conn: socket.socket, head: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n[")
    block = b"1," * 32768
    for _ in range(1300):  # 85 MB, past the 64 MiB an answer may have
        conn.sendall(block)


def info_then(detect: Behave) -> Behave:
    """A server whose /v1/info is a clipn server's and whose /v1/detect is `detect`."""
    def behave(conn: socket.socket, head: bytes) -> None:
        (send(answer(json.dumps(INFO).encode())) if b" /v1/info " in head else detect)(conn, head)
    return behave


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request may take 1 s ($CLIPN_SERVER_TIMEOUT_S); the weights limits as small."""
    for name, value in {"CLIPN_SERVER_TIMEOUT_S": "1", "CLIPN_FETCH_STALL_S": "0.5", "CLIPN_FETCH_HEADERS_S": "1"}.items():
        monkeypatch.setenv(name, value)


class Listener:
    """A port that only counts who connects (to show a redirect was not followed)."""

    def __init__(self) -> None:
        self.sock, self.hits = socket.create_server(("127.0.0.1", 0)), 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            conn.sendall(b"220 ready\r\n")
            conn.close()

    def url(self, scheme: str) -> str:
        return f"{scheme}://127.0.0.1:{self.sock.getsockname()[1]}/x"


ELSEWHERE = Listener()
INFO_CASES = {
    "200 with HTML": (send(answer(b"<html><body>\nhello</body></html>", headers=b"Content-Type: text/html\r\n")), r"the answer is not JSON \(Content-Type 'text/html'\)"),
    "JSON nested 100000 deep": (send(answer(b"[" * 100_000 + b"]" * 100_000)), r"the answer is not JSON"),
    "wrong types": (send(answer(b'{"classes": "a,b", "limits": {"max_upload_mb": "16"}}')), r"not a clipn server's info"),
    "a list": (send(answer(b"[1, 2]")), r"not a clipn server's info"),
    "infinite upload limit": (send(answer(b'{"classes": [], "limits": {"max_upload_mb": Infinity}}')), r"not a clipn server's info"),
    "body never ends": (endless, r"an answer of more than 64 MiB: refused"),
    "body one byte at a time": (lambda c, h: (c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"), drip(b"[" * 40)(c, h)),
                                r"no complete answer within 1 s \(\$CLIPN_SERVER_TIMEOUT_S\)"),
    "headers one byte at a time": (drip(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 100), r"no complete answer within 1 s"),
    "Content-Length larger than the body": (send(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n{\"classes\""), r"the answer was cut short \(10 bytes of the 5000 announced\)"),
    "closed mid-headers": (send(b"HTTP/1.1 200 OK\r\nContent-Le"), r"the answer is not JSON"),
    "closed without a reply": (send(b""), r"closed the connection without a reply"),
    "70 KB header line": (send(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"), r"a header line longer than 64 KiB"),
    "2000 headers": (send(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(2000)) + b"\r\n"), r"got more than 100 headers"),
    "500 with an HTML page": (send(answer(b"<html>\n<h1>Internal error</h1>\n" + b"x" * 200_000, b"500 Internal Server Error")), r"HTTP 500 Internal Server Error$"),
    "503 with a JSON error over lines": (send(answer(b'{"error": "busy\\nretry \\u001b[31mlater"}', b"503 Busy")), r"HTTP 503 busy\?retry \?\[31mlater$"),
    "429 with Retry-After of years": (send(answer(b"{}", b"429 Too Many Requests", b"Retry-After: 99999999\r\n")), r"HTTP 429 Too Many Requests \(Retry-After: 99999999\)"),
    "429 with Retry-After negative": (send(answer(b"{}", b"429 Too Many Requests", b"Retry-After: -5\r\n")), r"HTTP 429 Too Many Requests \(Retry-After: -5\)"),
    "status line not UTF-8": (send(b"HTTP/1.1 500 \xff\xfe\x1b[2J\r\nContent-Length: 0\r\n\r\n"), r"HTTP 500 \xff\xfe\?\[2J$"),
    "redirect to another host": (send(answer(b"", b"302 Found", b"Location: " + ELSEWHERE.url("http").encode() + b"\r\n")),
                                 r"the server redirects \(HTTP 302\) to 'http://127\.0\.0\.1:\d+/x', which is not followed: give --server the URL"),
    "gzip bomb": (send(answer(gzip.compress(b"[" * (20 << 20)), headers=b"Content-Encoding: gzip\r\n")), r"the answer is not JSON"),
    "redirect to file://": (send(answer(b"", b"307 Temporary Redirect", b"Location: file:///etc/passwd\r\n")), r"redirects \(HTTP 307\) to 'file:///etc/passwd', which is not followed"),
}


@pytest.mark.parametrize("case", list(INFO_CASES))
def test_server_info_from_a_hostile_server_is_one_line(case: str, fast: None, monkeypatch: pytest.MonkeyPatch) -> None:
    behave, message = INFO_CASES[case]
    if case == "body never ends":  # 85 MB through loopback: the cap, not the clock, must stop it
        monkeypatch.setenv("CLIPN_SERVER_TIMEOUT_S", "60")
    server = Hostile(behave)
    hits = ELSEWHERE.hits
    with pytest.raises(ServerError) as info:
        server_info(server.url, "secret-key")
    text = str(info.value)
    assert text.startswith(server.url + "/v1/info: ") and re.search(message, text), text
    assert "\n" not in text and len(text) < 400
    assert ELSEWHERE.hits == hits  # no redirect followed: the key went nowhere else


def test_server_must_be_an_http_url() -> None:
    for url in ("file:///etc", "ftp://127.0.0.1/", "127.0.0.1:8000"):
        with pytest.raises(ServerError, match=r"--server must be an http\(s\) URL"):
            server_info(url, None)


def test_a_self_signed_certificate_fails_clearly(fast: None, tmp_path: Path) -> None:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    server = Hostile(send(answer(json.dumps(INFO).encode())), context)
    with pytest.raises(ServerError, match=r"cannot reach the server \(.*CERTIFICATE_VERIFY_FAILED") as info:
        server_info(server.url, None)
    assert "\n" not in str(info.value)
    with pytest.raises(FetchError, match=r"CERTIFICATE_VERIFY_FAILED"):
        download(server.url + "/w.pt", tmp_path / "w.pt")
    assert not (tmp_path / "w.pt").exists()


def _images(tmp_path: Path, n: int) -> list[InputItem]:
    for i in range(n):
        (tmp_path / f"{i}.png").write_bytes(b"img%d" % i)
    return [InputItem(str(tmp_path / f"{i}.png")) for i in range(n)]


def test_records_that_do_not_match_the_images_are_their_error_records(tmp_path: Path) -> None:
    items = _images(tmp_path, 4)
    p = [i.path for i in items]
    bad = [record(p[0]), record("/etc/passwd"), {**record(p[2]), "verdict": {"x": 1}}, {**record(p[3]), "note": [1] * 5}]
    server = Hostile(send(answer(json.dumps(bad).encode())))
    out = list(remote_records(server.url, items, None, 1 << 20))
    assert [r["path"] for r in out] == p and out[0] == record(p[0])  # the good one is kept
    assert "is for another path ('/etc/passwd')" in out[1]["error"]
    assert "has the verdict dict, not ID or OOD" in out[2]["error"] and "has a field 'note' that is not a number" in out[3]["error"]


@pytest.mark.parametrize("body", [b"[]", b'{"path": "x"}', b"[1, 2, 3, 4, 5]", b'"records"'])
def test_an_answer_that_is_not_one_record_per_image_fails_that_request_only(body: bytes, tmp_path: Path) -> None:
    items = _images(tmp_path, 20)  # two requests: 16, then 4
    calls: list[int] = []

    def behave(conn: socket.socket, head: bytes) -> None:
        calls.append(1)
        names = [i.path for i in items[16:]]
        conn.sendall(answer(body if len(calls) == 1 else json.dumps([record(n) for n in names]).encode()))

    out = list(remote_records(Hostile(behave).url, items, None, 1 << 20))
    assert [r["path"] for r in out] == [i.path for i in items]
    assert all("the answer is not a list of 16 records, one per image sent" in r["error"] for r in out[:16])
    assert out[16:] == [record(i.path) for i in items[16:]]


def test_after_a_request_with_no_answer_the_rest_are_not_sent_but_get_records(fast: None, tmp_path: Path) -> None:
    items = _images(tmp_path, 40)
    server = Hostile(drip(b"HTTP/1.1 200 OK\r\n" + b"X: " * 20))
    out = list(remote_records(server.url, items, None, 1 << 20))
    assert [r["path"] for r in out] == [i.path for i in items] and server.seen == ["/v1/detect"]
    assert all(re.search(r"/v1/detect: no complete answer within 1 s \(\$CLIPN_SERVER_TIMEOUT_S\)$", r["error"]) for r in out[:16])
    assert all(r["error"].startswith("not sent: ") for r in out[16:])


def test_detect_server_hostile_answers_exit_1_with_every_record(fast: None, tmp_path: Path) -> None:
    items = _images(tmp_path, 3)
    for detect, message in ((send(answer(b"<html>oops</html>")), "the answer is not JSON"),
                            (send(b"HTTP/1.1 200 OK\r\nContent-Length: 900\r\n\r\n[{"), "the answer was cut short"),
                            (send(answer(b"[" * 100_000)), "the answer is not JSON")):
        server = Hostile(info_then(detect))
        out = cli("detect", "--server", server.url, "--format", "jsonl", *[i.path for i in items])
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        records = [json.loads(line) for line in out.stdout.splitlines()]
        assert [r["path"] for r in records] == [i.path for i in items] and all(message in r["error"] for r in records)


def test_detect_server_that_is_not_a_clipn_server_exits_2_in_one_line(fast: None, tmp_path: Path) -> None:
    items = _images(tmp_path, 1)
    for behave, message in ((send(answer(b"<html>login</html>", headers=b"Content-Type: text/html\r\n")), "the answer is not JSON"),
                            (send(answer(b"", b"301 Moved", b"Location: https://example.org/\r\n")), "which is not followed")):
        server = Hostile(behave)
        out = cli("detect", "--server", server.url, items[0].path)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert cli("detect", "--server", "file:///etc", items[0].path).returncode == 2


def redirect(location: bytes) -> Behave:
    return send(answer(b"", b"302 Found", b"Location: " + location + b"\r\n"))


@pytest.mark.parametrize("scheme", ["ftp", "file", "data"])
def test_weights_download_follows_no_redirect_off_http(scheme: str, fast: None, tmp_path: Path) -> None:
    target = {"ftp": ELSEWHERE.url("ftp"), "file": "file:///etc/passwd", "data": "data:,hello"}[scheme]
    hits = ELSEWHERE.hits
    server = Hostile(redirect(target.encode()))
    with pytest.raises(FetchError, match=re.escape(f"the server redirects to '{target}': only http(s) redirects are followed")) as info:
        download(server.url + "/w.pt", tmp_path / "w.pt")
    assert "\n" not in str(info.value) and ELSEWHERE.hits == hits and not (tmp_path / "w.pt").exists()


def test_weights_download_stops_a_long_redirect_chain(fast: None, tmp_path: Path) -> None:
    server = Hostile(lambda conn, head: redirect(b"/hop%d" % len(server.seen))(conn, head))
    with pytest.raises(FetchError, match=r"more than 10 redirects \(the last to '/hop11'\): refused"):
        download(server.url + "/w.pt", tmp_path / "w.pt")
    assert len(server.seen) == 11 and not (tmp_path / "w.pt").exists()


def test_weights_download_keeps_encoded_bytes_as_sent(fast: None, tmp_path: Path) -> None:
    """A gzip 'bomb' is never inflated: clipn asks for identity and checks the bytes that came."""
    bomb = gzip.compress(b"\0" * (50 << 20))
    server = Hostile(send(answer(bomb, headers=b"Content-Encoding: gzip\r\n")))
    result = download(server.url + "/w.pt", tmp_path / "w.pt", sha256=hashlib.sha256(bomb).hexdigest())
    assert result.size == len(bomb) < 1 << 20 and (tmp_path / "w.pt").read_bytes() == bomb



def test_server_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Hostile(send(answer(json.dumps(INFO).encode())))
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv("CLIPN_SERVER_TIMEOUT_S", bad)
        with pytest.raises(ServerError, match=r"\$CLIPN_SERVER_TIMEOUT_S must be a positive number"):
            server_info(server.url, None)
    monkeypatch.setenv("CLIPN_SERVER_TIMEOUT_S", "2.5")
    assert server_info(server.url, None) == INFO


def test_weights_download_does_not_read_a_redirects_endless_body(fast: None, tmp_path: Path) -> None:
    """urllib reads a redirect's body to its end before following it: an endless one is not read."""
    sent: list[int] = []

    def behave(conn: socket.socket, head: bytes) -> None:
        if b" /w.pt " not in head:
            return conn.sendall(answer(b"abc", headers=b""))
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /real\r\n\r\n")
        sent.append(0)
        for _ in range(4800):  # 300 MiB, then the connection closes
            conn.sendall(b"x" * 65536)
            sent[0] += 65536

    server = Hostile(behave)
    result = download(server.url + "/w.pt", tmp_path / "w.pt")
    assert (tmp_path / "w.pt").read_bytes() == b"abc" and result.size == 3
    assert server.seen == ["/w.pt", "/real"] and sent[0] < 300 << 20


@pytest.mark.parametrize("location", [b"\x01ftp://HOST/x", b" ftp://HOST/x", b"FTP://HOST/x", b"\tftp://HOST/x"])
def test_weights_redirect_scheme_is_read_as_urllib_reads_it(location: bytes, fast: None, tmp_path: Path) -> None:
    host = ELSEWHERE.url("ftp").split("://")[1].split("/")[0].encode()
    hits = ELSEWHERE.hits
    with pytest.raises(FetchError, match=r"only http\(s\) redirects are followed"):
        download(Hostile(redirect(location.replace(b"HOST", host))).url + "/w.pt", tmp_path / "w.pt")
    assert ELSEWHERE.hits == hits


@pytest.mark.parametrize("status", [b"429 Too Many Requests\r\nRetry-After: 99999999", b"429 Slow\r\nRetry-After: -5",
                                    b"503 \xff\xfe\x1b[2J\r\nRetry-After: Wed, 21 Oct 2999 07:28:00 GMT"])
def test_weights_download_never_waits_on_retry_after(status: bytes, fast: None, tmp_path: Path) -> None:
    server = Hostile(send(b"HTTP/1.1 " + status + b"\r\nContent-Length: 5\r\n\r\nslow!"))
    with pytest.raises(FetchError, match=r"the server answered HTTP (429|503) ") as info:
        download(server.url + "/w.pt", tmp_path / "w.pt")
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value) and server.seen == ["/w.pt"]


def test_a_server_that_never_answers_is_named_by_the_clients_own_timeout(fast: None) -> None:
    """Whichever bound ends the wait (the socket's or the whole request's), the message names $CLIPN_SERVER_TIMEOUT_S."""
    server = Hostile(send(b"", then_wait=30))
    with pytest.raises(ServerError, match=r"no complete answer within 1 s \(\$CLIPN_SERVER_TIMEOUT_S\)$") as info:
        server_info(server.url, None)
    assert "CLIPN_FETCH" not in str(info.value)
