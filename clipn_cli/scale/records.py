"""Shard files: detect's records as Parquet or JSON Lines bytes, and back.

The fields are detect's own (`Detection.as_dict`, columns in `output.CSV_COLUMNS` order, detail
columns from `output.DETAIL_COLUMNS`). A JSON Lines shard holds the very lines `clipn detect
--format jsonl` writes; a Parquet shard has one column per field, null where a record lacks it
(an error record has only `path` and `error`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from typing import Any

from ..output import CSV_COLUMNS, DETAIL_COLUMNS, json_text

SHARD_FORMATS = ("parquet", "jsonl")


def _arrow_types() -> dict[str, Any]:
    import pyarrow as pa

    top_k = pa.list_(pa.struct([("class", pa.string()), ("class_index", pa.int64()), ("probability", pa.float64())]))
    types: dict[str, Any] = {name: pa.float64() for name in CSV_COLUMNS}
    types.update({name: pa.string() for name in ("path", "error", "verdict", "rule", "class")})
    types.update(p_value=pa.float64(), q_value=pa.float64())
    types.update(class_index=pa.int64(), p_yes=pa.list_(pa.float64()), logits_yes=pa.list_(pa.float64()),
                 logits_no=pa.list_(pa.float64()), top_k=top_k)
    return types


def columns_for(records: Sequence[dict[str, Any]], details: bool, extra: Sequence[str] = ()) -> list[str]:
    """The shard's columns: detect's CSV columns, the run's `extra` ones (`p_value` of calibrated
    runs: present even in a shard of error records only), the detail columns asked for, then any other field."""
    columns = list(CSV_COLUMNS) + list(extra) + (list(DETAIL_COLUMNS) if details else ["top_k"])
    seen = set(columns)
    for record in records:
        for key in record:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    return columns


def to_table(records: Sequence[dict[str, Any]], details: bool = False, extra: Sequence[str] = ()):
    """A pyarrow Table of records with a fixed schema (the same for every shard of a run)."""
    import pyarrow as pa

    types = _arrow_types()
    arrays, fields = [], []
    for name in columns_for(records, details, extra):
        values = [_utf8(r.get(name)) for r in records]
        kind = types.get(name)
        array = pa.array(values, type=kind) if kind is not None else pa.array(values)
        if kind is None and pa.types.is_null(array.type):
            array = array.cast(pa.string())
        arrays.append(array)
        fields.append(pa.field(name, array.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _utf8(value: Any) -> Any:
    """Parquet strings are UTF-8: a file name's undecodable bytes (lone surrogates, as Python reads
    them) become backslash escapes (b'caf\\xe9'), readable and lossless to the eye; JSON Lines
    shards keep them exactly, as local detect does."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def encode_shard(records: Sequence[dict[str, Any]], fmt: str, details: bool = False, extra: Sequence[str] = ()) -> bytes:
    """The bytes of one shard file."""
    if fmt == "jsonl":
        return "".join(json_text(r) + "\n" for r in records).encode("utf-8", "surrogateescape")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        pq.write_table(to_table(records, details, extra), sink, compression="zstd")
        return sink.getvalue()
    raise ValueError(f"unknown shard format '{fmt}' (expected one of {', '.join(SHARD_FORMATS)})")


def decode_shard(data: bytes, fmt: str) -> Iterator[dict[str, Any]]:
    """Records of a shard file as detect writes them (Parquet nulls dropped, as in JSON Lines)."""
    if fmt == "jsonl":
        for line in data.decode("utf-8", "surrogateescape").splitlines():
            yield json.loads(line)
        return
    import pyarrow.parquet as pq

    for row in pq.read_table(io.BytesIO(data)).to_pylist():
        if row.get("error") is not None:
            yield {"path": row["path"], "error": row["error"]}
        else:
            yield {k: v for k, v in row.items() if v is not None and not (k == "top_k" and v == [])}
