"""Hostile inputs, round 2 (issue 12): each family with its own hostile files, built here.

Library calls and in-process CLI runs where they suffice; a real `clipn` process only where the
process is the point (locale and stdin bytes, signals, a closed stdout, peak memory).
Tests run as root, where `chmod 000` stops nothing: an unreadable folder is simulated by making
`os.scandir` refuse it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import DEEP, IMAGES, cli, spawn

from clipn_cli.inputs import decode as images
from clipn_cli.heads.embeddings import ClassEmbeddings
from clipn_cli.errors import ClassesError, ClipnError, EmbeddingsError, OutputError, TrainError, WeightsError
from clipn_cli.inputs.decode import load_images, load_one, open_image
from clipn_cli.inputs.limits import DecodeLimits, jpeg_scans
from clipn_cli.inputs.sources import InputItem, iter_inputs
from clipn_cli.outputs.writers import CsvRows

CLASSES = "cat,horse,rocket"
HANG_GUARD = 60  # seconds: only to stop a hung test, never a speed assertion


def invoke(*args: str, input: str | None = None) -> tuple[int, list[dict], str]:
    """Run clipn in-process (`cli`); returns the exit code, the JSON Lines records and stderr."""
    result = cli(*args, stdin=input)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return result.returncode, records, result.stderr


def clipn_process(*args: str, **kwargs: object) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "CLIPN_WEIGHTS"}
    env.update(kwargs.pop("env", {}))  # type: ignore[arg-type]
    return spawn([sys.executable, "-m", "clipn_cli", *args], env=env, **kwargs)  # type: ignore[call-overload]


def wait_with_rusage(proc: subprocess.Popen, stdin: bytes | None = None) -> tuple[int, bytes, bytes, int]:
    """Exit code, stdout, stderr and the peak RSS (KiB) of this one child (os.wait4, not RUSAGE_CHILDREN's max)."""
    out, err = [], []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read())) for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for thread in readers:
        thread.start()
    if stdin is not None:
        proc.stdin.write(stdin)
        proc.stdin.close()
    timer = threading.Timer(HANG_GUARD * 3, proc.kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for thread in readers:
        thread.join()
    return proc.returncode, out[0], err[0], usage.ru_maxrss


def jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def png_bytes(width: int, height: int, mode_byte: int = 2, rows: bool = True) -> bytes:
    """A PNG declaring width×height (8-bit RGB by default); with `rows`, every row's data is there (zeros)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = {0: 1, 2: 3, 6: 4}[mode_byte]
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + width * channels)
    body = b"".join(compressor.compress(row) for _ in range(height if rows else 1)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode_byte, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def photo() -> Image.Image:
    return Image.open(IMAGES / "horse.png").convert("RGB")


def progressive_jpeg(image: Image.Image, extra_scans: int = 0) -> bytes:
    """A progressive JPEG; `extra_scans` repeats its smallest scan that many times (a CPU bomb's shape:
    each scan is a pass over the whole image, however few bytes it takes)."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    ends = [data.find(b"\xff\xc4", s) % (len(data) + 1) for s in starts]  # up to the next table or EOI
    scans = [data[s : min(e, len(data) - 2)] for s, e in zip(starts, ends)]
    return data[:-2] + min(scans, key=len) * extra_scans + b"\xff\xd9"


# 1. formats that start programs ---------------------------------------------------------------

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"


@pytest.fixture
def fake_ghostscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `gs` first on PATH that leaves a marker file when anything runs it."""
    from PIL import EpsImagePlugin

    marker = tmp_path / "gs-ran"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    gs = bindir / "gs"
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow looks gs up once and remembers
    monkeypatch.setattr(EpsImagePlugin, "gs_windows_binary", None, raising=False)
    return marker


def test_no_image_starts_a_program(tiny_weights: Path, tmp_path: Path, fake_ghostscript: Path) -> None:
    eps = tmp_path / "x.jpg"
    eps.write_bytes(EPS)
    with pytest.raises(Exception):  # the file is a real trigger: Pillow alone hands it to gs
        Image.open(eps).load()
    assert fake_ghostscript.exists()
    fake_ghostscript.unlink()

    hostile = {
        "x.jpg": (EPS, "PostScript/EPS"),
        "doc.png": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", "PDF"),
        "binary-eps.jpg": (b"\xc5\xd0\xd3\xc6" + struct.pack("<6I", 30, len(EPS), 0, 0, 0, 0) + b"\xff\xff" + EPS, "EPS"),
    }
    inputs = []
    for name, (data, _) in hostile.items():
        (tmp_path / name).write_bytes(data)
        inputs += [str(tmp_path / name), str(IMAGES / "horse.png")]
    code, records, stderr = invoke("detect", "-w", str(tiny_weights), "--classes", CLASSES, "-j", "2", *inputs)
    assert code == 1 and "Traceback" not in stderr
    assert [r["path"] for r in records] == inputs
    for record, (_, fragment) in zip(records[::2], hostile.values()):
        assert record["error"].startswith(f"format {fragment} is not decoded by clipn (allowed: JPEG, PNG"), record
    assert all("verdict" in r for r in records[1::2])
    assert not fake_ghostscript.exists()


def test_allowed_formats_still_decode_and_others_are_named(tmp_path: Path) -> None:
    image = photo().resize((40, 30))
    for fmt, kwargs in (("JPEG", {}), ("PNG", {}), ("GIF", {}), ("WEBP", {}), ("BMP", {}), ("TIFF", {}), ("PPM", {})):
        path = tmp_path / f"x.{fmt.lower()}"
        image.save(path, fmt, **kwargs)
        assert open_image(str(path)).size == (40, 30), fmt
    image.save(tmp_path / "icon.png", "ICO", sizes=[(16, 16)])
    assert load_one(InputItem(str(tmp_path / "icon.png")), lambda i: i).error.startswith("format ICO is not decoded")


# 2. path lines on stdin are bytes, in every locale; plus a baseline of peak memory --------------


def test_non_utf8_name_on_stdin_is_one_input_in_a_utf8_locale(tiny_weights: Path, tmp_path: Path) -> None:
    latin1 = os.fsencode(tmp_path) + b"/caf\xe9.png"
    with open(latin1, "wb") as fh:
        fh.write((IMAGES / "horse.png").read_bytes())
    lines = [os.fsencode(IMAGES / "chelsea.png"), latin1, os.fsencode(IMAGES / "rocket.jpg"), b"/no/such/file.png"]
    proc = clipn_process(
        "detect", "-w", str(tiny_weights), "--classes", CLASSES, "-j", "4", "-",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # strict UTF-8 stdin, as Python sets it up under en_US.UTF-8 (C.UTF-8 alone would escape bad bytes)
        env={"LC_ALL": "C.UTF-8", "PYTHONUTF8": "0", "PYTHONIOENCODING": "utf-8:strict"},
    )
    code, out, err, _ = wait_with_rusage(proc, b"\n".join(lines) + b"\n")
    records = jsonl(out)
    assert code == 1 and b"Traceback" not in err
    assert [os.fsencode(r["path"]) for r in records] == lines
    assert [("verdict" in r) for r in records] == [True, True, True, False]


# 3. FIFO swap race and signals ------------------------------------------------------------------


def test_path_swapped_for_a_fifo_after_the_check_does_not_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tmp_path / "swapped.png"
    os.mkfifo(fifo)
    regular = os.stat(IMAGES / "horse.png")
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: regular if str(p) == str(fifo) else real_stat(p, *a, **k))
    result: list = []
    thread = threading.Thread(target=lambda: result.append(load_one(InputItem(str(fifo)), lambda i: i)), daemon=True)
    thread.start()
    thread.join(HANG_GUARD)
    if not result:  # the old open() by name blocks here forever; free it before failing
        with open(fifo, "wb"):
            pass
    assert result and result[0].error == "not a regular file (device, socket or pipe)"


STUCK = """
import sys, threading
from clipn_cli.inputs import decode as images
real = images._open_descriptor
def stuck(path):
    if "stuck" in path:
        threading.Event().wait()  # blocked for ever, as open() on a FIFO with no writer
    return real(path)
images._open_descriptor = stuck
from clipn_cli.cli.app import main
sys.argv[0] = "clipn"
main()
"""


@pytest.mark.parametrize("signum, code, stdin_open", [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)])
def test_signal_ends_a_run_with_a_stuck_decoder_and_keeps_finished_records(
    tiny_weights: Path, signum: int, code: int, stdin_open: bool
) -> None:
    good = [str(IMAGES / name) for name in sorted(os.listdir(IMAGES))][:10]
    env = {k: v for k, v in os.environ.items() if k != "CLIPN_WEIGHTS"}
    proc = spawn(
        [sys.executable, "-c", STUCK, "detect", "-w", str(tiny_weights), "--classes", CLASSES, "-b", "1", "-j", "2", "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0,  # unbuffered: readline takes one line only
    )
    proc.stdin.write(("\n".join([*good, "/tmp/stuck.png"]) + "\n").encode())
    if not stdin_open:
        proc.stdin.close()
        proc.stdin = None
    first = proc.stdout.readline()  # a record is out: the run is in its stuck state now
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    took = time.monotonic() - sent
    records = jsonl(first + out)
    assert proc.returncode == code, err
    assert b"Traceback" not in err and b"stopped after" in err
    assert records and [r["path"] for r in records] == good[: len(records)]
    print(f"{signal.Signals(signum).name}: exited {took:.2f} s after the signal with {len(records)} records")


# 4. classes files -------------------------------------------------------------------------------


def test_classes_file_must_be_a_small_regular_file(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.heads.classes import MAX_CLASS_FILE_BYTES, read_class_file

    fifo = tmp_path / "classes.fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.txt"
    with open(big, "wb") as fh:
        fh.truncate(MAX_CLASS_FILE_BYTES + 1)
    cases = {"/dev/zero": "not a regular file", str(fifo): "not a regular file", str(big): "larger than 16 MiB", str(tmp_path): "is a directory"}
    for path, fragment in cases.items():
        with pytest.raises(ClassesError, match=f"^{path}: cannot read class file: .*{fragment}"):
            read_class_file(path)
    code, records, stderr = invoke("detect", "-w", str(tiny_weights), "--classes-file", str(fifo), str(IMAGES / "chelsea.png"))
    assert code == 2 and records == [] and stderr.count("\n") == 1 and "not a regular file" in stderr


# 5. bombs inside containers and under the limits: the frame decoded is checked, memory bounded --


def bomb_folder(root: Path) -> list[str]:
    """Small files that declare huge frames, in containers and plain; some are just under the pixel limit."""
    root.mkdir()
    huge_png = png_bytes(13_000, 13_000, rows=False)
    files = {}
    # an ICO whose only entry is a 13000x13000 PNG (the directory says 0x0 = 256)
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(huge_png), 22) + huge_png
    files["icon.jpg"] = ico
    files["icns.png"] = b"icns" + struct.pack(">I", 16 + len(huge_png)) + b"ic10" + struct.pack(">I", 8 + len(huge_png)) + huge_png
    # a GIF whose logical screen is small but whose first frame is 20000x20000
    files["frame.gif"] = (
        b"GIF89a" + struct.pack("<HHBBB", 8, 8, 0, 0, 0) + b"\x2c" + struct.pack("<HHHHB", 0, 0, 20_000, 20_000, 0x80)
        + b"\x00\x00\x00\xff\xff\xff" + b"\x02\x02\x44\x01\x00\x3b"
    )
    # a two-page TIFF: a small first page, then a 30000x30000 one (only the first is decoded, and scored)
    tiff = io.BytesIO()
    photo().resize((32, 32)).save(tiff, "TIFF", save_all=True, append_images=[Image.new("L", (1, 1))])
    files["pages.tiff"] = tiff.getvalue()
    tags = [(256, 4, 30_000), (257, 4, 30_000), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (278, 4, 30_000), (279, 4, 16)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in tags) + b"\0" * 4
    files["declared.tif"] = b"II*\0" + struct.pack("<I", 8 + 16) + b"\0" * 16 + ifd
    files["wide.bmp"] = b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 30_000, 3_000, 1, 24, 0, 0, 0, 0, 0, 0)
    files["header.ppm"] = b"P6\n12000 9000\n255\n" + b"\x00" * 64
    files["rgba.png"] = png_bytes(8_500, 8_500, mode_byte=6, rows=False)  # under the pixel limit, over the memory limit
    # four RGB PNGs just under the pixel limit with every row present: each really decodes 324 MB
    full = png_bytes(9_000, 9_000)
    files.update({f"full-{i}.png": full for i in range(4)})
    for name, data in files.items():
        (root / name).write_bytes(data)
    return sorted(str(root / name) for name in files)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "bombs"
    bomb_folder(root)
    return root


def test_frame_that_is_decoded_is_checked_before_decoding(bombs: Path) -> None:
    paths = sorted(str(p) for p in bombs.iterdir())
    results = {Path(p).name: load_one(InputItem(p), lambda i: i.size) for p in paths if "full-" not in p}
    assert results["pages.tiff"].pixels == (32, 32)
    for name, result in results.items():
        if name != "pages.tiff":
            assert result.error and ("too large" in result.error or "not decoded by clipn" in result.error or "needs about" in result.error), (name, result)
    assert results["icon.jpg"].error.startswith("format ICO")
    assert "needs about" in results["rgba.png"].error


def test_memory_budget_is_shared_by_decoding_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four threads decoding images of 60% of the budget each: never two decodes at once."""
    from PIL import ImageFile

    active, peak = [0], [0]
    lock = threading.Lock()
    real_load = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> object:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)  # long enough that, were two decodes allowed at once, they would overlap
        try:
            return real_load(self)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    side = int((0.6 * (1 << 20) / 4) ** 0.5)  # RGB: 4 bytes a pixel in Pillow
    path = tmp_path / "sixty-percent.png"
    photo().resize((side, side)).save(path)
    results = list(load_images([InputItem(str(path))] * 6, lambda i: torch.zeros(1), workers=4, limits=DecodeLimits(memory_mb=1)))
    assert [r.error for r in results] == [None] * 6
    assert peak[0] == 1
    results = list(load_images([InputItem(str(path))] * 6, lambda i: torch.zeros(1), workers=4, limits=DecodeLimits(memory_mb=4)))
    assert peak[0] > 1  # the test can tell: with room for several, they overlap


