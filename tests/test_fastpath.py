"""The torch-free fast start of `detect --embeddings F --runtime onnx|openvino|auto` (README "The
torch-free fast start"): no torch imported, and the same records as the torch path within README
"Reproducibility"."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from conftest import IMAGES, assert_close_records, cli, sigint_at_default

pytestmark = pytest.mark.skipif(find_spec("onnxruntime") is None or find_spec("onnx") is None, reason="needs the onnx extra")

CLASSES = "cat,horse,rocket,coffee"
TEXT_FIELDS = ("path", "error", "verdict", "rule", "class", "top_k")
# the runtimes the fast start runs, each where its package is installed
RUNTIMES = ["onnx", pytest.param("openvino", marks=pytest.mark.skipif(find_spec("openvino") is None, reason="needs the openvino extra"))]
# run clipn's main as the console script does, then say whether torch (or onnx) was ever imported
NO_TORCH = """
import sys
from clipn_cli.cli.app import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(sorted(m for m in ("torch", "open_clip", "onnx") if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


@pytest.fixture
def setup(tiny_weights: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """Class embeddings of the tiny model, the fixture images and a broken one; the export not cached yet."""
    embeddings = tmp_path / "heads.safetensors"
    assert cli("embed-classes", "-w", tiny_weights, "-c", CLASSES, "-o", embeddings).returncode == 0
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    return embeddings, [*sorted(str(p) for p in IMAGES.iterdir()), str(broken)]


def run(*args: object, stdin: str | None = None) -> tuple[int, str, str]:
    result = cli("detect", *args, stdin=stdin)
    return result.returncode, result.stdout, result.stderr


def torch_path(monkeypatch: pytest.MonkeyPatch, *args: object) -> tuple[int, str, str]:
    """The same command with the fast start refused: the torch path's answer."""
    from clipn_cli.fastdetect import FastStart

    with monkeypatch.context() as patch:
        patch.setattr(FastStart, "open", classmethod(lambda cls, *a, **k: None))
        return run(*args)


def fast_path(monkeypatch: pytest.MonkeyPatch, *args: object, stdin: str | None = None) -> tuple[int, str, str]:
    """The command with the torch path's model loading made to fail: only the fast start can answer."""
    from clipn_cli.cli import detect

    def no_torch_path(*_: object, **__: object) -> None:
        raise AssertionError("the torch path ran")

    with monkeypatch.context() as patch:
        patch.setattr(detect, "load_weights_for_cli", no_torch_path)
        return run(*args, stdin=stdin)


def parsed(fmt: str, text: str) -> list[dict]:
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines()]
    if fmt == "json":
        return json.loads(text)
    rows = list(csv.DictReader(io.StringIO(text)))
    return [{k: (float(v) if v and k not in TEXT_FIELDS else v) for k, v in row.items()} for row in rows]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fast_start_imports_no_torch_once_the_export_is_cached(tiny_weights: Path, setup: tuple[Path, list[str]], tmp_path: Path,
                                                               runtime: str) -> None:
    embeddings, images = setup
    args = ["detect", "-w", str(tiny_weights), "-e", str(embeddings), "--runtime", runtime, "--format", "jsonl", images[0]]
    first = cli(*args)  # no export yet: the torch path makes it, and says so once
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("ONNX export for these weights is not cached yet") == 1
    env = {"CLIPN_HOME": str(tmp_path / "clipn-home"), "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, env={**__import__("os").environ, **env},
                          preexec_fn=sigint_at_default)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr  # neither torch, open_clip nor onnx
    assert "not cached" not in done.stderr
    assert_close_records(json.loads(done.stdout), json.loads(first.stdout))


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("rule", [("--rule", "atd"), ("--rule", "ctw"), ("--rule", "msp", "--threshold", "0.3"),
                                  ("--rule", "energy", "--threshold", "0.1", "--details")])
def test_fast_records_equal_the_torch_paths(monkeypatch: pytest.MonkeyPatch, tiny_weights: Path, setup: tuple[Path, list[str]],
                                            rule: tuple[str, ...], runtime: str) -> None:
    embeddings, images = setup
    common = ("-w", tiny_weights, "-e", embeddings, *rule, "--top-k", "3", "--format", "jsonl", "--batch-size", "5", *images)
    assert run(*common, "--runtime", runtime)[0] == 1  # exports the tower; the broken image's record makes it 1
    code, fast, _ = fast_path(monkeypatch, *common, "--runtime", runtime)
    for slow in (runtime, "torch"):
        want_code, want, _ = torch_path(monkeypatch, *common, "--runtime", slow)
        assert code == want_code == 1
        assert_close_records(parsed("jsonl", fast), parsed("jsonl", want))
    records = parsed("jsonl", fast)
    assert [r["path"] for r in records] == images and "error" in records[-1] and len(records[0]["top_k"]) == 3


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_fast_records_equal_in_every_format(monkeypatch: pytest.MonkeyPatch, tiny_weights: Path, setup: tuple[Path, list[str]], fmt: str,
                                            runtime: str) -> None:
    embeddings, images = setup
    common = ("-w", tiny_weights, "-e", embeddings, "--runtime", runtime, "--format", fmt, *images)
    run(*common)  # exports the tower
    code, fast, _ = fast_path(monkeypatch, *common)
    want_code, want, _ = torch_path(monkeypatch, *common)
    assert code == want_code == 1
    assert_close_records(parsed(fmt, fast), parsed(fmt, want))
    assert len(parsed(fmt, fast)) == len(images)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_auto_takes_the_fast_start_in_the_runtime_tune_recorded(monkeypatch: pytest.MonkeyPatch, tiny_weights: Path,
                                                                setup: tuple[Path, list[str]], runtime: str) -> None:
    from clipn_cli.fastdetect import FastStart
    from clipn_cli.runtimes.choice import record_measurement
    from clipn_cli.weights.home import read_header, weights_home

    from clipn_cli.cli import fastpath

    monkeypatch.setattr(fastpath, "_accelerator_may_be_here", lambda: False)  # a GPU machine is the case at the end
    embeddings, images = setup
    common = ("-w", tiny_weights, "-e", embeddings, "--format", "jsonl", *images)
    run(*common, "--runtime", runtime)  # exports the tower
    record_measurement(weights_home() / "runtimes", read_header(tiny_weights)["fingerprint"], runtime, {})
    opened: list[str] = []
    real_open = FastStart.open.__func__

    def spy(cls: type, weights: object, embeddings: Path, runtime: str = "onnx", few: bool = False) -> FastStart | None:
        opened.append(runtime)
        return real_open(cls, weights, embeddings, runtime, few)

    monkeypatch.setattr(FastStart, "open", classmethod(spy))
    code, fast, err = fast_path(monkeypatch, *common, "--runtime", "auto")
    assert opened == [runtime]
    assert code == 1 and err.count("--runtime auto") == 1 and f"--runtime auto: {runtime} (measured fastest" in err
    want_code, want, _ = torch_path(monkeypatch, *common, "--runtime", "torch")
    assert want_code == 1
    assert_close_records(parsed("jsonl", fast), parsed("jsonl", want))
    record_measurement(weights_home() / "runtimes", read_header(tiny_weights)["fingerprint"], "torch", {})
    opened.clear()
    assert run(*common, "--runtime", "auto")[0] == 1 and opened == []  # tune picked torch: the torch path, no fast start tried
    record_measurement(weights_home() / "runtimes", read_header(tiny_weights)["fingerprint"], runtime, {})
    monkeypatch.setattr(fastpath, "_accelerator_may_be_here", lambda: True)
    assert run(*common, "--runtime", "auto")[0] == 1 and opened == []  # --device auto may mean a GPU: the torch path decides
    assert run(*common, "--runtime", "auto", "--device", "cpu")[0] == 1 and opened == [runtime]  # the CPU named: the fast start


@pytest.mark.parametrize("extra", [("--cache", "features"), ("--report", "r.html"), ("--precision", "fp32", "--quantize", "int8"),
                                   ("--negatives", "neglabel", "--words", str(Path(__file__).parent / "fixtures" / "words-small.txt"))])
def test_runs_the_fast_start_does_not_take_go_the_torch_way(monkeypatch: pytest.MonkeyPatch, tiny_weights: Path,
                                                            setup: tuple[Path, list[str]], tmp_path: Path, extra: tuple[str, ...]) -> None:
    from clipn_cli.fastdetect import FastStart

    embeddings, images = setup
    run("-w", tiny_weights, "-e", embeddings, "--runtime", "onnx", images[0])  # exports the tower
    monkeypatch.setattr(FastStart, "open", classmethod(lambda cls, *a: pytest.fail("the fast start was tried")))
    extra = tuple(str(tmp_path / e) if e in ("features", "r.html") else e for e in extra)
    code, out, err = run("-w", tiny_weights, "-e", embeddings, "--runtime", "onnx", "--format", "jsonl", *extra, images[0])
    assert "the fast start was tried" not in err
    assert code in (0, 2), err  # --negatives with a file lacking them is the torch path's one-line error
    assert code == 0 or err.startswith("clipn: ") and len(err.strip().splitlines()) == 1


def test_embeddings_of_other_weights_refused_in_the_same_line(monkeypatch: pytest.MonkeyPatch, tiny_weights: Path,
                                                              setup: tuple[Path, list[str]], tmp_path: Path) -> None:
    embeddings, images = setup
    run("-w", tiny_weights, "-e", embeddings, "--runtime", "onnx", images[0])  # exports the tower
    other = tmp_path / "digits.safetensors"
    assert cli("embed-classes", "-w", "digits", "-c", "zero,one", "-o", other).returncode == 0
    args = ("-w", tiny_weights, "-e", other, "--runtime", "onnx", images[0])
    fast, slow = fast_path(monkeypatch, *args), torch_path(monkeypatch, *args)
    assert fast[0] == slow[0] == 2
    assert fast[2] == slow[2] and "made with other weights" in fast[2] and len(fast[2].strip().splitlines()) == 1


def test_guarded_decoder_with_numpy_pixels_gives_the_torch_transforms(setup: tuple[Path, list[str]]) -> None:
    import numpy as np

    from clipn_cli.inputs.decode import load_one, make_transform
    from clipn_cli.inputs.sources import InputItem
    from clipn_cli.runtimes.preprocess import preprocess

    transform = make_transform(224)
    _, images = setup
    for path in images:
        want, got = load_one(InputItem(path), transform), load_one(InputItem(path), lambda image: preprocess(image, 224))
        assert got.error == want.error
        if want.pixels is not None:
            assert isinstance(got.pixels, np.ndarray) and np.array_equal(got.pixels, want.pixels.numpy()), path


def test_a_few_files_open_onnx_runtime_without_prepacking(monkeypatch: pytest.MonkeyPatch, tiny_weights: Path,
                                                          setup: tuple[Path, list[str]], tmp_path: Path) -> None:
    """Up to FEW_IMAGES image files named on the command line skip ONNX Runtime's weight prepacking (a
    faster start); a folder, stdin, a list of paths or more files keep it (faster per image). The
    records are the same."""
    from clipn_cli.fastdetect import FEW_IMAGES
    from clipn_cli.runtimes.sessions import OnnxTower

    embeddings, images = setup
    folder = tmp_path / "pictures"
    folder.mkdir()
    for name in images[:3]:
        (folder / Path(name).name).write_bytes(Path(name).read_bytes())
    common = ("-w", tiny_weights, "-e", embeddings, "--runtime", "onnx", "--format", "jsonl")
    run(*common, images[0])  # exports the tower
    prepacked: list[bool] = []
    real_init = OnnxTower.__init__

    def spy(self: OnnxTower, path: Path, device: str = "cpu", prepack: bool = True) -> None:
        prepacked.append(prepack)
        real_init(self, path, device, prepack)

    monkeypatch.setattr(OnnxTower, "__init__", spy)
    few = fast_path(monkeypatch, *common, *sorted(str(p) for p in folder.iterdir()))
    many = fast_path(monkeypatch, *common, str(folder))
    assert fast_path(monkeypatch, *common, *[images[0]] * (FEW_IMAGES + 1))[0] == 0
    assert fast_path(monkeypatch, *common, "-", stdin=images[0] + "\n")[0] == 0
    listed = tmp_path / "list.txt"
    listed.write_text(images[0] + "\n")
    assert fast_path(monkeypatch, *common, str(listed))[0] == 0  # one file naming any number of images
    assert prepacked == [False, True, True, True, True]
    assert few[0] == many[0] == 0
    assert_close_records(parsed("jsonl", few[1]), parsed("jsonl", many[1]))
