"""Bounded HTTP(S) transfer: resumable verified downloads from a server that is not trusted.

Bytes go to `NAME.part` (kept on a lost connection so that the next run resumes with an HTTP Range
request); the finished download is checked (length, sha256 where known) before it is renamed, and a
checksum mismatch deletes it. Every read has a stall timeout, the headers (redirects included) a
deadline, the body a rate floor over a window and a byte cap, and every protocol failure (not HTTP,
an endless header line, a bad Content-Length) is one `FetchError` naming the URL.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import FetchError
from ..files import env_number, sha256_file


Progress = Callable[[int, int | None], None]
"""Called with (bytes on disk so far, total bytes or None) as a download advances."""

CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchLimits:
    """How long and how much a server may take; a slow or endless server is cut off, not waited for.

    - `stall` (CLIPN_FETCH_STALL_S): seconds any one read (connect, a header, the body) may wait for a byte.
    - `headers` (CLIPN_FETCH_HEADERS_S): seconds from the request to the last header, redirects included,
      so headers sent a byte at a time cannot last for ever.
    - `rate_floor` (CLIPN_FETCH_MIN_RATE, bytes/s) over `window` (CLIPN_FETCH_WINDOW_S, seconds): the body
      must average at least this rate over every window, so a trickle is cut off.
    - `max_bytes` (CLIPN_FETCH_MAX_BYTES): the largest body accepted, with or without Content-Length.
    """

    stall: float = 60.0
    headers: float = 120.0
    rate_floor: float = 1024.0
    window: float = 60.0
    max_bytes: int = 16 << 30

    @classmethod
    def from_env(cls) -> FetchLimits:
        return cls(
            stall=env_number("CLIPN_FETCH_STALL_S", cls.stall, float, FetchError, finite=True),
            headers=env_number("CLIPN_FETCH_HEADERS_S", cls.headers, float, FetchError, finite=True),
            rate_floor=env_number("CLIPN_FETCH_MIN_RATE", cls.rate_floor, float, FetchError, finite=True),
            window=env_number("CLIPN_FETCH_WINDOW_S", cls.window, float, FetchError, finite=True),
            max_bytes=env_number("CLIPN_FETCH_MAX_BYTES", cls.max_bytes, int, FetchError, finite=True),
        )


class _CutOff(Exception):
    """The server broke a limit; the message says which."""


class Watch:
    """Closes the sockets of a request when its deadline passes: a blocked read then returns at once.

    Connections made by urllib (one per redirect) register here through `_WatchedHTTP(S)Handler`."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.fired = False
        self.timer: threading.Timer | None = None

    def connection(self, http_class: type[http.client.HTTPConnection]) -> Callable[..., http.client.HTTPConnection]:
        watch = self

        class Watched(http_class):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                super().connect()
                with watch.lock:
                    watch.sockets.append(self.sock)
                    if watch.fired:
                        _shut(self.sock)

        return Watched

    def start(self, seconds: float) -> None:
        self.timer = threading.Timer(seconds, self.fire)
        self.timer.daemon = True
        self.timer.start()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def fire(self) -> None:
        with self.lock:
            self.fired = True
            for sock in self.sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Redirected(urllib.error.URLError):
    """A redirect not followed (off http(s), past 10, or any where none are); `reason` names it."""


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows at most `max_redirections` (10) redirects, to http(s) only (urllib alone follows ftp://); none unless `follow`."""

    def __init__(self, follow: bool) -> None:
        self.follow = follow

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any) -> Any:
        target = printable(raw := headers.get("Location") or headers.get("URI") or "")
        if not self.follow:
            raise Redirected(f"the server redirects (HTTP {code}) to {target!r}, which is not followed")
        if urllib.parse.urlparse(urllib.parse.urljoin(req.full_url, raw)).scheme.lower() not in ("http", "https"):
            raise Redirected(f"the server redirects to {target!r}: only http(s) redirects are followed")
        if len(getattr(req, "redirect_dict", {})) >= self.max_redirections:
            raise Redirected(f"more than {self.max_redirections} redirects (the last to {target!r}): refused")
        fp.close()  # unread: urllib would read a redirect's body to its end, however long
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def opener(watch: Watch, follow: bool = True) -> urllib.request.OpenerDirector:
    """urllib's usual opener (proxies; redirects as `_Redirects`) whose connections `watch` can cut."""

    class HTTP(urllib.request.HTTPHandler):
        def do_open(self, http_class: type[http.client.HTTPConnection], req: urllib.request.Request, **kw: Any) -> Any:
            return super().do_open(watch.connection(http_class), req, **kw)

    class HTTPS(urllib.request.HTTPSHandler):
        def do_open(self, http_class: type[http.client.HTTPConnection], req: urllib.request.Request, **kw: Any) -> Any:
            return super().do_open(watch.connection(http_class), req, **kw)

    return urllib.request.build_opener(HTTP, HTTPS, _Redirects(follow))


