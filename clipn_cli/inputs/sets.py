"""The labelled image sets of `eval`: an ID set and named OOD sets, from PATH specs.

A spec is any input kind `sources.INPUT_KINDS_HELP` lists, read by the same readers `detect` uses;
what this module adds is the sets themselves: class labels from a directory's sub-folders, OOD
names (`NAME=PATH`), and the refusals that would make a set meaningless (missing, empty).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..errors import EvaluationError
from .sources import GLOB_CHARS, IMAGE_EXTENSIONS, InputItem, iter_inputs, iter_table
from .tables import TableError, is_table

ID_SET = "ID"
AVERAGE = "average"  # the name of the metrics averaged over OOD sets: no set may take it
STDIN = "-"


@dataclass
class ImageSet:
    """Images of one set; `labels` holds each image's class folder where the layout gives one."""

    name: str
    role: str  # "id" or "ood"
    items: list[InputItem] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)


def parse_ood_spec(spec: str) -> tuple[str, str]:
    """`NAME=PATH` → (NAME, PATH); a bare PATH is named after its last component."""
    name, sep, path = spec.partition("=")
    if sep and name and not os.path.exists(spec) and os.sep not in name and "/" not in name:
        return name, path
    stem = Path(spec.rstrip("/\\")).stem or spec
    return stem, spec


def group_ood_specs(specs: Iterable[str]) -> dict[str, list[str]]:
    """`NAME=PATH` strings → {NAME: [PATH, ...]} in first-seen order (a repeated NAME merges paths)."""
    grouped: dict[str, list[str]] = {}
    for spec in specs:
        name, path = parse_ood_spec(spec)
        grouped.setdefault(name, []).append(path)
    return grouped


def collect(spec: str, stdin: IO[str] | IO[bytes] | None = None) -> tuple[list[InputItem], list[str | None]]:
    """The images a PATH spec names, with their class folder when `spec` is a directory."""
    if os.path.isdir(spec):
        # keep an unlistable sub-folder's error item (it is reported as unreadable), not "no image files"
        items = [item for item in iter_inputs([spec]) if not (item.error and item.path == spec)]
        labels = [_class_folder(spec, item.path) for item in items]
    elif is_table(spec):
        try:
            items = list(iter_table(spec))
        except TableError as exc:
            raise EvaluationError(str(exc)) from None
        labels = [None] * len(items)
    elif spec == STDIN or os.path.isfile(spec) or GLOB_CHARS & set(spec):
        items = list(iter_inputs([spec], stdin))
        if len(items) == 1 and items[0].error:
            raise EvaluationError(f"{spec}: {items[0].error}")
        labels = [None] * len(items)
    else:
        raise EvaluationError(f"{spec}: no such file or directory")
    if not items:
        raise EvaluationError(f"{spec}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS)[:6])}, ...)")
    return items, labels


def _class_folder(root: str, path: str) -> str | None:
    parts = Path(os.path.relpath(path, root)).parts
    return parts[0] if len(parts) > 1 else None


def collect_sets(
    id_specs: str | Sequence[str], ood_specs: Mapping[str, str | Sequence[str]], stdin: IO[str] | IO[bytes] | None = None,
) -> list[ImageSet]:
    """The ID set (all `id_specs` together) followed by one set per OOD name; `-` reads paths from `stdin`."""
    id_specs = [id_specs] if isinstance(id_specs, str) else list(id_specs)
    if not id_specs:
        raise EvaluationError("no ID images: give at least one --id PATH")
    if not ood_specs:
        raise EvaluationError("no OOD images: give at least one --ood NAME=PATH")
    for name in ood_specs:
        if name.lower() in (AVERAGE, ID_SET.lower()):
            raise EvaluationError(f"OOD set name '{name}' is reserved ('{AVERAGE}' and '{ID_SET}' name the average and the ID set); choose another")
    ood_lists = {name: [specs] if isinstance(specs, str) else list(specs) for name, specs in ood_specs.items()}
    if [*id_specs, *(s for specs in ood_lists.values() for s in specs)].count(STDIN) > 1:
        raise EvaluationError("- (paths on stdin) can name one set only: stdin is read once")
    sets = [ImageSet(ID_SET, "id")]
    # one --id folder per class (`--id d/cat --id d/dog`): each folder's name labels its images
    per_class = len(id_specs) > 1 and all(os.path.isdir(spec) for spec in id_specs)
    for spec in id_specs:
        items, labels = collect(spec, stdin)
        if per_class:
            labels = [label if label is not None else Path(os.path.abspath(spec)).name for label in labels]
        sets[0].items += items
        sets[0].labels += labels
    for name, specs in ood_lists.items():
        ood = ImageSet(name, "ood")
        for spec in specs:
            items, _ = collect(spec, stdin)
            ood.items += items
            ood.labels += [None] * len(items)
        sets.append(ood)
    return sets
