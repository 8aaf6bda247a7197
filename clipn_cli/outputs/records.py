"""Detect's records: the `Detection` of one input, their fields and checks, their JSON text, and the
one Arrow schema of local `--format parquet` files and Ray's shards; shard files as Parquet or JSON
Lines bytes, and back; and the records of a batch of scores (`detections_from_scores`, for torch
tensors and NumPy arrays alike).

The fields are detect's own (`Detection.as_dict`, columns in `CSV_COLUMNS` order, detail columns
from `DETAIL_COLUMNS`). A JSON Lines shard holds the very lines `clipn detect --format jsonl`
writes; a Parquet file has one column per field, null where a record lacks it (an error record has
only `path` and `error`). Torch-free, like all of `outputs/`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import OptionsError, RuleError, ShardError
from ..jsonsafe import json_text  # re-exported: the JSON text of a record
from ..scores import methods
from ..scores.methods import Scores, record_fields

SHARD_FORMATS = ("parquet", "jsonl")
MAX_SHARD_BYTES = 256 << 20  # a shard file read back (--report, --fdr); a Parquet shard's declared uncompressed size too
MAX_RECORD_LINE = 64 << 20  # bytes of one JSON Lines record read back by --resume (--details at 50,000 classes: ~3 MB)
CSV_COLUMNS = ("path", "error", "verdict", "rule", "class", "class_index", *record_fields())  # empty where a method was not computed
DETAIL_COLUMNS = ("p_yes", "logits_yes", "logits_no", "top_k")


VERDICTS = ("ID", "OOD")
PROBABILITIES = ("p_ood", "p_value", "q_value")  # in [0, 1]
NUMBER_LISTS = ("p_yes", "logits_yes", "logits_no")


def record_problem(record: Any, required: tuple[str, ...] = ()) -> str | None:
    """What makes `record` not one of detect's records, or None: every reader of records written
    earlier (a JSON Lines file to --resume, a Ray run's shards) checks each with this before use,
    since the file may have been edited. `required`: fields the run's records all carry (`p_value`
    of a calibrated run)."""
    if not isinstance(record, dict):
        return "is not a JSON object"
    if not isinstance(record.get("path"), str):
        return "has no path"
    if "error" in record:
        return None if isinstance(record["error"], str) else "has an error that is not text"
    if record.get("verdict") not in VERDICTS:
        return f"has the verdict {_shown(record.get('verdict'))}, not ID or OOD"
    for key in ("rule", "class"):
        if not isinstance(record.get(key), str):
            return f"has the {key} {_shown(record.get(key))}, not text"
    if not _count(record.get("class_index")):
        return f"has the class_index {_shown(record.get('class_index'))}, not a count"
    for key in (*CSV_COLUMNS[6:], "p_value", "q_value"):
        value = record.get(key)
        if value is None:
            # a plain CLIP has no ATD score nor p_ood; any other record has both
            if key in required or (key == "p_ood" and record.get("atd_score") is not None):
                return f"has no {key}"
        elif not _finite(value) or (key in PROBABILITIES and not 0.0 <= value <= 1.0):
            return f"has the {key} {_shown(value)}, not a {'probability' if key in PROBABILITIES else 'finite number'}"
    for key in NUMBER_LISTS:
        if key in record and not (isinstance(record[key], list) and all(_finite(v) for v in record[key])):
            return f"has a {key} that is not a list of finite numbers"
    top_k = record.get("top_k", [])
    if not (isinstance(top_k, list) and all(isinstance(t, dict) and isinstance(t.get("class"), str) and _count(t.get("class_index"))
                                            and _finite(t.get("probability")) for t in top_k)):
        return "has a top_k that is not a list of {class, class_index, probability}"
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 53


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


SCORE_FIELDS = methods.record_fields(methods.available())  # always in a record (null if not computed); pool methods add theirs
_SCORE_ATTRIBUTES = frozenset(methods.record_fields())


@dataclass
class Detection:
    """The verdict for one input, or the error that prevented one.

    `scores` maps the record fields of the methods table (`methods.record_fields`) to this image's
    values, in table order: a new method is a new key, not a new attribute. `r.atd_score`,
    `r.p_ood`, ... read it (None where the run did not compute that score).
    """

    path: str
    error: str | None = None
    verdict: str | None = None  # "ID" or "OOD"
    rule: str | None = None
    class_name: str | None = None
    class_index: int | None = None
    scores: dict[str, float] = field(default_factory=dict)
    p_yes: list[float] | None = None
    logits_yes: list[float] | None = None
    logits_no: list[float] | None = None
    top_k: list[dict[str, Any]] = field(default_factory=list)

    def __getattr__(self, name: str) -> float | None:
        if name in _SCORE_ATTRIBUTES:
            return self.__dict__.get("scores", {}).get(name)
        raise AttributeError(f"'Detection' object has no attribute '{name}'")

    @property
    def extra_scores(self) -> dict[str, float]:
        """The scores of methods that are not always computed (negative-label pools)."""
        return {name: value for name, value in self.scores.items() if name not in SCORE_FIELDS}

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self, details: bool = False) -> dict[str, Any]:
        """The JSON record: `path` and `error`, or the verdict and scores (plus details if asked)."""
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        record: dict[str, Any] = {
            "path": self.path,
            "verdict": self.verdict,
            "rule": self.rule,
            "class": self.class_name,
            "class_index": self.class_index,
        }
        record.update({name: self.scores.get(name) for name in SCORE_FIELDS})
        record.update(self.extra_scores)
        if details:
            record.update(p_yes=self.p_yes, logits_yes=self.logits_yes, logits_no=self.logits_no)
        if self.top_k:
            record["top_k"] = self.top_k
        return record


def verdicts(scores: Scores, rule: str, threshold: float | None = None) -> Any:
    """(N,) True = OOD: the rule's own verdict, or `score < threshold` for a rule without one."""
    method = methods.get(rule)
    if threshold is not None:
        return method.value(scores) < threshold
    if method.verdict is None:
        raise RuleError(f"rule '{rule}' has no threshold-free verdict: give a threshold (e.g. thr@95%ID from 'clipn eval')")
    return method.verdict(scores)


