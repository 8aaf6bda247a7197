"""A Ray output folder someone changed, read back by --report and --fdr (`read_output`, `apply_fdr`)
and by --resume (`load_manifest`): every record checked, every file bounded and inside the folder,
one error naming the file. No cluster is started: the folder is made as the driver makes it."""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")

from conftest import RAY_RECORD as GOOD, make_ray_run as make_run  # noqa: E402

from clipn_cli.errors import ClipnError, OutputError  # noqa: E402
from clipn_cli.outputs.writers import resume_jsonl  # noqa: E402
from clipn_cli.scale.manifest import ResumeError, load_manifest  # noqa: E402
from clipn_cli.scale.output import apply_fdr, read_output  # noqa: E402
from clipn_cli.scale.store import OutputStore  # noqa: E402

def edit_record(store: OutputStore, index: int, **fields) -> Path:
    """Rewrite shard `index`'s first record with `fields` (None removes one), as an editor would."""
    shard = Path(store.root) / "shards" / f"part-{index:06d}.jsonl"
    lines = shard.read_text().splitlines()
    record = json.loads(lines[0])
    for key, value in fields.items():
        if value is None and key in record and key not in ("p_ood",):
            del record[key]
        else:
            record[key] = value
    lines[0] = json.dumps(record)
    shard.write_text("\n".join(lines) + "\n")
    return shard


def refused(root: Path, fdr: bool = False) -> str:
    with pytest.raises(ResumeError) as caught:
        if fdr:
            store = OutputStore.open(str(root))
            apply_fdr(store, load_manifest(store), 0.1)
        else:
            list(read_output(str(root)))
    return str(caught.value)


BAD_FIELDS = [
    ({"verdict": "MAYBE"}, 'has the verdict "MAYBE", not ID or OOD'),
    ({"verdict": None}, "has the verdict null, not ID or OOD"),
    ({"p_ood": math.inf}, "has the p_ood Infinity, not a probability"),
    ({"p_ood": None}, "has no p_ood"),
    ({"p_ood": math.nan}, "has the p_ood NaN, not a probability"),
    ({"p_ood": 1.5}, "has the p_ood 1.5, not a probability"),
    ({"p_ood": "0.3"}, 'has the p_ood "0.3", not a probability'),
    ({"atd_score": True}, "has the atd_score true, not a finite number"),
    ({"energy": [1]}, "has the energy list, not a finite number"),
    ({"class": 3}, "has the class 3, not text"),
    ({"rule": {}}, "has the rule dict, not text"),
    ({"class_index": -1}, "has the class_index -1, not a count"),
    ({"class_index": 1.5}, "has the class_index 1.5, not a count"),
    ({"path": 7}, "has no path"),
    ({"p_value": None}, "has no p_value"),
    ({"p_value": -0.1}, "has the p_value -0.1, not a probability"),
    ({"q_value": math.inf}, "has the q_value Infinity, not a probability"),
    ({"p_yes": [0.1, "x"]}, "has a p_yes that is not a list of finite numbers"),
    ({"top_k": [{"class": "cat"}]}, "has a top_k that is not a list of {class, class_index, probability}"),
]


@pytest.mark.parametrize("fields,problem", BAD_FIELDS, ids=[str(f) for f, _ in BAD_FIELDS])
def test_a_changed_record_is_one_error_naming_the_shard(tmp_path: Path, fields: dict, problem: str) -> None:
    store = make_run(tmp_path / "run", [[GOOD, {**GOOD, "path": "b.png"}], [{**GOOD, "path": "c.png"}]])
    shard = edit_record(store, 1, **fields)
    for fdr in (False, True):
        assert refused(tmp_path / "run", fdr) == f"{shard}: damaged shard (record 1 {problem})"


def test_error_records_and_a_plain_clip_record_pass(tmp_path: Path) -> None:
    plain = {**GOOD, "ctw_score": None, "atd_score": None, "p_ood": None}
    make_run(tmp_path / "run", [[GOOD, {"path": "x.png", "error": "not an image"}], [plain]])
    assert [r["path"] for r in read_output(str(tmp_path / "run"))] == ["a.png", "x.png", "a.png"]


def test_a_shard_with_records_added_or_lost_is_refused(tmp_path: Path) -> None:
    store = make_run(tmp_path / "run", [[GOOD, {**GOOD, "path": "b.png"}]])
    shard = Path(store.root) / "shards" / "part-000000.jsonl"
    shard.write_text(shard.read_text() + json.dumps({**GOOD, "path": "z.png"}) + "\n")
    assert refused(tmp_path / "run") == f"{shard}: damaged shard (holds more than the 2 records the manifest says)"
    shard.write_text(shard.read_text().splitlines()[0] + "\n")
    assert refused(tmp_path / "run") == f"{shard}: damaged shard (holds 1 records, the manifest says 2)"
    shard.write_bytes(b'{"path": "a.png", "verdict"')
    assert refused(tmp_path / "run") == f"{shard}: damaged shard (line 1 has no end (the file was cut))"


