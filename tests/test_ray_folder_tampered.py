"""A Ray output folder tampered with between runs, as an independent checker would: every field of
manifest.json of the wrong type or out of step with the shards, ambiguous JSON, a finished run with
a shard left out of its list, padded entries, a committed shard whose file is gone (--resume), and
files swapped after they were checked. No cluster is started: the folder is made as the driver makes it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")

from conftest import RAY_RECORD as GOOD, make_ray_run as make_run  # noqa: E402

from clipn_cli.scale.manifest import Manifest, ResumeError, load_manifest  # noqa: E402
from clipn_cli.scale.output import read_output  # noqa: E402
from clipn_cli.scale.ray_engine import open_manifest  # noqa: E402
from clipn_cli.scale.store import OutputStore, OutputStoreError  # noqa: E402


def three_shards(root: Path, fmt: str = "jsonl") -> OutputStore:
    return make_run(root, [[GOOD], [{**GOOD, "path": "b.png"}], [{**GOOD, "path": "c.png"}]], fmt=fmt)


def edited(store: OutputStore, edit) -> Path:
    """manifest.json after `edit(data)`; a returned str is written as the file's text."""
    path = Path(store.root) / "manifest.json"
    data = json.loads(path.read_text())
    text = edit(data)
    path.write_text(text if isinstance(text, str) else json.dumps(data))
    return path


def _drop_shard_1(data: dict) -> None:
    del data["finished_shards"][1]
    data["records"] = 2  # totals made to agree: only the list itself says a shard is missing


TAMPERED = [
    ("complete-text", lambda d: d.update(complete="no"), "complete is 'no', not true or false"),
    ("complete-number", lambda d: d.update(complete=1), "complete is 1, not true or false"),
    ("inputs-negative", lambda d: d.update(inputs=-5), "inputs is -5, not a count"),
    ("inputs-text", lambda d: d.update(inputs="3"), "inputs is '3', not a count"),
    ("inputs-bool", lambda d: d.update(inputs=True), "inputs is True, not a count"),
    ("inputs-huge", lambda d: d.update(inputs=10 ** 60), "inputs is 10000000000000"),
    ("inputs-float", lambda d: d.update(inputs=3.0), "inputs is 3.0, not a count"),
    ("shard-size-zero", lambda d: d.update(shard_size=-1), "shard_size is -1, not a count"),
    ("records-total", lambda d: d.update(records=99), "records is 99, the finished shards hold 3"),
    ("errors-total", lambda d: d.update(errors=-1), "errors is -1, the finished shards hold 0"),
    ("format-list", lambda d: d.update(format=["jsonl"]), "format ['jsonl']"),
    ("format-missing", lambda d: d.pop("format") and None, "format None"),
    ("file-of-another-format", lambda d: d["finished_shards"][0].update(file="shards/part-000000.parquet"),
     "file 'shards/part-000000.parquet' is not a jsonl shard"),
    ("digest-not-hex", lambda d: d["finished_shards"][0].update(digest="../x"), "a finished shard has no digest"),
    ("digest-huge", lambda d: d["finished_shards"][0].update(digest="a" * 100_000), "a finished shard has no digest"),
    ("index-10^12", lambda d: d["finished_shards"][0].update(index=10 ** 12), "shard 1000000000000's file is"),
    ("nan", lambda d: json.dumps(d).replace('"inputs": 3', '"inputs": NaN'), "NaN is not a JSON number"),
    ("infinity", lambda d: json.dumps(d).replace('"records": 1,', '"records": -Infinity,', 1), "-Infinity is not a JSON number"),
    ("duplicate-key", lambda d: json.dumps(d)[:-1] + ', "format": "parquet", "format": "jsonl"}', "the key 'format' is given twice"),
    ("duplicate-key-in-a-shard", lambda d: json.dumps(d).replace('"records": 1,', '"records": 1, "records": 5,', 1),
     "the key 'records' is given twice"),
    ("complete-with-a-shard-left-out", _drop_shard_1, "complete, but shard 1 is not listed"),
    ("complete-with-fewer-records-than-inputs", lambda d: d.update(inputs=4), "complete, but its shards hold 3 records for 4 inputs"),
]


@pytest.mark.parametrize("edit,problem", [(e, p) for _, e, p in TAMPERED], ids=[n for n, _, _ in TAMPERED])
def test_a_tampered_manifest_is_one_line_naming_it(tmp_path: Path, edit, problem: str) -> None:
    store = three_shards(tmp_path / "run")
    path = edited(store, edit)
    for read in (lambda: load_manifest(store), lambda: list(read_output(str(tmp_path / "run")))):
        with pytest.raises(ResumeError) as caught:
            read()
        message = str(caught.value)
        assert message.startswith(f"{path}: not a clipn manifest (") and problem in message and "\n" not in message


