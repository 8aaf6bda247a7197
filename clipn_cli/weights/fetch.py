"""Getting weights into the home: downloads (HTTP in `http.py`, Google Drive through gdown),
conversion, atomic placement.

A fetch never leaves a file that looks valid unless it is: the finished download is checked
(length, sha256 where known), converted to clipn's safetensors format, and only then renamed
into `weights/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ..errors import ClipnError, ConfigError, FetchError
from ..files import atomic_path, sha256_file
from .home import (
    BUNDLED,
    FORMAT,
    KNOWN,
    check_name,
    downloads_dir,
    fix_hint,
    get_default,
    known_model,
    locate,
    read_header,
    set_default,
    target_path,
)
from .http import Download, Progress, _check_hex, _discard, _partial_files, download


_DRIVE_HOSTS = {"drive.google.com", "docs.google.com", "drive.usercontent.google.com"}


@dataclass(frozen=True)
class Installed:
    """Weights placed in the home by `fetch_weights` or `add_weights`."""

    name: str
    path: Path
    fingerprint: str
    model_name: str
    already_present: bool = False
    made_default: bool = False
    download: Download | None = None
    bundled: bool = False  # ships with the package: nothing to download, ever


def is_drive_url(url: str) -> bool:
    return urllib.parse.urlparse(url).hostname in _DRIVE_HOSTS


def download_drive(url: str, dest: Path, name: str, checkpoint: str | None, progress: Progress | None = None) -> Path:
    """A Google Drive file or folder via gdown (a dependency): gdown handles Drive's
    confirmation pages, cookies and resuming, which a plain HTTP client gets wrong. From a folder
    the file at `checkpoint` is taken, else the checkpoint with the highest epoch."""
    try:
        import gdown
    except ImportError:
        raise FetchError(
            f"gdown, a dependency of clipn-cli, is missing from this Python environment (reinstall clipn-cli); {_by_hand_drive(url, name, checkpoint)}"
        ) from None
    try:
        if "/folders/" in url:
            listing = gdown.download_folder(url=url, skip_download=True, quiet=True)
            file_id = pick_checkpoint([(f.id, f.path) for f in listing], checkpoint, url)
            url = f"https://drive.google.com/uc?id={file_id}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        gdown.download(url=url, output=str(dest), resume=True, quiet=True, progress=progress)
    except FetchError:
        raise
    except OSError as exc:  # requests' connection errors are OSErrors
        raise FetchError(f"cannot reach Google Drive ({type(exc).__name__}); {_by_hand_drive(url, name, checkpoint)}") from None
    except Exception as exc:  # gdown raises many types (quota, permissions, page layout); each becomes one line
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FetchError(f"Google Drive download failed ({first}); {_by_hand_drive(url, name, checkpoint)}") from None
    return dest


def pick_checkpoint(files: list[tuple[str, str]], wanted: str | None, url: str) -> str:
    """The Drive id of `wanted` among (id, path-in-folder) pairs, else of the latest `epoch_N.pt`."""
    if wanted is not None:
        for file_id, path in files:
            if path.replace("\\", "/") == wanted:
                return file_id
    epochs = [(int(m.group(1)), file_id) for file_id, path in files if (m := re.search(r"epoch_(\d+)\.pt$", path))]
    if not epochs:
        raise FetchError(f"{url}: no {wanted or 'epoch_N.pt checkpoint'} in this Google Drive folder")
    return max(epochs)[1]


def _by_hand_drive(url: str, name: str, checkpoint: str | None) -> str:
    file = Path(checkpoint).name if checkpoint else "FILE.pt"
    return (
        f"or by hand: download {checkpoint or 'the checkpoint (.pt)'} from {url} in a browser, "
        f"then run 'clipn weights add {file} --name {name}'"
    )


@dataclass(frozen=True)
class _Plan:
    """What one fetch downloads, and under which name and architecture it is stored."""

    name: str
    url: str
    config: str | None
    sha256: str | None
    size: int | None
    checkpoint: str | None


def _plan(source: str, name: str | None, sha256: str | None, config: str | None) -> _Plan:
    """A known name or a URL → what to download; a URL of a known model counts as that model."""
    model = known_model(source)
    if model is None and urllib.parse.urlparse(source).scheme not in ("http", "https"):
        names = ", ".join(m.name for m in KNOWN)
        raise FetchError(f"unknown weights '{source}': give one of {names}, or an http(s) URL")
    url = model.url if model is not None and model.url else source
    model = model or next((m for m in KNOWN if m.url == url), None)
    if name is None and model is None and is_drive_url(url):
        raise FetchError(f"{url}: give the weights a name with --name")
    name = check_name(name if name is not None else (model.name if model is not None else _stem(url)))
    known = known_model(name)
    return _Plan(
        name=name,
        url=url,
        config=config,
        sha256=_check_hex(sha256) or (known.sha256 if known is not None else None),
        size=known.size if known is not None else None,
        checkpoint=known.checkpoint if known is not None else None,
    )


def _stem(url: str) -> str:
    """A default name from a URL's file name: `.../epoch_10.pt` → `epoch_10`."""
    base = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", base.split(".")[0]).strip("-._")
    if not stem:
        raise FetchError(f"{url}: cannot derive a name from this URL; give one with --name")
    return stem[:64]


