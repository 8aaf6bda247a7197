"""Prompt template sets: the official 128 CLIPN templates, a single simple one, or a user file.

Both text towers always get the same positive text; negation comes from the learned "no"
prompt, never from "no"/"without" wording (the mistake behind CLIPN issue #7).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import TemplatesError
from ..files import decode_utf8, parse_json, read_bounded

SIMPLE = ("a photo of a {}.",)
MAX_TEMPLATE_FILE_BYTES = 16 << 20


@dataclass(frozen=True)
class TemplateSet:
    """A named list of templates, each with one `{}` for the class name."""

    name: str
    templates: tuple[str, ...]

    @property
    def sha256(self) -> str:
        """Hash of the exact template strings, recorded with embeddings made from them."""
        return hashlib.sha256(json.dumps(list(self.templates), ensure_ascii=False).encode()).hexdigest()

    def texts(self, classname: str) -> list[str]:
        # str.format, like the official code: `{}` is the only placeholder a template may hold
        return [t.format(classname) for t in self.templates]


def clipn_templates() -> TemplateSet:
    """The 128 templates of the official inference, literal quotes and trailing commas included."""
    data = resources.files("clipn_cli").joinpath("data/templates_clipn.json").read_text(encoding="utf-8")
    return TemplateSet("clipn", tuple(parse_json(data)))  # package data, read like any JSON


def load_templates(spec: str = "clipn") -> TemplateSet:
    """`clipn` (default), `simple`, or a UTF-8 file with one template per line."""
    if spec == "clipn":
        return clipn_templates()
    if spec == "simple":
        return TemplateSet("simple", SIMPLE)
    path = Path(spec)
    if not os.path.lexists(path):  # a FIFO or device is named by the read below, not taken for a set's name
        raise TemplatesError(f"unknown template set '{spec}': use 'clipn', 'simple' or a file with one template per line")
    try:
        lines = decode_utf8(read_bounded(path, MAX_TEMPLATE_FILE_BYTES)).splitlines()
    except (OSError, ValueError) as exc:  # UnicodeTextError (offset and line in the file) is a ValueError
        raise TemplatesError(f"{path}: cannot read templates: {exc}") from None
    templates = [line.rstrip("\r") for line in lines if line.strip()]
    if not templates:
        raise TemplatesError(f"{path}: no templates in file")
    for number, template in enumerate(templates, 1):
        if template.count("{}") != 1 or _has_other_fields(template):
            raise TemplatesError(f"{path}: template {number} must contain exactly one '{{}}': {template!r}")
    return TemplateSet(path.name, tuple(templates))


def _has_other_fields(template: str) -> bool:
    """True if str.format would fail or substitute anything besides the one `{}`."""
    try:
        return template.format("X") != template.replace("{}", "X")
    except (IndexError, KeyError, ValueError):
        return True
