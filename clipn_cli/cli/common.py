"""What every command shares: the stderr console, error handling and exit codes, option aliases.

Exit codes: 0 every input scored; 1 some inputs failed (each has an error record);
2 usage or setup error (bad option, missing or unreadable weights, classes, embeddings; a full disk);
130 / 143 interrupted by SIGINT / SIGTERM; 141 the reader of stdout went away (`| head`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from ..errors import ClipnError, FileFormatError
from ..model.devices import CPU_DECODE_WORKERS, CPU_FORWARD_BATCH, CUDA_FORWARD_BATCH, PRECISIONS  # noqa: F401  PRECISIONS: for the commands

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2
EXIT_SIGINT, EXIT_SIGPIPE, EXIT_SIGTERM = 130, 141, 143
DEBUG_ENV = "CLIPN_DEBUG"
# --help groups the options of detect, eval and calibrate in these panels
INPUTS, MODEL, RULE, OUTPUT, CALIBRATION, ENGINE = "Inputs and classes", "Model and speed", "Verdict rule and scores", "Output", "Calibration", "Engine"
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # every command and group: `clipn -h`, `clipn detect -h`

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def examples(*lines: tuple[str, str]) -> str:
    """A command's --help epilog: (what it does, the command) pairs, one per paragraph (rich help
    joins lines within a paragraph)."""
    return "[bold]Examples[/bold]\n\n" + "\n\n".join(f"[dim]# {what}[/dim]\n\n  {_escape(command)}" for what, command in lines)


def warn(message: str) -> None:
    stderr.print(f"[yellow]clipn: warning:[/yellow] {_escape(message)}", markup=True, highlight=False)


def info(message: str) -> None:
    stderr.print(f"clipn: {message}", markup=False)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one line on stderr and exit (no traceback)."""
    error(message)
    raise typer.Exit(code)


def error(message: str) -> None:
    stderr.print(f"[red]clipn: error:[/red] {_escape(message)}", markup=True)


def check_choice(option: str, value: str | None, allowed: Sequence[str]) -> None:
    """Refuse an option value outside its choices before anything is loaded or written."""
    if value is not None and value not in allowed:
        listed = ", ".join(allowed[:-1]) + f" or {allowed[-1]}" if len(allowed) > 1 else allowed[0]
        fail(f"{option} must be {listed}, not '{value}'")


