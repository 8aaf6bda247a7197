"""Bounded JSON for untrusted text inside other files (safetensors headers, manifests, configs),
without torch: the manifest of a Ray output folder is read before a command has imported it; and
JSON text that stays valid UTF-8 whatever the paths hold, for every file clipn writes."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from .errors import JSONLimitError, SafetensorsError
from .files import JSONLimits, parse_json

MAX_JSON_DEPTH = 32  # deeper than any config or list clipn writes; a hostile file nests 100,000 deep


def loads_json(text: str | bytes, what: str, max_depth: int = MAX_JSON_DEPTH, limits: JSONLimits | None = None) -> Any:
    """JSON from an untrusted file, bounded before any object is built (`files.parse_json`): bad JSON,
    nesting deeper than `max_depth` or more values or containers than `limits` is a SafetensorsError."""
    limits = limits or JSONLimits()
    try:
        return parse_json(text, replace(limits, depth=min(limits.depth, max_depth)))
    except JSONLimitError as exc:
        raise SafetensorsError(f"{what} {exc}") from None
    except ValueError as exc:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        raise SafetensorsError(f"{what} is not valid JSON ({str(exc)[:120]})") from None


def json_text(value: Any, **kwargs: Any) -> str:
    """JSON that is valid UTF-8 whatever the paths hold.

    A file name with bytes that are not UTF-8 reaches Python as lone surrogates ('\\udce9'):
    they cannot be written as UTF-8, so such a record is written with \\u escapes, which
    `json.loads` turns back into the same str (and `os.fsencode` into the same bytes).
    """
    text = json.dumps(value, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, **kwargs)
    return text
