"""Run a Service on uvicorn until SIGTERM or SIGINT, then stop gracefully: the listening socket closes,
/readyz turns 503, requests in flight get their answers for up to the grace period (`--grace`), and
those still running after it get a 503 JSON error (the endpoint turns uvicorn's cancellation into it)."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable

import uvicorn

from .app import Service, create_app

GRACE_SECONDS = 30.0  # the default --grace: the longest a stop waits for requests in flight
MAX_HEADER_BYTES = 64 << 10  # a request line and headers larger than this are refused (h11)


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


def config_for(service: Service, host: str, port: int, grace: float = GRACE_SECONDS) -> uvicorn.Config:
    """uvicorn's settings for `service`: idle connections closed after --timeout, bounded headers, no
    banner, requests in flight cancelled `grace` seconds after a stop signal."""
    return uvicorn.Config(
        create_app(service), host=host, port=port, log_level="warning", access_log=False, lifespan="off",
        timeout_keep_alive=max(1, int(service.limits.timeout)), timeout_graceful_shutdown=grace,
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
