"""A headless Chromium for the tests that open a page as a user would (the HTML reports, serve's drop
page): found on PATH, driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`,
fds 3/4), so no extra dependency, and the page's own Content-Security-Policy stays in force: a
blocked script or external resource shows up as the console error it is. A helper module, not a
test file: test modules import it as they import conftest."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not found on PATH (Debian: apt-get install chromium); this browser test needs it")


class DevTools:
    """A headless Chromium spoken to over the DevTools protocol on fds 3 (commands) and 4 (replies)."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        to_chrome = os.pipe()
        from_chrome = os.pipe()

        def child_fds() -> None:
            a, b = os.dup(to_chrome[0]), os.dup(from_chrome[1])  # os.dup2 makes the targets inheritable
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome[0])
        os.close(from_chrome[1])
        self.write_fd, self.read_fd = to_chrome[1], from_chrome[0]
        self.buffer = b""
        self.last_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self.last_id += 1
        message: dict[str, Any] = {"id": self.last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self.last_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float = 120.0) -> dict[str, Any]:
        """The next message `match` accepts; others are kept as events. A generous hang guard only."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buffer:
                ready, _, _ = select.select([self.read_fd], [], [], max(deadline - time.monotonic(), 0.0))
                if not ready:
                    raise TimeoutError("chromium did not answer")
                chunk = os.read(self.read_fd, 1 << 16)
                if not chunk:
                    raise EOFError("chromium closed the DevTools pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            message = json.loads(raw)
            if match(message):
                return message
            self.events.append(message)

    def open(self, url: str, *domains: str) -> str:
        """A new tab at `url` with Page, Runtime, Log (and `domains`) reporting, once its load event fired; its session."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", *domains):
            self.call(f"{domain}.enable", session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        self.wait(lambda m: m.get("method") == "Page.loadEventFired")
        return session

    def evaluate(self, expression: str, session: str, await_promise: bool = False) -> Any:
        """The JSON value `expression` (a JSON.stringify of what the test wants) gives in the page."""
        found = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": await_promise, "returnByValue": True}, session=session)
        return json.loads(found["result"]["value"])

    def errors(self) -> list[str]:
        """Console errors, exceptions and dialogs among the events so far (CSP refusals are console errors)."""
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(params["entry"]["text"])
            elif method == "Runtime.exceptionThrown":
                errors.append(str(params["exceptionDetails"]))
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                errors.append(str(params["args"]))
            elif method == "Page.javascriptDialogOpening":
                errors.append(f"dialog: {params.get('message')}")
        return errors

    def requested(self) -> list[str]:
        """Every URL the page asked for (needs the Network domain: `open(url, "Network")`)."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self.write_fd)
            os.close(self.read_fd)
