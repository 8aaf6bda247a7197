"""`clipn detect --server URL`: the images named on the command line, sent to a running `clipn serve`
(standard library only: no `serve` extra needed). The server answers the records local detect makes.

The server is not trusted more than a download is: each request must finish within
`$CLIPN_SERVER_TIMEOUT_S` (connecting to the last byte, however slowly it drips), an answer over
`MAX_ANSWER` bytes is refused, no redirect is followed (the API key would go with it), and every
record is checked (one per image sent, its path, detect's fields and types) before it is written.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import stat
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import ClipnError
from ..files import env_number
from ..inputs.sources import InputItem, os_reason
from ..outputs.records import CSV_COLUMNS, DETAIL_COLUMNS, record_problem
from ..weights.http import Redirected, Watch, opener, printable, reason_of

PER_REQUEST = 16  # images per request (the server's default --max-batch)
TIMEOUT = 300.0  # seconds one request may take, default of $CLIPN_SERVER_TIMEOUT_S
MAX_ANSWER = 64 << 20  # bytes of one answer read at most (records of 16 images with 50,000 classes fit)
_KNOWN = {*CSV_COLUMNS, *DETAIL_COLUMNS, "p_value", "q_value"}


class ServerError(ClipnError):
    """The server could not be reached or refused a request: one line naming it and why."""


class _Unreachable(ServerError):
    """No answer at all (refused, timed out, cut): the next request would fare no better."""


def _call(url: str, key: str | None, body: bytes | None = None) -> Any:
    """One request and its JSON answer, bounded in time (`$CLIPN_SERVER_TIMEOUT_S`, the whole
    exchange) and size (`MAX_ANSWER`); every failure is one `ServerError` naming `url`."""
    timeout = env_number("CLIPN_SERVER_TIMEOUT_S", TIMEOUT, float, ServerError, finite=True)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    watch = Watch()
    watch.start(timeout)
    try:
        with opener(watch, follow=False).open(request, timeout=timeout) as response:
            data, missing, kind = *_read_capped(url, response), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raise ServerError(f"{url}: HTTP {exc.code} {_refusal(exc)}") from None
    except Redirected as exc:
        raise ServerError(f"{url}: {exc.reason}: give --server the URL of the server itself") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        cause = getattr(exc, "reason", exc) if isinstance(exc, urllib.error.URLError) else exc
        if watch.fired or isinstance(cause, TimeoutError):
            raise _Unreachable(f"{url}: no complete answer within {timeout:g} s ($CLIPN_SERVER_TIMEOUT_S)") from None
        broken = isinstance(cause, http.client.HTTPException)
        raise _Unreachable(f"{url}: {'no valid HTTP answer' if broken else 'cannot reach the server'} ({reason_of(exc)})") from None
    finally:
        watch.cancel()
    if watch.fired:  # the sockets were shut mid-answer: what was read is not all of it
        raise _Unreachable(f"{url}: no complete answer within {timeout:g} s ($CLIPN_SERVER_TIMEOUT_S)")
    if missing:  # http.client reads a body cut short as a clean end
        raise _Unreachable(f"{url}: the answer was cut short ({len(data)} bytes of the {len(data) + missing} announced)")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise ServerError(f"{url}: the answer is not JSON (Content-Type {printable(kind)!r}): is this a clipn server?") from None


def _read_capped(url: str, response: http.client.HTTPResponse) -> tuple[bytes, int]:
    """The body, and how many bytes its Content-Length announced beyond it; past `MAX_ANSWER` bytes, refused."""
    chunks, size = [], 0
    while block := response.read(1 << 16):
        size += len(block)
        if size > MAX_ANSWER:
            raise ServerError(f"{url}: an answer of more than {MAX_ANSWER >> 20} MiB: refused")
        chunks.append(block)
    return b"".join(chunks), response.length or 0


def _refusal(exc: urllib.error.HTTPError) -> str:
    """The server's reason for an error status: its JSON `error` if it sent one (64 KiB read at
    most), else the status line; never waited on (Retry-After is shown, not slept)."""
    reason = str(exc.reason)
    try:
        doc = json.loads(exc.read(1 << 16))
        reason = doc["error"] if isinstance(doc, dict) and isinstance(doc.get("error"), str) else reason
    except (ValueError, RecursionError, OSError, AttributeError, http.client.HTTPException):
        pass
    retry = exc.headers.get("Retry-After") if exc.headers is not None else None
    return printable(reason) + (f" (Retry-After: {printable(retry)[:40]})" if retry else "")


def server_info(base: str, key: str | None) -> dict[str, Any]:
    """GET /v1/info: the classes and rule the server's records are made with (checked: a
    positive upload limit, classes as text, a calibration level in (0, 1) or none)."""
    if urllib.parse.urlparse(base).scheme.lower() not in ("http", "https"):
        raise ServerError(f"--server must be an http(s) URL, not {printable(base)!r}")
    url = base.rstrip("/") + "/v1/info"
    info = _call(url, key)
    info = info if isinstance(info, dict) else {}
    limits, classes, alpha = info.get("limits"), info.get("classes", []), info.get("calibration_alpha")
    mb = limits.get("max_upload_mb") if isinstance(limits, dict) else None
    if not (_number(mb) and mb > 0 and isinstance(classes, list) and all(isinstance(c, str) for c in classes)
            and (alpha is None or (_number(alpha) and 0 < alpha < 1))):
        raise ServerError(f"{url}: the answer is not a clipn server's info (limits.max_upload_mb, classes, calibration_alpha)")
    return info


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


def _records(url: str, key: str | None, sent: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """The server's records for `sent`, one per image in order; a record that is not detect's for
    that image becomes that image's error record (the others are kept)."""
    body = json.dumps({"images": [base64.b64encode(d).decode() for _, d in sent], "names": [n for n, _ in sent]}).encode()
    answer = _call(url, key, body)
    if not isinstance(answer, list) or len(answer) != len(sent):
        raise ServerError(f"{url}: the answer is not a list of {len(sent)} records, one per image sent")
    out = []
    for (name, _), record in zip(sent, answer):
        problem = record_problem(record) or _stray(record, name)
        out.append(record if problem is None else {"path": name, "error": f"{url}: the server's record for this image {problem}"})
    return out


