"""Tables of image paths (.csv, .parquet with a `path` column) as inputs of local detect, calibrate and
eval: the same input layer the Ray engine plans from, with the same records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import IMAGES, cli

CLASSES = "cat,coffee,rocket"
NAMES = ["rocket.jpg", "coffee.png", "chelsea.png", "nope.png"]


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


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
