"""`clipn serve --engine ray` on a real local Ray cluster that this module starts once (its workers at
nice 0, as clipn's own clusters), joined by `clipn serve` subprocesses with `--ray-address`; a real
HTTP client on 127.0.0.1. Records must be byte-equal to local serve's for the same request (broken
images included), a killed replica must be replaced while requests keep being answered, and a full
queue (the ingress's bound, or Ray Serve's `BackPressureError` from the model handle) must answer
local serve's JSON 429, and `--replicas auto` must be Ray Serve autoscaling within the cluster's CPUs."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("starlette")

from conftest import DIGITS_CLASSES, DIGITS_IMAGES, assert_close_records, cli, free_port, http_request, json_body, ServeProcess  # noqa: E402

HANG_GUARD = 600  # seconds: only against a hung cluster, never a speed limit


class Served(ServeProcess):
    """A `clipn serve --engine ray` subprocess; Ray's logs are read as they come."""

    def __init__(self, args: list[str], home: Path) -> None:
        super().__init__(args, home, drain=True)

    def stop(self) -> int:
        return super().stop(timeout=HANG_GUARD)


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


@pytest.fixture(scope="module")
def local_atd(home: Path) -> bytes:
    """Local serve's body for `images()` with ATD: what every ATD application here must answer."""
    return local_serve(home)


def test_atd_records_equal_local_serve_and_detect(atd_ray: Served, local_atd: bytes) -> None:
    status, got = detect(atd_ray.url)
    assert status == 200
    check_records(got, local_atd, ())
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


def serve_controller() -> str:
    """The id of the cluster's Ray Serve controller actor."""
    import ray

    return ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")._actor_id.hex()


def test_threshold_records_equal_local_serve_and_detect(atd_ray: Served, cluster: str, home: Path, port: int) -> None:
    """Last: it replaces the ATD application (one clipn application per cluster)."""
    rule = ("--rule", "energy", "--threshold", "12.5")
    controller = serve_controller()
    assert atd_ray.stop() == 0, "".join(atd_ray.lines)
    served = Served(ray_args(cluster, port, *rule), home)
    try:
        assert serve_controller() == controller  # a joined cluster's Serve instance lives on: only the clipn application went
        status, got = detect(served.url)
        info = json.loads(http_request(served.url + "/v1/info")[2])
    finally:
        assert served.stop() == 0, "".join(served.lines)
    assert status == 200 and (info["rule"], info["threshold"]) == ("energy", 12.5)
    check_records(got, local_serve(home, *rule), rule)


class FakeModelHandle:
    """A `ClipnModel` deployment handle whose calls answer `outcomes` in turn: an exception (raised
    when awaited, as Ray Serve's router raises `BackPressureError` for a full queue) or records."""

    def __init__(self, outcomes: list[Exception | str]) -> None:
        self.detect, self.outcomes, self.calls = self, list(outcomes), 0

    def remote(self, images: list[Any]) -> Any:
        self.calls += 1
        outcome = self.outcomes.pop(0)

        async def answer() -> list[dict[str, Any]]:
            if isinstance(outcome, Exception):
                raise outcome
            return [{"path": i.path, "verdict": outcome} for i in images]
        return answer()


@pytest.fixture
def handle_server(request: pytest.FixtureRequest) -> Iterator[tuple[str, FakeModelHandle]]:
    """The ingress's Service and app (as `ClipnIngress` builds them) under uvicorn, over a fake handle."""
    import uvicorn

    from clipn_cli.serve.app import Service
    from clipn_cli.serve.engine import ServeLimits
    from clipn_cli.serve.ray_app import HandleBatcher
    from clipn_cli.serve.run import config_for

    handle = FakeModelHandle(request.param)
    service = Service(HandleBatcher(handle, 4), lambda image: image.size, {"version": "test"}, ServeLimits(queue=4))
    server = uvicorn.Server(config_for(service, "127.0.0.1", 0))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.01)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", handle
    server.should_exit = True
    thread.join()
    assert service.batcher.depth() == 0  # every admitted request released its place


def backpressure() -> Exception:
    from ray.serve.exceptions import BackPressureError

    return BackPressureError(num_queued_requests=2, max_queued_requests=2)


