"""A newcomer's first hour: the demo by name from a built wheel, --version, the first-run offer to
fetch weights, and messages that point the right way (issue 13)."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from clipn_cli import __version__
from clipn_cli.weights import fetch, home
from clipn_cli.cli import firstrun
from clipn_cli.weights.fetch import Installed
from conftest import CLASSES, DIGITS_IMAGES, IMAGES, ROOT, cli, spawn


# ---------------------------------------------------------------- the demo from any install


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (the checkout stays free of build/ and egg-info)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "clipn_cli", src / "clipn_cli", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True,
    )
    assert built.returncode == 0, built.stderr
    (found,) = out.glob("clipn_cli-*.whl")
    return found


def test_wheel_ships_the_demo_and_runs_it_by_name(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "clipn_cli/data/clipn-digits.safetensors" in names and not any(n.startswith(("weights/", "tests/")) for n in names)
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    # the wheel's package, not the checkout's: PYTHONPATH is only the target, and the cwd is elsewhere
    env = {**os.environ, "PYTHONPATH": str(target), "CLIPN_HOME": str(tmp_path / "home")}
    env.pop("CLIPN_WEIGHTS", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clipn_cli", *args], capture_output=True, text=True, env=env, cwd=tmp_path)

    where = subprocess.run([sys.executable, "-c", "import clipn_cli; print(clipn_cli.__file__)"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(target)
    detect = run("detect", "--weights", "digits", "--classes", "zero,one,two,three,four", "--format", "jsonl", str(DIGITS_IMAGES / "zero-0000.png"), str(DIGITS_IMAGES / "nine-0105.png"))
    assert detect.returncode == 0, detect.stderr
    assert [r["verdict"] for r in map(json.loads, detect.stdout.splitlines())] == ["ID", "OOD"]
    path = run("weights", "path", "digits")
    assert path.returncode == 0 and Path(path.stdout.strip()) == target / "clipn_cli" / "data" / "clipn-digits.safetensors"
    assert run("weights", "default", "digits").returncode == 0
    assert run("weights", "default").stdout.strip() == path.stdout.strip()
    assert run("--version").stdout == f"clipn-cli {__version__}\n"


def test_version_and_the_demo_by_name_in_process() -> None:
    version = cli("--version")
    assert version.returncode == 0 and version.stdout == f"clipn-cli {__version__}\n"
    result = cli("detect", "--weights", "digits", "--classes", "zero,one,two,three,four", str(DIGITS_IMAGES / "one-0070.png"))
    assert result.returncode == 0 and json.loads(result.stdout)["verdict"] == "ID"


# ---------------------------------------------------------------- help and messages


def test_help_states_the_weights_order_and_flags_take_no_value() -> None:
    wide = {"COLUMNS": "400"}
    top = cli("--help", env=wide)
    assert "--version" in top.stdout and "<bool>" not in top.stdout
    for command in ("detect", "eval", "embed-classes"):
        shown = cli(command, "--help", env=wide)
        assert shown.returncode == 0 and "<bool>" not in shown.stdout, command
        text = " ".join(shown.stdout.split())
        assert "First match wins: --weights, $CLIPN_WEIGHTS, 'clipn weights default', the best official model fetched" in text
    assert "--details" in cli("detect", "--help", env=wide).stdout


def test_class_source_errors_name_only_what_the_command_takes(tiny_weights: Path) -> None:
    detect = cli("detect", "-w", str(tiny_weights), str(IMAGES / "chelsea.png"))
    assert detect.returncode == 2 and detect.stderr == "clipn: error: give exactly one of --classes, --classes-file or --embeddings\n"
    embed = cli("embed-classes", "-w", str(tiny_weights))
    assert embed.returncode == 2 and "give exactly one of --classes or a CLASSES_FILE argument" in embed.stderr
    assert "[CLASSES_FILE]" in cli("embed-classes", "--help").stdout


def test_embeddings_given_as_weights_point_to_embeddings(tiny_weights: Path, tmp_path: Path) -> None:
    heads = tmp_path / "classes.safetensors"
    assert cli("embed-classes", "--classes", CLASSES, "-w", str(tiny_weights), "--templates", "simple", "-o", str(heads)).returncode == 0
    for command in ("detect", "eval"):
        args = [command, "-w", str(heads), "--classes", CLASSES]
        args += [str(IMAGES / "chelsea.png")] if command == "detect" else ["--id", str(IMAGES / "chelsea.png"), "--ood", f"x={IMAGES / 'rocket.jpg'}"]
        result = cli(*args)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert f"{heads}: a class-embeddings file" in result.stderr and "--embeddings" in result.stderr
        assert "convert" not in result.stderr


def test_weights_default_query_answers_none_with_nothing_set() -> None:
    result = cli("weights", "default")
    assert result.returncode == 0 and result.stdout == "none\n" and "no default configured" in result.stderr


def test_no_weights_error_no_longer_sends_users_to_install_what_they_have() -> None:
    result = cli("detect", "--classes", CLASSES, str(IMAGES / "chelsea.png"))
    assert result.returncode == 2 and "no weights" in result.stderr
    assert "[drive]" not in result.stderr and "pip install" not in result.stderr
    assert "[y/N]" not in result.stderr  # not a terminal: never asked


# ---------------------------------------------------------------- the first-run offer


def fake_fetch(tiny_weights: Path, calls: list[str]):
    def fetch_weights(source: str, name: str | None = None, **kwargs: object) -> Installed:
        calls.append(source)
        target = home.target_path(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_weights, target)
        home.set_default(source)
        return Installed(source, target, home.read_header(target)["fingerprint"], "tiny", made_default=True)

    return fetch_weights


def test_the_offer_is_made_only_with_no_weights_at_all_on_a_terminal(tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert firstrun.should_offer(None, terminal=True)
    assert not firstrun.should_offer(None, terminal=False)
    assert not firstrun.should_offer(tiny_weights, terminal=True)
    monkeypatch.setenv("CLIPN_WEIGHTS", str(tiny_weights))
    assert not firstrun.should_offer(None, terminal=True)
    monkeypatch.delenv("CLIPN_WEIGHTS")
    official = home.target_path("vitb16-rep1")
    official.parent.mkdir(parents=True)
    shutil.copyfile(tiny_weights, official)
    assert not firstrun.should_offer(None, terminal=True)  # official weights present: they are used
    official.unlink()
    shutil.copyfile(tiny_weights, home.target_path("mine"))
    home.set_default("mine")
    assert not firstrun.should_offer(None, terminal=True)  # a default is set


def test_offer_says_what_where_and_how_much_and_fetches_only_on_yes(tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(fetch, "fetch_weights", fake_fetch(tiny_weights, calls))
    prompts: list[str] = []
    for answer in ("", "n\n", "no\n", "maybe\n"):
        assert firstrun.offer_fetch(lambda p, a=answer: prompts.append(p) or a) is None
    assert calls == []
    (prompt,) = set(prompts)
    assert "about 1.4 GB" in prompt and str(home.target_path("vitb16-rep2")) in prompt and prompt.endswith("[y/N] ")
    path = firstrun.offer_fetch(lambda p: "Y\n")
    assert calls == ["vitb16-rep2"] and path == home.target_path("vitb16-rep2") and path.is_file()


def test_yes_on_a_terminal_fetches_then_detects(tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(fetch, "fetch_weights", fake_fetch(tiny_weights, calls))
    monkeypatch.setattr(firstrun, "interactive", lambda: True)
    declined = cli("detect", "--classes", CLASSES, str(IMAGES / "chelsea.png"), stdin="n\n")
    assert declined.returncode == 2 and "[y/N]" in declined.stderr and "no weights" in declined.stderr and calls == []
    accepted = cli("detect", "--classes", CLASSES, "--format", "jsonl", str(IMAGES / "chelsea.png"), stdin="y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert calls == ["vitb16-rep2"] and json.loads(accepted.stdout)["path"].endswith("chelsea.png")
    again = cli("detect", "--classes", CLASSES, str(IMAGES / "chelsea.png"))
    assert again.returncode == 0 and "[y/N]" not in again.stderr and calls == ["vitb16-rep2"]  # asked once: now there are weights


def test_a_real_terminal_is_asked_and_no_declines(tmp_path: Path) -> None:
    """The process on a pseudo-terminal (stdin, stdout, stderr): the question appears, "n" ends in
    the usual no-weights error, exit 2, and nothing is downloaded."""
    env = {**os.environ, "CLIPN_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT), "COLUMNS": "300"}
    env.pop("CLIPN_WEIGHTS", None)
    leader, follower = pty.openpty()
    proc = spawn([sys.executable, "-m", "clipn_cli", "detect", "--classes", CLASSES, str(IMAGES / "chelsea.png")],
                            stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    seen = b""

    def read_until(marker: bytes | None, limit: float = 300) -> None:  # a hang guard, not a timing
        nonlocal seen
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and (marker is None or marker not in seen):
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # the process closed the terminal
                    return
                if not chunk:
                    return
                seen += chunk
            elif proc.poll() is not None and marker is not None:
                return

    try:
        read_until(b"[y/N]")
        assert b"[y/N]" in seen, seen
        os.write(leader, b"n\n")
        read_until(None)
        assert proc.wait(timeout=120) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    text = seen.decode("utf-8", "replace")
    assert "about 1.4 GB" in text and "vitb16-rep2" in text and "no weights" in text and "Traceback" not in text
    assert not (tmp_path / "home" / "downloads").exists() and not (tmp_path / "home" / "weights").exists()


# ---------------------------------------------------------------- training and recipes


def test_offline_pretrained_base_fails_fast_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipn_cli.training import base

    (tmp_path / "index.jsonl").write_text(json.dumps({"image": str(IMAGES / "chelsea.png"), "caption": "a cat"}) + "\n")
    args = ["train", "--base", "ViT-B-16", "--pretrained", "laion2b_s34b_b88k", "--data", str(tmp_path / "index.jsonl"), "--output", str(tmp_path / "o.safetensors")]
    monkeypatch.setattr(base, "_in_hub_cache", lambda repo: False)
    monkeypatch.setattr(base, "_reachable", lambda url, timeout=5.0: False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    result = cli(*args)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "not in the local cache and huggingface.co cannot be reached" in result.stderr
    monkeypatch.setattr(base, "_reachable", lambda url, timeout=5.0: pytest.fail("HF_HUB_OFFLINE set: no connection is tried"))
    result = cli(*args, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "$HF_HUB_OFFLINE is set" in result.stderr and len(result.stderr.splitlines()) == 1


def test_reachable_tells_an_open_port_from_a_closed_one() -> None:
    from clipn_cli.training.base import _reachable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert _reachable(f"http://127.0.0.1:{port}/x")
    assert not _reachable(f"http://127.0.0.1:{port}/x", timeout=2)
    assert not _reachable("not a url")


def test_digits_build_without_scikit_learn_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_build_no_sklearn", ROOT / "examples" / "digits" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn...` now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    monkeypatch.setattr(sys, "argv", ["build.py", "--export-held-out", "/nonexistent/held"])
    with pytest.raises(SystemExit) as stopped:
        build.main()
    assert str(stopped.value.code) == "build.py: the digits come from scikit-learn, which is not installed: pip install scikit-learn"


def test_a_failed_download_message_is_cut_at_a_word() -> None:
    from clipn_cli.training.base import _shortened

    long = "Failed to download file " + "word " * 60 + "\nsecond line"
    cut = _shortened(long)
    assert cut.endswith("word…") and len(cut) <= 201 and "second" not in cut
    assert _shortened("short one\nmore") == "short one"
