"""Hostile training inputs: index files, caption files, tar shards, brace patterns and training
checkpoints are each refused with one line naming the file, in bounded time and memory."""

from __future__ import annotations

import bz2
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from clipn_cli.errors import DataError, TrainError
from clipn_cli.training import data as data_module
from clipn_cli.training.checkpoint import FORMAT, FORMAT_VERSION, load_state, save_state
from clipn_cli.training.data import Pair, ShardData, brace_count, open_data, read_shard

from conftest import IMAGES


def _tar(path: Path, members: dict[str, bytes], compress: str = "") -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(bz2.compress(raw.getvalue()) if compress == "bz2" else raw.getvalue())
    return path


def test_csv_caption_over_the_field_limit_is_one_line(tmp_path: Path) -> None:
    index = tmp_path / "index.csv"
    index.write_text("image,caption\na.png,short\nb.png," + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=rf"^{index}:3: not a valid CSV line \(field larger than field limit"):
        open_data(str(index))


def test_sparse_8_gib_index_and_caption_are_refused_unread(tmp_path: Path) -> None:
    index = tmp_path / "index.jsonl"
    with open(index, "wb") as fh:
        fh.truncate(8 << 30)
    with pytest.raises(DataError, match=rf"^{index}: larger than 1024 MiB"):
        open_data(str(index))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes((IMAGES / "chelsea.png").read_bytes())
    with open(folder / "a.txt", "wb") as fh:
        fh.truncate(8 << 30)
    with pytest.raises(DataError, match=rf"^{folder / 'a.txt'}: cannot read caption \(larger than 16 KiB"):
        open_data(str(folder))


@pytest.mark.parametrize("members", [
    {"a.jpg": b"\xff\xd8 image", "b.png": b"image"},  # no captions
    {},  # no member at all
    {"a.txt": b"a caption", "b.txt": b"another"},  # no images
])
def test_a_shard_without_pairs_ends_the_stream_with_an_error(tmp_path: Path, members: dict[str, bytes]) -> None:
    shard = _tar(tmp_path / "s.tar", members)
    stream = ShardData([str(shard)], str(shard)).stream(seed=0)
    with pytest.raises(DataError, match=rf"^{shard}: no \(image, caption\) pair in {shard}$"):
        next(stream)


def test_only_undecodable_images_end_the_stream_with_an_error(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.training.batches import MAX_FAILED_IN_A_ROW, StreamBatches, pair_stream
    from clipn_cli.weights.checkpoints import load_model

    shard = _tar(tmp_path / "bad.tar", {"a.jpg": b"not an image", "a.txt": b"cat", "b.png": b"\x89PNG broken", "b.txt": b"dog"})
    model, _ = load_model(tiny_weights)
    batches = StreamBatches(model, pair_stream(ShardData([str(shard)], str(shard)), 0, 0, 1), 4, torch.device("cpu"), workers=1)
    try:
        with pytest.raises(DataError, match=rf"^{MAX_FAILED_IN_A_ROW} samples in a row could not be decoded \(last: {shard}:[ab]: "):
            batches.next()
        assert batches.failed == MAX_FAILED_IN_A_ROW
    finally:
        batches.close()


def test_a_compressed_shard_reads_one_image_per_sample(tmp_path: Path) -> None:
    """Members a sample does not use (a second image, other files, a caption over 16 KiB) are not read."""
    big = b"x" * (2 << 20)
    shard = _tar(tmp_path / "s.tar", {"a.jpg": b"first", "a.png": big, "a.webp": big, "a.json": big, "a.txt": b"a cat",
                                      "b.jpg": b"img", "b.txt": b"y" * ((1 << 20) + 1)}, compress="bz2")
    pairs = list(read_shard(str(shard)))
    assert pairs == [Pair(f"{shard}:a", "a cat", b"first")]


def test_shuffle_buffer_holds_a_bounded_number_of_image_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    monkeypatch.setattr(data_module, "SHUFFLE_BUFFER_BYTES", 250)
    pulled = 0

    def source():
        nonlocal pulled
        for i in range(20):
            pulled += 1
            yield Pair(str(i), "c", bytes(100))

    out, most = [], 0
    for pair in data_module._shuffled(source(), 1000, random.Random(0)):
        most = max(most, pulled - len(out))
        out.append(pair.key)
    assert sorted(out, key=int) == [str(i) for i in range(20)]
    assert most <= 3  # 2 held (200 bytes) plus the one being swapped in


def test_brace_patterns_are_counted_before_they_are_expanded(tmp_path: Path) -> None:
    assert brace_count("shard-{0..99999999}.tar") == 100_000_000
    assert brace_count("{a,b}-{001..010}.tar") == 20
    with pytest.raises(DataError, match=r"shard-\{0\.\.99999999\}\.tar: names 100,000,000 shards, more than the 1,000,000 allowed"):
        open_data("shard-{0..99999999}.tar")


def test_a_compressed_checkpoint_member_is_refused_before_loading(tmp_path: Path) -> None:
    """A deflated member inflating to 64 MiB from a few KiB: torch never writes one, so it is refused."""
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (64 << 20))
    with pytest.raises(TrainError, match=rf"^{path}: refused to load: its zip archive declares 64 MiB"):
        load_state(path)
    small = tmp_path / "packed.pt"
    with zipfile.ZipFile(small, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * 1000)
    with pytest.raises(TrainError, match=rf"^{small}: refused to load: member 'archive/data.pkl' is compressed"):
        load_state(small)


