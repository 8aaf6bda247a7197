"""A full file system under every writer: one line naming the file and saying the disk is full,
exit 2, and no partial file (JSON Lines keeps its whole lines, so `--resume` finishes the run).

The disk is a real one: a tmpfs of 256 KiB mounted for the test (root only; skipped elsewhere),
filled up to the few bytes a test leaves free."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import IMAGES, cli

CLASSES = "cat,dog,horse,rocket"
FILLER = ".filler"


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """A function leaving `pages` free pages (4 KiB) on a fresh tmpfs and returning its folder."""
    where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")

    def leave(pages: int) -> Path:
        with open(where / FILLER, "wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        os.truncate(where / FILLER, (where / FILLER).stat().st_size - 4096 * pages)
        return where

    try:
        yield leave
    finally:
        subprocess.run(["umount", str(where)], check=True)


def left_on(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.iterdir() if p.name != FILLER)


def one_line_naming(result: subprocess.CompletedProcess, path: Path) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(path) in lines[0] and "the disk is full" in lines[0] and "Errno" not in lines[0], lines[0]


def test_jsonl_output_keeps_whole_lines_and_resumes_once_there_is_room(tiny_weights: Path, full_disk) -> None:
    disk = full_disk(1)
    out = disk / "out.jsonl"
    result = cli("detect", "-w", str(tiny_weights), "-c", CLASSES, "--details", "--format", "jsonl", "--output", str(out), str(IMAGES))
    one_line_naming(result, out)
    data = out.read_bytes()
    assert data.endswith(b"\n") or data == b""
    kept = [json.loads(line) for line in data.splitlines()]
    assert 0 < len(kept) < 12
    (disk / FILLER).unlink()
    resumed = cli("detect", "-w", str(tiny_weights), "-c", CLASSES, "--details", "--format", "jsonl", "--output", str(out), "--resume", str(IMAGES))
    assert resumed.returncode in (0, 1), resumed.stderr
    paths = [json.loads(line)["path"] for line in out.read_bytes().splitlines()]
    assert sorted(paths) == sorted(str(p) for p in IMAGES.iterdir()) and len(set(paths)) == 12


@pytest.mark.parametrize("option", ["json", "csv", "report"])
def test_atomic_detect_outputs_leave_nothing(tiny_weights: Path, tmp_path: Path, full_disk, option: str) -> None:
    disk = full_disk(0)
    if option == "report":
        target = disk / "report.html"
        args = ["--format", "jsonl", "--output", str(tmp_path / "out.jsonl"), "--report", str(target)]
    else:
        target = disk / f"out.{option}"
        args = ["--format", option, "--output", str(target)]
    result = cli("detect", "-w", str(tiny_weights), "-c", CLASSES, "--details", *args, str(IMAGES))
    one_line_naming(result, target)
    assert left_on(disk) == []


def test_calibrate_and_embed_classes_outputs_leave_nothing(tiny_weights: Path, full_disk) -> None:
    disk = full_disk(0)
    calibration = disk / "calibration.json"
    one_line_naming(cli("calibrate", "-w", str(tiny_weights), "-c", CLASSES, "--alpha", "0.5", "--output", str(calibration), str(IMAGES)), calibration)
    embeddings = disk / "heads.safetensors"
    one_line_naming(cli("embed-classes", "-w", str(tiny_weights), "-c", CLASSES, "--templates", "clipn", "--output", str(embeddings)), embeddings)
    assert left_on(disk) == []


def test_ray_output_store_names_the_shard_and_leaves_no_temporary(full_disk) -> None:
    pytest.importorskip("pyarrow")
    from clipn_cli.scale.store import OutputStore, OutputStoreError

    disk = full_disk(0)
    store = OutputStore.open(str(disk / "run"))
    store.prepare()
    with pytest.raises(OutputStoreError) as caught:
        store.write(b"x" * 20000, "shards", "part-000000.parquet")
    assert str(caught.value) == f"{disk / 'run'}/shards/part-000000.parquet: the disk is full (no space left on the device); nothing was written"
    assert store.list("shards") == [] and os.listdir(disk / "run" / "shards") == []
