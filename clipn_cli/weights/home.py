"""The weights home: where fetched weights live, which models clipn knows, and the default choice.

Layout of the home (`$CLIPN_HOME`, else the platform's user cache directory + `clipn`)::

    weights/NAME.safetensors   one file per model, in clipn's safetensors format
    downloads/                 partial and unconverted downloads (resumable)
    config.json                {"default": NAME}

Nothing here imports torch: listing and resolving names stay instant. Fingerprints are read from
the safetensors header, which clipn's format fills at conversion time.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightsError
from ..files import JSONLimits, atomic_open, open_regular, parse_json, read_json

HOME_ENV = "CLIPN_HOME"
WEIGHTS_ENV = "CLIPN_WEIGHTS"
FORMAT = "clipn-cli.weights"
VOCABULARY = "vocabulary"  # metadata: JSON list of the only class names a closed-vocabulary model knows
EMBEDDINGS_FORMAT = "clipn-cli.embeddings"  # `embeddings.FORMAT`, here so that a header is told apart without torch
SUFFIX = ".safetensors"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_CONFIG_BYTES = 1 << 20  # config.json holds one name; 1 MiB is generous
CONFIG_LIMITS = JSONLimits(values=10_000, containers=1_000)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (as `safetensors_file`, which imports torch)
_DRIVE_FOLDER = "https://drive.google.com/drive/folders/"


@dataclass(frozen=True)
class KnownModel:
    """A model clipn can name without a path.

    `sha256` and `size` describe the file to download; they are None where the publisher never
    stated them (the official CLIPN checkpoints), and then only the download's own length is checked.
    """

    name: str
    description: str
    config: str  # open_clip config to convert with; "" for bundled files, already converted
    url: str | None = None
    checkpoint: str | None = None
    sha256: str | None = None
    size: int | None = None
    rank: int = 0


KNOWN: tuple[KnownModel, ...] = (
    KnownModel(
        "vitb16-rep2",
        "official ViT-B-16, repeat 2: the best (ATD AUROC 94.32)",
        "ViT-B-16", _DRIVE_FOLDER + "1eNaaPaRWz0La8_qQliX30A4I7Y44yDMY", "checkpoints/epoch_10.pt", rank=3,
    ),
    KnownModel(
        "vitb16-rep3",
        "official ViT-B-16, repeat 3 (ATD AUROC 93.42)",
        "ViT-B-16", _DRIVE_FOLDER + "1qF4Pm1JSL3P0H4losPSmvldubFj91dew", "checkpoints/epoch_10.pt", rank=2,
    ),
    KnownModel(
        "vitb16-rep1",
        "official ViT-B-16, repeat 1 (ATD AUROC 92.62)",
        "ViT-B-16", _DRIVE_FOLDER + "1CRIKr0vwrvK4Mc63zfhg2o8cbEGct4oF", "checkpoints/epoch_10.pt", rank=1,
    ),
    KnownModel("digits", "bundled demo, digit images only", ""),
)
BEST = max(KNOWN, key=lambda m: m.rank)
ALIASES = {"vitb16": "vitb16-rep2"}
BUNDLED = {"digits": Path(__file__).resolve().parents[1] / "data" / "clipn-digits.safetensors"}  # package data: in every install


@dataclass(frozen=True)
class Entry:
    """One row of `clipn weights list`: a known or registered model and whether it is here.

    `status` is present, missing, or invalid (a file that is not in clipn's format).
    """

    name: str
    path: Path
    status: str
    size: int | None
    fingerprint: str
    model_name: str
    description: str
    known: bool
    is_default: bool
    aliases: tuple[str, ...] = ()

    @property
    def present(self) -> bool:
        return self.status == "present"

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "present": self.present, "status": self.status, "default": self.is_default, "path": str(self.path),
            "size": self.size, "fingerprint": self.fingerprint, "model": self.model_name,
            "description": self.description, "known": self.known, "aliases": list(self.aliases),
        }


def weights_home() -> Path:
    """`$CLIPN_HOME`, else the user cache directory of the platform (XDG, macOS, Windows)."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "clipn"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "clipn"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipn"


def weights_dir() -> Path:
    return weights_home() / "weights"


def downloads_dir() -> Path:
    return weights_home() / "downloads"


def known_model(name: str) -> KnownModel | None:
    name = ALIASES.get(name, name)
    return next((m for m in KNOWN if m.name == name), None)


def check_name(name: str) -> str:
    """A registered name becomes a file name: refuse anything that could leave the weights dir."""
    name = ALIASES.get(name, name)
    if not _NAME.fullmatch(name) or name.endswith(SUFFIX):
        raise WeightsError(f"invalid weights name '{name}': use letters, digits, '.', '_' or '-' (at most 64)")
    return name


def target_path(name: str) -> Path:
    """Where `clipn weights fetch/add` puts weights called `name`."""
    return weights_dir() / f"{check_name(name)}{SUFFIX}"


def locate(name: str) -> Path | None:
    """The file of a registered or bundled model, or None when it is not here."""
    name = check_name(name)
    for path in (weights_dir() / f"{name}{SUFFIX}", BUNDLED.get(name)):
        if path is not None and path.is_file():
            return path
    return None


def read_config() -> dict[str, str]:
    path = weights_home() / "config.json"
    if not os.path.lexists(path):
        return {}
    try:
        data = read_json(path, MAX_CONFIG_BYTES, CONFIG_LIMITS)
    except (OSError, ValueError) as exc:  # ValueError: a FIFO, too large, too many values, not JSON or UTF-8
        raise WeightsError(f"{path}: unreadable clipn config ({str(getattr(exc, 'strerror', None) or exc)[:200]}); fix or delete it") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: unreadable clipn config (not a JSON object); fix or delete it")
    return data


def get_default() -> str | None:
    value = read_config().get("default")
    return value if isinstance(value, str) and value else None


def set_default(name: str | None) -> None:
    """Make `name` the default weights (it must be here), or clear the default with None."""
    config = read_config()
    if name is None:
        config.pop("default", None)
    else:
        name = check_name(name)
        if locate(name) is None:
            raise WeightsError(f"weights '{name}' are not here: {fix_hint(name)}")
        config["default"] = name
    with atomic_open(weights_home() / "config.json", "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)


def fix_hint(name: str) -> str:
    """The command that makes weights `name` present."""
    model = known_model(name)
    if model is not None and model.name in BUNDLED:
        return f"'{model.name}' ships inside clipn-cli but its file is missing (expected at {BUNDLED[model.name]}): reinstall clipn-cli"
    if model is not None:
        return f"run 'clipn weights fetch {model.name}'"
    return f"run 'clipn weights add FILE --name {name}' or 'clipn weights fetch URL --name {name}'"


def best_present() -> Path | None:
    """The best official weights in the home, or None."""
    for model in sorted((m for m in KNOWN if m.rank), key=lambda m: -m.rank):
        path = locate(model.name)
        if path is not None:
            return path
    return None


def current_weights() -> Path | None:
    """What `resolve_weights(None)` would load, or None when nothing would be chosen (a query's answer,
    where loading would fail with the no-weights error)."""
    if get_default() is None and not os.environ.get(WEIGHTS_ENV) and best_present() is None:
        return None
    return resolve_weights(None)


def default_weights() -> Path:
    """The weights `detect` uses without `--weights`/`$CLIPN_WEIGHTS`: the configured default,
    else the best official model present. The bundled digits demo is never chosen silently:
    it only knows digits, and would give confident nonsense for other classes."""
    name = get_default()
    if name is not None:
        path = locate(name)
        if path is None:
            raise WeightsError(
                f"the default weights '{name}' are missing from {weights_dir()}: {fix_hint(name)}, "
                "or choose others with 'clipn weights default NAME'"
            )
        return path
    best = best_present()
    if best is not None:
        return best
    demo = "; or try the bundled demo: 'clipn weights default digits'" if locate("digits") else ""
    raise WeightsError(
        f"no weights: none given with --weights or $CLIPN_WEIGHTS, no default set, no official weights in "
        f"{weights_dir()}. Fix with one of: 'clipn weights fetch vitb16' (official ViT-B-16, about 1.4 GB from "
        "Google Drive); without internet, download checkpoints/epoch_10.pt "
        f"from {BEST.url} in a browser, then 'clipn weights add epoch_10.pt --name {BEST.name} --config {BEST.config}'; "
        f"or pass --weights FILE.safetensors{demo}"
    )


def resolve_weights(weights: str | os.PathLike[str] | None = None) -> Path:
    """The weights file to load: `weights`, else `$CLIPN_WEIGHTS`, else `default_weights()`.

    A value that is not an existing file but a model name (`vitb16-rep2`, `digits`, or a name
    given to `clipn weights add`) means that model's file in the home.
    """
    chosen = str(weights or os.environ.get(WEIGHTS_ENV) or "")
    if not chosen:
        return default_weights()
    if Path(chosen).exists() or chosen.endswith(SUFFIX) or not _NAME.fullmatch(ALIASES.get(chosen, chosen)):
        return Path(chosen)
    path = locate(chosen)
    if path is not None:
        return path
    model = known_model(chosen)
    if model is not None:
        raise WeightsError(f"weights '{model.name}' are not here: {fix_hint(model.name)}")
    return Path(chosen)


def read_header(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file, read from its JSON header without loading tensors.

    Anything but a regular file with a bounded header (a FIFO in `weights/`, a header of a 24 MB
    list) has no metadata: it is listed as invalid, never waited on or parsed.
    """
    try:
        with open_regular(path) as fh:
            length = int.from_bytes(fh.read(8), "little")
            if not 2 <= length <= min(MAX_HEADER_BYTES, os.fstat(fh.fileno()).st_size - 8):
                return {}
            meta = parse_json(fh.read(length)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError):  # ValueError: a special file, not JSON, past JSONLimits
        return {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def list_weights() -> list[Entry]:
    """Known models (present or not) and every other model registered in the home."""
    default = get_default()
    rows: list[Entry] = []
    for model in KNOWN:
        path = locate(model.name)
        rows.append(_entry(model.name, path or BUNDLED.get(model.name) or target_path(model.name), model.description, True, default))
    known = {m.name for m in KNOWN}
    if weights_dir().is_dir():
        for path in sorted(weights_dir().glob(f"*{SUFFIX}")):
            name = path.name[: -len(SUFFIX)]
            if name not in known:
                meta = read_header(path)
                rows.append(_entry(name, path, meta.get("source_url") or meta.get("source_name", ""), False, default))
    return rows


def _entry(name: str, path: Path, description: str, known: bool, default: str | None) -> Entry:
    exists = path.is_file()
    meta = read_header(path) if exists else {}
    status = "missing" if not exists else "present" if meta.get("format") == FORMAT else "invalid"
    return Entry(
        name=name, path=path, status=status,
        size=path.stat().st_size if exists else None, fingerprint=meta.get("fingerprint", ""),
        model_name=meta.get("model_name", ""), description=description, known=known, is_default=name == default,
        aliases=tuple(alias for alias, target in ALIASES.items() if target == name),
    )