def test_an_unfinished_run_may_have_gaps_and_no_input_count(tmp_path: Path) -> None:
    """Shards finish in any order: an unfinished manifest with shard 1 missing is read (and resumed)."""
    store = three_shards(tmp_path / "run")
    edited(store, lambda d: (_drop_shard_1(d), d.update(complete=False, inputs=None)))
    assert sorted(load_manifest(store).shards) == [0, 2]
    assert [r["path"] for r in read_output(str(tmp_path / "run"), require_complete=False)] == ["a.png", "c.png"]


def test_padded_entries_and_markers_are_not_held(tmp_path: Path) -> None:
    """An entry is kept as the driver writes it (file, records, errors, digest); a marker is one entry."""
    store = three_shards(tmp_path / "run")
    edited(store, lambda d: d["finished_shards"][0].update(padding=[0] * 100_000))
    assert load_manifest(store).shards[0] == {"file": "shards/part-000000.jsonl", "records": 1, "errors": 0, "digest": "d"}
    marker = Path(store.root) / "committed" / "part-000003.jsonl.json"
    marker.write_text(json.dumps({"index": 3, "file": "shards/part-000003.jsonl", "records": 1, "errors": 0, "digest": "d",
                                  "padding": "x" * (64 << 10)}))
    with pytest.raises(OutputStoreError, match=r"part-000003.jsonl.json: larger than 64 KiB \(the limit for this file\)"):
        load_manifest(store)


def test_a_manifest_of_150000_shards_loads(tmp_path: Path) -> None:
    """10^8 inputs in shards of 1,000 is 10^5 shards: within the documented ~400,000, so read back."""
    store = OutputStore.open(str(tmp_path / "run"))
    store.prepare()
    count = 150_000
    shards = {i: {"file": f"shards/part-{i:06d}.parquet", "records": 2, "errors": 1, "digest": "ab"} for i in range(count)}
    manifest = Manifest({"command": "detect", "format": "parquet"}, shards, inputs=2 * count, complete=True)
    (Path(store.root) / "manifest.json").write_text(json.dumps(manifest.as_dict(), indent=1))
    loaded = load_manifest(store)
    assert (len(loaded.shards), loaded.records, loaded.errors) == (count, 2 * count, count)


def test_resume_scores_again_a_committed_shard_whose_file_is_gone(tmp_path: Path) -> None:
    """A shard counts as done only with its file: otherwise --resume would finish a run 'complete'
    whose read-back fails, or whose records are short by a shard."""
    store = three_shards(tmp_path / "run")
    (Path(store.root) / "shards" / "part-000001.jsonl").unlink()
    job = load_manifest(store).job
    resumed = open_manifest(store, {**job, "clipn_version": "0"}, resume=True)
    assert sorted(resumed.shards) == [0, 2] and resumed.records == 2 and not resumed.complete


def _swapped_after_check(store: OutputStore, swap) -> None:
    """The store's checks of a path pass on the regular file there, then `swap` replaces it (as
    another process can between a check and the open)."""
    check = store._check_inside

    def checked_then_swapped(where: str, *parts: str) -> None:
        check(where, *parts)
        swap()

    store._check_inside = checked_then_swapped


def test_a_file_swapped_after_its_check_is_refused_on_the_open_descriptor(tmp_path: Path) -> None:
    store = three_shards(tmp_path / "run")
    shard = Path(store.root) / "shards" / "part-000001.jsonl"
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({**GOOD, "path": "/etc/secret.png"}) + "\n")
    _swapped_after_check(store, lambda: (shard.unlink(), shard.symlink_to(outside)))
    with pytest.raises(OutputStoreError, match=r"part-000001.jsonl: cannot be read \(Too many levels of symbolic links\)"):
        store.read("shards", "part-000001.jsonl")
    shard.unlink()
    shard.write_text(json.dumps(GOOD) + "\n")
    store = OutputStore.open(store.uri)
    _swapped_after_check(store, lambda: (shard.unlink(), os.mkfifo(shard)))
    with pytest.raises(OutputStoreError, match=r"part-000001.jsonl: not a regular file"):  # never waits for a writer
        store.read("shards", "part-000001.jsonl")


def test_resume_of_another_runs_folder_is_one_line_naming_the_difference(tmp_path: Path) -> None:
    store = three_shards(tmp_path / "run")
    edited(store, lambda d: d.update(weights_fingerprint="f" * 64, classes=["cat"]))
    job = {**load_manifest(store).job, "clipn_version": "0", "weights_fingerprint": "e" * 64, "classes": ["cat"]}
    with pytest.raises(ResumeError) as caught:
        open_manifest(store, job, resume=True)
    assert str(caught.value) == (f"--resume {store.uri}: the run there was made with weights_fingerprint='{'f' * 64}', this one has "
                                 f"weights_fingerprint='{'e' * 64}'; use the same options or a new --output")