@dataclass(frozen=True)
class Download:
    """A finished download: `resumed_from` bytes were already on disk, `received` came this time."""

    path: Path
    size: int
    sha256: str
    resumed_from: int
    received: int


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    size: int | None = None,
    progress: Progress | None = None,
    timeout: float = 60.0,
) -> Download:
    """Download `url` to `dest` over HTTP(S), resuming `dest.part` when the server allows it.

    Resuming sends `Range` with `If-Range` (the ETag or Last-Modified of the first attempt), so a
    file that changed on the server is downloaded again instead of being spliced.
    """
    dest = Path(dest)
    sha256 = _check_hex(sha256)
    if dest.is_file():
        digest = sha256_file(dest)
        if sha256 is None or digest == sha256:
            return Download(dest, dest.stat().st_size, digest, dest.stat().st_size, 0)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, validator_file = _partial_files(dest)
    validator = validator_file.read_text(encoding="utf-8").strip() if validator_file.is_file() else ""
    offset = part.stat().st_size if part.is_file() and validator else 0
    limits = FetchLimits.from_env()
    try:
        response = _request(url, offset, validator, limits, timeout)
    except _Unsatisfiable as exc:
        if offset and exc.total == offset:  # the part is already the whole file
            return _finish(part, dest, validator_file, sha256, size, offset, 0)
        _discard(part, validator_file)
        return download(url, dest, sha256=sha256, size=size, progress=progress, timeout=timeout)

    with response:
        offset, total = _body_range(url, response, offset, limits)
        if size is not None and total is not None and total != size:
            _discard(part, validator_file)
            raise FetchError(f"{url}: the server offers {total} bytes, expected {size}: refused")
        new_validator = response.headers.get("ETag") or response.headers.get("Last-Modified") or ""
        if new_validator:
            validator_file.write_text(new_validator, encoding="utf-8")
        else:
            validator_file.unlink(missing_ok=True)
        try:
            received = _receive(response, part, offset, total, progress, limits)
        except _CutOff as exc:
            raise FetchError(f"{url}: {exc}; {_kept(part, new_validator)}") from None
    done = offset + received
    if total is not None and done != total:
        raise FetchError(f"{url}: the connection was lost after {done} of {total} bytes; {_kept(part, new_validator)}")
    return _finish(part, dest, validator_file, sha256, size, offset, received)


class _Unsatisfiable(Exception):
    """HTTP 416 to a Range request: the part on disk is complete (`total` equals it) or stale."""

    def __init__(self, total: int | None) -> None:
        super().__init__(total)
        self.total = total