def test_bomb_folder_peak_memory_stays_near_an_ordinary_run(tiny_weights: Path, tmp_path: Path, bombs: Path) -> None:
    ordinary = tmp_path / "ordinary"
    ordinary.mkdir()
    for i, name in enumerate(sorted(os.listdir(IMAGES))[: len(os.listdir(bombs))]):
        (ordinary / f"{i:02d}-{name}").write_bytes((IMAGES / name).read_bytes())
    peaks = {}
    for label, folder in (("ordinary", ordinary), ("bombs", bombs)):
        proc = clipn_process("detect", "-w", str(tiny_weights), "--classes", CLASSES, "-j", "4", str(folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        code, out, err, peaks[label] = wait_with_rusage(proc)
        records = jsonl(out)
        assert b"Traceback" not in err
        assert [r["path"] for r in records] == sorted(str(p) for p in folder.iterdir())
        assert code == (0 if label == "ordinary" else 1)
    print(f"peak RSS: ordinary {peaks['ordinary'] / 1024:.0f} MiB, bombs {peaks['bombs'] / 1024:.0f} MiB")
    assert peaks["bombs"] - peaks["ordinary"] < 512 * 1024


# 6. CPU bombs: scans counted from markers, decode time bounded ------------------------------------


def test_progressive_jpeg_scans_are_counted_before_decoding(tmp_path: Path) -> None:
    image = photo().resize((64, 48))
    normal = progressive_jpeg(image)
    exif_thumb = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 1
    image.save(exif_thumb, "JPEG", progressive=True, exif=exif.tobytes() + normal[:400])  # JPEG bytes inside EXIF
    assert 2 <= jpeg_scans(normal, 100) <= 20
    assert jpeg_scans(exif_thumb.getvalue(), 100) == jpeg_scans(normal, 100)
    bomb = tmp_path / "scans.jpg"
    bomb.write_bytes(progressive_jpeg(image, extra_scans=500))
    assert jpeg_scans(bomb.read_bytes(), 100) > 100
    error = load_one(InputItem(str(bomb)), lambda i: i).error
    assert error == "progressive JPEG with more than 100 scans (limit CLIPN_MAX_JPEG_SCANS); a decoding-time bomb?"
    (tmp_path / "ok.jpg").write_bytes(normal)
    assert open_image(str(tmp_path / "ok.jpg")).size == (64, 48)


def test_decode_time_limit_gives_an_error_record(tmp_path: Path) -> None:
    slow = tmp_path / "slow.png"
    slow.write_bytes(png_bytes(2_000, 2_000, mode_byte=0))
    result = load_one(InputItem(str(slow)), lambda i: i, limits=DecodeLimits(timeout=1e-9))
    assert result.error == "decoding took longer than 1e-09 s (limit CLIPN_DECODE_TIMEOUT); a decoding-time bomb?"


def test_decode_stuck_inside_one_call_is_given_up_and_the_run_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = images._open_descriptor

    def stuck(path: str) -> object:
        if path.endswith("stuck.png"):
            release.wait(HANG_GUARD)
        return real(path)

    monkeypatch.setattr(images, "_open_descriptor", stuck)
    monkeypatch.setattr(images, "GIVE_UP_AFTER", 0.0)
    items = [InputItem(str(IMAGES / "chelsea.png")), InputItem("/x/stuck.png"), InputItem(str(IMAGES / "horse.png"))]
    try:
        results = list(load_images(items, lambda i: torch.zeros(1), workers=1, limits=DecodeLimits(timeout=5.0)))
    finally:
        release.set()
    assert [r.path for r in results] == [i.path for i in items]
    assert results[1].error.startswith("decoding took longer than 5 s") and results[0].error is None and results[2].error is None


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPN_MAX_JPEG_SCANS", "7")
    monkeypatch.setenv("CLIPN_DECODE_TIMEOUT", "2.5")
    assert DecodeLimits.from_env() == DecodeLimits(max_jpeg_scans=7, timeout=2.5)
    monkeypatch.setenv("CLIPN_DECODE_MEMORY_MB", "lots")
    with pytest.raises(ClipnError, match=r"\$CLIPN_DECODE_MEMORY_MB must be a positive number"):
        DecodeLimits.from_env()


# 7. hostile safetensors metadata --------------------------------------------------------------


def metadata_of(path: Path) -> dict[str, str]:
    from clipn_cli.safetensors_file import SafetensorsFile

    with SafetensorsFile(path) as sf:
        return dict(sf.metadata)


def rewrite(source: Path, target: Path, change_meta=None, change_tensors=None) -> Path:
    meta, tensors = metadata_of(source), load_file(str(source))
    if change_meta:
        change_meta(meta)
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, str(target), metadata=meta)
    return target


def set_config(key: str, value: object):
    def change(meta: dict[str, str]) -> None:
        cfg = json.loads(meta["model_config"])
        cfg["vision_cfg"][key] = value
        meta["model_config"] = json.dumps(cfg)

    return change


def test_hostile_weights_metadata_is_one_error_naming_the_file(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.weights.checkpoints import load_model, read_info

    cases = {
        "deep.safetensors": (lambda m: m.update(model_config=DEEP), "model_config metadata is nested too deeply"),
        "layers-10m.safetensors": (set_config("layers", 10_000_000), "vision_cfg.layers must be a whole number from 1 to 256"),
        "layers-2.5.safetensors": (set_config("layers", 2.5), "vision_cfg.layers must be a whole number from 1 to 256, not 2.5"),
        "layers-3.safetensors": (set_config("layers", 3), "the model config does not fit the tensors: vision_cfg.layers 3 (the tensors hold 2)"),
        "width.safetensors": (set_config("width", 96), "vision_cfg.width 96 (the tensors hold 64)"),
        "prompts.safetensors": (lambda m: m.update(num_prompts="99999999999"), "num_prompts 99999999999 is not from 1 to 4096"),
    }
    for name, (change, message) in cases.items():
        bad = rewrite(tiny_weights, tmp_path / name, change)
        with pytest.raises(ClipnError) as caught:
            load_model(bad)
        assert str(caught.value).startswith(f"{bad}: ") and message in str(caught.value), (name, str(caught.value))
    with pytest.raises(WeightsError, match="nested too deeply"):
        read_info(tmp_path / "deep.safetensors")


def test_hostile_safetensors_headers(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.weights.checkpoints import read_info

    def raw(name: str, header: bytes, data: bytes = b"") -> Path:
        path = tmp_path / name
        path.write_bytes(struct.pack("<Q", len(header)) + header + data)
        return path

    cases = {
        raw("deep-header.safetensors", ('{"a":' + DEEP + "}").encode()): "header is nested too deeply",
        raw("offsets.safetensors", b'{"prompt_no":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}', b"\0" * 16): "do not fit its shape",
        raw("dtype.safetensors", b'{"x":{"dtype":"PICKLE","shape":[1],"data_offsets":[0,1]}}', b"\0"): "unsupported dtype",
        raw("overlap.safetensors", b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}', b"\0" * 8): "overlap",
    }
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    cases[tmp_path / "long.safetensors"] = "header length"
    for path, fragment in cases.items():
        with pytest.raises(WeightsError) as caught:
            read_info(path)
        assert str(caught.value).startswith(f"{path}: not a valid safetensors file: ") and fragment in str(caught.value)
    code, records, stderr = invoke("detect", "-w", str(tmp_path / "deep-header.safetensors"), "--classes", CLASSES, str(IMAGES / "chelsea.png"))
    assert code == 2 and stderr.count("\n") == 1 and "deep-header.safetensors: not a valid safetensors file: header is nested too deeply" in stderr


def test_hostile_embeddings(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.weights.checkpoints import read_info

    good = tmp_path / "good.safetensors"
    assert invoke("embed-classes", "-w", str(tiny_weights), "--classes", CLASSES, "-t", "simple", "-o", str(good))[0] == 0
    deep = rewrite(good, tmp_path / "deep.safetensors", lambda m: m.update(classes=DEEP))
    nested = rewrite(good, tmp_path / "nested.safetensors", lambda m: m.update(classes='[["cat"], "horse", "rocket"]'))
    for path in (deep, nested):
        with pytest.raises(EmbeddingsError, match=f"^{path}: damaged embeddings file \\(class list (is nested too deeply|holds more than 1 lists or objects)"):
            ClassEmbeddings.load(path)
    narrow = rewrite(good, tmp_path / "narrow.safetensors", change_tensors=lambda t: t.update({k: v[:, :-1].contiguous() for k, v in t.items()}))
    ClassEmbeddings.load(narrow)  # a consistent file on its own; it does not fit these weights
    code, records, stderr = invoke("detect", "-w", str(tiny_weights), "--embeddings", str(narrow), str(IMAGES / "chelsea.png"))
    assert code == 2 and stderr.count("\n") == 1
    assert f"{narrow}: embeddings are 511-dimensional but the weights' features are {read_info(tiny_weights).model_cfg['embed_dim']}-dimensional" in stderr


def test_embeddings_read_through_one_descriptor_under_concurrent_replacement(tmp_path: Path) -> None:
    """A writer renames complete files over the path while a reader loads: every load is one whole file."""
    target = tmp_path / "shared.safetensors"
    versions = [
        ClassEmbeddings(names, torch.nn.functional.normalize(torch.randn(len(names), 8), dim=-1), torch.nn.functional.normalize(torch.randn(len(names), 8), dim=-1), "simple", "", "fp")
        for names in (["cat", "rocket"], ["coffee", "horse", "tree"])
    ]
    versions[0].save(target)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            versions[i % 2].save(target)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = [ClassEmbeddings.load(target).classes for _ in range(300)]
    finally:
        stop.set()
        thread.join()
    assert all(s in (["cat", "rocket"], ["coffee", "horse", "tree"]) for s in seen)


def test_loading_opens_each_file_once(tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race made deterministic: whatever replaces the path after the first open is not read."""
    from clipn_cli import safetensors_file
    from clipn_cli.weights.checkpoints import load_model

    emb = tmp_path / "e.safetensors"
    ClassEmbeddings(["a", "b"], torch.eye(2, 8), torch.eye(2, 8), "simple", "", "fp").save(emb)
    other = tmp_path / "other.safetensors"
    ClassEmbeddings(["x", "y", "z"], torch.eye(3, 8), torch.eye(3, 8), "simple", "", "fp").save(other)
    real_open = os.open
    opened: list[str] = []

    def open_then_replace(path: object, *args: object) -> int:
        fd = real_open(path, *args)
        opened.append(str(path))
        if str(path) == str(emb):
            os.replace(other, emb)  # lands between any two reads of the file
        return fd

    monkeypatch.setattr(safetensors_file.os, "open", open_then_replace)
    assert ClassEmbeddings.load(emb).classes == ["a", "b"] and opened == [str(emb)]
    opened.clear()
    load_model(tiny_weights)
    assert opened == [str(tiny_weights)]


# 8. zip-bomb checkpoints ----------------------------------------------------------------------


def test_zip_bomb_checkpoint_is_refused_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipn_cli.weights.format import read_checkpoint

    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (64 << 20))
        archive.writestr("archive/version", b"3\n")
    assert bomb.stat().st_size < 1 << 20

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load reached")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(WeightsError, match=r"bomb\.pt: refused to load: its zip archive declares 64 MiB of contents in a 0\.\d MiB file"):
        read_checkpoint(bomb)
    code, records, stderr = invoke("convert", str(bomb), str(tmp_path / "out.safetensors"))
    assert code == 2 and stderr.count("\n") == 1 and "zip archive declares" in stderr


def _restored(tmp_path: Path, compression: int = zipfile.ZIP_STORED) -> Path:
    """A real torch.save checkpoint rewritten member by member with `compression` (32-bit zip headers)."""
    raw = io.BytesIO()
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, raw)
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(io.BytesIO(raw.getvalue())) as source, zipfile.ZipFile(path, "w", compression=compression) as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info))
    return path


def _declare(path: Path, member: str, stored: int, size: int) -> None:
    """Patch `member`'s central-directory entry to declare `stored` compressed and `size` uncompressed bytes."""
    data = bytearray(path.read_bytes())
    eocd = data.rindex(b"PK\x05\x06")
    at = struct.unpack("<I", data[eocd + 16:eocd + 20])[0]  # the central directory's first entry
    while True:
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[at + 28:at + 34])
        if data[at + 46:at + 46 + name_len].decode().endswith(member):
            data[at + 20:at + 28] = struct.pack("<II", stored, size)
            path.write_bytes(bytes(data))
            return
        at += 46 + name_len + extra_len + comment_len


@pytest.mark.parametrize("hostile, message", [
    ("compressed", r"refused to load: member '[^']*data\.pkl' is compressed \(torch\.save stores members uncompressed"),
    ("longer", r"refused to load: member '[^']*data/0' declares 1000000 bytes, the file holds \d+ of them \(cut short\?\)"),
    ("unequal", r"refused to load: stored member '[^']*data/0' declares 16385 bytes but stores 16384"),
])
def test_checkpoint_members_must_be_stored_and_fit_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hostile: str, message: str) -> None:
    """Official checkpoints store members uncompressed: a compressed member, one declaring more bytes
    than the file holds, or one whose declared and stored sizes differ is refused before torch.load."""
    from clipn_cli.training.checkpoint import load_state
    from clipn_cli.weights.format import read_checkpoint

    path = _restored(tmp_path)
    assert read_checkpoint(path)["w"].sum().item() == sum(range(4096))  # the rewritten file loads
    path = _restored(tmp_path, zipfile.ZIP_DEFLATED if hostile == "compressed" else zipfile.ZIP_STORED)
    if hostile == "longer":
        _declare(path, "data/0", 1_000_000, 1_000_000)
    elif hostile == "unequal":
        _declare(path, "data/0", 16384, 16385)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load reached")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(WeightsError, match=rf"^{path}: {message}"):
        read_checkpoint(path)
    with pytest.raises(TrainError, match=rf"^{path}: {message}"):
        load_state(path)


# 9. stdout closed -------------------------------------------------------------------------------


def test_closed_stdout_is_one_line_exit_2(tiny_weights: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CLIPN_WEIGHTS"}
    command = f'exec "{sys.executable}" -m clipn_cli detect -w "{tiny_weights}" --classes {CLASSES} "{IMAGES / "chelsea.png"}" >&-'
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=HANG_GUARD * 3)
    assert result.returncode == 2
    assert result.stderr == "clipn: error: stdout is closed: results would be lost; give --output FILE or redirect stdout\n"


def test_writer_refuses_a_closed_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipn_cli.outputs.writers import open_writer

    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(OutputError, match="stdout is closed"):
        with open_writer("jsonl"):
            pass


# 10. errors that name what is wrong -------------------------------------------------------------


def test_path_problems_are_named(tiny_weights: Path, tmp_path: Path) -> None:
    inputs = ["x" * 300 + ".png", str(IMAGES / "chelsea.png"), "a\x00b.png", f"{IMAGES / 'chelsea.png'}/inside.png", str(tmp_path / ("d" * 255) / "x.png")]
    code, records, stderr = invoke("detect", "-w", str(tiny_weights), "--classes", CLASSES, "-", input="\n".join(inputs) + "\n")
    assert code == 1 and "Traceback" not in stderr
    assert [r["path"] for r in records] == inputs
    assert [r.get("error") for r in records] == [
        "file name too long", None, "path contains a NUL byte (not a valid file name)", "a part of the path is not a folder", "no such file",
    ]


# 11. unreadable sub-folders in a walk -----------------------------------------------------------


def test_unlistable_sub_folder_gets_an_error_record_in_its_place(tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "photos"
    for folder in ("a", "b-locked", "c"):
        (root / folder).mkdir(parents=True)
        (root / folder / "chelsea.png").write_bytes((IMAGES / "chelsea.png").read_bytes())
    locked = root / "b-locked"
    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:
        if str(path) == str(locked):  # what root never sees from chmod 000
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    items = list(iter_inputs([str(root)]))
    assert [(i.path, i.error) for i in items] == [
        (str(root / "a" / "chelsea.png"), None),
        (str(locked), "cannot list this folder (permission denied): its images are not scored"),
        (str(root / "c" / "chelsea.png"), None),
    ]
    code, records, stderr = invoke("detect", "-w", str(tiny_weights), "--classes", CLASSES, str(root))
    assert code == 1 and [r["path"] for r in records] == [i.path for i in items] and "error" in records[1]


def test_hostile_json_files_given_by_name(tmp_path: Path) -> None:
    """The same family in other JSON a user names: a --config file and a training index."""
    from clipn_cli.model.configs import resolve_config
    from clipn_cli.errors import ConfigError, DataError
    from clipn_cli.training.data import read_index

    config = tmp_path / "deep.json"
    config.write_text(DEEP)
    with pytest.raises(ConfigError, match=f"^{config}: cannot read model config: the model config is nested too deeply"):
        resolve_config(str(config))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # no writer: reading it by name would block for ever
    with pytest.raises(ConfigError, match=f"^{fifo}: cannot read model config: not a regular file"):
        resolve_config(str(fifo))
    index = tmp_path / "train.jsonl"
    index.write_text('{"image": "a.png", "caption": "a cat"}\n' + DEEP + "\n")
    with pytest.raises(DataError, match=f"^{index}:2: JSON nested too deeply"):
        read_index(index)


# 6. file names that are markup in an output format: one parseable record per image, the name intact --

ODD_NAMES = (b"car\rriage.png", b"new\nline.png", b"tab\tx.png", b"com,ma.png", b'quo"te.png', b"lat\xe9.png", b"\xff\xfe.png")


def test_odd_file_names_keep_one_record_each_in_csv_and_jsonl(tiny_weights: Path, tmp_path: Path) -> None:
    """A bare carriage return is a line end to every CSV reader: its field must be quoted like one with "\\n"."""
    folder = tmp_path / "odd"
    folder.mkdir()
    want = sorted(os.fsencode(folder) + b"/" + name for name in ODD_NAMES)
    for name in want:
        shutil.copy(IMAGES / "chelsea.png", name)
    args = ("detect", "-w", str(tiny_weights), "--classes", CLASSES, str(folder))
    printed = cli(*args, "--format", "csv")
    written = cli(*args, "--format", "csv", "--output", str(tmp_path / "out.csv"))
    assert printed.returncode == written.returncode == 0
    saved = (tmp_path / "out.csv").read_bytes().decode("utf-8", "surrogateescape")
    for text in (printed.stdout, saved):
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        assert sorted(os.fsencode(row["path"]) for row in rows) == want
        assert all(row["class"] in CLASSES.split(",") for row in rows)
    lines = cli(*args, "--format", "jsonl").stdout.splitlines()
    assert sorted(os.fsencode(json.loads(line)["path"]) for line in lines) == want


def test_csv_rows_quote_a_carriage_return_and_leave_other_rows_minimal() -> None:
    out = io.StringIO()
    writer = CsvRows(out, ("path", "score"))
    writer.writeheader()
    writer.writerow({"path": "a\rb.png", "score": 0.5})
    writer.writerow({"path": "c.png", "score": 0.25})
    assert out.getvalue() == 'path,score\n"a\rb.png","0.5"\nc.png,0.25\n'
    assert list(csv.reader(io.StringIO(out.getvalue(), newline=""))) == [["path", "score"], ["a\rb.png", "0.5"], ["c.png", "0.25"]]


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "JPEG", "TIFF", "BMP", "WEBP"])
def test_pixel_limit_is_clipns_in_every_format_up_and_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """Pillow refuses at open any image past twice its own MAX_IMAGE_PIXELS, in its own words: a
    CLIPN_MAX_PIXELS above that must still let an image through, and every refusal name clipn's limit.
    Pillow's limit is lowered to 1,000 pixels here so that small files stand for large ones."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (60, 100, 120):  # 3,600 pixels: under clipn's 5,000; 10,000 and 14,400: over it (the last past twice it)
        Image.new("RGB", (side, side), (200, 10, 10)).save(tmp_path / f"{side}.{fmt.lower()}", fmt)
    limits = DecodeLimits(max_pixels=5000)
    assert load_one(InputItem(str(tmp_path / f"60.{fmt.lower()}")), None, limits=limits).error is None
    for side in (100, 120):
        error = load_one(InputItem(str(tmp_path / f"{side}.{fmt.lower()}")), None, limits=limits).error
        assert error is not None and error.startswith("image too large: ") and "(limit 5000, CLIPN_MAX_PIXELS); possible decompression bomb" in error
