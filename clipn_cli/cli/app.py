"""The Typer application. Commands import the library (and torch) only when they run,
so `clipn --help` stays fast."""

from __future__ import annotations

import typer

from . import convert, detect, embed, weights
from . import eval as eval_command
from . import train as train_command

app = typer.Typer(
    name="clipn",
    help="Zero-shot out-of-distribution detection with CLIPN: is an image one of your classes, or something else?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.command("convert")(convert.convert)
app.command("embed-classes")(embed.embed_classes)
app.command("detect")(detect.detect)
app.command("train")(train_command.train)
app.command("eval")(eval_command.evaluate)
app.add_typer(weights.app, name="weights")


def main() -> None:
    app()
