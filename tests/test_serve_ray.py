"""`clipn serve --engine ray` on a real local Ray cluster that this module starts once (its workers at
nice 0, as clipn's own clusters), joined by `clipn serve` subprocesses with `--ray-address`; a real
HTTP client on 127.0.0.1. Records must be byte-equal to local serve's for the same request (broken
images included), a killed replica must be replaced while requests keep being answered, and a full
queue must answer local serve's JSON 429."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("starlette")

from conftest import DIGITS_CLASSES, DIGITS_IMAGES, assert_close_records, cli, free_port, http_request, json_body, spawn  # noqa: E402

HANG_GUARD = 600  # seconds: only against a hung cluster, never a speed limit


class Served:
    """A `clipn serve` subprocess, ready once it prints its URL."""

    def __init__(self, args: list[str], home: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("CLIPN_WEIGHTS", "CLIPN_API_KEY")}
        env["CLIPN_HOME"] = str(home)
        self.proc = spawn([sys.executable, "-m", "clipn_cli", "serve", *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        for line in self.proc.stderr:
            self.lines.append(line)
            if found := re.search(r"serving on (http://\S+)", line):
                self.url = found.group(1)
                break
        else:
            raise AssertionError("".join(self.lines))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=HANG_GUARD)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray cluster with 3 CPUs (2 model replicas of 1 CPU each, room for a restarted one); its address."""
    import ray
    from ray import serve

    from clipn_cli.scale.cluster import NICENESS_ENV

    os.environ[NICENESS_ENV] = "0"
    try:
        ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    finally:
        del os.environ[NICENESS_ENV]
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clipn-home")


@pytest.fixture(scope="module")
def port() -> int:
    """Ray Serve's proxy keeps the port it first listened on for the whole cluster."""
    return free_port()


def images() -> list[tuple[str, bytes]]:
    """The 20 demo digits and a truncated PNG (an error record)."""
    good = [(str(p), p.read_bytes()) for p in sorted(DIGITS_IMAGES.glob("*.png"))]
    return [*good[:10], ("broken.png", good[0][1][:200]), *good[10:]]


def ray_args(address: str, port: int, *rule: str) -> list[str]:
    return ["--engine", "ray", "--ray-address", address, "--port", str(port), "--replicas", "2",
            "--max-ongoing", "2", "--queue", "2", "--timeout", "300", "-w", "digits", "-c", DIGITS_CLASSES, *rule]


def detect(url: str) -> tuple[int, bytes]:
    status, _, body = http_request(url + "/v1/detect", json_body(images()), {"Content-Type": "application/json"})
    return status, body


@pytest.fixture(scope="module")
def atd_ray(cluster: str, home: Path, port: int) -> Iterator[Served]:
    served = Served(ray_args(cluster, port), home)
    yield served
    assert served.stop() == 0, "".join(served.lines)


def test_scale_out_options_are_checked_before_anything_loads() -> None:
    done = cli("serve", "-w", "digits", "-c", DIGITS_CLASSES, "--replicas", "3")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "need --engine ray" in done.stderr
    done = cli("serve", "--engine", "ray", "--replicas", "many", "-w", "digits", "-c", DIGITS_CLASSES)
    assert done.returncode == 2 and "--replicas many: give a number of replicas (1 or more) or auto" in done.stderr


def local_serve(home: Path, *rule: str) -> bytes:
    local = Served(["--port", "0", "-w", "digits", "-c", DIGITS_CLASSES, *rule], home)
    try:
        status, body = detect(local.url)
    finally:
        assert local.stop() == 0
    assert status == 200
    return body


def check_records(got: bytes, want: bytes, rule: tuple[str, ...]) -> None:
    """Byte-equal to local serve's body (the same app scoring the same batch), close to local detect's records."""
    assert got == want
    records = json.loads(got)
    assert len(records) == 21 and "error" in records[10] and records[10]["path"] == "broken.png"
    assert {r["verdict"] for r in records if "verdict" in r} == {"ID", "OOD"}
    done = cli("detect", "-w", "digits", "-c", DIGITS_CLASSES, "--format", "json", *rule, *(str(p) for p in sorted(DIGITS_IMAGES.glob("*.png"))))
    assert_close_records([r for r in records if "error" not in r], json.loads(done.stdout))


