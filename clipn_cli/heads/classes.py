"""Class names from a comma list or a text file, with the warnings a user needs to see."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..errors import ClassesError
from ..files import UnicodeTextError, decode_utf8, read_bounded

MAX_CLASS_FILE_BYTES = 16 << 20  # 16 MiB: a million class names; a class file is a regular file of at most this size


def parse_class_list(text: str) -> list[str]:
    """`cow,cat,fish` → names; surrounding whitespace stripped, empty items dropped."""
    names = [item.strip() for item in text.split(",")]
    names = [n for n in names if n]
    if not names:
        raise ClassesError("--classes: no class names given")
    return names


def read_class_file(path: str | Path) -> list[str]:
    """One class per line (UTF-8); blank lines and `#` comments ignored, whitespace stripped.

    The file must be a regular file of at most `MAX_CLASS_FILE_BYTES` (not a device or a pipe).
    """
    path = Path(path)
    try:
        raw = read_bounded(path, MAX_CLASS_FILE_BYTES)
    except OSError as exc:
        raise ClassesError(f"{path}: cannot read class file: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ClassesError(f"{path}: cannot read class file: {exc}") from None
    try:
        text = decode_utf8(raw)
    except UnicodeTextError as exc:
        raise ClassesError(f"{path}: not UTF-8 (byte {exc.offset}, line {exc.line}); save the class file as UTF-8") from None
    names = [line.strip() for line in text.splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise ClassesError(f"{path}: no class names (only blank lines or comments)")
    return names


def class_warnings(names: list[str]) -> list[str]:
    """Things that are legal but probably not what the user meant."""
    warnings = []
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes:
        shown = ", ".join(dupes[:5]) + (" …" if len(dupes) > 5 else "")
        warnings.append(f"duplicate class names kept (indices follow your list): {shown}")
    if len(names) == 1:
        warnings.append("a single class: ATD equals CTW (the class softmax is 1), both rules give the same verdict")
    return warnings


def vocabulary_warning(names: list[str], vocabulary: tuple[str, ...] | None, weights: str) -> str | None:
    """One line when classes fall outside the closed vocabulary the weights were trained on.

    Such a model (the `digits` demo knows ten digit names) still gives every image a confident
    verdict for any class name: its scores for names it never saw mean nothing. Names match
    ignoring case and surrounding spaces.
    """
    if vocabulary is None:
        return None
    known = {n.strip().casefold() for n in vocabulary}
    outside = list(dict.fromkeys(n for n in names if n.strip().casefold() not in known))
    if not outside:
        return None
    shown = ", ".join(repr(n) for n in outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
    listed = ", ".join(vocabulary[:10]) + (" …" if len(vocabulary) > 10 else "")
    return (f"{weights} was trained on {len(vocabulary)} class names only ({listed}); {shown} "
            f"{'is' if len(outside) == 1 else 'are'} outside them: verdicts for such classes mean nothing")
