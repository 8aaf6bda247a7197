"""The Typer application. Commands import the library (and torch) only when they run,
so `clipn --help` stays fast."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from . import calibrate, convert, detect, embed, export, serve, weights
from . import eval as eval_command
from . import train as train_command
from .common import HELP_OPTIONS, error, examples, set_debug


def _flags_take_no_value() -> None:
    """Typer's help labels every option with its type, flags included (`--details <bool>`), as if a
    flag took a value: show no type for flags."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_clipn", False):
        return

    def display_type_rich(self: TyperOption, ctx: object) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._clipn = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_take_no_value()

app = typer.Typer(
    name="clipn",
    help="Zero-shot out-of-distribution detection with CLIPN: is an image one of your classes, or something else?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings=HELP_OPTIONS,
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__
        from .common import check_stdout

        check_stdout(None, has_output_option=False)
        typer.echo(f"clipn-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error too (also CLIPN_DEBUG=1); for bug reports.")] = False,
) -> None:
    """Zero-shot out-of-distribution detection with CLIPN: is an image one of your classes, or something else?"""
    set_debug(debug)


DETECT_EXAMPLES = examples(
    ("the bundled demo: is each image one of these digits?", "clipn detect -w digits -c zero,one,two,three,four examples/digits/images/"),
    ("official weights, a results file, an HTML report", "clipn detect -c cow,cat,fish photos/ -o results.jsonl --report report.html"),
    ("classes encoded once, paths streamed from a pipeline", "find /data -name '*.jpg' | clipn detect -e animals.safetensors - > verdicts.jsonl"),
    ("verdicts with a chosen false-alarm rate", "clipn detect -c cow,cat,fish --calibration calib.json --alpha 0.01 photos/"),
    ("a Ray cluster, shards into a folder", "clipn detect --engine ray -e animals.safetensors -o run/ index.parquet"),
)
EVAL_EXAMPLES = examples(
    ("the digits demo: digits 0-4 are ID, 5-9 OOD", "clipn eval -w digits -c zero,one,two,three,four --id id/ --ood digits=ood/"),
    ("several OOD sets, per-image scores and plots", "clipn eval -c cow,cat --id val/ --ood inat=iNaturalist/ --ood sun=SUN/ --save-scores s.csv --plots plots/"),
)
SERVE_EXAMPLES = examples(
    ("the digits demo on http://127.0.0.1:8000", "clipn serve -w digits -c zero,one,two,three,four"),
    ("ask it from a script", "curl -F images=@photo.jpg http://127.0.0.1:8000/v1/detect"),
)
CALIBRATE_EXAMPLES = examples(
    ("store the scores of known ID images, then use them", "clipn calibrate -c cow,cat,fish id-photos/ -o calib.json"),
)

app.command("convert")(convert.convert)
app.command("embed-classes")(embed.embed_classes)
app.command("detect", epilog=DETECT_EXAMPLES)(detect.detect)
app.command("train")(train_command.train)
app.command("eval", epilog=EVAL_EXAMPLES)(eval_command.evaluate)
app.command("calibrate", epilog=CALIBRATE_EXAMPLES)(calibrate.calibrate)
app.command("serve", epilog=SERVE_EXAMPLES)(serve.serve)
app.command("export")(export.export)
weights.app.command("tune")(export.tune)
app.add_typer(weights.app, name="weights")


def main(argv: list[str] | None = None) -> None:
    """The `clipn` entry point: an option error is one line on stderr (exit 2), like every other error.

    Typer would print it in a box under a usage line; its exceptions are not public, so they are
    recognised by what every click exception has (a message and an exit code). `argv` (default
    sys.argv[1:]) lets tests run the command line in-process through this same path.
    """
    try:
        code = app(args=argv, prog_name="clipn", standalone_mode=False)
    except Exception as exc:
        exit_code = getattr(exc, "exit_code", None)
        if not (hasattr(exc, "format_message") and isinstance(exit_code, int)):
            raise
        message = exc.format_message()  # empty when help was printed instead (no arguments)
        if message:
            ctx = getattr(exc, "ctx", None)
            error(f"{message} (see '{ctx.command_path} --help')" if ctx is not None else message)
        sys.exit(exit_code)
    sys.exit(code or 0)