def actor_died() -> Exception:
    from ray.exceptions import RayActorError

    return RayActorError()


BUSY = {"error": "busy: every replica is busy and the queue is full (--queue); retry shortly", "status": 429}


@pytest.mark.parametrize("handle_server, calls, want", [
    pytest.param([backpressure()], 1, (429, BUSY), id="full-queue"),
    pytest.param([actor_died(), backpressure()], 2, (429, BUSY), id="replica-died-then-full-queue"),
    pytest.param([actor_died(), "ID"], 2, (200, [{"path": "a.png", "verdict": "ID"}]), id="replica-died-then-answered"),
    pytest.param([actor_died(), actor_died()], 2, (500, None), id="replica-died-twice"),
], indirect=["handle_server"])
def test_handle_backpressure_is_local_serves_json_429(handle_server: tuple[str, FakeModelHandle], calls: int,
                                                      want: tuple[int, Any]) -> None:
    """README "On a Ray Serve cluster": Ray Serve's `BackPressureError` from the model handle (a full
    `max_queued_requests` queue, e.g. while autoscaling has fewer replicas than the ingress's bound
    assumes) is answered as local serve's JSON 429 with Retry-After; a request whose replica died is
    sent once more, and fails (500, JSON) only when that try fails too."""
    url, handle = handle_server
    png = sorted(DIGITS_IMAGES.glob("*.png"))[0].read_bytes()
    status, headers, body = http_request(url + "/v1/detect", json_body([("a.png", png)]), {"Content-Type": "application/json"})
    assert (status, handle.calls) == (want[0], calls)
    assert headers["content-type"] == "application/json"
    if status == 429:
        assert headers["retry-after"] == "1"
    else:
        assert "retry-after" not in headers
    if want[1] is not None:
        assert json.loads(body) == want[1]
    else:
        assert json.loads(body)["status"] == 500 and "RayActorError" in json.loads(body)["error"]
    metrics = http_request(url + "/metrics")[2].decode()
    assert f'clipn_requests_total{{status="{status}"}} 1.0' in metrics


def test_auto_replicas_autoscale_between_one_and_what_the_cluster_holds(cluster: str, home: Path, port: int,
                                                                        local_atd: bytes) -> None:
    """Last (one clipn application per cluster: the threshold test has removed the ATD one). README
    "On a Ray Serve cluster": `--replicas auto` is Ray Serve autoscaling of `ClipnModel` on ongoing
    requests, `target_ongoing_requests` 2, from 1 replica to as many as the cluster's 3 CPUs hold at
    1 CPU each; /v1/info says so; the records are local serve's."""
    from ray import serve
    from ray.serve.context import _get_global_client

    args = ray_args(cluster, port)
    args[args.index("--replicas") + 1] = "auto"
    served = Served(args, home)
    try:
        status, got = detect(served.url)
        info = json.loads(http_request(served.url + "/v1/info")[2])
        app = serve.status().applications["clipn"]
        deployments = _get_global_client().get_serve_details()["applications"]["clipn"]["deployments"]
    finally:
        assert served.stop() == 0, "".join(served.lines)
    assert status == 200
    check_records(got, local_atd, ())
    assert info["engine"] == "ray"
    assert {k: info["limits"][k] for k in ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing",
                                          "queue")} == {"replicas": "auto", "min_replicas": 1, "max_replicas": 3,
                                                        "target_ongoing_requests": 2, "max_ongoing": 2, "queue": 2}
    assert app.status == "RUNNING" and app.deployments["ClipnModel"].status == "HEALTHY"
    model = deployments["ClipnModel"]
    autoscaling = model["deployment_config"]["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"], autoscaling["target_ongoing_requests"]) == (1, 3, 2), model
    assert (model["deployment_config"]["max_ongoing_requests"], model["deployment_config"]["max_queued_requests"]) == (2, 2)
    assert 1 <= model["target_num_replicas"] <= 3, model
    ingress = deployments["ClipnIngress"]["deployment_config"]
    assert (ingress["num_replicas"], ingress["max_ongoing_requests"]) == (1, 3 * 2 + 2 + 32), ingress  # capacity + INGRESS_EXTRA
