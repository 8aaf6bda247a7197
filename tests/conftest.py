"""Shared test setup: the official tiny checkpoint converted once per session, its images and golden
numbers, the digits demo, small helpers, and the one way to run the command line in-process (`cli`)."""

from __future__ import annotations

import base64
import contextlib
import gc
import importlib.util
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_CHECKPOINT = FIXTURES / "clipn-tiny-official.pt"
TINY_CONFIG = FIXTURES / "clipn-tiny-config.json"
IMAGES = FIXTURES / "images"
WORDS = FIXTURES / "words-small.txt"  # a small word list: NegLabel mining over it takes a moment
CLASSES = "cat,coffee,rocket"  # what most tiny-model CLI tests detect among the fixture images

# The digits demo that ships in the package: its weights, its example images, its ID classes
# (zero..four; five..nine are its OOD).
DIGITS_WEIGHTS = ROOT / "clipn_cli" / "data" / "clipn-digits.safetensors"
DIGITS_IMAGES = ROOT / "examples" / "digits" / "images"
DIGITS_ID = ("zero", "one", "two", "three", "four")
DIGITS_OOD = ("five", "six", "seven", "eight", "nine")
DIGITS_CLASSES = ",".join(DIGITS_ID)

# A CLIP small enough to train in well under a second per step on one CPU core.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested past every reader's depth limit


# The README's "Reproducibility" contract for one computation run with different groupings (batch
# size and composition, cache hits, Ray shards and actors, processes): float32 matrix products sum
# in a different order for a different batch shape, so results agree to float32 rounding, not bit
# for bit. Cosines (and each image-feature component) move by at most GROUPING_COSINE = 8 float32
# eps; a logit is 100 x a cosine; a probability moves by at most 2.5 x the largest logit change
# (softmax and sigmoid slopes, summed over the ATD terms), rounded up to 3.
GROUPING_COSINE = 8 * 2.0**-23  # ≈ 9.5e-7
GROUPING_LOGIT = 100 * GROUPING_COSINE  # ≈ 9.5e-5
GROUPING_PROBABILITY = 3 * GROUPING_LOGIT  # ≈ 2.9e-4
LOGIT_FIELDS = ("logit", "energy")  # record fields on the logit scale (max_logit, logits_yes, energy, ...)


def grouping_tolerance(field: str) -> float:
    """The README's bound for a record field between two groupings: logits or probability-scale scores."""
    return GROUPING_LOGIT if any(part in field for part in LOGIT_FIELDS) else GROUPING_PROBABILITY