def record_columns(scores: Scores) -> dict[str, list[float]]:
    """Detection-record field → per-image values, for every method these scores hold."""
    columns: dict[str, list[float]] = {}
    for m in methods.TABLE:
        if m.record is None or (m.pool is not None and m.name not in scores.extra) or (m.needs_no and scores.p_yes is None):
            continue
        columns[m.record] = m.value(scores).tolist()
        if m.name in methods.EXTRA_RECORD_FIELDS:
            name, value = methods.EXTRA_RECORD_FIELDS[m.name]
            columns[name] = value(scores).tolist()
    return columns


def detections_from_scores(
    paths: list[str], scores: Scores, classes: list[str], rule: str, details: bool = False, top_k: int = 0,
    threshold: float | None = None,
) -> list[Detection]:
    """Turn a batch of Scores into Detection records (pure: no model, no files; torch tensors or NumPy arrays)."""
    ood = verdicts(scores, rule, threshold).tolist()
    pred = scores.pred.tolist()
    columns = record_columns(scores)
    k = min(top_k, len(classes))
    from ..scores.arrays import topk  # NumPy only when records are made: `--help` imports this module

    top = topk(scores.probs, k) if k else None
    out = []
    for i, path in enumerate(paths):
        det = Detection(
            path=path,
            verdict="OOD" if ood[i] else "ID",
            rule=rule,
            class_name=classes[pred[i]],
            class_index=pred[i],
            scores={name: values[i] for name, values in columns.items()},  # no CLIPN scores for a plain CLIP
        )
        if details:
            det.p_yes = None if scores.p_yes is None else scores.p_yes[i].tolist()
            det.logits_yes = scores.logits_yes[i].tolist()
            det.logits_no = None if scores.logits_no is None else scores.logits_no[i].tolist()
        if top is not None:
            det.top_k = [
                {"class": classes[j], "class_index": j, "probability": p}
                for p, j in zip(top[0][i].tolist(), top[1][i].tolist())
            ]
        out.append(det)
    return out


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


def to_table(records: Sequence[dict[str, Any]], details: bool = False, extra: Sequence[str] = (), columns: Sequence[str] | None = None):
    """A pyarrow Table of records with a fixed schema (the same for every shard of a run); `columns`:
    exactly these (a later row group of one file), else `columns_for` the records."""
    import pyarrow as pa

    types = _arrow_types()
    arrays, fields = [], []
    for name in columns if columns is not None else columns_for(records, details, extra):
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
    raise OptionsError(f"unknown shard format '{fmt}' (expected one of {', '.join(SHARD_FORMATS)})")


def decode_shard(data: bytes, fmt: str, records: int | None = None, required: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Records of a shard file as detect writes them (Parquet nulls dropped, as in JSON Lines).

    The file may have been changed since it was written: `records` (the count the manifest holds)
    bounds how many are read, each line is at most MAX_RECORD_LINE, a Parquet file's declared size
    is checked before it is decoded, and every record must pass `record_problem` (with the
    `required` fields). Anything else is a ShardError.
    """
    if fmt == "jsonl":
        rows = _jsonl_rows(data, records)
    elif fmt == "parquet":
        rows = _parquet_rows(data, records)
    else:
        raise ShardError(f"unknown shard format '{fmt}'")
    count = 0
    for count, record in enumerate(rows, 1):
        if (problem := record_problem(record, required)) is not None:
            raise ShardError(f"record {count} {problem}")
        yield record
    if records is not None and count != records:
        raise ShardError(f"holds {count} records, the manifest says {records}")


def _jsonl_rows(data: bytes, records: int | None) -> Iterator[Any]:
    start = count = 0
    while start < len(data):
        end = data.find(b"\n", start, start + MAX_RECORD_LINE + 1)
        if end < 0:
            if len(data) - start > MAX_RECORD_LINE:
                raise ShardError(f"line {count + 1} is longer than {MAX_RECORD_LINE >> 20} MiB")
            raise ShardError(f"line {count + 1} has no end (the file was cut)")
        count += 1
        if records is not None and count > records:
            raise ShardError(f"holds more than the {records} records the manifest says")
        try:
            yield json.loads(data[start:end].decode("utf-8", "surrogateescape"))
        except (ValueError, RecursionError):
            raise ShardError(f"line {count} is not JSON") from None
        start = end + 1


def _parquet_rows(data: bytes, records: int | None) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    if records is not None and meta.num_rows != records:
        raise ShardError(f"holds {meta.num_rows} records, the manifest says {records}")
    declared = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if declared > MAX_SHARD_BYTES:
        raise ShardError(f"declares {declared >> 20} MiB of data, more than the {MAX_SHARD_BYTES >> 20} MiB a shard may hold")
    for row in pq.read_table(io.BytesIO(data)).to_pylist():
        if row.get("error") is not None:
            yield {"path": row["path"], "error": row["error"]}
        else:
            yield {k: v for k, v in row.items() if v is not None and not (k == "top_k" and v == [])}
