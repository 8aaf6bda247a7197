"""Hostile and odd inputs: every input gets exactly one record, the run goes on, nothing runs code."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from conftest import CLASSES, GROUPING_LOGIT, GROUPING_PROBABILITY, IMAGES, TINY_CONFIG, cli, grouping_tolerance, jsonl, spawn


def png_bomb(path: Path, side: int = 60_000) -> None:
    """A valid PNG header declaring side×side pixels, with almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def build_corpus(root: Path) -> tuple[dict[str, str], list[str]]:
    """Write the hostile corpus; returns {path: expected error fragment} and the paths that must score."""
    root.mkdir()
    photo = Image.open(IMAGES / "chelsea.png").convert("RGB")
    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG")
    png = (IMAGES / "horse.png").read_bytes()
    bad: dict[str, str] = {}
    good: list[str] = []

    def add_bad(name: str, data: bytes | None, fragment: str) -> None:
        path = root / name
        if data is not None:
            path.write_bytes(data)
        bad[str(path)] = fragment

    add_bad("zero.jpg", b"", "empty file (0 bytes)")
    add_bad("truncated.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 3], "truncated")
    add_bad("truncated.png", png[: len(png) // 3], "truncated")
    add_bad("random.jpg", random.Random(0).randbytes(5000), "not an image")
    add_bad("text.png", b"hello, I am text\n" * 20, "not an image")
    (root / "x.jpg").mkdir()
    add_bad("x.jpg", None, "directory")
    os.symlink(root / "nowhere.png", root / "broken-link.png")
    add_bad("broken-link.png", None, "broken symbolic link")
    os.symlink(root / "loop-b.png", root / "loop-a.png")
    os.symlink(root / "loop-a.png", root / "loop-b.png")
    add_bad("loop-a.png", None, "symbolic link loop")
    add_bad("loop-b.png", None, "symbolic link loop")
    png_bomb(root / "bomb.png")
    add_bad("bomb.png", None, "too large")
    os.mkfifo(root / "fifo.png")
    add_bad("fifo.png", None, "not a regular file")

    def add_good(name: str, image: Image.Image, **save: object) -> None:
        path = root / name
        image.save(path, **save)
        good.append(str(path))

    add_good("one-pixel.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    add_good("strip.png", Image.new("L", (20_000, 1), 128))
    add_good("sixteen-bit.png", Image.new("I;16", (64, 48), 40_000))
    add_good("cmyk.jpg", photo.convert("CMYK"))
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    add_good("palette-transparent.png", palette, transparency=0)
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    add_good("animated.gif", frames[0], save_all=True, append_images=frames[1:])
    add_good("multipage.tiff", frames[0], save_all=True, append_images=frames[1:])
    add_good("photo.webp", photo)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    add_good("exif-rotated.jpg", photo, exif=exif.tobytes())
    add_good("with space.png", photo)
    add_good("ünïcödé 猫.png", photo)
    add_good("new\nline.png", photo)
    return bad, good


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], list[str]]:
    return build_corpus(tmp_path_factory.mktemp("hostile") / "corpus")


def test_every_hostile_input_gets_exactly_one_record(tiny_weights: Path, corpus: tuple[dict[str, str], list[str]]) -> None:
    bad, good = corpus
    inputs = [p for pair in zip(good, list(bad) + [""] * len(good)) for p in pair if p]
    result = cli("detect", "-w", str(tiny_weights), "--classes", CLASSES, "--workers", "2", *inputs)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    records = jsonl(result.stdout)
    assert [r["path"] for r in records] == inputs
    for record in records:
        if record["path"] in bad:
            assert bad[record["path"]] in record["error"], record
        else:
            assert "error" not in record and record["verdict"] in {"ID", "OOD"}, record
    assert f"{len(bad)} of {len(inputs)} inputs could not be scored" in result.stderr


def test_stdin_and_directory_walk_over_the_corpus(tiny_weights: Path, corpus: tuple[dict[str, str], list[str]]) -> None:
    bad, good = corpus
    listed = [p for p in good + list(bad) if "\n" not in p]
    result = cli("detect", "-w", str(tiny_weights), "--classes", CLASSES, "-", stdin="\n".join(listed) + "\n")
    assert [r["path"] for r in jsonl(result.stdout)] == listed
    root = Path(good[0]).parent
    walked = jsonl(cli("detect", "-w", str(tiny_weights), "--classes", CLASSES, str(root)).stdout)
    assert len({r["path"] for r in walked}) == len(walked)  # one record per file, folders skipped
    assert str(root / "x.jpg") not in {r["path"] for r in walked}


def test_exif_orientation_ignored_by_default_and_applied_on_request(tiny_weights: Path, tmp_path: Path) -> None:
    photo = Image.open(IMAGES / "chelsea.png").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged, plain, rotated = tmp_path / "tagged.png", tmp_path / "plain.png", tmp_path / "rotated.png"
    photo.save(tagged, exif=exif.tobytes())
    photo.save(plain)
    photo.transpose(Image.Transpose.ROTATE_270).save(rotated)
    args = ("detect", "-w", str(tiny_weights), "--classes", CLASSES, "--details", "--workers", "0")
    default = jsonl(cli(*args, str(tagged), str(plain)).stdout)
    assert default[0]["logits_yes"] == pytest.approx(default[1]["logits_yes"], abs=GROUPING_LOGIT)
    turned = jsonl(cli(*args, "--exif-transpose", str(tagged), str(rotated)).stdout)
    assert turned[0]["logits_yes"] == pytest.approx(turned[1]["logits_yes"], abs=GROUPING_LOGIT)
    assert turned[0]["logits_yes"] != pytest.approx(default[0]["logits_yes"], abs=GROUPING_LOGIT)


def make_many(root: Path, count: int) -> list[str]:
    root.mkdir(exist_ok=True)
    Image.new("RGB", (32, 24), (90, 120, 30)).save(root / "seed.png")
    paths = []
    for i in range(count):
        path = root / f"img-{i:05d}.png"
        os.link(root / "seed.png", path)
        paths.append(str(path))
    return paths


def wait_for_lines(path: Path, lines: int, proc: subprocess.Popen) -> None:
    while proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= lines:
            return
        time.sleep(0.05)
    pytest.fail(f"detect ended before writing {lines} lines: {proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_jsonl_keeps_complete_lines_and_resumes(tiny_weights: Path, tmp_path: Path, sig: int, code: int) -> None:
    paths = make_many(tmp_path / "many", 3000)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "clipn_cli", "detect", "-w", str(tiny_weights), "--classes", CLASSES,
           "--format", "jsonl", "--output", str(out), "--batch-size", "16", "-"]
    proc = spawn(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write("\n".join(paths) + "\n")
    proc.stdin.close()
    wait_for_lines(out, 50, proc)
    proc.send_signal(sig)
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    proc.wait()
    assert proc.returncode == code, stderr
    assert "stopped after" in stderr and "--resume" in stderr
    data = out.read_bytes()
    assert data.endswith(b"\n")
    first = [json.loads(line) for line in data.splitlines()]
    assert 50 <= len(first) < len(paths)
    assert [r["path"] for r in first] == paths[: len(first)]

    with open(out, "ab") as fh:  # simulate a line cut by a hard kill: resume must drop it
        fh.write(b'{"path": "half a rec')
    result = cli(*cmd[3:], "--resume", stdin="\n".join(paths) + "\n")
    assert result.returncode == 0, result.stderr
    final = jsonl(out.read_text())
    assert [r["path"] for r in final] == paths


@pytest.fixture
def sigint_ignored() -> Iterator[None]:
    """This process with SIGINT ignored, as a shell leaves a command it starts with `&`."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_reader_going_away_stops_quietly_with_141(tiny_weights: Path, tmp_path: Path) -> None:
    """`clipn detect ... | head -1`: no message, no traceback, the SIGPIPE exit status a shell expects."""
    paths = make_many(tmp_path / "many", 2000)
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(paths) + "\n")
    cmd = [sys.executable, "-m", "clipn_cli", "detect", "-w", str(tiny_weights), "--classes", CLASSES, "--format", "jsonl", "-"]
    with open(listing) as stdin:  # a file, not a pipe we write to: the child's full stdout pipe would block us
        proc = spawn(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["path"] == paths[0]
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait() == 141, stderr
    assert stderr == ""


EXIT_DURING_TRANSFORM = """
import sys, threading, time, torch
from PIL import Image
from clipn_cli.inputs.decode import load_images
from clipn_cli.inputs.sources import InputItem

entered = threading.Event()

def slow(image):  # what a torch transform does, for long enough that the exit surely lands inside it
    if image.width == 32 or entered.is_set():  # the first input is quick: the run has its first record
        return torch.zeros(1)
    entered.set()
    a, until = torch.ones(400, 400), time.monotonic() + 1.5
    while time.monotonic() < until:
        a = a @ a / 400
    return a[:1, 0]

quick, slow_one = sys.argv[1:3]
results = load_images([InputItem(quick)] + [InputItem(slow_one)] * 49, slow, workers=2, prefetch=4)
next(results)
entered.wait()  # a decode thread is inside torch now, for 1.5 s
sys.exit(3)
"""


def test_exit_while_a_thread_is_inside_torch_keeps_the_exit_code(tmp_path: Path) -> None:
    """A decode thread inside the transform (torch's C++) when the command exits: the interpreter
    must not end it there, which aborts the process (exit -6, "terminate called ...") instead of
    exiting with the code the command chose (here 3; for `| head`, 141)."""
    quick, slow = tmp_path / "quick.png", tmp_path / "slow.png"
    Image.new("RGB", (32, 24), (1, 2, 3)).save(quick)
    Image.new("RGB", (33, 24), (1, 2, 3)).save(slow)
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", EXIT_DURING_TRANSFORM, str(quick), str(slow)], capture_output=True, text=True)
        assert (proc.returncode, proc.stderr) == (3, "")


LAST_REFERENCE_AT_EXIT = """
import sys, threading, time, torch, weakref
from concurrent.futures import Future
from clipn_cli.inputs import decode as images
from clipn_cli.inputs.sources import InputItem

handed = threading.Event()

class SlowFuture(Future):
    def set_result(self, result):  # the thread keeps its reference a while after handing the result over
        super().set_result(result)
        handed.set()
        time.sleep(1.5)

images.Future = SlowFuture
results = images.load_images([InputItem(sys.argv[1])] * 3, lambda image: torch.ones(3, 64, 64), workers=1, prefetch=1)
first = next(results)
handed.wait()
tensor = weakref.ref(first.pixels)
del first  # now the decoding thread holds the last reference to the tensor, and will free it
images._settle_decoding_threads()  # what exit runs first: it must wait until the thread has let go
print("freed" if tensor() is None else "still held")
sys.exit(3)
"""


def test_exit_while_a_thread_holds_the_last_reference_to_a_tensor(tmp_path: Path) -> None:
    """Freeing a tensor is torch C++ that releases the GIL: a decoding thread that drops the last
    reference to one while the interpreter ends aborted the process (exit -6) once in ten runs of an
    ordinary 12-image detect on a loaded machine (core dump: THPVariable_clear → take_gil →
    pthread_exit). Such a thread is waited for at exit, as one inside a transform is."""
    image = tmp_path / "one.png"
    Image.new("RGB", (32, 24), (1, 2, 3)).save(image)
    proc = subprocess.run([sys.executable, "-c", LAST_REFERENCE_AT_EXIT, str(image)], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "freed\n", "")


def test_transform_section_refuses_new_entries_once_closed() -> None:
    from clipn_cli.inputs.limits import Section as _Section
    from clipn_cli.inputs.limits import Stopped as _Stopped

    section = _Section()
    with section.inside():
        assert section.close(timeout=0.01) is False  # someone is inside: the wait runs out
    assert section.close(timeout=0.01) is True
    with pytest.raises(_Stopped), section.inside():
        pass


@pytest.mark.parametrize("pytest_ignores_sigint", [False, True])
def test_interrupted_json_output_leaves_no_file(tiny_weights: Path, tmp_path: Path, request: pytest.FixtureRequest, pytest_ignores_sigint: bool) -> None:
    """Also when pytest was started with `&` from a script (SIGINT ignored): its child still stops with 130."""
    if pytest_ignores_sigint:
        request.getfixturevalue("sigint_ignored")
    paths = make_many(tmp_path / "many", 2000)
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "clipn_cli", "detect", "-w", str(tiny_weights), "--classes", CLASSES, "--format", "json", "--output", str(out), "-"]
    proc = spawn(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write("\n".join(paths) + "\n")
    proc.stdin.close()
    time.sleep(0.5)
    while proc.poll() is None and not list(tmp_path.glob(".out.json.*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait()
    assert proc.returncode == 130
    assert not out.exists() and not list(tmp_path.glob(".out.json.*"))


def peak_rss_growth_mb(args: list[str], small: Path, large: Path) -> tuple[float, float]:
    """Peak RSS (MB) of one `clipn` process after a run on the `small` path list, then after a run
    on the `large` one (stdin each time): one start-up instead of two, the same comparison."""
    code = (
        "import gc, resource, sys\n"
        "from clipn_cli.cli.app import main\n"
        "for listing in sys.argv[1:3]:\n"
        "    sys.stdin = open(listing)\n"
        "    try:\n        main(sys.argv[3:])\n    except SystemExit:\n        pass\n"
        "    gc.unfreeze(); gc.collect()\n"
        "    sys.stderr.write(f'PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(small), str(large), *args], capture_output=True, text=True)
    peaks = [int(ln.split()[1]) / 1024 for ln in result.stderr.splitlines() if ln.startswith("PEAK_RSS_KB")]
    assert len(peaks) == 2, result.stderr
    return peaks[0], peaks[1]


def test_memory_stays_flat_with_many_stdin_paths(tiny_weights: Path, tmp_path: Path) -> None:
    paths = make_many(tmp_path / "many", 4000)
    args = ["detect", "-w", str(tiny_weights), "--classes", CLASSES, "--output", str(tmp_path / "o.jsonl"), "-"]
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text("\n".join(paths[:400]) + "\n")
    large.write_text("\n".join(paths) + "\n")
    small_peak, large_peak = peak_rss_growth_mb(args, small, large)
    # holding 4,000 preprocessed images would need ~2.4 GB; streaming keeps the peak where it was
    assert large_peak - small_peak < 100, (small_peak, large_peak)
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 4000  # the large run did score every path


def make_pickle_bomb(path: Path, marker: Path) -> None:
    """A checkpoint whose unpickling would create `marker` (what a malicious .pt does)."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch

    torch.save({"state_dict": {"prompt_no": Payload()}}, path)


def test_pickle_payload_refused_and_never_run(tmp_path: Path) -> None:
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    make_pickle_bomb(evil, marker)
    result = cli("convert", str(evil), str(tmp_path / "out.safetensors"), "--config", str(TINY_CONFIG))
    assert result.returncode == 2
    assert "refused" in result.stderr and str(evil) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "unsupported GLOBAL posix.system" in result.stderr
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()

    result = cli("weights", "add", str(evil), "--name", "evil", "--config", str(TINY_CONFIG))
    assert result.returncode == 2 and "refused" in result.stderr
    assert not marker.exists()
    assert "evil" not in cli("weights", "list", "--format", "json").stdout


def test_checkpoint_with_a_custom_class_names_it(tmp_path: Path) -> None:
    import argparse

    import torch

    path = tmp_path / "with-args.pt"
    torch.save({"state_dict": {"prompt_no": torch.zeros(2)}, "args": argparse.Namespace(lr=1e-3)}, path)
    result = cli("convert", str(path), str(tmp_path / "out.safetensors"), "--config", str(TINY_CONFIG))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "(Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default.)" in result.stderr


def corrupt_variants(tiny_weights: Path, root: Path) -> dict[str, tuple[Path, str]]:
    import torch
    from safetensors.torch import load_file, save_file

    from clipn_cli.weights.checkpoints import read_info

    data = tiny_weights.read_bytes()
    meta = read_info(tiny_weights).metadata
    tensors = load_file(str(tiny_weights))
    cases: dict[str, tuple[Path, str]] = {}

    def case(name: str, expect: str) -> Path:
        path = root / f"{name}.safetensors"
        cases[name] = (path, expect)
        return path

    case("truncated", "not a valid safetensors").write_bytes(data[: len(data) // 2])
    case("garbage", "not a valid safetensors").write_bytes(b"\x00" * 64)
    case("huge-header", "not a valid safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    wrong = dict(tensors, text_projection_no=torch.zeros(3, 3))
    save_file(wrong, str(case("wrong-shape", "wrong shape: text_projection_no")), metadata=meta)
    missing = {k: v for k, v in tensors.items() if k != "ln_final_no.bias"}
    save_file(missing, str(case("missing", "missing: ln_final_no.bias")), metadata=meta)
    nan = dict(tensors, positional_embedding=torch.full_like(tensors["positional_embedding"], float("nan")))
    save_file(nan, str(case("nan", "NaN or Inf")), metadata=meta)
    save_file(tensors, str(case("no-metadata", "not a clipn-cli weights file")))
    save_file(tensors, str(case("future-format", "format version 2 is not one this clipn-cli reads")), metadata={**meta, "format_version": "2"})
    return cases


def test_bad_weights_files_one_line_exit_2(tiny_weights: Path, tmp_path: Path) -> None:
    for name, (path, expect) in corrupt_variants(tiny_weights, tmp_path).items():
        result = cli("detect", "-w", str(path), "--classes", CLASSES, str(IMAGES / "chelsea.png"))
        assert result.returncode == 2, name
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0] and str(path) in lines[0], (name, result.stderr)
        assert result.stdout == ""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no class names"),
        (b"# only\n# comments\n\n", "no class names"),
        ("caf\u00e9\n".encode("latin-1"), "not UTF-8"),
    ],
)
def test_bad_class_files(tiny_weights: Path, tmp_path: Path, content: bytes, message: str) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_bytes(content)
    result = cli("detect", "-w", str(tiny_weights), "--classes-file", str(classes), str(IMAGES / "chelsea.png"))
    assert result.returncode == 2 and message in result.stderr and str(classes) in result.stderr


def test_empty_class_list_and_long_names(tiny_weights: Path) -> None:
    result = cli("detect", "-w", str(tiny_weights), "--classes", " , ", str(IMAGES / "chelsea.png"))
    assert result.returncode == 2 and "no class names" in result.stderr
    long_name = "a very long class name " * 20
    result = cli("detect", "-w", str(tiny_weights), "--classes", f"cat,{long_name}", str(IMAGES / "chelsea.png"))
    assert result.returncode == 0 and "truncated" in result.stderr


def test_ten_thousand_classes(tiny_weights: Path, tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(f"class number {i}" for i in range(10_000)) + "\n")
    out = tmp_path / "classes.safetensors"
    result = cli("embed-classes", str(classes), "-w", str(tiny_weights), "--templates", "simple")
    assert result.returncode == 0, result.stderr
    result = cli("detect", "-w", str(tiny_weights), "-e", str(out), "--top-k", "3", str(IMAGES / "chelsea.png"))
    (record,) = jsonl(result.stdout)
    assert 0 <= record["class_index"] < 10_000 and len(record["top_k"]) == 3


def test_concurrent_writers_never_corrupt_embeddings(tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "shared.safetensors"
    cmd = [sys.executable, "-m", "clipn_cli", "embed-classes", "-w", str(tiny_weights), "-o", str(out)]
    procs = [spawn([*cmd, "--classes", classes], stderr=subprocess.PIPE) for classes in ("cat,rocket", "coffee,horse,tree")]
    seen = []
    while any(p.poll() is None for p in procs):
        if out.exists():  # a reader never sees a partial file
            from clipn_cli.heads.embeddings import ClassEmbeddings

            seen.append(ClassEmbeddings.load(out).classes)
        time.sleep(0.01)
    assert all(p.returncode == 0 for p in procs)
    from clipn_cli.heads.embeddings import ClassEmbeddings

    assert ClassEmbeddings.load(out).classes in (["cat", "rocket"], ["coffee", "horse", "tree"])
    assert all(s in (["cat", "rocket"], ["coffee", "horse", "tree"]) for s in seen)
    assert not list(tmp_path.glob(".shared.safetensors.*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_gets_error_record(tiny_weights: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked.png"
    locked.write_bytes((IMAGES / "horse.png").read_bytes())
    locked.chmod(0)
    result = cli("detect", "-w", str(tiny_weights), "--classes", CLASSES, str(locked), str(IMAGES / "horse.png"))
    records = jsonl(result.stdout)
    assert result.returncode == 1 and records[0] == {"path": str(locked), "error": "permission denied"}
    assert records[1]["verdict"] in {"ID", "OOD"}


def test_permission_error_maps_to_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mapping itself, testable as root too: PIL raising PermissionError becomes a record."""
    from PIL import Image

    from clipn_cli.inputs.decode import load_one
    from clipn_cli.inputs.sources import InputItem

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image, "open", refuse)
    loaded = load_one(InputItem(str(IMAGES / "horse.png")), transform=lambda img: img)
    assert loaded.pixels is None and loaded.error == "permission denied"


def test_concurrent_runs_share_a_feature_cache(tiny_weights: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "clipn_cli", "detect", "-w", str(tiny_weights), "--classes", CLASSES, "--cache", str(cache), str(IMAGES)]
    procs = [spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    entries = list(cache.rglob("*.feat"))
    assert len(entries) == len(list(IMAGES.iterdir()))
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".feat"]  # no temporary leftovers
    again = cli(*args[3:])
    assert same_results(jsonl(again.stdout), jsonl(outputs[0]))
    assert same_results(jsonl(outputs[0]), jsonl(outputs[1]))


def same_results(a: list[dict], b: list[dict]) -> bool:
    """Equal records, scores to float32 rounding: which images were cache hits changes how the
    misses are batched, and a batch's size changes the last bits of every feature (README: Reproducibility)."""
    if [sorted(r) for r in a] != [sorted(r) for r in b]:
        return False
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if isinstance(value, float):
                if abs(value - rb[key]) > grouping_tolerance(key):
                    return False
            elif value != rb[key]:
                return False
    return True


def test_batch_size_changes_scores_only_by_rounding(tiny_weights: Path) -> None:
    common = ["detect", "-w", str(tiny_weights), "--classes", CLASSES, "--format", "jsonl", str(IMAGES)]
    one = jsonl(cli(*common, "--batch-size", "1").stdout)
    five = jsonl(cli(*common, "--batch-size", "5").stdout)
    assert len(one) == len(list(IMAGES.iterdir()))
    assert same_results(one, five)
    assert not same_results(one, [{**r, "ctw_score": r["ctw_score"] + 2 * GROUPING_PROBABILITY} for r in five])