def assert_close_records(got: object, want: object, where: tuple = (), field: str = "") -> None:
    """Equal, except floats (at any depth) within `grouping_tolerance` of the field that holds them."""
    if isinstance(want, float):
        assert isinstance(got, float) and abs(got - want) <= grouping_tolerance(field), (where, got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for key in want:
            assert_close_records(got[key], want[key], (*where, key), key if isinstance(key, str) else field)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close_records(g, w, (*where, i), field)
    else:
        assert got == want, where


@pytest.fixture(scope="session")
def golden() -> dict:
    """Numbers the official CLIPN code computed on the tiny checkpoint (see shared/reference)."""
    return json.loads((FIXTURES / "golden-tiny.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny official checkpoint converted to clipn's safetensors format."""
    from clipn_cli.weights.checkpoints import convert_checkpoint

    out = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    convert_checkpoint(OFFICIAL_CHECKPOINT, out, config=str(TINY_CONFIG))
    return out


@pytest.fixture(scope="module")
def tiny_model(tiny_weights: Path) -> Any:
    """The tiny CLIPN loaded for library calls; one per test module, so no module sees another's changes."""
    from clipn_cli.weights.checkpoints import load_model

    return load_model(tiny_weights)[0]


@pytest.fixture(scope="session")
def images_dir() -> Path:
    return IMAGES


@pytest.fixture(scope="session")
def tiny_embeddings(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CLASSES embedded once with the tiny weights (`clipn embed-classes`), for `detect -e`."""
    out = tmp_path_factory.mktemp("emb") / "classes.safetensors"
    result = cli("embed-classes", "--classes", CLASSES, "--weights", tiny_weights, "--output", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def plain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random open_clip CLIP of the tiny config (seed 0) saved as a plain state dict: nothing downloaded."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**json.loads(TINY_CONFIG.read_text(encoding="utf-8")))
    path = tmp_path_factory.mktemp("plain") / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return path


SQUARE_COLOURS = ("red", "green", "blue", "yellow", "black", "white")


def square_png(colour: str, shade: int) -> bytes:
    """A 40x32 PNG of one colour with the pixel at (shade, shade) marked, so equal colours differ in bytes."""
    import io

    from PIL import Image

    img = Image.new("RGB", (40, 32), colour)
    img.putpixel((shade, shade), (shade * 20 % 256, 0, 0))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def captioned_squares(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `clipn train` tests train on: 12 images (two per colour) captioned "a <colour> square" in
    index.jsonl, a plain random TINY_CLIP (seed 0) as clip.pt and its config as tiny.json."""
    import open_clip
    import torch

    root = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(12):
        colour = SQUARE_COLOURS[i % 6]
        name = f"img{i:02d}.png"
        (root / name).write_bytes(square_png(colour, i))
        rows.append({"image": name, "caption": f"a {colour} square"})
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "tiny.json").write_text(json.dumps(TINY_CLIP), encoding="utf-8")
    torch.manual_seed(0)
    torch.save(open_clip.model.CLIP(**TINY_CLIP).state_dict(), root / "clip.pt")
    return root


def digits_build() -> ModuleType:
    """examples/digits/build.py as a module (digit rendering, the split, the held-out export)."""
    spec = importlib.util.spec_from_file_location("digits_build", ROOT / "examples" / "digits" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="session")
def digits_held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits demo's 360 held-out images as DIR/<name>/<index>.png (made by build.py; needs scikit-learn)."""
    pytest.importorskip("sklearn")
    folder = tmp_path_factory.mktemp("held")
    digits_build().export_held_out(folder)
    return folder


def jsonl(text: str) -> list[dict]:
    """The records of a JSON Lines text (detect's stdout)."""
    return [json.loads(line) for line in text.splitlines()]


def calibration_doc(**changes: object) -> dict:
    """A valid calibration file's content, with `changes` applied: the start of every hostile calibration."""
    doc = {"format": "clipn-cli.calibration", "format_version": "1", "count": 3, "alpha": 0.05,
           "weights_fingerprint": "f" * 64, "classes": ["cat"], "templates": "simple", "templates_sha256": "0" * 64,
           "settings": {}, "scores": {"mcm": [0.1, 0.2, 0.3]}}
    doc.update(changes)
    return doc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET (or POST `body`) `url` as a serve client does: status, lower-cased headers, body; an HTTP error is an answer too."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def json_body(images: list[tuple[str, bytes]]) -> bytes:
    """A /v1/detect JSON body: the images base64-encoded, with their names."""
    return json.dumps({"images": [base64.b64encode(d).decode() for _, d in images], "names": [n for n, _ in images]}).encode()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's weights or home directory."""
    monkeypatch.delenv("CLIPN_WEIGHTS", raising=False)
    monkeypatch.setenv("CLIPN_HOME", str(tmp_path / "clipn-home"))


def sigint_at_default() -> None:
    """`preexec_fn` of every child a test spawns: SIGINT back at its default disposition.

    A shell that starts pytest with `&` (no job control) sets SIGINT to ignored, a child inherits
    an ignored signal across exec, and clipn keeps an inherited SIG_IGN as it should; the tests
    that interrupt a child would then see it run on. The child of a test must behave as it does
    when started from a terminal, however pytest itself was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(args: list[str], **kwargs: Any) -> subprocess.Popen:
    """`subprocess.Popen` for a test's child process, with SIGINT at its default (`sigint_at_default`)."""
    return subprocess.Popen(args, preexec_fn=sigint_at_default, **kwargs)


class ServeProcess:
    """A `clipn serve` subprocess with its own weights home and no weights or key from the
    environment, ready once it prints its URL. `drain` reads the rest of its stderr into `lines` as
    it comes (a chatty child, e.g. Ray's, must never fill the pipe); otherwise a test reads it."""

    def __init__(self, args: list[str], home: Path, env: dict[str, str] | None = None, drain: bool = False) -> None:
        full = {k: v for k, v in os.environ.items() if k not in ("CLIPN_WEIGHTS", "CLIPN_API_KEY")}
        full.update(CLIPN_HOME=str(home), **(env or {}))
        self.proc = spawn([sys.executable, "-m", "clipn_cli", "serve", *args], env=full,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        for line in self.proc.stderr:
            self.lines.append(line)
            if found := re.search(r"serving on (http://\S+)", line):
                self.url = found.group(1)
                break
        else:
            raise AssertionError("".join(self.lines))
        if drain:
            threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM (unless it has ended), then its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def run_cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `clipn` entry point (`python -m clipn_cli`) in a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k != "CLIPN_WEIGHTS"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "clipn_cli", *args],
        input=stdin, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=None, preexec_fn=sigint_at_default,
    )


class CliResult(subprocess.CompletedProcess):
    """What `cli` returns: a CompletedProcess, plus click's names for the same things (`exit_code`;
    `output`, stdout then stderr), so a test written against CliRunner reads the same through `cli`."""

    @property
    def exit_code(self) -> int:
        return self.returncode

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli(*args: str | os.PathLike[str], stdin: str | None = None, env: dict[str, str] | None = None, cwd: Path | None = None) -> CliResult:
    """Run the command line in this process, through `main()` as the console script does (the same
    one-line option errors and exit codes), with stdout and stderr captured apart. Returns what
    `run_cli` returns, so a test can switch between the two; use `run_cli` only where the process is
    the point (signals, pipes, start-up imports, the console script)."""
    from click.testing import CliRunner

    from clipn_cli.cli.app import main

    previous = Path.cwd()
    with CliRunner().isolation(input=stdin, env=env) as (out, err, _):
        code: object = 0
        try:
            if cwd is not None:
                os.chdir(cwd)
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
        finally:
            gc.unfreeze()  # detect freezes what it loaded for a short-lived process; this one goes on
            os.chdir(previous)
            sys.stdout.flush()
            sys.stderr.flush()
        stdout = out.getvalue().decode("utf-8", "surrogateescape")
        stderr = err.getvalue().decode("utf-8", "backslashreplace")
    returncode = code if isinstance(code, int) else 0 if code is None else 1
    return CliResult(["clipn", *map(str, args)], returncode, stdout, stderr)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads for an in-process run (what OMP_NUM_THREADS sets for a new process)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- a Ray output folder, made as the driver makes it

RAY_RECORD = {"path": "a.png", "verdict": "ID", "rule": "atd", "class": "cat", "class_index": 0, "ctw_score": 0.5,
              "atd_score": 0.7, "p_ood": 0.3, "msp": 0.9, "max_logit": 20.0, "energy": -20.0, "p_value": 0.4}


def make_ray_run(root: Path, shards: list[list[dict]], fmt: str = "jsonl", calibrated: bool = True) -> Any:
    """A finished run as `run_detect` leaves it: shard files, then the manifest listing them (an OutputStore)."""
    from clipn_cli.outputs.records import encode_shard
    from clipn_cli.scale.manifest import Manifest, ManifestWriter
    from clipn_cli.scale.store import OutputStore

    store = OutputStore.open(str(root))
    store.prepare()
    job = {"command": "detect", "format": fmt, **({"calibration": {"method": "atd"}} if calibrated else {})}
    manifest = Manifest(job, inputs=sum(map(len, shards)), complete=True)
    writer = ManifestWriter(store, manifest, interval=3600)
    for index, records in enumerate(shards):
        name = f"part-{index:06d}.{fmt}"
        store.write(encode_shard(records, fmt, extra=("p_value",) if calibrated else ()), "shards", name)
        writer.finished(index, {"file": f"shards/{name}", "records": len(records), "errors": sum("error" in r for r in records), "digest": "d"})
    writer.flush(force=True)
    return store


# ---------------------------------------------------------------- a hostile HTTP server

class RawServer:
    """A raw-socket server on 127.0.0.1 (TLS with `context`) answering each connection, in a thread
    of its own, with `behave(conn, head)` once the request head and the body its Content-Length
    announces are read (with `whole_request=False`: after one read, whatever it holds, so that a TLS
    hello, which is no HTTP head, is answered too); the path of every request is kept in `seen`. For
    clients facing a hostile server."""

    def __init__(self, behave: Callable[[socket.socket, bytes], None], context: ssl.SSLContext | None = None,
                 whole_request: bool = True) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.behave, self.context, self.whole_request, self.seen = behave, context, whole_request, []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.context else 'http'}://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            if self.context is not None:
                conn = self.context.wrap_socket(conn, server_side=True)
            head = conn.recv(65536)
            while self.whole_request and b"\r\n\r\n" not in head and len(head) < 1 << 20:
                head += conn.recv(65536) or b"\r\n\r\n"
            head, _, body = head.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            while self.whole_request and length and len(body) < int(length.group(1)):
                body += conn.recv(65536) or b"x" * int(length.group(1))
            self.seen.append(head.split(b" ")[1].decode(errors="replace") if head.count(b" ") else "")
            self.behave(conn, head)
        except OSError:
            pass
        finally:
            conn.close()
