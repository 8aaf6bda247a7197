"""Closed vocabularies: recorded by `clipn train`, shipped with the digits demo, warned about once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipn_cli.heads.classes import vocabulary_warning
from clipn_cli.errors import WeightsError
from clipn_cli.weights.checkpoints import read_info
from clipn_cli.weights.format import fingerprint
from conftest import DIGITS_IMAGES, DIGITS_WEIGHTS, cli

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WARNING = "was trained on 10 class names only"


def test_warning_names_the_classes_outside_and_ignores_case() -> None:
    assert vocabulary_warning(["Zero", " one ", "nine"], NAMES, "d.safetensors") is None
    assert vocabulary_warning(["cat", "dog"], None, "open.safetensors") is None  # open vocabulary: never
    message = vocabulary_warning(["zero", "cat", "astronaut", "coffee", "horse", "rocket", "cat"], NAMES, "d.safetensors")
    assert message is not None and "\n" not in message
    assert message.startswith("d.safetensors was trained on 10 class names only (zero, one, two")
    assert "'cat', 'astronaut', 'coffee' and 2 more are outside them" in message


def test_the_demo_weights_carry_their_vocabulary_and_unchanged_tensors() -> None:
    from safetensors.torch import load_file

    info = read_info(DIGITS_WEIGHTS)
    assert info.vocabulary == NAMES
    # the fingerprint recorded when the demo was trained still matches its tensors: only metadata was added
    assert info.fingerprint == fingerprint(load_file(str(DIGITS_WEIGHTS))) == "3f3da6740e38bf3cf251379bf820d43dfb00a3a2ee4d6c5b90554606905b5731"


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if WARNING in line]


def test_every_command_warns_once_about_classes_outside_the_vocabulary(tmp_path: Path) -> None:
    image = str(DIGITS_IMAGES / "one-0070.png")
    outside = ("--weights", "digits", "-c", "cat,astronaut,coffee,horse,rocket")
    result = cli("detect", image, *outside, "-f", "jsonl")
    assert result.returncode == 0, result.stderr
    [line] = _warnings(result.stderr)
    assert line.startswith("clipn: warning: clipn-digits.safetensors was trained on 10 class names only") and "'cat'" in line
    embeddings = tmp_path / "e.safetensors"
    result = cli("embed-classes", *outside, "-o", str(embeddings))
    assert result.returncode == 0, result.stderr
    assert len(_warnings(result.stderr)) == 1
    result = cli("detect", image, "--weights", "digits", "-e", str(embeddings), "-f", "jsonl")
    assert result.returncode == 0, result.stderr
    assert len(_warnings(result.stderr)) == 1
    result = cli("eval", *outside, "--id", str(DIGITS_IMAGES / "one-0070.png"), "--ood", f"x={DIGITS_IMAGES / 'nine-0105.png'}", "-f", "json")
    assert result.returncode == 0, result.stderr
    assert len(_warnings(result.stderr)) == 1


def test_no_warning_inside_the_vocabulary() -> None:
    result = cli("detect", str(DIGITS_IMAGES), "--weights", "digits", "-c", "zero,One,two,three,four", "-f", "jsonl")
    assert result.returncode == 0, result.stderr
    assert _warnings(result.stderr) == [] and "warning" not in result.stderr
    assert len(result.stdout.splitlines()) == 20


def test_damaged_vocabulary_metadata_is_one_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(DIGITS_WEIGHTS), "pt") as fh:
        meta = fh.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(DIGITS_WEIGHTS)), str(bad), metadata={**meta, "vocabulary": json.dumps(["zero", 1])})
    with pytest.raises(WeightsError, match=r"bad.safetensors: damaged metadata \(vocabulary is not a list"):
        read_info(bad)


# ---------------------------------------------------------------- clipn train


def test_train_records_the_vocabulary_and_keeps_a_bases(captioned_squares: Path, tmp_path: Path) -> None:
    common = ("--data", str(captioned_squares / "index.jsonl"), "--steps", "1", "--batch-size", "4", "--device", "cpu", "--workers", "1")
    first = tmp_path / "first.safetensors"
    result = cli("train", "--base", str(captioned_squares / "clip.pt"), "--config", str(captioned_squares / "tiny.json"), *common,
                 "--vocabulary", "red, green,blue,,red", "-o", str(first))
    assert result.returncode == 0, result.stderr
    assert read_info(first).vocabulary == ("red", "green", "blue")
    second = tmp_path / "second.safetensors"  # trained on from a CLIPN with a vocabulary: it is kept
    assert cli("train", "--base", str(first), *common, "-o", str(second)).returncode == 0
    assert read_info(second).vocabulary == ("red", "green", "blue")
    plain = tmp_path / "plain.safetensors"  # no --vocabulary, a plain CLIP base: open vocabulary
    assert cli("train", "--base", str(captioned_squares / "clip.pt"), "--config", str(captioned_squares / "tiny.json"), *common, "-o", str(plain)).returncode == 0
    assert read_info(plain).vocabulary is None and "vocabulary" not in read_info(plain).metadata
    result = cli("train", "--base", str(first), *common, "--vocabulary", " , ", "-o", str(tmp_path / "x.safetensors"))
    assert result.returncode == 2 and result.stderr.strip() == "clipn: error: --vocabulary: no class names given"