def test_parquet_shards_are_checked_the_same_way(tmp_path: Path) -> None:
    make_run(tmp_path / "run", [[GOOD], [{**GOOD, "path": "b.png", "verdict": "BAD"}]], fmt="parquet")
    assert refused(tmp_path / "run") == f"{tmp_path}/run/shards/part-000001.parquet: damaged shard (record 1 has the verdict \"BAD\", not ID or OOD)"


def test_a_symlink_out_of_the_folder_is_never_read(tmp_path: Path) -> None:
    store = make_run(tmp_path / "run", [[GOOD], [{**GOOD, "path": "b.png"}]])
    outside = tmp_path / "secret.jsonl"
    outside.write_text(json.dumps({**GOOD, "path": "/etc/secret.png"}) + "\n")
    shard = Path(store.root) / "shards" / "part-000001.jsonl"
    shard.unlink()
    shard.symlink_to(outside)
    message = refused(tmp_path / "run")
    assert message.startswith(f"{shard}: a symbolic link (to {outside})") and "secret.png" not in message
    # a link to another shard of the same folder would count its records twice: refused too
    shard.unlink()
    shard.symlink_to(Path(store.root) / "shards" / "part-000000.jsonl")
    assert "a symbolic link" in refused(tmp_path / "run")
    # the shards folder itself, and the manifest, as links out of the folder
    shard.unlink()
    elsewhere = tmp_path / "elsewhere"
    os.rename(Path(store.root) / "shards", elsewhere)
    (Path(store.root) / "shards").symlink_to(elsewhere)
    assert "a symbolic link" in refused(tmp_path / "run")
    manifest = Path(store.root) / "manifest.json"
    os.rename(manifest, tmp_path / "m.json")
    manifest.symlink_to(tmp_path / "m.json")
    with pytest.raises(ClipnError, match="manifest.json: a symbolic link"):
        load_manifest(store)


def test_a_shard_that_is_not_a_regular_file_or_too_large(tmp_path: Path) -> None:
    store = make_run(tmp_path / "run", [[GOOD]])
    shard = Path(store.root) / "shards" / "part-000000.jsonl"
    shard.unlink()
    with open(shard, "wb") as fh:
        fh.truncate(8 << 30)  # sparse: nothing is on disk, 8 GiB would be read
    assert refused(tmp_path / "run") == f"{shard}: larger than 256 MiB (the limit for this file) (a shard the manifest lists as finished)"
    shard.unlink()
    os.mkfifo(shard)
    assert refused(tmp_path / "run") == f"{shard}: not a regular file (a shard the manifest lists as finished)"
    shard.unlink()
    shard.mkdir()
    assert refused(tmp_path / "run") == f"{shard}: not a regular file (a shard the manifest lists as finished)"


def test_a_manifest_listing_one_file_twice_or_under_another_index(tmp_path: Path) -> None:
    store = make_run(tmp_path / "run", [[GOOD], [{**GOOD, "path": "b.png"}]])
    path = Path(store.root) / "manifest.json"
    data = json.loads(path.read_text())
    data["finished_shards"][1]["file"] = "shards/part-000000.jsonl"
    path.write_text(json.dumps(data))
    with pytest.raises(ResumeError, match="shard 1's file is 'shards/part-000000.jsonl', not part-000001"):
        load_manifest(store)
    data["finished_shards"][1] = dict(data["finished_shards"][0])
    path.write_text(json.dumps(data))
    with pytest.raises(ResumeError, match="a shard is listed twice"):
        load_manifest(store)


def test_a_manifest_with_a_long_list_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    store = make_run(tmp_path / "run", [[GOOD]])
    path = Path(store.root) / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data)[:-1] + ', "padding": [' + "0," * 12_000_000 + "0]}")  # 24 MB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ResumeError, match=r"not a clipn manifest \(more than 4,000,000 JSON values\)"):
        load_manifest(store)
    # the file's bytes are read (24 MB); no list of 12 million ints (~400 MB) is built
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 << 10


def test_local_resume_checks_records_with_the_same_validator(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "path": "b.png", "p_ood": None}) + "\n")
    with pytest.raises(OutputError, match=r"out.jsonl: line 2 is not a clipn JSON Lines record: refusing to append to this file \(it has no p_ood\)"):
        resume_jsonl(out)