def check_output(option: str, path: Path | None, directory: bool = False) -> None:
    """Refuse an output path that cannot be written, before any work is done that it would lose.

    Its folder must exist: clipn makes no folders the user did not ask for (a typo in `-o` would
    otherwise leave a tree of them, even at the file-system root). An output folder (`directory`:
    --plots, the Ray --output) may be new, but its parent must exist.
    """
    from ..files import is_stream

    if path is None:
        return
    if directory:
        if path.exists() and not path.is_dir():
            fail(f"{option} {path}: exists and is not a directory")
    elif path.is_dir():
        fail(f"{option} {path}: is a directory")
    elif is_stream(path):
        return  # a pipe, device or /dev/stdout: written in place
    folder = path if path.is_dir() else path.absolute().parent
    if not folder.exists():
        fail(f"{option} {path}: the folder {folder} does not exist (create it first: mkdir -p {folder})")
    if not folder.is_dir():
        fail(f"{option} {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(f"{option} {path}: cannot write in {folder}")


def check_device(device: str) -> None:
    """Refuse a misspelt --device by its spelling alone, before torch is imported (whether a valid
    one is present is asked of torch when the model loads, in one line too)."""
    from ..model.devices import DEVICE_SPELLING, DEVICES

    if not DEVICE_SPELLING.fullmatch(device):
        fail(f"--device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, not '{device}'")


def check_file(option: str, path: str | os.PathLike[str] | None) -> None:
    """An input file named by an option must be there before anything loads."""
    if path is None:
        return
    if not os.path.exists(path):
        fail(f"{option} {path}: no such file")
    if os.path.isdir(path):
        fail(f"{option} {path}: is a directory, not a file")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(" ".join(text.split("\n")))


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives, so cleanup runs as for Ctrl-C."""


# torch's messages for a device that ran out of memory or whose driver failed: not bugs of ours
DEVICE_FAILURE = re.compile(r"out of memory|^(CUDA|MPS|HIP|XPU) (error|driver)", re.IGNORECASE)


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """User conditions (`ClipnError`, a full disk, a closed pipe, an interrupt) become one line and
    their documented exit code; any other exception is a bug and propagates with its traceback
    (exit 1). `--debug` or CLIPN_DEBUG=1 prints the traceback of a user condition too."""

    def on_term(signum: int, frame: object) -> None:
        raise Terminated()

    from ..files import is_disk_full

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    # a file name's non-UTF-8 bytes go to stdout as they are (as `ls` and `find` print them)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    # per-file image problems become error records; PIL's own warnings about them are noise
    warnings.filterwarnings("ignore", module=r"PIL(\..*)?$")
    try:
        yield
    except typer.Exit:
        raise
    except ClipnError as exc:
        if debug_enabled():
            traceback.print_exc(file=sys.stderr)
        fail(exc.one_line() if isinstance(exc, FileFormatError) else str(exc))
    except BrokenPipeError:
        _quiet_stdout()
        raise typer.Exit(EXIT_SIGPIPE) from None
    except OSError as exc:
        if not is_disk_full(exc):  # any other OSError is a bug of ours: its traceback shows where
            raise
        if debug_enabled():
            traceback.print_exc(file=sys.stderr)
        fail(f"{exc.filename or 'stdout'}: the disk is full (no space left on the device)")
    except MemoryError:
        fail("out of memory: lower --batch-size or --workers")
    except RuntimeError as exc:  # the device's own failures (memory, driver) are conditions; any other one is a bug
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if type(exc).__name__ != "OutOfMemoryError" and not DEVICE_FAILURE.search(first):
            raise
        fail(first or "out of memory on the device: lower --batch-size")
    except KeyboardInterrupt:
        stderr.print("clipn: interrupted", markup=False)
        raise typer.Exit(EXIT_SIGINT) from None
    except Terminated:
        stderr.print("clipn: terminated", markup=False)
        raise typer.Exit(EXIT_SIGTERM) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


_debug = {"on": False}  # set by `clipn --debug` for this invocation


def set_debug(on: bool) -> None:
    _debug["on"] = on


def debug_enabled() -> bool:
    """`clipn --debug ...` or CLIPN_DEBUG=1: tracebacks of user errors too."""
    return _debug["on"] or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def _quiet_stdout() -> None:
    """The reader of our stdout went away (`| head`): stop as `cat` would, without a message, and
    point stdout at /dev/null so that the interpreter's final flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def stdout_is_terminal() -> bool:
    return sys.stdout is not None and sys.stdout.isatty()


def check_stdout(output: Path | None, has_output_option: bool = True) -> None:
    """Refuse to start when results would go to a closed stdout (`>&-`), before any work is done."""
    if output is None and sys.stdout is None:
        fail("stdout is closed: results would be lost; " + ("give --output FILE or redirect stdout" if has_output_option else "redirect stdout"))


WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights", "-w", rich_help_panel=MODEL,
        help="CLIPN weights: a .safetensors file or a name from 'clipn weights list' (e.g. digits), or a plain open_clip CLIP "
        "as MODEL:TAG or MODEL:FILE. First match wins: --weights, $CLIPN_WEIGHTS, 'clipn weights default', the best official model fetched.",
        show_default=False,
    ),
]
TemplatesOpt = Annotated[
    str, typer.Option("--templates", "-t", rich_help_panel=INPUTS, help="Prompt templates: 'clipn' (the official 128), 'simple', or a file with one template per line.")
]
DeviceOpt = Annotated[str, typer.Option("--device", rich_help_panel=MODEL, help="auto, cpu, cuda, cuda:N or mps.")]
ClassesOpt = Annotated[str | None, typer.Option("--classes", "-c", rich_help_panel=INPUTS, help="Comma-separated class names, e.g. cow,cat,fish.", show_default=False)]
ClassesFileOpt = Annotated[
    Path | None, typer.Option("--classes-file", rich_help_panel=INPUTS, help="Text file: one class per line, '#' comments.", show_default=False)
]
BatchSizeOpt = Annotated[
    int | None, typer.Option("--batch-size", "-b", rich_help_panel=MODEL, min=1, help=f"Images per forward pass. Default: {CPU_FORWARD_BATCH} on CPU, {CUDA_FORWARD_BATCH} on CUDA.", show_default=False)
]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", "-j", rich_help_panel=MODEL, min=0, help=f"Decoding threads (0 = decode in the main thread). Default: min({CPU_DECODE_WORKERS}, CPUs); all CPUs with CUDA.", show_default=False),
]
PrecisionOpt = Annotated[str, typer.Option("--precision", rich_help_panel=MODEL, help="fp32 (exact), fp16 or bf16 (autocast).")]
RuntimeOpt = Annotated[
    str,
    typer.Option("--runtime", rich_help_panel=MODEL, help="Image tower runtime: auto (the exact one 'clipn weights tune' measured fastest here, else torch), torch, onnx (ONNX Runtime, fp32; CPU or CUDA) or openvino (CPU: fp32, bf16); exported once per weights (README \"Runtimes\")."),
]
ExifOpt = Annotated[bool, typer.Option("--exif-transpose/--no-exif-transpose", rich_help_panel=MODEL, help="Rotate by EXIF orientation first (the official pipeline does not).")]
NegativesOpt = Annotated[
    str | None,
    typer.Option("--negatives", rich_help_panel=RULE, help="Negative labels to mine and score with: neglabel, csp, or both (neglabel,csp). Adds their methods' scores.", show_default=False),
]
WordsOpt = Annotated[
    Path | None,
    typer.Option("--words", rich_help_panel=RULE, help="Candidate words for --negatives instead of the shipped WordNet 3.0 list: 'noun.FILE<TAB>word' / 'adj.FILE<TAB>word' lines.", show_default=False),
]
