"""The HTTP endpoints (Starlette): requests are checked, received within bounds, decoded in a thread
pool through clipn's guarded decoder (bytes only: no client can name a path or a URL), and scored by
the `Batcher`. The `/v1/detect` body is byte for byte what `clipn detect --format json` prints."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..inputs.decode import DecodeLimits, LoadedImage, load_one
from ..inputs.sources import InputItem
from ..outputs.writers import JsonWriter
from .engine import Batcher, ServeLimits
from .metrics import ServeMetrics
from .pages import DOCS_CSP, INDEX_CSP, INDEX_HTML, docs_html, openapi

MAX_HEADER_BYTES = 64 << 10  # a request line and headers larger than this are refused (431)
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


class RequestError(Exception):
    """A request refused with `status` and a one-line reason (the JSON error body)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Holdings:
    """What admitted requests hold, counted, and the decoded images bounded (event-loop side only).

    Admission (`--queue`) bounds the bodies: at most `queue` requests receive or hold bytes at once.
    Decoded images are 0.6 MB each at 224 px, far more than the JPEG bytes they come from, so a
    request decodes only when its images fit in `limit` (twice `--max-batch`: one batch in the model,
    the next one ready) or nothing else is decoded; requests take their turn in arrival order, and
    an image stays counted until its request is answered. `most` keeps the largest counts seen.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.bodies, self.decoded = limit, 0, 0
        self.most = {"bodies": 0, "decoded": 0}
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def counts(self) -> dict[str, int]:
        """Requests holding received bytes, decoded images held, requests waiting to decode."""
        return {"bodies": self.bodies, "decoded": self.decoded, "waiting_to_decode": len(self._waiting)}

    def body(self, change: int) -> None:
        self.bodies += change
        self.most["bodies"] = max(self.most["bodies"], self.bodies)

    async def take(self, count: int) -> None:
        """Wait for room for `count` decoded images (FIFO), then hold it until `give`."""
        if not self._waiting and self._fits(count):
            self._hold(count)
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((count, turn))
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.give(count)
            else:
                self._waiting.remove((count, turn))
                self._grant()
            raise

    def give(self, count: int) -> None:
        self.decoded -= count
        self._grant()

    def _fits(self, count: int) -> bool:
        return self.decoded == 0 or self.decoded + count <= self.limit

    def _hold(self, count: int) -> None:
        self.decoded += count
        self.most["decoded"] = max(self.most["decoded"], self.decoded)

    def _grant(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            count, turn = self._waiting.popleft()
            self._hold(count)
            turn.set_result(None)


@dataclass
class Service:
    """What the endpoints share: the batcher, the decoder's settings, limits, the key and the metrics."""

    batcher: Batcher
    transform: Callable[[Any], Any]
    info: dict[str, Any]
    limits: ServeLimits = field(default_factory=ServeLimits)
    api_key: str | None = None
    decode_limits: DecodeLimits = field(default_factory=DecodeLimits.from_env)
    exif_transpose: bool = False
    decode_threads: int = 2
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    stopping: bool = False
    cut_off: int = 0  # requests still running when the grace period ran out (answered 503)

    def __post_init__(self) -> None:
        self.decoders = ThreadPoolExecutor(max(1, self.decode_threads), thread_name_prefix="clipn-serve-decode")
        self.held = Holdings(2 * self.limits.max_batch)
        self.metrics.watch_queue(self.batcher.depth)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})


def authorized(service: Service, request: Request) -> bool:
    """No key configured, or `Authorization: Bearer KEY` equal to it (compared in constant time)."""
    if service.api_key is None:
        return True
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), service.api_key.encode())


async def read_body(request: Request, limits: ServeLimits) -> bytes:
    """The body, refused past `max_upload_mb` (413) or when it takes longer than `timeout` to arrive (408)."""
    coding = request.headers.get("content-encoding", "identity").strip().lower()
    if coding != "identity":
        raise RequestError(415, f"Content-Encoding {coding[:40]!r} is not accepted: send the body uncompressed")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise RequestError(413, f"request body of {declared} bytes is over the {limits.max_upload_mb:g} MB limit (--max-upload-mb)")
    chunks: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_bytes:
                raise RequestError(413, f"request body is over the {limits.max_upload_mb:g} MB limit (--max-upload-mb)")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), limits.timeout)
    except TimeoutError:
        raise RequestError(408, f"the request body took longer than {limits.timeout:g} s to arrive (--timeout)") from None
    return b"".join(chunks)