def fetch_weights(
    source: str,
    name: str | None = None,
    *,
    sha256: str | None = None,
    config: str | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> Installed:
    """A known model name or an http(s)/Google Drive URL → verified, converted weights in the home.

    A complete download whose conversion fails (e.g. it needs `config`) is kept, so the next
    attempt converts it without downloading again.
    """
    model = known_model(source)
    if model is not None and model.name in BUNDLED:
        path = locate(model.name)
        if path is None:
            raise FetchError(f"nothing to fetch for '{model.name}': {fix_hint(model.name)}")
        return dataclasses.replace(_describe(model.name, path, already_present=True), bundled=True)
    plan = _plan(source, name, sha256, config)
    present = locate(plan.name)
    if present is not None and not force:
        return _describe(plan.name, present, already_present=True)
    key = hashlib.sha256(plan.url.encode()).hexdigest()[:10]
    dest = downloads_dir() / f"{plan.name}-{key}{Path(plan.checkpoint or urllib.parse.urlparse(plan.url).path).suffix}"
    if force:  # a download kept from an earlier attempt is not trusted either
        _discard(dest, *_partial_files(dest))
    if is_drive_url(plan.url):
        download_drive(plan.url, dest, plan.name, plan.checkpoint, progress)
        result = _verify_local(dest, plan.sha256, plan.size)
    else:
        result = download(plan.url, dest, sha256=plan.sha256, size=plan.size, progress=progress)
    try:
        installed = _install(result.path, plan.name, plan.config, {"source_url": plan.url}, move=True)
    except ClipnError as exc:
        raise FetchError(
            f"{exc}; the download is kept at {result.path}: rerun with --config NAME|FILE.json, "
            f"or run 'clipn weights add {result.path} --name {plan.name} --config NAME|FILE.json'"
        ) from None
    result.path.unlink(missing_ok=True)
    return dataclasses.replace(installed, download=result)


def _verify_local(path: Path, sha256: str | None, size: int | None) -> Download:
    """Length and sha256 checks for a file another downloader finished; a mismatch deletes it."""
    actual, digest = path.stat().st_size, sha256_file(path)
    if (size is not None and actual != size) or (sha256 is not None and digest != sha256):
        path.unlink()
        raise FetchError(f"{path.name}: size or sha256 mismatch (got {actual} bytes, sha256 {digest}): the download was deleted")
    return Download(path, actual, digest, 0, actual)


def add_weights(file: str | os.PathLike[str], name: str | None = None, config: str | None = None) -> Installed:
    """Register a local `.pt` checkpoint (converted) or clipn `.safetensors` (checked, copied)."""
    file = Path(file)
    if not file.is_file():
        raise FetchError(f"{file}: no such file")
    return _install(file, check_name(name if name is not None else _stem(file.name)), config, {}, move=False)


def _install(src: Path, name: str, config: str | None, metadata: dict[str, str], move: bool) -> Installed:
    """Convert or check `src` and place it at the name's path atomically."""
    from .checkpoints import convert_checkpoint, load_model

    target = target_path(name)
    if read_header(src).get("format") == FORMAT:
        load_model(src)  # strict: every tensor present, right shape, finite
        if move:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target)
        else:
            with atomic_path(target) as tmp:
                shutil.copyfile(src, tmp)
    else:
        known = known_model(name)
        default_config = known.config if known is not None and known.config else None
        try:
            convert_checkpoint(src, target, config=config or default_config, extra_metadata=metadata)
        except ConfigError as exc:
            raise ConfigError(f"{src}: {exc}") from None
    return _describe(name, target, made_default=_default_if_none(name))


def _default_if_none(name: str) -> bool:
    """The first weights in a home without a default become it, unless an official model is
    present (the default rule then picks the best official one by itself)."""
    if get_default() is not None or any(locate(m.name) for m in KNOWN if m.url):
        return False
    set_default(name)
    return True


def _describe(name: str, path: Path, already_present: bool = False, made_default: bool = False) -> Installed:
    meta = read_header(path)
    return Installed(name, path, meta.get("fingerprint", ""), meta.get("model_name", ""), already_present, made_default)
