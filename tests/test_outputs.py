"""outputs/: torch-free, and `--format parquet` writes detect's records through the Arrow schema of Ray's shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IMAGES, cli

pq = pytest.importorskip("pyarrow.parquet")

PACKAGE = Path(__file__).parent.parent / "clipn_cli"


def test_no_outputs_module_imports_torch() -> None:
    names = sorted(f"clipn_cli.outputs.{p.stem}" for p in (PACKAGE / "outputs").glob("*.py") if p.stem != "__init__")
    code = f"import importlib, sys\nfor n in {names!r}: importlib.import_module(n)\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=None)
    assert result.returncode == 0, result.stderr
    assert len(names) >= 5 and result.stdout.strip() == "False"


def parquet_records(path: Path) -> list[dict]:
    """Rows as detect's records: nulls dropped (an error row keeps path and error), as in JSON Lines."""
    return [{k: v for k, v in row.items() if v is not None and not (k == "top_k" and v == [])}
            for row in pq.read_table(path).to_pylist()]


@pytest.mark.parametrize("extra", [(), ("--details",), ("--top-k", "2")], ids=["plain", "details", "top-k"])
def test_parquet_holds_the_jsonl_records_in_the_shard_schema(tiny_weights: Path, tiny_embeddings: Path, tmp_path: Path, extra: tuple[str, ...]) -> None:
    from clipn_cli.outputs.records import encode_shard

    bad = tmp_path / "broken.jpg"
    bad.write_bytes((IMAGES / "rocket.jpg").read_bytes()[:300])
    base = ("detect", "-w", str(tiny_weights), "-e", str(tiny_embeddings), str(IMAGES), str(bad), str(tmp_path / "missing.png"), *extra)
    lines = cli(*base, "--format", "jsonl")
    out = tmp_path / "out.parquet"
    result = cli(*base, "--format", "parquet", "--output", str(out))
    assert result.returncode == lines.returncode == 1 and result.stdout == ""
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    assert len(records) >= 5 and sum("error" in r for r in records) == 2
    assert parquet_records(out) == records
    shard = tmp_path / "shard.parquet"
    shard.write_bytes(encode_shard(records, "parquet", details="--details" in extra))
    assert pq.read_schema(out) == pq.read_schema(shard)


def test_parquet_needs_a_file(tiny_weights: Path, tiny_embeddings: Path) -> None:
    result = cli("detect", "-w", str(tiny_weights), "-e", str(tiny_embeddings), str(IMAGES / "chelsea.png"), "--format", "parquet")
    assert result.returncode == 2 and result.stdout == ""
    assert "--format parquet is binary: give --output FILE" in result.stderr and "Traceback" not in result.stderr


def test_parquet_row_groups_keep_one_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipn_cli.outputs import writers

    monkeypatch.setattr(writers, "PARQUET_ROW_GROUP", 2)
    scored = {"path": "a.png", "verdict": "OOD", "rule": "atd", "class": "cat", "class_index": 0, "atd_score": 0.25,
              "ctw_score": 0.5, "p_ood": 0.75, "p_value": 0.01}
    records = [scored, {"path": "b.png", "error": "no such file"}, {**scored, "path": "c.png", "verdict": "ID", "p_value": 0.5}]
    out = tmp_path / "r.parquet"
    with writers.open_writer("parquet", out, columns=("p_value",)) as writer:
        for record in records:
            writer.write(record)
    assert pq.ParquetFile(out).metadata.num_row_groups == 2
    assert parquet_records(out) == records


def test_a_cut_parquet_run_leaves_no_file(tmp_path: Path) -> None:
    from clipn_cli.outputs.writers import open_writer

    out = tmp_path / "r.parquet"
    with pytest.raises(KeyboardInterrupt), open_writer("parquet", out) as writer:
        writer.write({"path": "b.png", "error": "no such file"})
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
