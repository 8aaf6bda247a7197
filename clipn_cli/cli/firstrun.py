"""The first run with no weights at all: on a terminal, offer to fetch the official ones.

A newcomer's first `clipn detect` otherwise ends in an error that lists commands to type. On a
terminal (stdin and stderr both), clipn asks once, saying what it downloads, how much and where,
and goes on with the fetched weights on "y". Anything but "y"/"yes" (Enter, "n", end of input)
declines, and the usual no-weights error follows. Pipelines and scripts are never asked: a script
runs `clipn weights fetch vitb16` first, which does nothing when the weights are already here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from .common import info, stderr

DOWNLOAD_SIZE = "about 1.4 GB"  # the publisher states none; the checkpoint with its optimizer state
CONVERTED_SIZE = "about 855 MB"


def interactive() -> bool:
    """Someone can answer: stdin and stderr are both a terminal."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def should_offer(weights: object | None, *, terminal: bool) -> bool:
    """Offer a download only when nothing names weights and nothing would be chosen: no --weights,
    no $CLIPN_WEIGHTS, no default, no official weights in the home; and only on a terminal."""
    from ..weights.home import WEIGHTS_ENV, current_weights

    if weights is not None or os.environ.get(WEIGHTS_ENV) or not terminal:
        return False
    return current_weights() is None


def prompt_text() -> str:
    from ..weights.home import BEST, target_path

    return (
        f"clipn: no CLIPN weights yet. Download the official {BEST.config} ('{BEST.name}', {DOWNLOAD_SIZE} "
        f"from Google Drive, kept as {CONVERTED_SIZE}) to {target_path(BEST.name)}? [y/N] "
    )


def offer_fetch(ask: Callable[[str], str]) -> Path | None:
    """Ask with `ask(prompt) -> answer`; on yes, fetch the best official weights (they become the
    default) and return their file; None when declined."""
    if ask(prompt_text()).strip().lower() not in {"y", "yes"}:
        return None
    from ..weights import fetch
    from ..weights.home import BEST
    from .weights import download_progress

    with download_progress(stderr) as progress:
        result = fetch.fetch_weights(BEST.name, progress=progress)
    info(f"'{result.name}' ready: {result.path}; later runs use it without asking")
    return result.path


def ask_on_terminal(prompt: str) -> str:
    """The prompt on stderr (stdout is for results), the answer from stdin; end of input declines."""
    stderr.print(prompt, end="", markup=False, highlight=False)
    return sys.stdin.readline()


def first_run_weights(weights: Path | None) -> Path | None:
    """`weights` as given, or the weights fetched on the first run's yes; None leaves the choice to
    `resolve_weights` (which explains what to do when nothing is there)."""
    if should_offer(weights, terminal=interactive()):
        return offer_fetch(ask_on_terminal)
    return weights
