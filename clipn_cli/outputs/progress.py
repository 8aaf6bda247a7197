"""Progress of a run on a terminal's stderr: one status line, redrawn in place.

It shows `done/total`, the rate and the time left when the number of inputs is known (files,
folders, tables: counted by a background thread while the run starts), and `done` and the rate when
it is not (paths on stdin). Writers of a terminal table hide it while they print a row
(`suspended`), so rows scroll above it and it never lands in the middle of one.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import IO

REDRAW_EVERY = 0.1  # seconds: a faster redraw only costs time, the eye does not see it
CLEAR_LINE = "\r\x1b[2K"


class StatusLine:
    """A progress line on a terminal; `advance` per input, `suspended` around other output."""

    def __init__(self, stream: IO[str], total: int | None = None, what: str = "images", clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.total, self.what, self.clock = stream, total, what, clock
        self.done = 0
        self._start = clock()
        self._drawn = float("-inf")
        self._lock = threading.Lock()

    def text(self) -> str:
        """`12/928 images · 3.1/s · 4:56 left`, or `12 images · 3.1/s` while the total is not known."""
        elapsed = max(self.clock() - self._start, 1e-9)
        rate = self.done / elapsed
        if self.total is None:
            return f"{self.done} {self.what} · {rate:.1f}/s"
        parts = [f"{self.done}/{self.total} {self.what}", f"{rate:.1f}/s"]
        if self.done and self.total >= self.done:
            parts.append(f"{_clock_time((self.total - self.done) / rate)} left")
        return " · ".join(parts)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.clock() - self._drawn >= REDRAW_EVERY:
            self.draw()

    def draw(self) -> None:
        with self._lock:
            width = shutil.get_terminal_size().columns
            self.stream.write(CLEAR_LINE + self.text()[: max(width - 1, 0)])
            self.stream.flush()
            self._drawn = self.clock()

    def clear(self) -> None:
        with self._lock:
            self.stream.write(CLEAR_LINE)
            self.stream.flush()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Hide the line while something else is written to the same terminal."""
        self.clear()
        try:
            yield
        finally:
            self.draw()


class NoStatus:
    """The status line of a run whose stderr is not a terminal (pipelines, logs, tests): nothing."""

    total: int | None = None

    def advance(self, n: int = 1) -> None:
        pass

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        yield


def _clock_time(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextlib.contextmanager
def input_progress(stream: IO[str] | None, paths: Iterable[str], skip: Collection[str] = ()) -> Iterator[StatusLine | NoStatus]:
    """The status line of a run over `paths` on `stream` if it is a terminal, else NoStatus.

    The total is counted in a daemon thread walking the same inputs (no image is opened), so a
    large folder or table starts scoring at once; with `-` (stdin) among them there is no total.
    Inputs in `skip` (already done, `--resume`) are not counted.
    """
    if stream is None or not stream.isatty():
        yield NoStatus()
        return
    status = StatusLine(stream)
    paths = list(paths)
    if "-" not in paths:
        threading.Thread(target=_count, args=(status, paths, skip), name="clipn-count-inputs", daemon=True).start()
    try:
        status.draw()
        yield status
    finally:
        status.clear()


def _count(status: StatusLine, paths: list[str], skip: Collection[str]) -> None:
    from ..inputs.sources import iter_inputs

    try:
        status.total = sum(1 for item in iter_inputs(paths) if item.path not in skip)
    except Exception:  # noqa: BLE001 - the run itself reports what cannot be read; the line just shows no total
        return
