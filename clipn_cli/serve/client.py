"""`clipn detect --server URL`: the images named on the command line, sent to a running `clipn serve`
(standard library only: no `serve` extra needed). The server answers the records local detect makes."""

from __future__ import annotations

import base64
import json
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import ClipnError
from ..inputs.sources import InputItem, os_reason

PER_REQUEST = 16  # images per request (the server's default --max-batch)


class ServerError(ClipnError):
    """The server could not be reached or refused a request: one line naming it and why."""


def _call(url: str, key: str | None, body: bytes | None = None, timeout: float = 300.0) -> Any:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (the user's own URL)
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            reason = exc.reason
        raise ServerError(f"{url}: {exc.code} {reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ServerError(f"{url}: cannot reach the server ({getattr(exc, 'reason', exc)})") from None


def server_info(base: str, key: str | None) -> dict[str, Any]:
    """GET /v1/info: the classes and rule the server's records are made with."""
    return _call(base.rstrip("/") + "/v1/info", key)


def _read(item: InputItem, max_bytes: int) -> bytes | str:
    """The file's bytes, or the error record's reason (the server decodes; this only reads the user's own file)."""
    if item.error:
        return item.error
    try:
        st = os.stat(item.path)
        if stat.S_ISDIR(st.st_mode):
            return "is a directory, not an image"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file (device, socket or pipe)"
        if st.st_size > max_bytes:
            return f"file of {st.st_size} bytes is over the server's upload limit"
        with open(item.path, "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as exc:
        return os_reason(exc)


def remote_records(base: str, items: Iterable[InputItem], key: str | None, max_bytes: int) -> Iterator[dict[str, Any]]:
    """One record per input, in input order; inputs that cannot be read here get their error record."""
    url = base.rstrip("/") + "/v1/detect"
    pending: list[tuple[str, bytes | str]] = []

    def flush() -> Iterator[dict[str, Any]]:
        sent = [(name, data) for name, data in pending if isinstance(data, bytes)]
        answers: Iterator[dict[str, Any]] = iter(())
        if sent:
            body = json.dumps({"images": [base64.b64encode(d).decode() for _, d in sent], "names": [n for n, _ in sent]}).encode()
            answers = iter(_call(url, key, body))
        for name, data in pending:
            yield next(answers) if isinstance(data, bytes) else {"path": name, "error": data}
        pending.clear()

    budget = int(max_bytes * 0.7)  # base64 adds a third, the JSON a little more
    size = 0
    for item in items:
        data = _read(item, budget)
        weight = len(data) if isinstance(data, bytes) else 0
        if pending and (len(pending) >= PER_REQUEST or size + weight > budget):
            yield from flush()
            size = 0
        pending.append((item.path, data))
        size += weight
    yield from flush()
