"""`clipn serve` against real servers on 127.0.0.1 (ephemeral ports): a `python -m clipn_cli serve`
subprocess with the shipped digits weights where the model matters (records, broken images,
metrics, SIGTERM), and uvicorn in a thread around a gated stand-in model where the point is the
HTTP contract (401, 413, 415, malformed bodies, 429)."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from conftest import DIGITS_CLASSES, DIGITS_IMAGES, WORDS, assert_close_records, cli, http_request, json_body, spawn, ServeProcess  # noqa: E402
from headless_chromium import DevTools, needs_chromium  # noqa: E402


def multipart(images: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, str]]:
    boundary = "clipn-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in images]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def detect_json(url: str, images: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    status, _, body = http_request(url + "/v1/detect", json_body(images), {"Content-Type": "application/json"})
    assert status == 200, body
    return json.loads(body)


class Served(ServeProcess):
    """Local `clipn serve` on any free port."""

    def __init__(self, args: list[str], home: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(["--port", "0", *args], home, env)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clipn-home")


@pytest.fixture(scope="module")
def atd_server(home: Path) -> Iterator[Served]:
    served = Served(["-w", "digits", "-c", DIGITS_CLASSES], home)
    yield served
    assert served.stop() == 0


def digit_images() -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in sorted(DIGITS_IMAGES.glob("*.png"))]


def local_detect(*args: str) -> list[dict[str, Any]]:
    done = cli("detect", "-w", "digits", "-c", DIGITS_CLASSES, "--format", "json", *args, *(str(p) for p in sorted(DIGITS_IMAGES.glob("*.png"))))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("rule", ["atd", "ctw"])
def test_records_equal_local_detect(rule: str, home: Path, atd_server: Served) -> None:
    served = atd_server if rule == "atd" else Served(["-w", "digits", "-c", DIGITS_CLASSES, "--rule", rule], home)
    try:
        got = detect_json(served.url, digit_images())
    finally:
        if served is not atd_server:
            assert served.stop() == 0
    want = local_detect("--rule", rule)
    assert len(got) == 20 and {r["verdict"] for r in got} == {"ID", "OOD"}
    assert_close_records(got, want)


def test_calibrated_records_equal_local_detect(home: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib.json"
    made = cli("calibrate", "-w", "digits", "-c", DIGITS_CLASSES, "-o", str(calib), *(str(p) for p in sorted(DIGITS_IMAGES.glob("*.png"))))
    assert made.returncode == 0, made.stderr
    served = Served(["-w", "digits", "-c", DIGITS_CLASSES, "--calibration", str(calib), "--alpha", "0.2"], home)
    try:
        got = detect_json(served.url, digit_images())
        _, _, info = http_request(served.url + "/v1/info")
    finally:
        assert served.stop() == 0
    want = local_detect("--calibration", str(calib), "--alpha", "0.2")
    assert all("p_value" in r for r in got)
    assert_close_records(got, want)
    assert json.loads(info)["calibration_alpha"] == 0.2


def test_negative_label_records_equal_local_detect(home: Path) -> None:
    neg = ["--negatives", "neglabel", "--words", str(WORDS), "--rule", "neglabel", "--threshold", "0.5"]
    served = Served(["-w", "digits", "-c", DIGITS_CLASSES, *neg], home)
    try:
        got = detect_json(served.url, digit_images())
        info = json.loads(http_request(served.url + "/v1/info")[2])
    finally:
        assert served.stop() == 0
    want = local_detect(*neg)
    assert {r["verdict"] for r in got} == {"ID", "OOD"} and all("neglabel_score" in r and "atd_neg_score" in r for r in got)
    assert_close_records(got, want)
    assert info["negatives"] == ["neglabel"] and info["rule"] == "neglabel" and info["threshold"] == 0.5


def test_multipart_uploads_are_named_by_their_file_names(atd_server: Served) -> None:
    images = digit_images()[:3]
    body, headers = multipart([(Path(n).name, d) for n, d in images])
    status, got_headers, answer = http_request(atd_server.url + "/v1/detect", body, headers)
    assert status == 200
    assert [r["path"] for r in json.loads(answer)] == [Path(n).name for n, _ in images]
    assert json.loads(answer)[1:] == [dict(r, path=Path(r["path"]).name) for r in detect_json(atd_server.url, images)][1:]
    assert got_headers["x-content-type-options"] == "nosniff"


def broken_images() -> list[tuple[str, bytes, str]]:
    from PIL import Image

    png = sorted(DIGITS_IMAGES.glob("*.png"))[0].read_bytes()
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")
    return [
        ("truncated.png", png[: len(png) // 2], "corrupt or truncated"),
        ("bomb.png", bomb.getvalue(), "image too large"),
        ("doc.pdf", b"%PDF-1.4\n" + b"0" * 100, "format PDF is not decoded"),
        ("notes.txt", b"hello, not an image", "not an image"),
        ("empty.png", b"", "empty file"),
    ]


def test_broken_images_get_error_records_and_the_server_goes_on(atd_server: Served) -> None:
    good = digit_images()[0]
    broken = broken_images()
    got = detect_json(atd_server.url, [good, *[(n, d) for n, d, _ in broken], good])
    assert [r["path"] for r in got] == [good[0], *[n for n, _, _ in broken], good[0]]
    for record, (name, _, reason) in zip(got[1:-1], broken):
        assert set(record) == {"path", "error"} and reason in record["error"], record
    assert got[0] == got[-1] and got[0]["verdict"] in ("ID", "OOD")
    assert_close_records(detect_json(atd_server.url, [good]), [got[0]])


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_metrics_count_what_was_sent(atd_server: Served) -> None:
    names = ['clipn_requests_total{status="200"}', 'clipn_requests_total{status="400"}', 'clipn_images_total{verdict="ID"}',
             'clipn_images_total{verdict="OOD"}', 'clipn_images_total{verdict="error"}', "clipn_request_seconds_count"]
    before = http_request(atd_server.url + "/metrics")[2].decode()
    records = detect_json(atd_server.url, digit_images()) + detect_json(atd_server.url, [("x.txt", b"not an image")])
    assert http_request(atd_server.url + "/v1/detect", b"{", {"Content-Type": "application/json"})[0] == 400
    after = http_request(atd_server.url + "/metrics")[2].decode()
    delta = {n: metric(after, n) - metric(before, n) for n in names}
    verdicts = [r.get("verdict", "error") for r in records]
    assert delta == {names[0]: 2, names[1]: 1, names[2]: verdicts.count("ID"), names[3]: verdicts.count("OOD"), names[4]: 1, names[5]: 3}
    assert metric(after, "clipn_queue_depth") == 0
    assert metric(after, "clipn_batch_images_count") >= 2


def test_info_health_pages(atd_server: Served) -> None:
    status, _, body = http_request(atd_server.url + "/v1/info")
    info = json.loads(body)
    assert status == 200 and info["classes"] == DIGITS_CLASSES.split(",") and info["rule"] == "atd" and len(info["weights_fingerprint"]) == 64
    assert info["limits"]["queue"] == 16
    assert http_request(atd_server.url + "/healthz")[0] == 200 and http_request(atd_server.url + "/readyz")[0] == 200
    spec = json.loads(http_request(atd_server.url + "/openapi.json")[2])
    assert set(spec["paths"]) >= {"/v1/detect", "/healthz", "/readyz", "/v1/info", "/metrics"}
    for page in ("/", "/docs"):
        status, headers, html = http_request(atd_server.url + page)
        csp = headers["content-security-policy"]
        assert status == 200 and "default-src 'none'" in csp
        assert not re.search(rb"(src|href)=\"(https?:)?//", html), page  # nothing fetched from elsewhere


def test_sigterm_answers_the_request_in_flight_and_exits_0(home: Path) -> None:
    served = Served(["-w", "digits", "-c", DIGITS_CLASSES], home)
    body = json_body(digit_images()[:2])
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(f"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        while metric(http_request(served.url + "/metrics")[2].decode(), "clipn_queue_depth") != 1:
            pass  # admitted: its body is being received
        served.proc.send_signal(signal.SIGTERM)
        conn.sendall(body[100:])
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert len(json.loads(answer.split(b"\r\n\r\n", 1)[1])) == 2
    assert served.proc.wait() == 0
    served.proc.stderr.close()


def test_sigterm_after_grace_answers_503_and_exits_1(home: Path) -> None:
    served = Served(["-w", "digits", "-c", DIGITS_CLASSES, "--grace", "0.5"], home)
    body = json_body(digit_images()[:2])
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(f"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        while metric(http_request(served.url + "/metrics")[2].decode(), "clipn_queue_depth") != 1:
            pass  # admitted: its body is being received, and the rest never comes
        served.proc.send_signal(signal.SIGTERM)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"status": 503, "error": "the server stopped before this request was answered (its --grace period ran out)"}
    assert served.proc.wait() == 1
    assert "1 request(s) still running after --grace 0.5 s were answered 503" in served.proc.stderr.read()
    served.proc.stderr.close()


GATED_SERVER = r"""
import sys, threading
from clipn_cli.serve.app import Service
from clipn_cli.serve.engine import Batcher, ServeLimits
from clipn_cli.serve.run import run_server