def _request(url: str, offset: int, validator: str, limits: FetchLimits, timeout: float) -> http.client.HTTPResponse:
    """The server's reply up to its last header, within `limits.headers` (redirects included); from
    byte `offset` when a part is kept. Every failure is one FetchError, except 416 (`_Unsatisfiable`)."""
    headers = {"User-Agent": f"clipn-cli/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers.update({"Range": f"bytes={offset}-", "If-Range": validator})
    watch = Watch()
    watch.start(limits.headers)
    try:
        response = opener(watch).open(urllib.request.Request(url, headers=headers), timeout=min(timeout, limits.stall))
    except urllib.error.HTTPError as exc:
        watch.cancel()
        if exc.code == 416:
            raise _Unsatisfiable(_range_total(exc.headers.get("Content-Range", ""))) from None
        raise FetchError(f"{url}: the server answered HTTP {exc.code} {printable(str(exc.reason))}; {_by_hand(url)}") from None
    except Redirected as exc:
        watch.cancel()
        raise FetchError(f"{url}: {exc.reason}; {_by_hand(url)}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        watch.cancel()
        if watch.fired:
            raise FetchError(f"{url}: {_late(limits)}; {_by_hand(url)}") from None
        raise FetchError(f"cannot download {url} ({reason_of(exc)}); {_by_hand(url)}") from None
    watch.cancel()
    if watch.fired:  # cut inside the headers: what came looks like a reply, but it is not one
        response.close()
        raise FetchError(f"{url}: {_late(limits)}; {_by_hand(url)}")
    return response


def _body_range(url: str, response: http.client.HTTPResponse, offset: int, limits: FetchLimits) -> tuple[int, int | None]:
    """Where the body starts in the file (the asked `offset` for a matching 206, else 0) and the file's
    whole length (None: unknown); a part not asked for, or more than `limits.max_bytes`, is refused."""
    content_range = response.headers.get("Content-Range", "")
    if response.status == 206 and _range_start(content_range) == offset:
        total = _range_total(content_range)
    elif response.status == 206:
        raise FetchError(f"{url}: the server sent a part of the file that was not asked for (Content-Range {printable(content_range)!r}): refused")
    else:
        offset = 0
        total = _content_length(url, response.headers.get("Content-Length"))
    if total is not None and total > limits.max_bytes:
        raise FetchError(f"{url}: the server offers {total} bytes, more than the {limits.max_bytes} allowed (CLIPN_FETCH_MAX_BYTES): refused")
    return offset, total


def _receive(
    response: http.client.HTTPResponse, part: Path, offset: int, total: int | None, progress: Progress | None, limits: FetchLimits
) -> int:
    """Append the response body to `part`; a lost connection ends the loop (the caller compares the
    length), a broken limit raises `_CutOff`. Without a Content-Length only a clean end counts as complete."""
    received = 0
    window_start, window_bytes = time.monotonic(), 0
    with open(part, "ab" if offset else "wb") as fh:
        if progress:
            progress(offset, total)
        while True:
            try:
                block = response.read1(CHUNK)
            except TimeoutError:
                raise _CutOff(f"no byte for {limits.stall:g} s (CLIPN_FETCH_STALL_S)") from None
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if total is None:
                    raise _CutOff(f"the connection failed after {offset + received} bytes ({reason_of(exc)})") from None
                break
            if not block:
                break
            fh.write(block)
            received += len(block)
            window_bytes += len(block)
            if offset + received > limits.max_bytes:
                raise _CutOff(f"more than {limits.max_bytes} bytes (CLIPN_FETCH_MAX_BYTES): stopped")
            if progress:
                progress(offset + received, total)
            now = time.monotonic()
            if now - window_start >= limits.window:
                if window_bytes < limits.rate_floor * (now - window_start):
                    raise _CutOff(
                        f"slower than {limits.rate_floor:g} bytes/s over {limits.window:g} s "
                        "(CLIPN_FETCH_MIN_RATE, CLIPN_FETCH_WINDOW_S): stopped"
                    )
                window_start, window_bytes = now, 0
        fh.flush()
        os.fsync(fh.fileno())
    return received


def _late(limits: FetchLimits) -> str:
    return f"no complete reply within {limits.headers:g} s (CLIPN_FETCH_HEADERS_S)"


def _kept(part: Path, validator: str) -> str:
    again = "resume" if validator else "start again (the server gives no ETag or Last-Modified to resume safely)"
    return f"the partial download is kept at {part}: run the same command again to {again}"


def _content_length(url: str, value: str | None) -> int | None:
    """Content-Length as ASCII digits only (`int()` would take '٣' and ' 3'); anything else is refused."""
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]{1,20}", value.strip()):
        raise FetchError(f"{url}: the server sent an invalid Content-Length {printable(value)!r}: refused")
    return int(value)


def printable(text: str) -> str:
    """A server's text cut to 100 printable characters, for a one-line message."""
    return "".join(c if c.isprintable() else "?" for c in text[:100])


def reason_of(exc: BaseException) -> str:
    """One short line for a network or protocol failure (http.client's messages can hold a whole header line)."""
    reason = getattr(exc, "reason", None) if isinstance(exc, urllib.error.URLError) else exc
    reason = reason if reason is not None else exc
    if isinstance(reason, TimeoutError):
        return "no reply within the stall timeout (CLIPN_FETCH_STALL_S)"
    if isinstance(reason, http.client.LineTooLong):
        return "a header line longer than 64 KiB: not a web server clipn can use"
    if isinstance(reason, http.client.RemoteDisconnected):
        return "the server closed the connection without a reply"
    if isinstance(reason, http.client.BadStatusLine):
        return "the reply is not HTTP"
    if isinstance(reason, http.client.HTTPException):
        return f"not a valid HTTP reply: {type(reason).__name__}: {printable(str(reason))}"
    return printable(str(reason)) or type(reason).__name__


def _finish(part: Path, dest: Path, validator_file: Path, sha256: str | None, size: int | None, offset: int, received: int) -> Download:
    """Check the complete `part`; rename it to `dest` or delete it."""
    actual_size = part.stat().st_size
    digest = sha256_file(part)
    if size is not None and actual_size != size:
        _discard(part, validator_file)
        raise FetchError(f"{dest.name}: downloaded {actual_size} bytes, expected {size}: deleted")
    if sha256 is not None and digest != sha256:
        _discard(part, validator_file)
        raise FetchError(f"{dest.name}: sha256 mismatch (expected {sha256}, got {digest}): the download was deleted")
    os.replace(part, dest)
    validator_file.unlink(missing_ok=True)
    return Download(dest, actual_size, digest, offset, received)


def _partial_files(dest: Path) -> tuple[Path, Path]:
    """Where an unfinished download of `dest` keeps its bytes and the server's validator (for If-Range)."""
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.validator")


def _discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _range_start(content_range: str) -> int | None:
    match = re.fullmatch(r"bytes ([0-9]{1,20})-[0-9]{1,20}/([0-9]{1,20}|\*)", content_range.strip())
    return int(match.group(1)) if match else None


def _range_total(content_range: str) -> int | None:
    match = re.fullmatch(r"bytes (?:[0-9]{1,20}-[0-9]{1,20}|\*)/([0-9]{1,20})", content_range.strip())
    return int(match.group(1)) if match else None


def _check_hex(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise FetchError(f"--sha256 must be 64 hexadecimal digits, not '{sha256}'")
    return value


def _by_hand(url: str) -> str:
    return f"without internet, download {url} in a browser, copy it here, then run 'clipn weights add FILE --name NAME'"