def test_atd_records_equal_local_serve_and_detect(atd_ray: Served, home: Path) -> None:
    status, got = detect(atd_ray.url)
    assert status == 200
    check_records(got, local_serve(home), ())
    info = json.loads(http_request(atd_ray.url + "/v1/info")[2])
    assert (info["engine"], info["rule"]) == ("ray", "atd")


def replica_actors() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "ClipnModel" in a["name"])


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications["clipn"]
    return app.deployments["ClipnModel"].replica_states.get("RUNNING", 0)


def replaced(victim: str) -> bool:
    """Two replicas running again, neither of them `victim`."""
    now = replica_actors()
    return len(now) == 2 and victim not in now and running_replicas() == 2


def test_killed_replica_is_replaced_while_requests_keep_coming(atd_ray: Served) -> None:
    """README "Serve": a request in flight on a replica that dies is sent once more to a live one;
    Ray Serve starts a new replica; requests sent after the kill are answered."""
    import ray

    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            statuses.append(detect(atd_ray.url)[0])

    loop = threading.Thread(target=client)
    loop.start()
    try:
        while len(statuses) < 2:
            time.sleep(0.05)
        victims = replica_actors()
        assert len(victims) == 2
        ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
        killed_at = len(statuses)
        deadline = time.monotonic() + HANG_GUARD
        while not replaced(victims[0]) and time.monotonic() < deadline:
            time.sleep(0.5)
        while len(statuses) < killed_at + 5:
            time.sleep(0.05)
    finally:
        stop.set()
        loop.join()
    assert set(statuses) <= {200, 500, 503}, statuses
    assert statuses[killed_at + 1:] == [200] * len(statuses[killed_at + 1:]), statuses
    assert replaced(victims[0])
    assert detect(atd_ray.url)[0] == 200


def test_full_queue_is_429_with_retry_after(atd_ray: Served) -> None:
    """--replicas 2 --max-ongoing 2 --queue 2: the ingress holds 2 x 2 + 2 = 6 requests; the 7th gets
    local serve's JSON 429. Clients that send half a body hold their places deterministically."""
    host, port = re.match(r"http://([^:]+):(\d+)", atd_ray.url).groups()
    body = json_body(images()[:1])
    held = []
    try:
        for _ in range(6):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(f"POST /v1/detect HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
            held.append(sock)
        deadline = time.monotonic() + HANG_GUARD
        while (status := detect(atd_ray.url))[0] != 429 and time.monotonic() < deadline:
            time.sleep(0.2)  # until the proxy has handed all six to the ingress
        _, headers, text = http_request(atd_ray.url + "/v1/detect", json_body(images()), {"Content-Type": "application/json"})
    finally:
        for sock in held:
            sock.close()
    assert status[0] == 429
    assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
    assert json.loads(text) == {"error": "busy: 6 requests are in progress (--queue); retry shortly", "status": 429}
    deadline = time.monotonic() + HANG_GUARD
    while detect(atd_ray.url)[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)  # the six places come back once their clients are gone
    assert detect(atd_ray.url)[0] == 200


def test_threshold_records_equal_local_serve_and_detect(atd_ray: Served, cluster: str, home: Path, port: int) -> None:
    """Last: it replaces the ATD application (one clipn application per cluster)."""
    rule = ("--rule", "energy", "--threshold", "12.5")
    assert atd_ray.stop() == 0, "".join(atd_ray.lines)
    served = Served(ray_args(cluster, port, *rule), home)
    try:
        status, got = detect(served.url)
        info = json.loads(http_request(served.url + "/v1/info")[2])
    finally:
        assert served.stop() == 0, "".join(served.lines)
    assert status == 200 and (info["rule"], info["threshold"]) == ("energy", 12.5)
    check_records(got, local_serve(home, *rule), rule)
