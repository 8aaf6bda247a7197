"""Run a Service on uvicorn until SIGTERM or SIGINT, then stop gracefully: the listening socket closes,
/readyz turns 503, requests in flight get their answers for up to the grace period (`--grace`), and
those still running after it get a 503 JSON error (the endpoint turns uvicorn's cancellation into it).

The connection layer is uvicorn's h11 protocol, never httptools (which has no header limit), with
what uvicorn lacks against slow or hostile clients: a deadline for each request head, a cap on open
connections, and JSON answers for what it refuses before the application sees a request."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import MAX_HEADER_BYTES, Service, create_app

GRACE_SECONDS = 30.0  # the default --grace: the longest a stop waits for requests in flight
MAX_CONNECTIONS = 1000  # open connections at once (fewer where the open-files limit is low); more: 503 and closed
REFUSAL_LINGER = 2.0  # seconds a refused connection stays half-open so that its answer is read, not reset


def connection_cap() -> int:
    """MAX_CONNECTIONS, or fewer so that files the server opens itself (spooled uploads, the model's) still fit."""
    try:
        import resource
    except ImportError:  # Windows: no open-files limit to read
        return MAX_CONNECTIONS
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else max(16, min(MAX_CONNECTIONS, soft // 2))


def raw_json_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response with the JSON error body, closing the connection (for refusals made
    before h11 holds a request to answer)."""
    body = json.dumps({"error": message, "status": status}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "x-content-type-options: nosniff\r\nconnection: close\r\n\r\n").encode() + body


class ServeProtocol(H11Protocol):
    """One client connection. Its request head (request line and headers) must arrive within
    `head_timeout` of the connection opening or of the previous answer, else the connection closes
    (408 when part of a head came); an idle keep-alive connection closes after the same time. A body
    is the endpoint's to time (`--timeout`, 408). Past `max_connections`, a new connection gets 503."""

    head_timeout: float = 30.0
    max_connections: int = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = self._stalled = False
        super().connection_made(transport)
        self._arm()
        if len(self.connections) > self.max_connections:
            self._refuse(raw_json_response(503, "Service Unavailable", f"too many open connections (over {self.max_connections}); retry shortly"))

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def shutdown(self) -> None:
        if self._refused:
            self.transport.close()
        else:
            super().shutdown()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request (malformed, or a head over MAX_HEADER_BYTES): a JSON 400 or 431."""
        if len(self.conn.trailing_data[0]) > MAX_HEADER_BYTES:
            status, reason, message = 431, "Request Header Fields Too Large", f"the request line and headers are over {MAX_HEADER_BYTES >> 10} KB"
        else:
            status, reason, message = 400, "Bad Request", "malformed HTTP request (request line, headers, Content-Length or chunked body)"
        self._refuse(raw_json_response(status, reason, message))

    def _refuse(self, answer: bytes) -> None:
        """Answer, then close our side only, and the connection REFUSAL_LINGER seconds later: what the
        client still sends meanwhile is read and dropped, since closing with bytes unread resets the
        connection and the client could lose the answer; after it, a refused client holds nothing."""
        self._refused = True
        if self.cycle is not None and not self.cycle.response_complete:  # its endpoint sees the client gone, as at a close
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._arm(min(self.head_timeout, REFUSAL_LINGER))
        else:
            self.transport.close()

    def _arm(self, delay: float | None = None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.head_timeout if delay is None else delay, self._head_timed_out)

    def _head_timed_out(self) -> None:
        """The deadline: close a connection refused, idle, or slow with its head. One whose request is
        being answered is looked at again a timeout later (its endpoint bounds the body), and closed
        when its answer has been stuck for two deadlines in a row on a client that does not read."""
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete and not self._refused:
            stalled, self._stalled = self._stalled, self.flow.write_paused
            if not (stalled and self._stalled):
                self._arm()
                return
        elif not self._refused and self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self.transport.write(raw_json_response(408, "Request Timeout", f"the request head took longer than {self.head_timeout:g} s to arrive (--timeout)"))
        self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server, announcing the address it listens on and telling the service when it stops."""

    def __init__(self, config: uvicorn.Config, service: Service, announce: Callable[[str], None]) -> None:
        super().__init__(config)
        self.service, self.announce = service, announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.announce(f"http://{f'[{host}]' if ':' in host else host}:{port}")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.service.stopping = True
        await super().shutdown(sockets)


def config_for(service: Service, host: str, port: int, grace: float = GRACE_SECONDS, max_connections: int | None = None) -> uvicorn.Config:
    """uvicorn's settings for `service`: the ServeProtocol (request heads and idle connections closed
    after --timeout, heads over MAX_HEADER_BYTES refused, connections capped), no WebSocket, no banner,
    requests in flight cancelled `grace` seconds after a stop signal."""
    protocol = type("ServeProtocol", (ServeProtocol,), {
        "head_timeout": service.limits.timeout, "max_connections": max_connections or connection_cap()})
    return uvicorn.Config(
        create_app(service), host=host, port=port, log_level="warning", access_log=False, lifespan="off",
        http=protocol, ws="none", timeout_keep_alive=max(1, int(service.limits.timeout)), timeout_graceful_shutdown=grace,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES, server_header=False,
    )


def run_server(service: Service, host: str, port: int, announce: Callable[[str], None], grace: float = GRACE_SECONDS) -> int:
    """Serve until a stop signal, then finish the requests in flight within `grace` seconds and end
    the model's thread; the number of requests cut off by the grace period (answered 503)."""
    server = _Server(config_for(service, host, port, grace), service, announce)
    # uvicorn raises the stop signal again once it is done; this process has already stopped as asked
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.batcher.close(wait=service.cut_off == 0)  # a forward still running after the grace is not waited for
        service.decoders.shutdown(wait=False, cancel_futures=True)
    if not server.started:
        raise OSError(f"cannot listen on {host}:{port} (in use, or not an address of this machine)")
    return service.cut_off
