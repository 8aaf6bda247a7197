"""Tables of image paths (.csv, .parquet with a `path` column) and path lists (.txt, .lst) as inputs of
local detect, calibrate and eval: the same input layer the Ray engine plans from, with the same records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CLASSES, IMAGES, cli, jsonl

NAMES = ["rocket.jpg", "coffee.png", "chelsea.png", "nope.png"]


@pytest.fixture()
def listed(tiny_weights: Path) -> list[dict]:
    """detect's records for the images named one by one (the last one is missing)."""
    result = cli("detect", "-w", str(tiny_weights), "--classes", CLASSES, "--format", "jsonl", *[str(IMAGES / n) for n in NAMES])
    assert result.returncode == 1, result.stderr
    return jsonl(result.stdout)


def test_local_detect_reads_a_csv_table_relative_to_its_folder(tiny_weights: Path, tmp_path: Path, listed: list[dict]) -> None:
    table = IMAGES.parent / "table-test.csv"  # relative names resolve against the table's folder
    table.write_text("label,path\n" + "".join(f"{i},{IMAGES.name}/{n}\n" for i, n in enumerate(NAMES)), encoding="utf-8")
    try:
        result = cli("detect", "-w", str(tiny_weights), "--classes", CLASSES, "--format", "jsonl", str(table))
    finally:
        table.unlink()
    assert result.returncode == 1, result.stderr
    assert jsonl(result.stdout) == listed


def test_local_detect_reads_a_parquet_table(tiny_weights: Path, tmp_path: Path, listed: list[dict]) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = tmp_path / "index.parquet"
    pq.write_table(pa.table({"path": [str(IMAGES / n) for n in NAMES]}), table)
    result = cli("detect", "-w", str(tiny_weights), "--classes", CLASSES, "--format", "jsonl", str(table))
    assert result.returncode == 1, result.stderr
    assert jsonl(result.stdout) == listed