def _stray(record: dict[str, Any], name: str) -> str | None:
    """Why a well-formed record is not this image's, or not writable as local detect's are."""
    if record["path"] != name:
        return f"is for another path ({printable(record['path'])[:60]!r})"
    extra = next((k for k, v in record.items() if k not in _KNOWN and v is not None and not _number(v)), None)
    return None if extra is None else f"has a field {printable(extra)[:40]!r} that is not a number"


def remote_records(base: str, items: Iterable[InputItem], key: str | None, max_bytes: int) -> Iterator[dict[str, Any]]:
    """One record per input, in input order; inputs that cannot be read here get their error record,
    and so do the images of a request the server fails (after one that got no answer at all, the
    rest are not sent: each gets a record saying why)."""
    url = base.rstrip("/") + "/v1/detect"
    pending: list[tuple[str, bytes | str]] = []
    down: list[str] = []

    def flush() -> Iterator[dict[str, Any]]:
        sent = [(name, data) for name, data in pending if isinstance(data, bytes)]
        answers: Iterator[dict[str, Any]] = iter(())
        if sent and down:
            answers = iter([{"path": name, "error": f"not sent: {down[0]}"} for name, _ in sent])
        elif sent:
            try:
                answers = iter(_records(url, key, sent))
            except ServerError as exc:
                if isinstance(exc, _Unreachable):
                    down.append(str(exc))
                answers = iter([{"path": name, "error": str(exc)} for name, _ in sent])
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