def score(loaded):
    print("scoring", flush=True)
    threading.Event().wait()  # a forward that outlives the grace period

limits = ServeLimits(queue=4, max_batch=1)
service = Service(Batcher(score, 1, 5.0, 4), lambda image: image.size, {"version": "test"}, limits)
cut_off = run_server(service, "127.0.0.1", 0, lambda url: print(url, flush=True), grace=float(sys.argv[1]))
sys.exit(1 if cut_off else 0)
"""


def test_requests_in_the_model_or_queued_after_grace_get_503(tmp_path: Path) -> None:
    proc = spawn([sys.executable, "-c", GATED_SERVER, "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    png = digit_images()[0][1]
    answers: list[Any] = []
    clients = [threading.Thread(target=lambda n=n: answers.append(http_request(url + "/v1/detect", json_body([(n, png)]), {"Content-Type": "application/json"})))
               for n in ("a.png", "b.png")]
    clients[0].start()
    assert proc.stdout.readline() == "scoring\n"  # the first is in the model, the second waits in the queue
    clients[1].start()
    while metric(http_request(url + "/metrics")[2].decode(), "clipn_queue_depth") != 2:
        threading.Event().wait(0.01)
    proc.send_signal(signal.SIGTERM)
    for t in clients:
        t.join()
    assert [a[0] for a in answers] == [503, 503] and all("--grace" in json.loads(a[2])["error"] for a in answers)
    assert proc.wait() == 1
    proc.stdout.close()
    proc.stderr.close()


def test_detect_server_prints_what_local_detect_prints(atd_server: Served, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted(DIGITS_IMAGES.glob("*.png"))[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    for name, data, _ in broken_images()[:2]:
        (folder / name).write_bytes(data)
    for fmt in ("json", "jsonl", "csv"):
        args = ("--format", fmt, str(folder), str(tmp_path / "missing.png"))
        remote = cli("detect", "--server", atd_server.url, *args)
        local = cli("detect", "-w", "digits", "-c", DIGITS_CLASSES, *args)
        assert remote.returncode == local.returncode == 1
        if fmt == "csv":
            assert remote.stdout.splitlines()[0] == local.stdout.splitlines()[0] and len(remote.stdout.splitlines()) == 8
        else:
            parse = (lambda t: json.loads(t)) if fmt == "json" else (lambda t: [json.loads(x) for x in t.splitlines()])
            assert_close_records(parse(remote.stdout), parse(local.stdout))
    refused = cli("detect", "--server", atd_server.url, "-c", "a,b", str(folder))
    assert refused.returncode == 2 and "--classes cannot be used with --server" in refused.stderr


class Gated:
    """A stand-in model: scoring waits for `gate`; `entered` says a batch is being scored."""

    def __init__(self) -> None:
        self.gate, self.entered = threading.Event(), threading.Event()
        self.batches: list[int] = []

        self.decoded = 0  # images through the decoder's transform

    def transform(self, image: Any) -> Any:
        self.decoded += 1
        return image.size

    def __call__(self, loaded: list[Any]) -> list[dict[str, Any]]:
        self.batches.append(len(loaded))
        self.entered.set()
        self.gate.wait()
        return [{"path": i.path, "verdict": "ID"} if i.error is None else {"path": i.path, "error": i.error} for i in loaded]


@pytest.fixture
def gated_server(request_limits: dict[str, Any]) -> Iterator[tuple[str, Gated]]:
    import uvicorn

    from clipn_cli.serve.app import Service
    from clipn_cli.serve.engine import Batcher, ServeLimits
    from clipn_cli.serve.run import config_for

    model = Gated()
    limits = ServeLimits(**{k: v for k, v in request_limits.items() if k not in ("key", "max_connections")})
    service = Service(Batcher(model, limits.max_batch, limits.max_wait_ms, limits.queue), model.transform, {"version": "test"},
                      limits, api_key=request_limits.get("key"))
    model.service = service
    server = uvicorn.Server(config_for(service, "127.0.0.1", 0, max_connections=request_limits.get("max_connections")))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.01)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", model
    model.gate.set()
    server.should_exit = True
    thread.join()
    service.batcher.close()


@pytest.fixture
def request_limits() -> dict[str, Any]:
    return {"queue": 1, "max_upload_mb": 0.01, "max_images": 3}


def test_queue_full_is_429_at_once(gated_server: tuple[str, Gated]) -> None:
    url, model = gated_server
    png = digit_images()[0][1]
    first: list[Any] = []
    holder = threading.Thread(target=lambda: first.append(http_request(url + "/v1/detect", json_body([("a.png", png)]), {"Content-Type": "application/json"})))
    holder.start()
    model.entered.wait()
    status, headers, body = http_request(url + "/v1/detect", json_body([("b.png", png)]), {"Content-Type": "application/json"})
    assert status == 429 and headers["retry-after"] == "1" and "--queue" in json.loads(body)["error"]
    model.gate.set()
    holder.join()
    assert first[0][0] == 200 and json.loads(first[0][2]) == [{"path": "a.png", "verdict": "ID"}]
    assert model.batches == [1]


@pytest.mark.parametrize("request_limits", [{"queue": 4, "max_batch": 1, "max_upload_mb": 0.1, "max_images": 3}])
def test_many_clients_hold_at_most_queue_bodies_and_twice_max_batch_decoded_images(gated_server: tuple[str, Gated]) -> None:
    url, model = gated_server
    held = model.service.held
    png = digit_images()[0][1]
    answers: list[Any] = []

    def send(name: str) -> None:
        answers.append(http_request(url + "/v1/detect", json_body([(name, png)]), {"Content-Type": "application/json"}))

    admitted = [threading.Thread(target=send, args=(f"{i}.png",)) for i in range(4)]
    for t in admitted:
        t.start()
    # one request in the model, one decoded and queued (2 = twice --max-batch); two hold only their bytes
    while held.counts() != {"bodies": 2, "decoded": 2, "waiting_to_decode": 2}:
        threading.Event().wait(0.01)
    refused = [http_request(url + "/v1/detect", json_body([(f"late{i}.png", png)]), {"Content-Type": "application/json"}) for i in range(12)]
    assert [r[0] for r in refused] == [429] * 12
    assert model.decoded == 2 and model.service.batcher.depth() == 4
    model.gate.set()
    for t in admitted:
        t.join()
    assert sorted(r[0] for r in answers) == [200] * 4 and model.decoded == 4
    assert held.most["bodies"] <= 4 and held.most["decoded"] == 2 and held.counts() == {"bodies": 0, "decoded": 0, "waiting_to_decode": 0}


def test_decoded_images_are_granted_in_arrival_order_and_a_large_request_alone() -> None:
    import asyncio

    from clipn_cli.serve.app import Holdings

    async def run() -> None:
        held = Holdings(2)
        await held.take(1)
        large = asyncio.ensure_future(held.take(3))  # over the limit: only once nothing else is decoded
        small = asyncio.ensure_future(held.take(1))  # would fit, but waits its turn behind `large`
        late = asyncio.ensure_future(held.take(1))
        await asyncio.sleep(0)
        assert held.counts() == {"bodies": 0, "decoded": 1, "waiting_to_decode": 3}
        held.give(1)
        await asyncio.sleep(0)
        assert large.done() and not small.done() and held.decoded == 3
        small.cancel()  # a request that goes away gives up its turn
        await asyncio.sleep(0)
        assert held.counts() == {"bodies": 0, "decoded": 3, "waiting_to_decode": 1}
        held.give(3)
        await asyncio.sleep(0)
        assert late.done() and held.decoded == 1 and held.most["decoded"] == 3

    asyncio.run(run())


@pytest.mark.parametrize("body, kind, status, reason", [
    (b"{", "application/json", 400, "malformed JSON"),
    (b'{"images": "x"}', "application/json", 400, "must be"),
    (b'{"images": ["@@@"]}', "application/json", 400, "not valid base64"),
    (b'{"images": ["aGk="], "names": [1]}', "application/json", 400, "names"),
    (b'{"images": []}', "application/json", 400, "no images"),
    (json.dumps({"images": ["aGk="] * 4}).encode(), "application/json", 413, "over the limit of 3"),
    (b"x" * 20_000, "application/json", 413, "--max-upload-mb"),
    (b"raw", "image/png", 415, "multipart/form-data"),
    (b"--b\r\nbroken", "multipart/form-data; boundary=b", 400, "no images"),
])
def test_malformed_requests_get_a_json_error(gated_server: tuple[str, Gated], body: bytes, kind: str, status: int, reason: str) -> None:
    url, model = gated_server
    model.gate.set()
    got, _, answer = http_request(url + "/v1/detect", body, {"Content-Type": kind})
    assert got == status and reason in json.loads(answer)["error"], answer
    assert http_request(url + "/v1/detect", json_body([("ok.txt", b"hi")]), {"Content-Type": "application/json"})[0] == 200


@pytest.mark.parametrize("request_limits", [{"queue": 2, "max_upload_mb": 1, "max_images": 3, "key": "s3cret"}])
def test_a_key_is_needed_when_the_server_has_one(gated_server: tuple[str, Gated]) -> None:
    url, model = gated_server
    model.gate.set()
    body = json_body([("ok.txt", b"hi")])
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        for path, data in (("/v1/detect", body), ("/v1/info", None), ("/metrics", None)):
            status, got, _ = http_request(url + path, data, {"Content-Type": "application/json", **headers})
            assert status == 401 and got["www-authenticate"] == "Bearer", (path, headers)
    assert http_request(url + "/v1/detect", body, {"Content-Type": "application/json", "Authorization": "Bearer s3cret"})[0] == 200
    assert http_request(url + "/healthz")[0] == 200


# ---------------------------------------------------------------- hostile HTTP: raw sockets

def raw_exchange(url: str, data: bytes, sock: socket.socket | None = None) -> tuple[int, dict[str, str], Any]:
    """Send `data` as is and read until the server closes: status, lower-cased headers, JSON body."""
    if sock is None:
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=60)
    with sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
    return int(lines[0].split()[1]), headers, json.loads(body)


def request_bytes(method: str, path: str, headers: str = "", body: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}\r\n".encode() + body


@pytest.mark.parametrize("data, status, reason", [
    (request_bytes("GET", "/healthz", "".join(f"X-{i}: {'a' * 1000}\r\n" for i in range(100))), 431, "over 64 KB"),
    (request_bytes("GET", "/healthz", "".join(f"X{i}:a\r\n" for i in range(20_000))), 431, "over 64 KB"),
    (request_bytes("POST", "/v1/detect", "Content-Length: -5\r\n"), 400, "malformed HTTP request"),
    (request_bytes("POST", "/v1/detect", "Content-Length: abc\r\n"), 400, "malformed HTTP request"),
    (request_bytes("POST", "/v1/detect", "Content-Length: 2\r\nContent-Length: 3\r\n", b"{}"), 400, "malformed HTTP request"),
    (request_bytes("POST", "/v1/detect", "Transfer-Encoding: chunked\r\n", b"zz\r\nab\r\n0\r\n\r\n"), 400, "malformed HTTP request"),
    (request_bytes("GET", "/\xff".encode("latin-1").decode("latin-1")), 400, "malformed HTTP request"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(100), 400, "malformed HTTP request"),
    (b"GET /healthz\r\n\r\n", 400, "malformed HTTP request"),
    (request_bytes("POST", "/v1/detect", "Content-Type: application/json\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"),
     400, "both Content-Length and Transfer-Encoding"),
    (request_bytes("POST", "/v1/detect", "Content-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n", b"{}"),
     415, "Content-Encoding 'gzip' is not accepted"),
    (request_bytes("GET", "/nope"), 404, "GET '/nope': Not Found"),
    (request_bytes("GET", "/../../etc/passwd"), 404, "Not Found"),
    (request_bytes("GET", "/v1/detect"), 405, "Method Not Allowed"),
    (request_bytes("OPTIONS", "/v1/detect"), 405, "Method Not Allowed"),
    (request_bytes("FOO", "/healthz"), 405, "Method Not Allowed"),
], ids=["head-100KB-one-read", "20000-headers", "negative-length", "non-numeric-length", "two-lengths", "bad-chunk", "non-ascii-path",
        "tls-hello", "http-0.9", "length-and-chunked", "gzip-body", "unknown-path", "traversal", "get-on-post", "options", "unknown-method"])
def test_every_refusal_is_one_json_error_and_the_server_goes_on(gated_server: tuple[str, Gated], data: bytes, status: int, reason: str) -> None:
    """Refused by the HTTP layer (h11) or by routing, as by the endpoint: the documented status with
    `{"error", "status"}` as JSON, never text/plain; oversized heads are refused, not parsed."""
    url, model = gated_server
    model.gate.set()
    got, headers, body = raw_exchange(url, data)
    assert (got, body["status"]) == (status, status) and reason in body["error"] and set(body) == {"error", "status"}, body
    assert headers["content-type"] == "application/json"
    assert answered_once_its_place_is_free(url) == 200


def answered_once_its_place_is_free(url: str) -> int:
    """A valid request's status after a refusal. A request refused mid-body (a bad chunk) held the one
    --queue place, which the server lets go as soon as it sees that request end; a request sent before
    that gets the documented 429 and retries. A place never let go fails after 1,000 retries."""
    for _ in range(1000):
        status = http_request(url + "/v1/detect", json_body([("ok.txt", b"hi")]), {"Content-Type": "application/json"})[0]
        if status != 429:
            return status
        threading.Event().wait(0.01)
    return 429


def fully_closed_by_server(sock: socket.socket) -> bool:
    """Whether the server let go of `sock` (after its answer and half-close): bytes sent to a closed
    socket are answered with a reset, after which sending fails; a half-open one drops them for ever."""
    for _ in range(6000):  # 60 s: far past REFUSAL_LINGER
        try:
            sock.sendall(b"x")
        except OSError:  # ECONNRESET or EPIPE
            return True
        threading.Event().wait(0.01)
    return False


def closed_by_server(sock: socket.socket) -> bytes:
    """What the server sends before closing `sock` (the socket's 60 s timeout fails a server that never does)."""
    answer = b""
    with sock:
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("request_limits", [{"queue": 2, "max_upload_mb": 1, "max_images": 3, "timeout": 2.0}])
def test_slow_heads_idle_connections_and_trickled_bodies_are_closed_after_timeout(gated_server: tuple[str, Gated]) -> None:
    """Slowloris: a connection must send its request head within --timeout of opening (or of its last
    answer); an idle one, a half-sent head and a body trickled after an early answer are closed, and
    the server answers others meanwhile."""
    url, model = gated_server
    model.gate.set()
    port = int(url.rsplit(":", 1)[1])
    idle, partial, trickled = (socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(3))
    partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: a")
    trickled.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\nabc")
    assert http_request(url + "/v1/detect", json_body([("ok.txt", b"hi")]), {"Content-Type": "application/json"})[0] == 200
    assert closed_by_server(idle) == b""
    head, _, body = closed_by_server(partial).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and "request head took longer than 2 s" in json.loads(body)["error"]
    assert closed_by_server(trickled).startswith(b"HTTP/1.1 200 ")  # answered once, then closed: the rest of its body is never awaited
    assert http_request(url + "/healthz")[0] == 200


@pytest.mark.parametrize("request_limits", [{"queue": 2, "max_upload_mb": 1, "max_images": 3, "max_connections": 4, "timeout": 600}])
def test_connections_past_the_cap_get_503_and_the_server_recovers(gated_server: tuple[str, Gated]) -> None:
    """Past the cap: a JSON 503, and the connection closed by the server within REFUSAL_LINGER even
    though its client keeps it open and --timeout is 10 minutes (a refused client holds no socket)."""
    url, model = gated_server
    model.gate.set()
    port = int(url.rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(4)]
    for sock in held:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # heads never finished
    refused = socket.create_connection(("127.0.0.1", port), timeout=60)
    refused.sendall(request_bytes("GET", "/healthz"))
    answer = b""
    while chunk := refused.recv(65536):  # the answer, then the end of file of the server's half-close
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and json.loads(body) == {"error": "too many open connections (over 4); retry shortly", "status": 503}
    assert fully_closed_by_server(refused)
    refused.close()
    for sock in held:
        sock.close()
    for _ in range(1000):  # the server sees the closes as they come
        if (answer := http_request(url + "/healthz"))[0] == 200:
            break
        assert answer[0] == 503
        threading.Event().wait(0.01)
    assert answer[0] == 200
    assert http_request(url + "/v1/detect", json_body([("ok.txt", b"hi")]), {"Content-Type": "application/json"})[0] == 200


# ---------------------------------------------------------------- the drop page in headless Chromium

PAGE_ROWS = """new Promise(done => {
  const out = document.getElementById('out'), ready = () => out.rows.length >= %d;
  const give = () => done(JSON.stringify([...out.rows].map(r => ({
    cells: [...r.cells].slice(1).map(c => c.textContent), cls: r.cells[2].className,
    thumb: r.querySelector('img').src.slice(0, 5)}))));
  if (ready()) give(); else new MutationObserver((_, o) => { if (ready()) { o.disconnect(); give(); } }).observe(out, {childList: true});
})"""

DROP = """(() => {
  const bytes = Uint8Array.from(atob('%s'), c => c.charCodeAt(0)), data = new DataTransfer();
  data.items.add(new File([bytes], '%s', {type: 'image/png'}));
  document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
})()"""


def page_rows(browser: DevTools, session: str, count: int) -> list[dict[str, Any]]:
    """The page's result rows, newest first, once there are `count` of them (the page awaits the server)."""
    return browser.evaluate(PAGE_ROWS % count, session, await_promise=True)


@needs_chromium
def test_the_drop_page_shows_each_verdict_in_headless_chromium(atd_server: Served, tmp_path: Path) -> None:
    picked = [tmp_path / "three.png", tmp_path / "notes.txt"]
    digits = digit_images()
    picked[0].write_bytes(digits[3][1])
    picked[1].write_bytes(b"hello, not an image")
    want = [dict(r, path=Path(r["path"]).name) for r in detect_json(atd_server.url, [(p.name, p.read_bytes()) for p in picked] + [("dropped.png", digits[17][1])])]

    browser = DevTools(tmp_path / "profile")
    try:
        session = browser.open(atd_server.url + "/", "Network", "DOM")
        root = browser.call("DOM.getDocument", session=session)["root"]["nodeId"]
        pick = browser.call("DOM.querySelector", {"nodeId": root, "selector": "#pick"}, session=session)["nodeId"]
        browser.call("DOM.setFileInputFiles", {"nodeId": pick, "files": [str(p) for p in picked]}, session=session)
        shown = page_rows(browser, session, 2)
        browser.call("Runtime.evaluate", {"expression": DROP % (base64.b64encode(digits[17][1]).decode(), "dropped.png")}, session=session)
        shown = page_rows(browser, session, 3)
    finally:
        browser.close()

    # newest first: the dropped image, then the picked ones in reverse
    for row, record in zip(shown, [want[2], want[1], want[0]]):
        verdict = record.get("verdict", "error")
        assert row["cells"][:2] == [record["path"], verdict] and row["cls"] == ("err" if "error" in record else verdict), (row, record)
        assert row["thumb"] == "blob:"
        if "error" in record:
            assert row["cells"][2] == record["error"]
        else:  # the page's numbers come from another batch than `want`'s: equal within the grouping bounds
            cls, p_ood, atd = re.fullmatch(r"(\S+)  p_ood (\S+)  atd (\S+)", row["cells"][2]).groups()
            assert_close_records({"class": cls, "p_ood": float(p_ood), "atd_score": float(atd)},
                                 {k: record[k] for k in ("class", "p_ood", "atd_score")})
    assert browser.errors() == []
    fetched = browser.requested()
    assert atd_server.url + "/v1/detect" in fetched
    assert all(url.startswith((atd_server.url + "/", "blob:")) for url in fetched), fetched


def test_runtime_onnx_records_equal_local_detect_onnx(home: Path) -> None:
    """--runtime reaches serve through detect's helper: the ONNX image tower scores, as in detect --runtime onnx."""
    pytest.importorskip("onnxruntime")
    served = Served(["-w", "digits", "-c", DIGITS_CLASSES, "--runtime", "onnx"], home)
    try:
        got = detect_json(served.url, digit_images())
        info = json.loads(http_request(served.url + "/v1/info")[2])
    finally:
        assert served.stop() == 0
    done = cli("detect", "-w", "digits", "-c", DIGITS_CLASSES, "--format", "json", "--runtime", "onnx",
               *(str(p) for p in sorted(DIGITS_IMAGES.glob("*.png"))), env={"CLIPN_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert info["runtime"] == "onnx" and len(got) == 20
    assert_close_records(got, json.loads(done.stdout))
    assert list((home / "runtimes").iterdir())  # the export both used, made once


class _Timers:
    """A loop whose call_later only records: the test fires each deadline itself."""

    def __init__(self) -> None:
        self.pending: list[Any] = []

    def call_later(self, delay: float, callback: Any) -> Any:
        timer = types.SimpleNamespace(delay=delay, callback=callback, cancel=lambda: self.pending.remove(timer) if timer in self.pending else None)
        self.pending.append(timer)
        return timer

    def fire(self) -> float:
        (timer,) = self.pending
        self.pending.clear()
        timer.callback()
        return timer.delay


class _Transport:
    def __init__(self) -> None:
        self.written, self.eof, self.closed = b"", False, False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 9) if name in ("sockname", "peername") else default

    def write(self, data: bytes) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_a_request_being_answered_keeps_its_deadline_and_a_refusal_then_closes() -> None:
    """The head deadline firing while a request is answered is looked at again a timeout later (it
    was dropped: a request refused after that moment, or an answer its client never reads, held the
    connection for ever); a refusal closes the connection REFUSAL_LINGER later; an answer stuck unread
    (writing paused) for two deadlines in a row closes it."""
    import uvicorn
    from uvicorn.server import ServerState

    from clipn_cli.serve.run import REFUSAL_LINGER, ServeProtocol

    config = uvicorn.Config(lambda scope, receive, send: None, http=ServeProtocol, lifespan="off")
    config.load()
    for ending in ("refused", "stalled"):
        timers, transport = _Timers(), _Transport()
        protocol = ServeProtocol(config, ServerState(), {}, _loop=timers)  # type: ignore[arg-type]
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.cycle = types.SimpleNamespace(response_complete=False, disconnected=False, message_event=threading.Event())
        assert timers.fire() == ServeProtocol.head_timeout and not transport.closed
        assert len(timers.pending) == 1  # looked at again, not dropped
        if ending == "refused":
            protocol.send_400_response("bad chunk")
            assert transport.written.startswith(b"HTTP/1.1 400 ") and transport.eof and protocol.cycle.disconnected
            assert timers.fire() == REFUSAL_LINGER and transport.closed
        else:
            protocol.flow.write_paused = True
            timers.fire()
            assert not transport.closed  # one deadline with the answer unread: it may be a slow reader
            timers.fire()
            assert transport.closed