@pytest.mark.parametrize("state, message", [
    ({}, "no 'settings'"),
    ({"settings": {}, "trainable": {"x": 1}, "optimizer": {}, "scaler": {}, "step": 1, "consumed": [1]}, "'trainable' is not what clipn writes"),
    ({"settings": {}, "trainable": {}, "optimizer": {"state": {}, "param_groups": []}, "scaler": {}, "step": -1, "consumed": [1]}, "'step' is not what clipn writes"),
])
def test_a_checkpoint_missing_fields_is_one_line(tmp_path: Path, state: dict, message: str) -> None:
    path = tmp_path / "state.pt"
    save_state(path, state)
    with pytest.raises(TrainError, match=rf"^{path}: damaged training checkpoint \({message}"):
        load_state(path)


def test_cli_resume_from_a_checkpoint_holding_only_its_format(tiny_weights: Path, tmp_path: Path) -> None:
    from conftest import cli

    path = tmp_path / "state.pt"
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION}, path)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.png").write_bytes((IMAGES / "chelsea.png").read_bytes())
    (folder / "a.txt").write_text("a cat")
    out = cli("train", "--base", str(tiny_weights), "--data", str(folder), "--resume", str(path), "--output", str(tmp_path / "out.safetensors"), "--steps", "1")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"{path}: damaged training checkpoint (no 'settings')" in out.stderr


LONG_CAPTION = "x" * (16 << 10) + "y"  # one byte over the 16 KiB a caption may hold (README "Train")
ACCENTED = "é" * (8 << 10) + "y"  # 8,193 characters, 16 KiB + 1 of UTF-8


@pytest.mark.parametrize("name, row", [
    ("index.jsonl", '{"image": "b.png", "caption": "%s"}'),
    ("index.tsv", "b.png\t%s"),
    ("index.csv", "b.png,%s"),
])
@pytest.mark.parametrize("long", [LONG_CAPTION, ACCENTED])
def test_an_index_caption_over_16_kib_is_one_line_naming_file_and_line(tmp_path: Path, name: str, row: str, long: str) -> None:
    """A caption of 16 KiB + 1 byte (counted in UTF-8 bytes, not characters) in any index kind is
    refused at its line; one of exactly 16 KiB is read."""
    index = tmp_path / name
    header = {"index.jsonl": "", "index.tsv": "image\tcaption\n", "index.csv": ""}[name]
    first = {"index.jsonl": '{"image": "a.png", "caption": "short"}', "index.tsv": "a.png\tshort", "index.csv": "a.png,short"}[name]
    line = 3 if header else 2
    index.write_text(header + first + "\n" + row % long + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{index}:{line}: a caption of 16,385 bytes, more than the 16 KiB a caption may hold$"):
        open_data(str(index))
    index.write_text(header + first + "\n" + row % long[:-1] + "\n", encoding="utf-8")
    assert [len(p.caption.encode()) for p in open_data(str(index)).pairs] == [5, 16 << 10]


def test_a_caption_file_over_16_kib_beside_an_image_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes((IMAGES / "chelsea.png").read_bytes())
    (tmp_path / "a.txt").write_text(LONG_CAPTION)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'a.txt'}: cannot read caption \(larger than 16 KiB"):
        open_data(str(tmp_path))


def test_a_shard_caption_over_16_kib_skips_its_sample_unread(tmp_path: Path) -> None:
    """A stream skips what it cannot use: the 16 KiB + 1 caption is not read and its sample left out;
    a caption of exactly 16 KiB is read."""
    shard = _tar(tmp_path / "s.tar", {"k1.jpg": b"\xff\xd8 image", "k1.txt": b"fine", "k2.jpg": b"\xff\xd8 image", "k2.txt": LONG_CAPTION.encode(),
                                      "k3.jpg": b"\xff\xd8 image", "k3.txt": LONG_CAPTION[:-1].encode()})
    assert [(p.key.rsplit(":", 1)[1], len(p.caption)) for p in read_shard(str(shard))] == [("k1", 4), ("k3", 16 << 10)]
