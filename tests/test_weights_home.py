"""The weights home: where it is, what `clipn weights list/path/add/default` show and do, and
which weights `detect` picks when --weights and $CLIPN_WEIGHTS are absent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_CHECKPOINT, TINY_CONFIG, cli
from rich.console import Console

from clipn_cli.weights import home
from clipn_cli.cli.weights import download_progress
from clipn_cli.errors import WeightsError
from clipn_cli.weights.home import resolve_weights


def place(tiny_weights: Path, name: str) -> Path:
    """Put already-converted weights into the home under `name`, as fetch/add would."""
    target = home.weights_dir() / f"{name}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tiny_weights, target)
    return target


@pytest.mark.parametrize(
    ("platform", "env", "expected"),
    [
        ("linux", {"XDG_CACHE_HOME": "/xdg"}, "/xdg/clipn"),
        ("linux", {}, "~/.cache/clipn"),
        ("darwin", {}, "~/Library/Caches/clipn"),
        ("win32", {"LOCALAPPDATA": "/appdata"}, "/appdata/clipn"),
    ],
)
def test_home_is_the_platform_cache_dir_without_clipn_home(monkeypatch: pytest.MonkeyPatch, platform: str, env: dict, expected: str) -> None:
    monkeypatch.delenv("CLIPN_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr("sys.platform", platform)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert home.weights_home() == Path(expected).expanduser()


def test_clipn_home_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLIPN_HOME", str(tmp_path / "h"))
    assert home.weights_dir() == tmp_path / "h" / "weights"


def test_no_weights_error_lists_the_commands_that_fix_it() -> None:
    with pytest.raises(WeightsError) as err:
        resolve_weights(None)
    message = str(err.value)
    assert "'clipn weights fetch vitb16'" in message
    assert "'clipn weights add epoch_10.pt --name vitb16-rep2 --config ViT-B-16'" in message
    assert "drive.google.com/drive/folders/1eNaaPaRWz0La8_qQliX30A4I7Y44yDMY" in message
    assert str(home.weights_dir()) in message
    out = cli("detect", "--classes", "cat,dog", "x.png")
    assert out.returncode == 2 and "clipn weights fetch vitb16" in out.stderr and "Traceback" not in out.stderr


def test_resolution_order(monkeypatch: pytest.MonkeyPatch, tiny_weights: Path) -> None:
    rep1, rep3, mine = (place(tiny_weights, n) for n in ("vitb16-rep1", "vitb16-rep3", "mine"))
    assert resolve_weights(None) == rep3  # best official present (repeat 2 is absent)
    home.set_default("mine")
    assert resolve_weights(None) == mine  # the configured default beats the ranking
    monkeypatch.setenv("CLIPN_WEIGHTS", "vitb16-rep1")
    assert resolve_weights(None) == rep1  # $CLIPN_WEIGHTS, here a name, beats the default
    assert resolve_weights(tiny_weights) == tiny_weights  # --weights beats everything
    assert home.resolve_weights("mine") == mine and resolve_weights("vitb16-rep3") == rep3
    with pytest.raises(WeightsError, match="'vitb16-rep2' are not here: run 'clipn weights fetch vitb16-rep2'"):
        resolve_weights("vitb16")
    monkeypatch.delenv("CLIPN_WEIGHTS")
    mine.unlink()
    with pytest.raises(WeightsError, match="default weights 'mine' are missing"):
        resolve_weights(None)
    home.set_default(None)
    assert resolve_weights(None) == rep3


def test_bundled_digits_demo_is_listed_but_never_chosen_silently(monkeypatch: pytest.MonkeyPatch, tiny_weights: Path, tmp_path: Path) -> None:
    monkeypatch.setitem(home.BUNDLED, "digits", tmp_path / "absent.safetensors")
    row = next(e for e in home.list_weights() if e.name == "digits")
    assert row.status == "missing"
    out = cli("weights", "path", "digits")
    assert out.returncode == 2 and "ships inside clipn-cli but its file is missing" in out.stderr

    monkeypatch.setitem(home.BUNDLED, "digits", tiny_weights)
    row = next(e for e in home.list_weights() if e.name == "digits")
    assert row.present and row.size == tiny_weights.stat().st_size and len(row.fingerprint) == 64
    with pytest.raises(WeightsError, match="clipn weights default digits"):
        resolve_weights(None)
    assert cli("weights", "default", "digits").returncode == 0
    assert resolve_weights(None) == tiny_weights


def test_add_converts_a_checkpoint_and_makes_the_first_weights_default(tiny_weights: Path) -> None:
    out = cli("weights", "add", OFFICIAL_CHECKPOINT, "--name", "tiny", "--config", TINY_CONFIG)
    assert out.returncode == 0, out.stderr
    assert "now the default" in out.stderr and home.get_default() == "tiny"
    stored = home.weights_dir() / "tiny.safetensors"
    assert home.read_header(stored)["fingerprint"] == home.read_header(tiny_weights)["fingerprint"]
    path = cli("weights", "path", "tiny")
    assert path.returncode == 0 and path.stdout.strip() == str(stored)
    assert cli("weights", "path").stdout.strip() == str(stored)

    second = cli("weights", "add", tiny_weights, "--name", "copy")
    assert second.returncode == 0 and "now the default" not in second.stderr
    assert (home.weights_dir() / "copy.safetensors").read_bytes() == tiny_weights.read_bytes()

    listed = json.loads(cli("weights", "list", "--format", "json").stdout)
    rows = {r["name"]: r for r in listed["weights"]}
    assert listed["home"] == str(home.weights_home()) and listed["default"] == "tiny"
    assert [n for n in rows if rows[n]["known"]] == ["vitb16-rep2", "vitb16-rep3", "vitb16-rep1", "digits"]
    assert rows["tiny"]["present"] and rows["tiny"]["default"] and not rows["copy"]["default"]
    assert rows["copy"]["fingerprint"] == rows["tiny"]["fingerprint"] and rows["vitb16-rep2"]["status"] == "missing"
    table = cli("weights", "list")
    assert table.returncode == 0 and "tiny" in table.stdout and "vitb16-rep2" in table.stdout


def test_official_weights_present_are_not_overridden_by_a_later_add(tiny_weights: Path) -> None:
    place(tiny_weights, "vitb16-rep2")
    assert cli("weights", "add", tiny_weights, "--name", "other").returncode == 0
    assert home.get_default() is None and resolve_weights(None).name == "vitb16-rep2.safetensors"


def test_add_refuses_bad_files_and_names_and_places_nothing(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    out = cli("weights", "add", junk)
    assert out.returncode == 2 and "junk.pt" in out.stderr and "Traceback" not in out.stderr
    for bad in ("../evil", ""):
        out = cli("weights", "add", OFFICIAL_CHECKPOINT, "--name", bad)
        assert out.returncode == 2 and f"invalid weights name '{bad}'" in out.stderr
    out = cli("weights", "add", OFFICIAL_CHECKPOINT, "--name", "nocfg")
    assert out.returncode == 2 and "--config" in out.stderr
    assert not home.weights_dir().exists() or list(home.weights_dir().iterdir()) == []


def test_default_command_sets_shows_and_unsets(tiny_weights: Path) -> None:
    target = place(tiny_weights, "a")
    assert cli("weights", "default", "missing-one").returncode == 2
    assert cli("weights", "default", "a").returncode == 0
    shown = cli("weights", "default")
    assert shown.returncode == 0 and shown.stdout.strip() == str(target) and "configured default: a" in shown.stderr
    assert cli("weights", "default", "--unset").returncode == 0 and home.get_default() is None


def test_download_bar_renders_on_a_terminal_only() -> None:
    console = Console(force_terminal=True, width=100, record=True)
    with download_progress(console) as update:
        assert update is not None
        for done in (0, 500_000, 1_000_000):
            update(done, 1_000_000)
    assert "1.0/1.0 MB" in console.export_text()
    with download_progress(Console(force_terminal=False)) as update:
        assert update is None