async def named_images(request: Request, body: bytes, limits: ServeLimits) -> list[tuple[str, bytes]]:
    """(name, bytes) per image: multipart field `images` (repeatable) or JSON {"images": [base64...], "names": [...]}."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        images = await _multipart(request, body, limits)
    elif kind == "application/json":
        images = _json_images(body, limits)
    else:
        raise RequestError(415, "send images as multipart/form-data (field 'images') or application/json ({\"images\": [base64, ...]})")
    if not images:
        raise RequestError(400, "no images in the request")
    if len(images) > limits.max_images:
        raise RequestError(413, f"{len(images)} images in one request, over the limit of {limits.max_images}")
    return images


async def _multipart(request: Request, body: bytes, limits: ServeLimits) -> list[tuple[str, bytes]]:
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=limits.max_images + 1, max_fields=limits.max_images + 1)
    except HTTPException as exc:
        raise RequestError(400, f"malformed multipart body ({exc.detail})") from None
    out = []
    try:
        for i, part in enumerate(form.getlist("images")):
            if isinstance(part, str):
                raise RequestError(400, "the 'images' field must hold file uploads, not text")
            out.append((part.filename or f"images[{i}]", await part.read()))
    finally:
        await form.close()
    return out


def _json_images(body: bytes, limits: ServeLimits) -> list[tuple[str, bytes]]:
    from ..files import JSONLimits, parse_json

    try:
        doc = parse_json(body, JSONLimits(values=4 * limits.max_images + 16, containers=8, depth=3))
    except ValueError as exc:
        raise RequestError(400, f"malformed JSON ({str(exc)[:120]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not all(isinstance(x, str) for x in doc["images"]):
        raise RequestError(400, "the JSON body must be {\"images\": [\"<base64>\", ...]} (optional \"names\": [...])")
    names = doc.get("names", [f"images[{i}]" for i in range(len(doc["images"]))])
    if not isinstance(names, list) or len(names) != len(doc["images"]) or not all(isinstance(x, str) for x in names):
        raise RequestError(400, "\"names\" must be a list of strings, one per image")
    out = []
    for i, (name, text) in enumerate(zip(names, doc["images"])):
        try:
            out.append((name, base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError):
            raise RequestError(400, f"images[{i}] is not valid base64") from None
    return out


async def decode(service: Service, images: list[tuple[str, bytes]]) -> list[LoadedImage]:
    """Every image through the guarded decoder, in the decoding threads (never on the event loop)."""
    loop = asyncio.get_running_loop()
    jobs = [
        loop.run_in_executor(service.decoders, load_one, InputItem(name, data=data), service.transform,
                             service.exif_transpose, 0, service.decode_limits)
        for name, data in images
    ]
    return list(await asyncio.gather(*jobs))


def json_records(records: list[dict[str, Any]]) -> str:
    """The records as `clipn detect --format json` prints them."""
    out = io.StringIO()
    writer = JsonWriter(out)
    for record in records:
        writer.write(record)
    writer.finish()
    return out.getvalue()


async def score(service: Service, request: Request) -> list[dict[str, Any]]:
    """Admit, receive, decode and score one request (RequestError for every refusal)."""
    if service.stopping:
        raise RequestError(503, "the server is stopping")
    if not service.batcher.admit():
        raise RequestError(429, f"busy: {service.limits.queue} requests are in progress (--queue); retry shortly", {"Retry-After": "1"})
    submitted, decoded = False, 0
    try:
        service.held.body(+1)
        try:
            images = await named_images(request, await read_body(request, service.limits), service.limits)
            await service.held.take(len(images))
            decoded = len(images)
            loaded = await decode(service, images)
            del images  # the bytes are decoded: only the pixels wait for the model
        finally:
            service.held.body(-1)
        future = service.batcher.submit(loaded)
        submitted = True
        del loaded
        return await asyncio.wrap_future(future)
    finally:
        service.held.give(decoded)
        service.batcher.release(submitted)


async def detect_response(service: Service, request: Request) -> Response:
    """POST /v1/detect: the records, or the JSON error of a refused or failed request; counted in the metrics."""
    started = time.monotonic()
    if not authorized(service, request):
        response: Response = error(401, "a valid API key is needed: Authorization: Bearer KEY", {"WWW-Authenticate": "Bearer"})
    else:
        try:
            records = await score(service, request)
            service.metrics.images(records)
            response = Response(json_records(records), media_type="application/json", headers=SECURITY_HEADERS)
        except RequestError as exc:
            response = error(exc.status, exc.message, exc.headers)
        except ClientDisconnect:
            response = error(400, "the client went away before sending its body")
        except asyncio.CancelledError:
            if not service.stopping:
                raise
            service.cut_off += 1  # uvicorn cancels what still runs when the grace period ends
            response = error(503, "the server stopped before this request was answered (its --grace period ran out)")
        except Exception as exc:  # a failed batch: this request's answer, the server goes on
            response = error(500, f"scoring failed ({type(exc).__name__}: {str(exc)[:160]})")
    service.metrics.request(response.status_code, time.monotonic() - started)
    return response


class HeadChecks:
    """What every request head must pass before routing: at most MAX_HEADER_BYTES (431; h11 refuses a
    larger head only while it is still arriving, not one that came in a single read), and not both
    Content-Length and Transfer-Encoding (400: the shape of request smuggling behind a proxy that reads
    the other one). Both answers close the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            size = len(scope["raw_path"]) + len(scope["query_string"]) + sum(len(k) + len(v) + 4 for k, v in headers)
            names = {name for name, _ in headers}
            if size > MAX_HEADER_BYTES:
                answer = error(431, f"the request line and headers are over {MAX_HEADER_BYTES >> 10} KB", {"Connection": "close"})
                return await answer(scope, receive, send)
            if {b"content-length", b"transfer-encoding"} <= names:
                answer = error(400, "a request may not send both Content-Length and Transfer-Encoding", {"Connection": "close"})
                return await answer(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(service: Service) -> Starlette:
    """The Starlette application for `service` (see README "Serve" for each endpoint)."""

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not authorized(service, request):
                return error(401, "a valid API key is needed: Authorization: Bearer KEY", {"WWW-Authenticate": "Bearer"})
            return await handler(request)
        return endpoint

    async def detect(request: Request) -> Response:
        return await detect_response(service, request)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"}, headers=SECURITY_HEADERS)

    async def readyz(request: Request) -> Response:
        if service.stopping:
            return error(503, "stopping")
        return JSONResponse({"status": "ready"}, headers=SECURITY_HEADERS)

    async def info(request: Request) -> Response:
        return JSONResponse(service.info, headers=SECURITY_HEADERS)

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8", headers=SECURITY_HEADERS)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi(service.info), headers=SECURITY_HEADERS)

    async def docs(request: Request) -> Response:
        return HTMLResponse(docs_html(openapi(service.info)), headers={**SECURITY_HEADERS, "Content-Security-Policy": DOCS_CSP})

    async def index(request: Request) -> Response:
        return HTMLResponse(INDEX_HTML, headers={**SECURITY_HEADERS, "Content-Security-Policy": INDEX_CSP})

    async def refused(request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (404, 405: `Allow` kept) as the JSON error every endpoint answers."""
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, f"{request.method[:16]} {request.url.path[:200]!r}: {exc.detail}", dict(exc.headers or {}))

    async def failed(request: Request, exc: Exception) -> Response:
        """An unexpected failure: a JSON 500 naming the exception's type, never a traceback."""
        return error(500, f"internal error ({type(exc).__name__})")

    routes = [
        Route("/v1/detect", detect, methods=["POST"]),
        Route("/healthz", healthz), Route("/readyz", readyz),
        Route("/v1/info", guarded(info)), Route("/metrics", guarded(metrics)),
        Route("/openapi.json", openapi_json), Route("/docs", docs), Route("/", index),
    ]
    return Starlette(routes=routes, middleware=[Middleware(HeadChecks)], exception_handlers={HTTPException: refused, Exception: failed})