def test_an_unreadable_table_is_one_error_record_and_the_run_goes_on(tiny_weights: Path, tmp_path: Path) -> None:
    no_column = tmp_path / "files.csv"
    no_column.write_text("file\nrocket.jpg\n", encoding="utf-8")
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(b"PAR1 not really")
    result = cli("detect", "-w", str(tiny_weights), "--classes", CLASSES, "--format", "jsonl",
                 str(no_column), str(damaged), str(IMAGES / "rocket.jpg"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    records = jsonl(result.stdout)
    assert [r["path"] for r in records] == [str(no_column), str(damaged), str(IMAGES / "rocket.jpg")]
    assert records[0]["error"] == "the CSV table has no 'path' column in its header"
    assert records[1]["error"].startswith(("not a readable Parquet table", "reading a Parquet table needs pyarrow"))
    assert "error" not in records[2]


def test_eval_and_calibrate_take_tables(tiny_weights: Path, tmp_path: Path) -> None:
    common = ["-w", str(tiny_weights), "--classes", CLASSES]
    sets = {"id": ("rocket.jpg", "coffee.png", "chelsea.png"), "ood": ("astronaut.png", "brick.png", "camera.png")}
    for name, files in sets.items():
        (tmp_path / f"{name}.csv").write_text("path\n" + "".join(f"{IMAGES / n}\n" for n in files), encoding="utf-8")
        (tmp_path / f"{name}.txt").write_text("".join(f"{IMAGES / n}\n" for n in files), encoding="utf-8")  # eval's path lists
    as_table = cli("eval", *common, "--id", str(tmp_path / "id.csv"), "--ood", f"misc={tmp_path / 'ood.csv'}", "--format", "json")
    as_list = cli("eval", *common, "--id", str(tmp_path / "id.txt"), "--ood", f"misc={tmp_path / 'ood.txt'}", "--format", "json")
    assert as_table.returncode == 0 and as_list.returncode == 0, as_table.stderr + as_list.stderr
    assert json.loads(as_table.stdout)["images"] == {"ID": 3, "misc": 3}
    assert json.loads(as_table.stdout)["results"] == json.loads(as_list.stdout)["results"]
    bad = tmp_path / "bad.csv"
    bad.write_text("name\nx.png\n", encoding="utf-8")
    refused = cli("eval", *common, "--id", str(tmp_path / "id.csv"), "--ood", f"misc={bad}")
    assert refused.returncode == 2 and f"{bad}: the CSV table has no 'path' column" in refused.stderr
    calib = cli("calibrate", *common, "--alpha", "0.25", "-o", str(tmp_path / "c.json"), str(tmp_path / "ood.csv"))
    assert calib.returncode == 0, calib.stderr
    assert json.loads((tmp_path / "c.json").read_text())["count"] == 3


def test_path_lists_are_an_input_kind_of_every_command(tiny_weights: Path, tmp_path: Path, listed: list[dict]) -> None:
    """A .txt/.lst list of paths (UTF-8, one per line, `#` comments, relative to its folder) is read
    by the same input layer for detect, calibrate and eval; a list that is not UTF-8 is one error record."""
    listing = IMAGES.parent / "list-test.lst"
    listing.write_text("# the four inputs\n" + "".join(f"  {IMAGES.name}/{n}\n\n" for n in NAMES), encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"rocket.jpg\ncaf\xe9.png\n")
    try:
        result = cli("detect", "-w", str(tiny_weights), "--classes", CLASSES, "--format", "jsonl", str(listing), str(bad))
    finally:
        listing.unlink()
    assert result.returncode == 1, result.stderr
    records = jsonl(result.stdout)
    assert records[:-2] == listed
    assert records[-2]["path"] == str(tmp_path / "rocket.jpg") and records[-2]["error"] == "no such file"
    assert records[-1] == {**records[-1], "path": str(bad), "error": "not a UTF-8 list of image paths (byte 14, line 2); is it an image with an unknown extension?"}
    (tmp_path / "id.txt").write_text("".join(f"{IMAGES / n}\n" for n in NAMES[:3]), encoding="utf-8")
    calib = cli("calibrate", "-w", str(tiny_weights), "--classes", CLASSES, "--alpha", "0.25", "-o", str(tmp_path / "c.json"), str(tmp_path / "id.txt"))
    assert calib.returncode == 0, calib.stderr
    assert json.loads((tmp_path / "c.json").read_text())["count"] == 3


def test_eval_reads_one_set_from_stdin(tiny_weights: Path, tmp_path: Path) -> None:
    common = ["-w", str(tiny_weights), "--classes", CLASSES, "--format", "json"]
    ood = "".join(f"{IMAGES / n}\n" for n in ("astronaut.png", "brick.png"))
    (tmp_path / "ood.txt").write_text(ood, encoding="utf-8")
    from_stdin = cli("eval", *common, "--id", str(IMAGES / "rocket.jpg"), "--id", str(IMAGES / "coffee.png"), "--ood", "misc=-", stdin=ood)
    from_list = cli("eval", *common, "--id", str(IMAGES / "rocket.jpg"), "--id", str(IMAGES / "coffee.png"), "--ood", f"misc={tmp_path / 'ood.txt'}")
    assert from_stdin.returncode == 0 and from_list.returncode == 0, from_stdin.stderr + from_list.stderr
    assert json.loads(from_stdin.stdout) == json.loads(from_list.stdout)
    assert json.loads(from_stdin.stdout)["images"] == {"ID": 2, "misc": 2}
    twice = cli("eval", *common, "--id", "-", "--ood", "misc=-", stdin=ood)
    assert twice.returncode == 2 and "- (paths on stdin) can name one set only" in twice.stderr


@pytest.mark.parametrize("command, option", [("detect", "paths"), ("calibrate", "paths"), ("eval", "id_paths")])
def test_every_command_names_the_input_kinds_from_one_place(command: str, option: str) -> None:
    import typer.main

    from clipn_cli.cli.app import app
    from clipn_cli.inputs.sources import INPUT_KINDS_HELP

    group = typer.main.get_command(app)
    param = next(p for p in group.commands[command].params if p.name == option)  # type: ignore[attr-defined]
    assert INPUT_KINDS_HELP in param.help
