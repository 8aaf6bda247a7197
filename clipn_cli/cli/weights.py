"""`clipn weights list|path|fetch|add|default`: the weights home from the command line."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from .common import HELP_OPTIONS, check_choice, check_stdout, fail, handle_errors, info, stderr

if TYPE_CHECKING:
    from ..weights.fetch import Installed

app = typer.Typer(
    name="weights",
    help="Get and choose CLIPN weights: the official ViT-B-16 checkpoints, your own files, the default.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=HELP_OPTIONS,
)

NameOpt = Annotated[str | None, typer.Option("--name", "-n", help="Name to store the weights under.", show_default=False)]
ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", help="open_clip model name or model-config JSON for conversion. Default: the known model's, else recognised from tensor shapes.", show_default=False),
]


@app.command("list")
def list_cmd(
    fmt: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
) -> None:
    """Known models and registered weights: present or not, size, fingerprint, which is the default."""
    with handle_errors():
        from ..weights.home import get_default, list_weights, weights_home

        check_choice("--format", fmt, ("table", "json"))
        check_stdout(None, has_output_option=False)
        rows = list_weights()
        if fmt == "json":
            doc = {"home": str(weights_home()), "default": get_default(), "weights": [r.as_dict() for r in rows]}
            typer.echo(json.dumps(doc, indent=2))
            return
        from rich import box
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(f"weights home: {weights_home()}"), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("name", "status", "size", "fingerprint"):
            table.add_column(column, no_wrap=True)
        table.add_column("about")
        for r in rows:
            size = f"{r.size / 1e6:.1f} MB" if r.size is not None else ""
            status = f"{r.status}, default" if r.is_default else r.status
            name = r.name + "".join(f" (or {alias})" for alias in r.aliases)
            table.add_row(Text(name), status, size, r.fingerprint[:12], Text(r.description))
        Console(highlight=False).print(table)


@app.command("path")
def path_cmd(
    name: Annotated[str | None, typer.Argument(help="Weights name. Default: the weights detect would use now.", show_default=False)] = None,
) -> None:
    """Print the file of weights NAME (or of the current default), for scripts."""
    with handle_errors():
        from ..weights.home import fix_hint, locate, resolve_weights

        check_stdout(None, has_output_option=False)
        if name is None:
            typer.echo(str(resolve_weights(None)))
            return
        path = locate(name)
        if path is None:
            fail(f"weights '{name}' are not here: {fix_hint(name)}")
        typer.echo(str(path))


@app.command("fetch")
def fetch_cmd(
    source: Annotated[str, typer.Argument(help="A known name (vitb16 = vitb16-rep2, vitb16-rep1, vitb16-rep3) or an http(s) / Google Drive URL.")],
    name: NameOpt = None,
    sha256: Annotated[str | None, typer.Option("--sha256", help="Expected sha256 of the downloaded file: anything else is deleted.", show_default=False)] = None,
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even if the weights are here.")] = False,
) -> None:
    """Download, verify and convert weights into the weights home; an interrupted download resumes.

    The official checkpoints are on Google Drive (downloaded with gdown, which handles Drive's quirks).
    """
    with handle_errors():
        from ..weights.fetch import fetch_weights

        with download_progress(stderr) as progress:
            result = fetch_weights(source, name, sha256=sha256, config=config, progress=progress, force=force)
        if result.already_present:
            again = "it ships with clipn-cli" if result.bundled else "--force downloads it again"
            info(f"'{result.name}' is already here: {result.path} ({again})")
            return
        done = result.download
        if done is not None and done.resumed_from:
            info(f"resumed at {done.resumed_from} of {done.size} bytes")
        _report(result)


@app.command("add")
def add_cmd(
    file: Annotated[Path, typer.Argument(help="An official .pt checkpoint (converted) or a clipn .safetensors (checked, copied).")],
    name: NameOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Register a local weights file in the weights home (the route for machines without internet)."""
    with handle_errors():
        from ..weights.fetch import add_weights

        _report(add_weights(file, name, config))


@app.command("default")
def default_cmd(
    name: Annotated[str | None, typer.Argument(help="Weights to use when --weights and $CLIPN_WEIGHTS are absent.", show_default=False)] = None,
    unset: Annotated[bool, typer.Option("--unset", help="Forget the default: the best official weights present are used.")] = False,
) -> None:
    """Set (or show, without NAME) the default weights: without NAME, prints the file detect would
    use now, or 'none' when there is none (exit 0: a query, not an error)."""
    with handle_errors():
        from ..weights.home import current_weights, get_default, set_default

        if unset or name is not None:
            if unset and name is not None:
                fail("give NAME or --unset, not both")
            set_default(name)
            info(f"default weights: {name}" if name else "default weights unset")
            return
        check_stdout(None, has_output_option=False)
        configured = get_default()
        info(f"configured default: {configured}" if configured else "no default configured")
        current = current_weights()
        typer.echo(str(current) if current is not None else "none")


def _report(result: Installed) -> None:
    size_mb = result.path.stat().st_size / 1e6
    info(f"'{result.name}' ready: {result.path} ({size_mb:.1f} MB, {result.model_name}, fingerprint {result.fingerprint[:12]})")
    if result.made_default:
        info(f"'{result.name}' is now the default weights ('clipn weights default NAME' to change)")


@contextlib.contextmanager
def download_progress(console: Console) -> Iterator[Callable[[int, int | None], None] | None]:
    """A Rich download bar (bytes, speed, time left) on a terminal; nothing in pipelines."""
    if not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("downloading", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("download", total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update
