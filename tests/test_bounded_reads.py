"""Hostile inputs, round 3 (issue 20): valid but huge JSON, special files in place of regular ones,
Parquet dictionary bombs, oversized word lists, a cache that links out of the home, and decode errors
that must name the true byte offset. Every reader goes through `clipn_cli.files`' bounded reads, so
each case is one error naming the file (or a rebuilt cache), never a hang or GBs of memory.

Refusals of huge JSON are checked by their message, which states the count the pre-scan found: it
proves the text was refused before any object was built. FIFOs would hang the old code; pytest's own
timeout of the CI run catches that, so no test asserts wall-clock time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clipn_cli.errors import CalibrationError
from clipn_cli.files import JSONLimitError, JSONLimits, NotRegularFileError, parse_json, read_bounded, read_json

from conftest import IMAGES, calibration_doc, cli

CLASSES = "cat,horse,rocket"


def _sparse(path: Path, size: int = 8 << 30) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


# the bounded JSON reader --------------------------------------------------------------------------

def test_parse_json_counts_values_containers_and_depth_before_parsing() -> None:
    # brackets, commas, colons and escaped quotes inside strings are not structure
    text = json.dumps({'a[{,:"\\': ["x]]", 1, {"b": '\\"[[['}]})
    assert parse_json(text, JSONLimits(values=8, containers=3, depth=3)) == json.loads(text)
    with pytest.raises(JSONLimitError, match=r"about 9 values \(limit 8\)"):
        parse_json("[" + "0," * 7 + "0]", JSONLimits(values=8))
    with pytest.raises(JSONLimitError, match="more than 2 lists or objects"):
        parse_json("[[], {}, []]", JSONLimits(containers=2))
    with pytest.raises(JSONLimitError, match=r"nested too deeply \(limit 3 levels\)"):
        parse_json("[[[[0]]]]", JSONLimits(depth=3))
    with pytest.raises(JSONLimitError, match="nested too deeply"):  # 100,000 deep: no RecursionError
        parse_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError):
        parse_json('{"a": "unterminated')


def test_read_json_refuses_special_and_sparse_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFileError):
        read_json(fifo, 1 << 20)
    with pytest.raises(ValueError, match="larger than 1 MiB"):
        read_json(_sparse(tmp_path / "sparse.json"), 1 << 20)
    with pytest.raises(NotRegularFileError):
        read_bounded("/dev/zero", 1 << 20)


def test_calibration_with_a_24_mb_list_in_an_extra_key_is_refused_before_parsing(tmp_path: Path) -> None:
    from clipn_cli.scores.calibration import Calibration

    path = tmp_path / "cal.json"
    text = json.dumps(calibration_doc())
    path.write_text(text[:-1] + ', "extra": [' + "0," * 12_500_000 + "0]}")
    with pytest.raises(CalibrationError) as caught:
        Calibration.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a clipn calibration file") and "values (limit 12,000,000)" in message
    path.write_text(text[:-1] + ', "extra": [1, 2]}')  # small: parsed, then refused by name
    with pytest.raises(CalibrationError, match="unknown key 'extra'"):
        Calibration.load(path)
    path.write_text(text[:-1] + ', "scores2": [' + "[]," * 20_000 + "[]]}")
    with pytest.raises(CalibrationError, match="lists or objects"):
        Calibration.load(path)


def test_safetensors_header_holding_a_24_mb_list_is_refused_before_parsing(tmp_path: Path) -> None:
    from clipn_cli.heads.embeddings import ClassEmbeddings
    from clipn_cli.errors import EmbeddingsError
    from clipn_cli.weights.home import read_header
    from clipn_cli.safetensors_file import SafetensorsError, SafetensorsFile

    header = b'{"__metadata__": {"format": "clipn-cli.embeddings"}, "x": [' + b"0," * 12_000_000 + b"0]}"
    path = tmp_path / "big-header.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(SafetensorsError, match=r"header holds about 12,000,00\d values \(limit 1,000,000\)"):
        SafetensorsFile(path)
    with pytest.raises(EmbeddingsError, match="values"):
        ClassEmbeddings.load(path)
    assert read_header(path) == {}  # `weights list`: listed as invalid, never parsed


def test_embeddings_metadata_json_is_bounded(tmp_path: Path) -> None:
    from clipn_cli.heads.embeddings import CLASS_LIST_LIMITS
    from clipn_cli.safetensors_file import SafetensorsError, loads_json

    with pytest.raises(SafetensorsError, match="class list holds"):
        loads_json("[" + '"a",' * 3_000_000 + '"a"]', "class list", max_depth=1, limits=CLASS_LIST_LIMITS)
    assert loads_json('["a,b", "c:[d"]', "class list", max_depth=1) == ["a,b", "c:[d"]


def test_home_config_sparse_8_gib_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "clipn-home"
    home.mkdir(parents=True, exist_ok=True)
    _sparse(home / "config.json")
    result = cli("weights", "list", env={"CLIPN_HOME": str(home)})
    assert result.returncode == 2
    assert "config.json: unreadable clipn config (larger than 1 MiB" in result.stderr and result.stderr.count("\n") == 1
    (home / "config.json").unlink()
    (home / "config.json").write_text('{"default": [' + "0," * 20_000 + "0]}")
    result = cli("weights", "list", env={"CLIPN_HOME": str(home)})
    assert result.returncode == 2 and "values (limit 10,000)" in result.stderr


# special files where weights are expected ---------------------------------------------------------

def test_fifo_as_weights_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    result = cli("detect", "--weights", str(fifo), "--classes", CLASSES, str(IMAGES / "chelsea.png"))
    assert result.returncode == 2 and str(fifo) in result.stderr and "not a regular file" in result.stderr
    assert result.stderr.count("\n") == 1


def test_fifo_in_the_weights_home_is_listed_and_refused(tmp_path: Path) -> None:
    home = tmp_path / "clipn-home"
    (home / "weights").mkdir(parents=True)
    os.mkfifo(home / "weights" / "piped.safetensors")
    env = {"CLIPN_HOME": str(home)}
    listed = cli("weights", "list", "--format", "json", env=env)
    assert listed.returncode == 0, listed.stderr
    row = next(r for r in json.loads(listed.stdout)["weights"] if r["name"] == "piped")
    assert not row["present"]
    result = cli("detect", "--weights", str(home / "weights" / "piped.safetensors"), "--classes", CLASSES,
                 str(IMAGES / "chelsea.png"), env=env)
    assert result.returncode == 2 and "not a regular file" in result.stderr and result.stderr.count("\n") == 1


# tables: dictionary bombs, decode offsets -----------------------------------------------------------

def test_parquet_dictionary_bomb_is_refused_before_expanding(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipn_cli.inputs.tables import TableError, table_paths

    bomb = tmp_path / "bomb.parquet"  # 64 rows sharing one 8 MiB value: a few hundred bytes on disk
    pq.write_table(pa.table({"path": pa.array(["a" * (8 << 20)]).dictionary_encode().take(pa.array([0] * 64))}),
                   bomb, compression="zstd", store_schema=False)
    assert bomb.stat().st_size < 4096
    with pytest.raises(TableError, match=r"bomb.parquet: row 1 holds a path of 8,388,608 bytes \(limit 64 KiB"):
        list(table_paths(str(bomb)))
    mixed = tmp_path / "mixed.parquet"  # the rows before the long one are all kept
    pq.write_table(pa.table({"path": [f"x{i}.jpg" for i in range(1500)] + ["b" * 70_000, "y.jpg"]}), mixed, row_group_size=1000)
    found = []
    with pytest.raises(TableError, match="row 1501 holds a path of 70,000 bytes"):
        found.extend(table_paths(str(mixed), batch_rows=700))
    assert found == [f"x{i}.jpg" for i in range(1500)]


def test_csv_decode_error_names_the_offset_in_the_file(tmp_path: Path) -> None:
    from clipn_cli.inputs.tables import TableError, table_paths

    rows = "\ufeffpath\n".encode() + b"".join(b"img%06d.jpg\n" % i for i in range(1000))  # past 8 KiB of rows
    table = tmp_path / "t.csv"
    table.write_bytes(rows + b"caf\xe9.jpg\n")
    with pytest.raises(TableError) as caught:
        list(table_paths(str(table)))
    assert str(caught.value) == f"{table}: not a UTF-8 CSV table (byte {len(rows) + 3}, line 1002)"


# negative-label inputs ------------------------------------------------------------------------------

def test_candidate_cache_linking_out_of_the_home_is_ignored_and_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from safetensors.torch import save_file

    from clipn_cli.heads import wordpool

    monkeypatch.setenv("CLIPN_HOME", str(tmp_path / "home"))
    found = wordpool.candidates("neglabel", [("noun.x", "cat"), ("noun.x", "dog"), ("adj.x", "red")])
    fresh = torch.nn.functional.normalize(torch.arange(24.0).reshape(3, 8), dim=-1)
    monkeypatch.setattr(wordpool, "embed_prompts", lambda model, prompts, progress=None: fresh)
    model = type("Model", (), {"text_projection": torch.zeros(8, 8)})()
    outside = tmp_path / "outside.safetensors"
    save_file({"candidates": torch.ones(3, 8)}, str(outside))
    before = outside.read_bytes()
    path = wordpool.cache_path("f" * 64, found)
    path.parent.mkdir(parents=True)
    path.symlink_to(outside)
    assert torch.equal(wordpool.candidate_embeddings(model, found, "f" * 64), fresh)  # not the linked file
    assert outside.read_bytes() == before and not path.is_symlink()  # the link replaced, its target untouched
    assert torch.equal(wordpool._cached(path, (3, 8)), fresh)
    # a cache folder linking out of the home: neither read nor written
    other = wordpool.cache_path("e" * 64, found)
    (tmp_path / "elsewhere").mkdir()
    save_file({"candidates": torch.ones(3, 8)}, str(tmp_path / "elsewhere" / other.name))
    other.parent.symlink_to(tmp_path / "elsewhere")
    assert torch.equal(wordpool.candidate_embeddings(model, found, "e" * 64), fresh)


def test_word_lists_are_bounded_by_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipn_cli.errors import ClipnError
    from clipn_cli.heads.wordpool import MAX_WORDS, read_words

    assert MAX_WORDS == 200_000 and len(read_words()) < MAX_WORDS  # the shipped list fits
    monkeypatch.setenv("CLIPN_MAX_WORDS", "100")
    listed = tmp_path / "words.txt"
    listed.write_text("".join(f"noun.x\tw{i}\n" for i in range(100)))
    assert len(read_words(listed)) == 100
    listed.write_text("".join(f"noun.x\tw{i}\n" for i in range(101)))
    with pytest.raises(ClipnError, match=r"words.txt: more than 100 words \(the limit.*\$CLIPN_MAX_WORDS"):
        read_words(listed)
    folder = tmp_path / "txtfiles"
    folder.mkdir()
    (folder / "noun.a.txt").write_text("".join(f"a{i}\n" for i in range(60)))
    (folder / "adj.b.txt").write_text("".join(f"b{i}\n" for i in range(60)))
    with pytest.raises(ClipnError, match="txtfiles: more than 100 words"):
        read_words(folder)
    monkeypatch.setenv("CLIPN_MAX_WORDS", "many")
    with pytest.raises(ClipnError, match=r"\$CLIPN_MAX_WORDS must be a whole number"):
        read_words(listed)


# decode errors name the byte's offset in the file and its line ---------------------------------------

def test_text_decoders_name_the_true_offset_and_line(tmp_path: Path) -> None:
    import gzip

    from clipn_cli.heads.classes import read_class_file
    from clipn_cli.errors import ClipnError, EvaluationError
    from clipn_cli.inputs.sets import collect
    from clipn_cli.heads.prompts import load_templates
    from clipn_cli.heads.wordpool import read_words

    head = "\ufeff".encode() + b"".join(b"name %05d\n" % i for i in range(1000))  # a BOM, then 11 KB of lines
    bad = head + b"caf\xe9\n"
    where = f"byte {len(head) + 3}, line 1001"
    (tmp_path / "classes.txt").write_bytes(bad)
    with pytest.raises(ClipnError, match=where):
        read_class_file(tmp_path / "classes.txt")
    (tmp_path / "list.txt").write_bytes(bad)
    with pytest.raises(EvaluationError, match=where):
        collect(str(tmp_path / "list.txt"))
    (tmp_path / "templates.txt").write_bytes(bad.replace(b"\n", b" {}\n"))
    with pytest.raises(ClipnError, match=f"byte {len(head) + 1000 * 3 + 3}, line 1001"):
        load_templates(str(tmp_path / "templates.txt"))
    words = b"".join(b"noun.x\tw%05d\n" % i for i in range(1000))
    (tmp_path / "words.txt").write_bytes(words + b"noun.x\tcaf\xe9\n")
    with pytest.raises(ClipnError, match=f"byte {len(words) + 10}, line 1001"):
        read_words(tmp_path / "words.txt")
    (tmp_path / "words.gz").write_bytes(gzip.compress(words + b"noun.x\tcaf\xe9\n"))
    with pytest.raises(ClipnError, match=f"byte {len(words) + 10} of the inflated text, line 1001"):
        read_words(tmp_path / "words.gz")
