"""The feature cache: keys follow file identity, damaged entries are rebuilt, hits skip decoding."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import GROUPING_COSINE

from clipn_cli.model.feature_cache import FeatureCache
from clipn_cli.errors import CacheError
from clipn_cli.inputs.decode import LoadedImage
from clipn_cli.inputs.sources import InputItem
from clipn_cli.model.encode import encode_images

FINGERPRINT = "ab" * 32


@pytest.fixture
def photos(tmp_path: Path, images_dir: Path) -> list[Path]:
    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["chelsea.png", "rocket.jpg", "coffee.png"]
    for name in names:
        shutil.copy(images_dir / name, folder / name)
    return [folder / name for name in names]


def entry_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.feat"))


def test_roundtrip_and_identity(tmp_path: Path, photos: list[Path]) -> None:
    cache = FeatureCache(tmp_path / "cache", FINGERPRINT)
    key = cache.key(str(photos[0]))
    feature = torch.randn(512)
    assert cache.get(key) is None
    cache.put(key, feature)
    assert torch.equal(cache.get(key), feature)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.written) == (1, 1, 1)
    assert entry_files(tmp_path / "cache")[0].parent.parent.name == FINGERPRINT[:16]
    assert not list((tmp_path / "cache").rglob("*.part"))
    # same file through another path spelling: same key; other variant or weights: other entry
    assert cache.key(str(photos[0].parent / ".." / "photos" / photos[0].name)) == key
    assert cache.key(str(photos[0]), "precision=fp16") != key
    assert FeatureCache(tmp_path / "cache", "cd" * 32).get(key) is None
    # a new mtime or size is a new identity
    st = photos[0].stat()
    os.utime(photos[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert cache.key(str(photos[0])) != key
    assert cache.key(str(tmp_path / "missing.png")) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "magic"])
def test_damaged_entries_are_ignored(tmp_path: Path, photos: list[Path], damage: str) -> None:
    cache = FeatureCache(tmp_path / "cache", FINGERPRINT)
    key = cache.key(str(photos[0]))
    cache.put(key, torch.randn(512))
    entry = entry_files(tmp_path / "cache")[0]
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x40
    elif damage == "truncate":
        data = data[:-2]
    elif damage == "empty":
        data = bytearray()
    else:
        data[0:4] = b"XXXX"
    entry.write_bytes(bytes(data))
    assert cache.get(key) is None
    assert cache.stats.corrupt == 1


def test_unusable_cache_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match="cannot create the feature cache"):
        FeatureCache(blocker, FINGERPRINT)


def run(model, paths: list[Path], cache: FeatureCache) -> tuple[list, list[str]]:
    decoded: list[str] = []

    def on_loaded(image: LoadedImage) -> None:
        decoded.append(Path(image.path).name)

    items = [InputItem(str(p)) for p in paths]
    return list(encode_images(model, items, batch_size=2, cache=cache, on_loaded=on_loaded)), decoded


def test_encode_images_with_cache(tiny_model, tmp_path: Path, photos: list[Path]) -> None:
    root = tmp_path / "cache"
    plain = list(encode_images(tiny_model, [InputItem(str(p)) for p in photos], batch_size=2))
    first, decoded = run(tiny_model, photos, FeatureCache(root, FINGERPRINT))
    assert decoded == [p.name for p in photos]
    assert len(entry_files(root)) == 3
    for a, b in zip(plain, first):
        assert a.path == b.path and torch.equal(a.feature, b.feature)

    cache = FeatureCache(root, FINGERPRINT)
    second, decoded = run(tiny_model, photos, cache)
    assert decoded == []  # nothing decoded, nothing encoded
    assert (cache.stats.hits, cache.stats.written) == (3, 0)
    for a, b in zip(first, second):
        assert a.path == b.path and torch.equal(a.feature, b.feature)

    # a changed file is encoded again; a damaged entry is rebuilt; the rest come from the cache
    st = photos[1].stat()
    os.utime(photos[1], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    damaged_key = cache.key(str(photos[2]), "precision=fp32;exif_transpose=False")
    damaged = root / FINGERPRINT[:16] / damaged_key[:2] / f"{damaged_key}.feat"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x00")
    cache = FeatureCache(root, FINGERPRINT)
    third, decoded = run(tiny_model, photos, cache)
    assert decoded == [photos[1].name, photos[2].name]
    assert (cache.stats.hits, cache.stats.corrupt, cache.stats.written) == (1, 1, 2)
    for a, b in zip(first, third):
        # p1 and p2 now share a batch (p0 was a hit): batch composition changes the last float32 bits (README: Reproducibility)
        torch.testing.assert_close(a.feature, b.feature, rtol=0, atol=GROUPING_COSINE)
    assert FeatureCache(root, FINGERPRINT).get(damaged_key) is not None  # rewritten, valid again


def test_errors_keep_their_place_and_are_not_cached(tiny_model, tmp_path: Path, photos: list[Path]) -> None:
    bad = tmp_path / "photos" / "bad.png"
    bad.write_bytes(b"not an image")
    paths = [photos[0], bad, tmp_path / "missing.png", photos[1]]
    cache = FeatureCache(tmp_path / "cache", FINGERPRINT)
    results, _ = run(tiny_model, paths, cache)
    assert [r.path for r in results] == [str(p) for p in paths]
    assert [r.error is None for r in results] == [True, False, False, True]
    assert len(entry_files(tmp_path / "cache")) == 2
