"""Depth-limited JSON for untrusted files (headers, manifests, configs), without torch: the manifest
of a Ray output folder is read before a command has imported it."""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_DEPTH = 32  # deeper than any config or list clipn writes; a hostile file nests 100,000 deep


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file; the message says what is wrong (without the path)."""


def loads_json(text: str | bytes, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` for untrusted text: bad JSON or nesting deeper than `max_depth` is a SafetensorsError.

    Python's parser raises RecursionError somewhere near 1000 levels, and code walking a parsed
    value recursively fails near the same depth: a small, fixed limit avoids both.
    """
    try:
        value = json.loads(text)
    except RecursionError:
        raise SafetensorsError(f"{what} is nested too deeply (limit {max_depth} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SafetensorsError(f"{what} is not valid JSON ({str(exc)[:120]})") from None
    if json_depth(value) > max_depth:
        raise SafetensorsError(f"{what} is nested too deeply (limit {max_depth} levels)")
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, computed without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
