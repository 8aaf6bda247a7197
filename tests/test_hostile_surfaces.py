"""Hostile inputs on the surfaces added after issue 12: calibration files, --words lists and the
negative-label cache, embeddings with negatives, plain open_clip checkpoints and configs, the Ray
engine's tables and manifest, report thumbnails, and a closed stdout for every command that prints.

Each bad file must give one error naming it (ClipnError / one line, exit 2) or be rebuilt (the
cache), never a traceback, a hang or unbounded memory. Library calls and in-process CLI runs; a real
process only for a closed stdout. FIFOs stand for "a file swapped for a pipe": a test that would hang
is caught by pytest's own timeout of the CI run, so none of these asserts wall-clock time.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipn_cli.errors import CalibrationError, ClipnError, EmbeddingsError

from conftest import DEEP, IMAGES, TINY_CONFIG, calibration_doc, cli

CLASSES = "cat,horse,rocket"


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


# calibration files -------------------------------------------------------------------------------

@pytest.mark.parametrize("case, expected", [
    ("fifo", "not a regular file"),
    ("dir", "is a directory"),
    ("deep", "nested too deeply"),
    ("deep_settings", "nested too deeply"),
    ("latin1", "not JSON"),
    ("nul", "not JSON"),
    ("truncated", "not JSON"),
    ("huge_int", "too large for a float"),
    ("nan", "NaN or Inf"),
    ("strings", "not a list of numbers"),
    ("classes", "classes are not a list of strings"),
    ("version", "is not one this clipn-cli reads"),
    ("top_list", "not a clipn calibration file"),
    ("bool_count", "score counts disagree"),
    ("long_method", "'mmmmmmmm"),
    ("alpha", "alpha '"),
])
def test_hostile_calibration_file_is_one_error_naming_it(tmp_path: Path, case: str, expected: str) -> None:
    from clipn_cli.scores.calibration import Calibration

    path = tmp_path / "cal.json"
    good = json.dumps(calibration_doc())
    writers = {
        "fifo": lambda: _fifo(path),
        "dir": lambda: path.mkdir(),
        "deep": lambda: path.write_text(DEEP),
        "deep_settings": lambda: path.write_text(good.replace('"settings": {}', '"settings": ' + "[" * 40 + "]" * 40)),
        "latin1": lambda: path.write_bytes(good.replace("cat", "caf\xe9").encode("latin-1")),
        "nul": lambda: path.write_bytes(good.encode()[:40] + b"\0" + good.encode()[40:]),
        "truncated": lambda: path.write_text(good[: len(good) // 2]),
        "huge_int": lambda: path.write_text(good.replace("0.1,", "1" + "0" * 400 + ",")),
        "nan": lambda: path.write_text(good.replace("0.1,", "NaN,")),
        "strings": lambda: path.write_text(good.replace("0.1,", '"0.1",')),
        "classes": lambda: path.write_text(json.dumps(calibration_doc(classes=[{"a": 1}]))),
        "version": lambda: path.write_text(json.dumps(calibration_doc(format_version="x" * 100_000))),
        "top_list": lambda: path.write_text("[1, 2, 3]"),
        "bool_count": lambda: path.write_text(json.dumps(calibration_doc(count=True, scores={"msp": [0.5]}))),
        "long_method": lambda: path.write_text(json.dumps(calibration_doc(scores={"m" * 1_000_000: ["x"]}))),
        "alpha": lambda: path.write_text(json.dumps(calibration_doc(alpha="9" * 1_000_000))),
    }
    writers[case]()
    with pytest.raises(CalibrationError) as caught:
        Calibration.load(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message and len(message) < 400


def test_calibration_devices_and_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipn_cli.scores import calibration

    with pytest.raises(CalibrationError, match="/dev/zero: not a regular file"):
        calibration.Calibration.load("/dev/zero")
    big = tmp_path / "big.json"
    big.write_text(json.dumps(calibration_doc()))
    monkeypatch.setattr(calibration, "MAX_FILE_BYTES", 64)
    with pytest.raises(CalibrationError, match="larger than"):
        calibration.Calibration.load(big)


def test_detect_with_a_hostile_calibration_is_one_line_exit_2(tiny_weights: Path, tmp_path: Path) -> None:
    image = str(IMAGES / "chelsea.png")
    for bad in (_fifo(tmp_path / "fifo.json"), tmp_path / "deep.json"):
        if bad.name == "deep.json":
            bad.write_text(DEEP)
        result = cli("detect", "-w", str(tiny_weights), "--classes", CLASSES, "--rule", "msp", "--calibration", str(bad), image)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and str(bad) in result.stderr and "Traceback" not in result.stderr


# --words lists and the cached candidate embeddings ----------------------------------------------

def _gzip_bomb(path: Path, size: int) -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(path, "wb") as fh:
        fh.write(compressor.compress(b"noun.x\tword\n"))
        block = b"\0" * (1 << 20)
        for _ in range(size >> 20):
            fh.write(compressor.compress(block))
        fh.write(compressor.flush())


@pytest.mark.parametrize("case, expected", [
    ("fifo", "not a regular file"),
    ("latin1", "not UTF-8"),
    ("truncated_gzip", "truncated gzip"),
    ("bad_gzip", "cannot read the word list"),
    ("nul_word", "a NUL byte"),
    ("long_word", "over 256 characters"),
    ("bad_line", "line 2 is not"),
])
def test_hostile_word_list_is_one_error_naming_it(tmp_path: Path, case: str, expected: str) -> None:
    from clipn_cli.heads.wordpool import read_words

    path = tmp_path / "words.txt"
    good = b"noun.artifact\tcar\nadj.all\tred\n"
    writers = {
        "fifo": lambda: _fifo(path),
        "latin1": lambda: path.write_bytes(good + b"noun.artifact\tcaf\xe9\n"),
        "truncated_gzip": lambda: path.write_bytes(gzip.compress(good * 100)[:-12]),
        "bad_gzip": lambda: path.write_bytes(b"\x1f\x8b" + b"garbage" * 10),
        "nul_word": lambda: path.write_bytes(good + b"noun.artifact\tca\0r\n"),
        "long_word": lambda: path.write_bytes(good + b"noun.artifact\t" + b"a" * 1000 + b"\n"),
        "bad_line": lambda: path.write_bytes(b"noun.artifact\tcar\nno tab here\n"),
    }
    writers[case]()
    with pytest.raises(ClipnError) as caught:
        read_words(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_word_list_bombs_are_refused_at_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipn_cli.heads import wordpool

    with pytest.raises(ClipnError, match="/dev/zero: cannot read the word list: not a regular file"):
        wordpool.read_words("/dev/zero")
    monkeypatch.setattr(wordpool, "MAX_WORDS_BYTES", 4 << 20)
    bomb = tmp_path / "bomb.txt.gz"
    _gzip_bomb(bomb, 64 << 20)  # 64 MiB of zeros in ~64 KB: inflated only up to the limit
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(ClipnError, match="inflates to more than 4 MiB"):
        wordpool.read_words(bomb)
    big = tmp_path / "big.txt"
    big.write_bytes(b"noun.x\tword\n" * (500_000))  # 6 MB
    with pytest.raises(ClipnError, match="larger than 4 MiB"):
        wordpool.read_words(big)
    folder = tmp_path / "txtfiles"
    folder.mkdir()
    for i in range(2):
        (folder / f"noun.part{i}.txt").write_bytes((b"w" * 15 + b"\n") * 200_000)  # 3.2 MB each, 6.4 MB together (within the word count)
    with pytest.raises(ClipnError, match="together are larger than 4 MiB"):
        wordpool.read_words(folder)


def test_word_folder_names_a_fifo_or_folder_instead_of_skipping_or_waiting(tmp_path: Path) -> None:
    from clipn_cli.heads.wordpool import read_words

    folder = tmp_path / "txtfiles"
    folder.mkdir()
    (folder / "noun.artifact.txt").write_text("car\n")
    (folder / "README.md").write_text("not a word file\n")
    assert read_words(folder) == [("noun.artifact", "car")]
    _fifo(folder / "adj.all.txt")
    with pytest.raises(ClipnError, match=r"adj\.all\.txt: cannot read the word list: not a regular file"):
        read_words(folder)
    os.unlink(folder / "adj.all.txt")
    (folder / "adj.all.txt").mkdir()
    with pytest.raises(ClipnError, match=r"adj\.all\.txt: cannot read the word list"):
        read_words(folder)
    os.rmdir(folder / "adj.all.txt")
    (folder / "adj.all.txt").write_bytes(b"r\xe9d\n")
    with pytest.raises(ClipnError, match="not UTF-8"):
        read_words(folder)


def test_cli_words_that_are_not_a_word_list_are_one_line_exit_2(tiny_weights: Path, tmp_path: Path) -> None:
    for bad in ("/dev/zero", str(_fifo(tmp_path / "words.txt"))):
        result = cli("embed-classes", "--classes", CLASSES, "-w", str(tiny_weights), "--templates", "simple",
                     "--negatives", "neglabel", "--words", bad, "-o", str(tmp_path / "heads.safetensors"))
        assert result.returncode == 2 and result.stderr == f"clipn: error: {bad}: cannot read the word list: not a regular file (device, socket or pipe)\n"
        assert not (tmp_path / "heads.safetensors").exists()


def test_damaged_candidate_cache_is_rebuilt_never_trusted_or_waited_on(tmp_path: Path) -> None:
    from clipn_cli.heads.wordpool import _cached

    shape = (3, 8)
    path = tmp_path / "neglabel-x.safetensors"
    assert _cached(path, shape) is None  # missing
    _fifo(path)
    assert _cached(path, shape) is None  # a FIFO: not opened blocking
    path.unlink()
    path.write_bytes(b"\xff" * 64)
    assert _cached(path, shape) is None  # garbage header
    path.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    assert _cached(path, shape) is None  # header length beyond the file
    for tensors in ({"candidates": torch.ones(3, 7)}, {"candidates": torch.full(shape, float("nan"))},
                    {"candidates": torch.ones(shape, dtype=torch.int32)}, {"other": torch.ones(shape)}):
        save_file(tensors, str(path))
        assert _cached(path, shape) is None
    save_file({"candidates": torch.ones(shape)}, str(path))
    assert torch.equal(_cached(path, shape), torch.ones(shape))


# embeddings files with negatives (format 1.1) -----------------------------------------------------

WORDS = 100  # negatives.GROUPS: mining never stores fewer
GOOD = json.dumps({"neglabel": [f"w{i}" for i in range(WORDS)]})


def _embeddings_file(path: Path, negatives: str | None = None, tensors: dict | None = None) -> Path:
    meta = {"format": "clipn-cli.embeddings", "format_version": "1.1", "classes": json.dumps(["cat", "dog"]),
            "templates": "simple", "templates_sha256": "0" * 64, "weights_fingerprint": "f" * 64}
    if negatives is not None:
        meta["negatives"] = negatives
    base = {"text_yes": torch.eye(2, 4), "text_no": torch.eye(2, 4),
            "negatives.neglabel": torch.ones(WORDS, 4) / 2, "negatives.neglabel.id_heads": torch.eye(2, 4)}
    base.update(tensors or {})
    save_file({k: v for k, v in base.items() if v is not None}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("negatives, tensors", [
    (DEEP[:2000] + DEEP[-2000:], None),
    ('["neglabel"]', None),
    (json.dumps({"neglabel": list(range(WORDS))}), None),
    (json.dumps({"neglabel": "w" * WORDS}), None),  # a string is not a list of 100 one-letter words
    (GOOD[:-1] + ', "<script>": []}', None),
    (json.dumps({"neglabel": [f"w{i}" for i in range(WORDS - 1)]}), None),  # 99 words, 100 rows
    (json.dumps({"csp": [f"w{i}" for i in range(WORDS)]}), None),  # no tensors for the pool
    (GOOD, {"negatives.neglabel": torch.full((WORDS, 4), float("inf"))}),
    (GOOD, {"negatives.neglabel": torch.ones(WORDS, 5)}),
    (GOOD, {"negatives.neglabel.id_heads": None}),
    (json.dumps({"neglabel": ["a", "b", "c"]}), {"negatives.neglabel": torch.ones(3, 4)}),  # fewer than 100 groups
    (GOOD[:-2], None),  # truncated JSON
])
def test_hostile_negatives_in_embeddings_are_one_error_naming_the_file(tmp_path: Path, negatives: str, tensors: dict | None) -> None:
    from clipn_cli.heads.embeddings import ClassEmbeddings

    path = _embeddings_file(tmp_path / "heads.safetensors", negatives, tensors)
    with pytest.raises(EmbeddingsError) as caught:
        ClassEmbeddings.load(path)
    assert str(caught.value).startswith(f"{path}: damaged negative labels") and "\n" not in str(caught.value)


def test_well_formed_negatives_load(tmp_path: Path) -> None:
    from clipn_cli.heads.embeddings import ClassEmbeddings

    heads = ClassEmbeddings.load(_embeddings_file(tmp_path / "ok.safetensors", GOOD))
    assert heads.negatives["neglabel"].words == json.loads(GOOD)["neglabel"] and heads.negatives["neglabel"].negatives.shape == (WORDS, 4)


def test_embeddings_fifo_is_refused(tmp_path: Path) -> None:
    from clipn_cli.heads.embeddings import ClassEmbeddings

    fifo = _fifo(tmp_path / "heads.safetensors")
    with pytest.raises(EmbeddingsError, match="not a regular file"):
        ClassEmbeddings.load(fifo)


# plain open_clip checkpoints and configs ----------------------------------------------------------


@pytest.mark.parametrize("config, expected", [
    ("fifo", "not a regular file"),
    (DEEP, "nested too deeply"),
    ("[1, 2]", "needs 'embed_dim'"),
    (json.dumps({"embed_dim": 512, "vision_cfg": {"layers": 10_000_000, "width": 64}, "text_cfg": {}}), "vision_cfg.layers must be a whole number"),
    (json.dumps({"embed_dim": 512, "vision_cfg": {"layers": 2.5}, "text_cfg": {}}), "vision_cfg.layers must be a whole number"),
    (json.dumps({"embed_dim": "512", "vision_cfg": {}, "text_cfg": {}}), "embed_dim must be a positive integer"),
    ("\xe9\0{", "not valid JSON"),
])
def test_hostile_plain_clip_config_is_one_error_naming_it(tmp_path: Path, plain_checkpoint: Path, config: str, expected: str) -> None:
    from clipn_cli.weights.plainclip import load_plain_clip

    path = tmp_path / "cfg.json"
    if config == "fifo":
        _fifo(path)
    else:
        path.write_bytes(config.encode("utf-8", "surrogateescape"))
    with pytest.raises(ClipnError) as caught:
        load_plain_clip((str(path), str(plain_checkpoint)))
    assert str(path) in str(caught.value) and expected in str(caught.value) and "\n" not in str(caught.value)


def test_plain_clip_config_declaring_more_than_the_file_holds_is_refused_before_building(tmp_path: Path, plain_checkpoint: Path) -> None:
    from clipn_cli.weights.plainclip import load_plain_clip

    cfg = json.loads(TINY_CONFIG.read_text())
    cfg["vision_cfg"]["layers"] = 200  # within the bounds, but the file holds 2: building 200 would take long
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ClipnError, match=r"does not fit the tensors: vision_cfg.layers 200 \(the tensors hold 2\)"):
        load_plain_clip((str(path), str(plain_checkpoint)))
    model, info = load_plain_clip((str(TINY_CONFIG), str(plain_checkpoint)))  # the right config still loads
    assert info.metadata["kind"] == "open_clip" and not model.has_no


def test_plain_clip_checkpoint_with_nan_is_refused(tmp_path: Path, plain_checkpoint: Path) -> None:
    from clipn_cli.weights.plainclip import load_plain_clip

    state = torch.load(plain_checkpoint, weights_only=True)
    state["text_projection"][0, 0] = float("nan")
    for path in (tmp_path / "nan.pt", tmp_path / "nan.safetensors"):
        torch.save(state, path) if path.suffix == ".pt" else save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        with pytest.raises(ClipnError, match=rf"{path}: tensor 'text_projection' contains NaN or Inf values"):
            load_plain_clip((str(TINY_CONFIG), str(path)))


@pytest.mark.parametrize("name", ["fifo.pt", "dir.pt", "fifo.safetensors"])
def test_plain_clip_checkpoint_that_is_not_a_file_is_refused_without_waiting(tmp_path: Path, name: str) -> None:
    from clipn_cli.weights.plainclip import load_plain_clip

    path = tmp_path / name
    path.mkdir() if name.startswith("dir") else _fifo(path)
    with pytest.raises(ClipnError) as caught:
        load_plain_clip((str(TINY_CONFIG), str(path)))
    assert str(path) in str(caught.value) and ("not a regular file" in str(caught.value) or "directory" in str(caught.value))


# Ray engine inputs: tables of paths and the output folder's manifest ------------------------------

@pytest.mark.parametrize("content, expected", [
    (b"path\n" + b"a" * (2 << 20), "a line longer than"),
    (b"path\n\"" + b"a" * (200 << 10) + b"\"\n", "field larger than field limit"),
    (b"path\nimg/caf\xe9.png\n", "not a UTF-8 CSV table"),
    (b"name\nimg/a.png\n", "no 'path' column"),
])
def test_hostile_csv_table_is_one_error_naming_it(tmp_path: Path, content: bytes, expected: str) -> None:
    from clipn_cli.inputs.sources import iter_table

    path = tmp_path / "inputs.csv"
    path.write_bytes(content)
    with pytest.raises(ClipnError) as caught:
        list(iter_table(str(path)))
    assert str(caught.value).startswith(str(path)) and expected in str(caught.value) and "\n" not in str(caught.value)


def test_nul_in_a_csv_path_is_one_error_record(tmp_path: Path) -> None:
    from clipn_cli.inputs.decode import load_one
    from clipn_cli.inputs.sources import iter_table

    path = tmp_path / "inputs.csv"
    path.write_bytes(b"path\nimg/a.png\nimg/\0b.png\n")
    items = list(iter_table(str(path)))
    assert [i.path for i in items] == [str(tmp_path / "img/a.png"), str(tmp_path / "img/\0b.png")]
    assert "NUL byte" in load_one(items[1], lambda img: img).error


def test_empty_table_cells_are_error_records_not_dropped(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from clipn_cli.inputs.sources import iter_table

    csv_table = tmp_path / "t.csv"
    csv_table.write_text("label,path\n1,a.png\n2,\n3\n\n4,b.png\n", encoding="utf-8")  # an empty cell, a short row, a blank line
    got = [(i.path, i.error) for i in iter_table(str(csv_table))]
    assert got == [(str(tmp_path / "a.png"), None), (f"{csv_table} row 2", "empty 'path' value in the table"),
                   (f"{csv_table} row 3", "empty 'path' value in the table"), (str(tmp_path / "b.png"), None)]
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"path": ["a.png", None, ""]}), parquet)
    assert [i.error is None for i in iter_table(str(parquet))] == [True, False, False]


def test_table_swapped_for_a_fifo_is_refused_without_waiting(tmp_path: Path) -> None:
    from clipn_cli.inputs.sources import iter_table

    for name in ("inputs.csv", "inputs.parquet"):
        fifo = _fifo(tmp_path / name)
        with pytest.raises(ClipnError, match="not a regular file"):
            list(iter_table(str(fifo)))


def test_parquet_path_column_types(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from clipn_cli.inputs.sources import iter_table

    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"path": [1, 2, 3]}), numbers)
    with pytest.raises(ClipnError, match="'path' column holds int64, not file names"):
        list(iter_table(str(numbers)))
    raw = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"path": pa.array([b"caf\xe9.png", b"ok.png"], pa.binary())}), raw)
    got = [item.path for item in iter_table(str(raw))]  # a non-UTF-8 name stays one input, as on stdin
    assert got == [os.path.join(str(tmp_path), "caf\udce9.png"), os.path.join(str(tmp_path), "ok.png")]
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(raw.read_bytes()[:-20])
    with pytest.raises(ClipnError, match="not a readable Parquet table"):
        list(iter_table(str(damaged)))


def _manifest(tmp_path: Path, text: str | bytes | None = None, **shard: object) -> Path:
    folder = tmp_path / "out"
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    (folder / "committed").mkdir(exist_ok=True)
    if text is None:
        entry = {"index": 0, "file": "shards/part-000000.jsonl", "records": 1, "errors": 0, "digest": "ab"}
        entry.update(shard)
        text = json.dumps({"schema": "clipn-scale-manifest/1", "format": "jsonl", "complete": True, "inputs": 1, "finished_shards": [entry]})
    (folder / "manifest.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return folder


@pytest.mark.parametrize("text, shard, expected", [
    (DEEP, {}, "nested too deeply"),
    (b"\xff\xfe{", {}, "not valid JSON"),
    ('{"schema": "clipn-scale-manifest/1", "finished_shards": {"a": 1}}', {}, "finished_shards is not a list"),
    ("[]", {}, "schema"),
    (None, {"index": "abc"}, "index is 'abc', not a count"),
    (None, {"index": 1e300}, "not a count"),
    (None, {"records": -5}, "records is '-5'"),
    (None, {"errors": None}, "errors is 'None'"),
    (None, {"file": "../../../etc/passwd"}, "is not shards/part-NNNNNN.FORMAT"),
    (None, {"digest": 7}, "no digest"),
])
def test_hostile_manifest_is_one_error_naming_it(tmp_path: Path, text: str | None, shard: dict, expected: str) -> None:
    from clipn_cli.scale.manifest import ResumeError, load_manifest
    from clipn_cli.scale.store import OutputStore

    folder = _manifest(tmp_path, text, **shard)
    with pytest.raises(ResumeError) as caught:
        load_manifest(OutputStore.open(str(folder)))
    assert str(caught.value).startswith(f"{folder}/manifest.json: not a clipn manifest") and expected in str(caught.value)


def test_hostile_commit_marker_and_special_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipn_cli.scale import manifest as manifest_module
    from clipn_cli.scale.manifest import ResumeError, load_manifest
    from clipn_cli.scale.store import OutputStore, OutputStoreError

    folder = _manifest(tmp_path)
    store = OutputStore.open(str(folder))
    assert load_manifest(store).records == 1
    (folder / "committed" / "part-000001.jsonl.json").write_text(json.dumps({"index": float("inf")}))
    with pytest.raises(ResumeError, match=r"committed/part-000001.jsonl.json: not a clipn manifest"):
        load_manifest(store)
    (folder / "committed" / "part-000001.jsonl.json").unlink()
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 16)
    with pytest.raises(OutputStoreError, match=r"manifest.json: larger than"):
        load_manifest(store)
    (folder / "manifest.json").unlink()
    _fifo(folder / "manifest.json")
    with pytest.raises(OutputStoreError, match=r"manifest.json: not a regular file"):
        load_manifest(store)


def test_damaged_shard_file_is_one_error_naming_it(tmp_path: Path) -> None:
    from clipn_cli.scale import read_output
    from clipn_cli.scale.manifest import ResumeError

    folder = _manifest(tmp_path)
    shard = folder / "shards" / "part-000000.jsonl"
    record = {"path": "a.png", "verdict": "ID", "rule": "atd", "class": "cat", "class_index": 0, "p_ood": 0.2}
    for content in (json.dumps(record).encode() + b"\n", b'{"path": "a.png", \n', b"[" * 100_000 + b"\n"):
        shard.write_bytes(content)
        if content.endswith(b"}\n"):
            assert list(read_output(str(folder))) == [record]
            continue
        with pytest.raises(ResumeError, match=r"shards/part-000000.jsonl: damaged shard"):
            list(read_output(str(folder)))
    shard.unlink()
    with pytest.raises(ResumeError, match=r"shards/part-000000.jsonl: no such file \(a shard the manifest lists"):
        list(read_output(str(folder)))
    shard.mkdir()
    with pytest.raises(ResumeError, match=r"shards/part-000000.jsonl: not a regular file \(a shard the manifest lists"):
        list(read_output(str(folder)))
    (folder / "manifest.json").write_text((folder / "manifest.json").read_text().replace('"jsonl"', '"exe"', 1))
    with pytest.raises(ResumeError, match="format 'exe'"):
        list(read_output(str(folder)))


def test_resume_refusal_shows_a_huge_manifest_value_in_one_short_line(tmp_path: Path) -> None:
    from clipn_cli.scale.manifest import Manifest, ResumeError, check_resumable

    with pytest.raises(ResumeError) as caught:
        check_resumable(Manifest({"classes": "x" * 1_000_000}), {"classes": "cat"}, str(tmp_path))
    assert len(str(caught.value)) < 400 and "classes='xxx" in str(caught.value)


# report thumbnails ------------------------------------------------------------------------------

def test_report_thumbnails_use_the_guarded_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipn_cli.outputs.report import esc, thumbnail_uri

    marker = tmp_path / "gs-ran"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "gs").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (fake / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    eps = tmp_path / "x.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    assert thumbnail_uri(str(eps)) is None and not marker.exists()
    assert thumbnail_uri(str(_fifo(tmp_path / "pipe.png"))) is None
    assert thumbnail_uri("/dev/zero") is None
    assert thumbnail_uri(str(IMAGES / "chelsea.png")).startswith("data:image/")
    assert esc("<script>alert(1)</script>\udcff.jpg") == "&lt;script&gt;alert(1)&lt;/script&gt;\ufffd.jpg"


# closed stdout: every command that prints its result ------------------------------------------------

@pytest.mark.parametrize("args", [["weights", "list"], ["weights", "list", "--format", "json"], ["weights", "default"], ["--version"]])
def test_closed_stdout_is_one_line_exit_2_for_every_printing_command(tmp_path: Path, args: list[str]) -> None:
    env = {**os.environ, "CLIPN_HOME": str(tmp_path / "home")}
    env.pop("CLIPN_WEIGHTS", None)
    result = subprocess.run([sys.executable, "-m", "clipn_cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env, timeout=300, preexec_fn=lambda: os.close(1))
    assert result.returncode == 2, result.stderr
    assert result.stderr == "clipn: error: stdout is closed: results would be lost; redirect stdout\n"


def test_embed_classes_and_calibrate_write_files_with_stdout_closed(tiny_weights: Path, tmp_path: Path) -> None:
    """They print nothing to stdout (their result is --output), so a closed stdout costs nothing."""
    out = tmp_path / "heads.safetensors"
    command = (f'exec "{sys.executable}" -m clipn_cli embed-classes --classes {CLASSES} -w "{tiny_weights}" '
               f'--templates simple -o "{out}" >&-')
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CLIPN_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "Traceback" not in result.stderr


# training's decoding pool ---------------------------------------------------------------------------

def test_training_decodes_through_load_one_on_daemon_threads(tiny_weights: Path, tmp_path: Path) -> None:
    """A decode stuck for good cannot delay exit: the pool's threads are daemons and close() waits for none."""
    import threading

    from clipn_cli.training.batches import StreamBatches
    from clipn_cli.training.data import Pair
    from clipn_cli.weights.checkpoints import load_model

    model, _ = load_model(tiny_weights)
    eps = tmp_path / "x.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    good = str(IMAGES / "chelsea.png")
    pairs = iter([Pair("eps", "a cat", str(eps)), Pair("empty", "a cat", b""), Pair("fifo", "a cat", str(_fifo(tmp_path / "p.png"))),
                  *(Pair(f"ok{i}", "a cat", good) for i in range(20))])
    batches = StreamBatches(model, pairs, batch_size=2, device=torch.device("cpu"), workers=2)
    batch = batches.next()
    assert batch.image.shape[0] == 2 and batches.failed == 3
    assert any("format" in e for e in batches.errors) and any("empty file" in e for e in batches.errors)
    assert any("not a regular file" in e for e in batches.errors)
    batches.close()

    release = threading.Event()
    started = threading.Event()

    def stuck(image: object) -> torch.Tensor:
        started.set()
        release.wait()
        return torch.zeros(3, 224, 224)

    stalled = StreamBatches(model, iter([Pair(f"s{i}", "a cat", good) for i in range(8)]), batch_size=2, device=torch.device("cpu"), workers=1)
    stalled.transform = stuck
    stalled._fill()
    assert started.wait(120)
    threads = [t for t in threading.enumerate() if t.name.startswith("clipn-decode")]
    assert threads and all(t.daemon for t in threads)
    stalled.close()  # returns with a decode still running
    assert all(not f.done() or f.cancelled() for _, f in list(stalled._pending)[1:])
    release.set()


