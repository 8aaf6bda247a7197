"""Mistakes that need no model are one line before torch is imported: names, paths, devices, output
folders (README "Exit codes"). A missing output folder is refused, never created."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli

IMAGE = str(Path(__file__).parent / "fixtures" / "images" / "rocket.jpg")

# Run in a fresh interpreter: each case calls the real entry point in-process and reports its exit
# code, its stderr and whether torch was imported by then (this test process has torch already).
PROBE = r"""
import contextlib, io, json, sys
from clipn_cli.cli.app import main

found = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code
    found.append({"args": args, "code": code, "stderr": err.getvalue(), "torch": "torch" in sys.modules})
print(json.dumps(found))
"""


def _probe(cases: list[list[str]], home: Path) -> list[dict]:
    env = {**os.environ, "CLIPN_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("CLIPN_WEIGHTS", None)
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _fake_embeddings(path: Path, fingerprint: str) -> Path:
    """A safetensors header with the metadata `clipn embed-classes` writes (no tensors are read here)."""
    header = json.dumps({"__metadata__": {"format": "clipn-cli.embeddings", "format_version": "1", "weights_fingerprint": fingerprint,
                                          "classes": "[\"a\", \"b\"]"}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path


def test_every_mistake_is_one_line_before_torch(tmp_path: Path) -> None:
    from clipn_cli.weights.home import BUNDLED, read_header
    from clipn_cli.scale.manifest import Manifest, ManifestWriter
    from clipn_cli.scale.store import OutputStore

    digits = read_header(BUNDLED["digits"])["fingerprint"]
    made_by_digits = _fake_embeddings(tmp_path / "digits-classes.safetensors", digits)
    made_by_other = _fake_embeddings(tmp_path / "other-classes.safetensors", "f" * 64)
    finished = tmp_path / "ray-run"
    store = OutputStore.open(str(finished))
    store.prepare()
    ManifestWriter(store, Manifest({"format": "jsonl"}, inputs=0, complete=True)).flush(force=True)
    data = tmp_path / "pairs"
    data.mkdir()
    gone = "/nonexistent-clipn-dir/sub"
    cases = {
        "--weights digitz: no such file, and no weights of that name": ["detect", "--weights", "digitz", "-c", "a,b", IMAGE],
        f"{tmp_path}/photos: no such file or folder": ["detect", "-w", "digits", "-c", "a,b", f"{tmp_path}/photos"],
        "--device must be auto, cpu, cuda, cuda:N or mps, not 'gpu'": ["detect", "-w", "digits", "--device", "gpu", "-c", "a,b", IMAGE],
        f"--output {gone}/out.csv: the folder {gone} does not exist": ["detect", "-w", "digits", "-c", "a,b", "-o", f"{gone}/out.csv", IMAGE],
        f"--report {gone}/r.html: the folder {gone} does not exist": ["detect", "-w", "digits", "-c", "a,b", "--report", f"{gone}/r.html", IMAGE],
        f"{made_by_digits} was made with the weights 'digits' (fingerprint {digits[:12]}): give --weights digits": ["detect", "-e", str(made_by_digits), IMAGE],
        f"{made_by_other} was made with weights of fingerprint ffffffffffff, which are not in": ["detect", "-e", str(made_by_other), IMAGE],
        f"--calibration {tmp_path}/calib.json: no such file": ["detect", "-w", "digits", "-c", "a,b", "--calibration", f"{tmp_path}/calib.json", IMAGE],
        f"--words {tmp_path}/words.txt: no such file": ["detect", "-w", "digits", "-c", "a,b", "--negatives", "neglabel", "--words", f"{tmp_path}/words.txt", IMAGE],
        "unknown template set 'clipm'": ["detect", "-w", "digits", "-c", "a,b", "-t", "clipm", IMAGE],
        f"--output {finished}: holds a finished clipn run (0 shards)": ["detect", "--engine", "ray", "-w", "digits", "-c", "a,b", "-o", str(finished), IMAGE],
        f"--output {gone}/run: the folder {gone} does not exist": ["detect", "--engine", "ray", "-w", "digits", "-c", "a,b", "-o", f"{gone}/run", IMAGE],
        "--weights nope.safetensors: no such file": ["eval", "-w", "nope.safetensors", "-c", "a,b", "--id", str(tmp_path), "--ood", f"x={tmp_path}"],
        f"--plots {gone}/plots: the folder {gone} does not exist": ["eval", "-w", "digits", "-c", "a,b", "--id", str(tmp_path), "--ood", f"x={tmp_path}", "--plots", f"{gone}/plots"],
        f"--save-scores {gone}/s.csv: the folder": ["eval", "-w", "digits", "-c", "a,b", "--id", str(tmp_path), "--ood", f"x={tmp_path}", "--save-scores", f"{gone}/s.csv"],
        "not 'cuda:x'": ["calibrate", "-w", "digits", "-c", "a,b", "--device", "cuda:x", "-o", f"{tmp_path}/c.json", IMAGE],
        f"{tmp_path}/id: no such file or folder": ["calibrate", "-w", "digits", "-c", "a,b", "-o", f"{tmp_path}/c.json", f"{tmp_path}/id"],
        "not 'tpu'": ["embed-classes", "-c", "a,b", "-o", f"{tmp_path}/e.safetensors", "--device", "tpu"],
        f"--output {gone}/e.safetensors: the folder": ["embed-classes", "-w", "digits", "-c", "a,b", "-o", f"{gone}/e.safetensors"],
        "weights 'vitb16-rep2' are not here: run 'clipn weights fetch vitb16-rep2'": ["train", "--base", "vitb16", "--data", str(data), "-o", f"{tmp_path}/t.safetensors"],
        f"--data {tmp_path}/pairs.csv: no such file or folder": ["train", "--base", "digits", "--data", f"{tmp_path}/pairs.csv", "-o", f"{tmp_path}/t.safetensors"],
        f"--checkpoint {gone}/t.ckpt: the folder": ["train", "--base", "digits", "--data", str(data), "-o", f"{tmp_path}/t.safetensors", "--checkpoint", f"{gone}/t.ckpt"],
        f"CHECKPOINT {tmp_path}/epoch_10.pt: no such file": ["convert", f"{tmp_path}/epoch_10.pt", f"{tmp_path}/out.safetensors"],
    }
    for want, got in zip(cases, _probe(list(cases.values()), tmp_path / "home"), strict=True):
        assert got["code"] == 2, got
        assert want in got["stderr"] and got["stderr"].count("\n") == 1, got
        assert not got["torch"], got
    assert not Path("/nonexistent-clipn-dir").exists()


def test_a_missing_input_among_others_is_said_before_loading_and_still_gets_its_record(tmp_path: Path) -> None:
    missing = str(tmp_path / "gone.png")
    result = cli("detect", "-w", "digits", "-c", "zero,one", IMAGE, missing)
    assert result.returncode == 1
    assert f"1 named input(s) do not exist, first: {missing} (each gets an error record)" in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[1] == {"path": missing, "error": "no such file"} and "verdict" in records[0]


def test_an_absent_device_is_one_line() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli("detect", "-w", "digits", "--device", "cuda", "-c", "zero,one", IMAGE)
    assert result.returncode == 2
    assert result.stderr == "clipn: error: device 'cuda' requested but CUDA is not available\n"


@pytest.mark.parametrize("args", [["-h"], ["detect", "-h"], ["weights", "list", "-h"], ["eval", "-h"]])
def test_dash_h_is_help(args: list[str]) -> None:
    result = cli(*args)
    assert result.returncode == 0 and "Usage: clipn" in result.stdout


def test_weights_list_shows_aliases() -> None:
    listed = json.loads(cli("weights", "list", "--format", "json").stdout)
    assert {w["name"]: w["aliases"] for w in listed["weights"]}["vitb16-rep2"] == ["vitb16"]
    assert "vitb16-rep2 (or vitb16)" in cli("weights", "list").stdout


def test_dir_lists_the_api() -> None:
    import clipn_cli

    assert set(clipn_cli.__all__) <= set(dir(clipn_cli))
    assert "load_model" in dir(clipn_cli) and "detect" in dir(clipn_cli)


def test_train_base_takes_a_weights_name() -> None:
    from clipn_cli.cli.train import _named_base
    from clipn_cli.weights.home import BUNDLED

    assert _named_base("digits", None) == str(BUNDLED["digits"])
    assert _named_base("ViT-B-16", "laion2b_s34b_b88k") == "ViT-B-16"