def test_parquet_row_group_too_large_uncompressed_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Parquet table is read one row group at a time; a group whose path column would decompress
    past the limit (a bomb: megabytes of one repeated name compress to almost nothing) is refused from
    its metadata, after the groups before it."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from clipn_cli.inputs import tables
    from clipn_cli.inputs.sources import iter_table

    bomb = tmp_path / "bomb.parquet"
    schema = pa.schema([("path", pa.string())])
    with pq.ParquetWriter(bomb, schema, compression="zstd", use_dictionary=False) as writer:
        writer.write_table(pa.table({"path": ["ok.png"] * 10}, schema=schema))
        writer.write_table(pa.table({"path": ["a" * 4000 + ".png"] * 2000}, schema=schema))  # ~8 MB of names, one group
    assert bomb.stat().st_size < 200_000
    monkeypatch.setattr(tables, "MAX_PARQUET_CHUNK", 1 << 20)
    got = []
    with pytest.raises(ClipnError, match=r"row group 1 holds \d+ MB of path names uncompressed \(limit 1 MB\)") as caught:
        for item in iter_table(str(bomb)):
            got.append(item.path)
    assert len(got) == 10 and str(caught.value).startswith(str(bomb))


def test_resume_reads_the_file_a_bounded_line_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipn_cli.outputs import writers as output

    monkeypatch.setattr(output, "MAX_RECORD_LINE", 4096)
    record = {"path": "a.png", "verdict": "ID", "rule": "atd", "class": "cat", "class_index": 0, "p_ood": 0.2}
    good = json.dumps(record) + "\n"
    out = tmp_path / "out.jsonl"
    out.write_text(good + '{"path": "' + "x" * 10_000)  # a record longer than the limit, never ended
    with pytest.raises(ClipnError, match="line 2 is longer than 0 MiB: refusing to append"):
        output.resume_jsonl(out)
    out.write_text(good + '{"path": "b.png", "verd')  # a record cut mid-write: dropped, the rest kept
    seen = []
    assert output.resume_jsonl(out, seen.append) == {"a.png"} and seen == [record]
    assert out.read_text() == good
