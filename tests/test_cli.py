"""The `clipn` command line through its entry point `main()`: inputs, outputs, errors, exit codes.

In-process (`cli`) unless the process is the point (start-up imports, the console script, a shell
redirect onto /dev/stdout): those spawn one (`run_cli`)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CLASSES, IMAGES, OFFICIAL_CHECKPOINT, TINY_CONFIG, cli, jsonl, run_cli

def test_help_lists_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("convert", "embed-classes", "detect"):
        assert command in result.stdout


def test_help_imports_no_heavy_module() -> None:
    """`clipn --help` stays instant: torch, open_clip, numpy, PIL and safetensors load only when a command runs."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "clipn_cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "detect" in result.stdout
    modules = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "clipn_cli.cli.app" in modules
    assert not {m for m in modules if m.split(".")[0] in {"torch", "open_clip", "numpy", "PIL", "safetensors"}}


def test_stdin_paths_in_input_order(tiny_weights: Path, tiny_embeddings: Path) -> None:
    paths = [str(IMAGES / "rocket.jpg"), str(IMAGES / "chelsea.png"), str(IMAGES / "coffee.png")]
    result = cli("detect", "-w", str(tiny_weights), "--embeddings", str(tiny_embeddings), "-", stdin="\n".join(paths) + "\n")
    assert result.returncode == 0, result.stderr
    records = jsonl(result.stdout)  # not a terminal: jsonl by default
    assert [r["path"] for r in records] == paths
    for r in records:
        assert r["verdict"] in {"ID", "OOD"} and r["rule"] == "atd"
        assert r["class"] in CLASSES.split(",") and r["class_index"] == CLASSES.split(",").index(r["class"])
        assert r["p_ood"] == pytest.approx(1 - r["atd_score"], abs=1e-6)


def test_directory_input_is_recursive_and_sorted(tiny_weights: Path, tiny_embeddings: Path, tmp_path: Path) -> None:
    nested = tmp_path / "photos" / "nested"
    nested.mkdir(parents=True)
    shutil.copy(IMAGES / "rocket.jpg", tmp_path / "photos" / "b.jpg")
    shutil.copy(IMAGES / "horse.png", nested / "a.png")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    result = cli("detect", "-w", str(tiny_weights), "-e", str(tiny_embeddings), str(tmp_path / "photos"))
    assert result.returncode == 0, result.stderr
    names = [Path(r["path"]).name for r in jsonl(result.stdout)]
    assert names == ["b.jpg", "a.png"]  # files of a folder before its sub-folders; .txt skipped


def test_glob_expanded_by_the_tool(tiny_weights: Path, tiny_embeddings: Path) -> None:
    result = cli("detect", "-w", str(tiny_weights), "-e", str(tiny_embeddings), str(IMAGES / "*.jpg"))
    assert result.returncode == 0, result.stderr
    assert sorted(Path(r["path"]).name for r in jsonl(result.stdout)) == ["hubble_deep_field.jpg", "retina.jpg", "rocket.jpg"]


def test_corrupt_file_gives_error_record_and_exit_1(tiny_weights: Path, tiny_embeddings: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes((IMAGES / "rocket.jpg").read_bytes()[:300])
    good = [str(IMAGES / "chelsea.png"), str(IMAGES / "rocket.jpg")]
    result = cli("detect", "-w", str(tiny_weights), "-e", str(tiny_embeddings), good[0], str(bad), good[1], str(tmp_path / "missing.png"))
    assert result.returncode == 1
    records = jsonl(result.stdout)
    assert [r["path"] for r in records] == [good[0], str(bad), good[1], str(tmp_path / "missing.png")]
    assert "error" in records[1] and "truncated" in records[1]["error"]
    assert records[3] == {"path": str(tmp_path / "missing.png"), "error": "no such file"}
    assert records[0]["verdict"] and records[2]["verdict"]
    alone = jsonl(cli("detect", "-w", str(tiny_weights), "-e", str(tiny_embeddings), good[0]).stdout)
    assert alone[0].keys() == records[0].keys()  # a bad neighbour changes nothing (but batch-size rounding)
    for key, value in alone[0].items():
        assert records[0][key] == (pytest.approx(value, abs=1e-5) if isinstance(value, float) else value)
    assert "2 of 4 inputs could not be scored" in result.stderr


def test_missing_weights_exit_2_one_line(tmp_path: Path) -> None:
    result = cli("detect", "--classes", CLASSES, str(IMAGES / "chelsea.png"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no weights" in lines[0] and "CLIPN_WEIGHTS" in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_weights_from_environment(tiny_weights: Path) -> None:
    result = cli("detect", "--classes", CLASSES, str(IMAGES / "chelsea.png"), env={"CLIPN_WEIGHTS": str(tiny_weights)})
    assert result.returncode == 0, result.stderr
    assert jsonl(result.stdout)[0]["path"].endswith("chelsea.png")


def test_embeddings_from_other_weights_refused(tiny_weights: Path, tiny_embeddings: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    assert cli("convert", str(OFFICIAL_CHECKPOINT), str(other), "--config", str(TINY_CONFIG), "--dtype", "fp16").returncode == 0
    result = cli("detect", "-w", str(other), "-e", str(tiny_embeddings), str(IMAGES / "chelsea.png"))
    assert result.returncode == 2
    assert "made with other weights" in result.stderr and str(tiny_embeddings) in result.stderr
    assert result.stdout == ""


def test_16_bit_weights_halve_the_file_and_score_close_to_fp32(tiny_weights: Path, tmp_path: Path) -> None:
    args = ("detect", "--classes", CLASSES, str(IMAGES))
    full = jsonl(cli(*args, "-w", str(tiny_weights)).stdout)
    deviation = {}
    for dtype in ("fp16", "bf16", "int16"):
        small = tmp_path / f"{dtype}.safetensors"
        assert cli("convert", str(OFFICIAL_CHECKPOINT), str(small), "--config", str(TINY_CONFIG), "--dtype", dtype).returncode == 0
        upper = 0.51 if dtype != "int16" else 0.53  # + a 4-byte scale per row: the tiny model's rows are only 32 wide
        assert 0.49 < small.stat().st_size / tiny_weights.stat().st_size < upper
        reduced = jsonl(cli(*args, "-w", str(small)).stdout)
        assert [r["path"] for r in reduced] == [r["path"] for r in full]
        deviation[dtype] = max(abs(a[k] - b[k]) for a, b in zip(full, reduced) if "error" not in a for k in ("ctw_score", "atd_score"))
    assert deviation["int16"] < 1e-4 and deviation["fp16"] < 1e-3 and deviation["bf16"] < 1e-2
    assert deviation["int16"] < deviation["fp16"] / 4 < deviation["bf16"] / 4


def test_formats_json_csv_table_and_output_file(tiny_weights: Path, tiny_embeddings: Path, tmp_path: Path) -> None:
    base = ("detect", "-w", str(tiny_weights), "-e", str(tiny_embeddings), str(IMAGES / "chelsea.png"), str(IMAGES / "rocket.jpg"))
    as_json = json.loads(cli(*base, "--format", "json", "--top-k", "2").stdout)
    assert len(as_json) == 2 and len(as_json[0]["top_k"]) == 2
    assert as_json[0]["top_k"][0]["class"] == as_json[0]["class"]

    out = tmp_path / "out.csv"
    result = cli(*base, "--format", "csv", "--output", str(out))
    assert result.returncode == 0 and result.stdout == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [Path(r["path"]).name for r in rows] == ["chelsea.png", "rocket.jpg"]
    assert float(rows[0]["atd_score"]) == pytest.approx(as_json[0]["atd_score"])

    table = cli(*base, "--format", "table").stdout
    assert "chelsea.png" in table and "verdict" in table


def test_ctw_rule_and_single_class_warning(tiny_weights: Path) -> None:
    result = cli("detect", "-w", str(tiny_weights), "--classes", "cat", "--rule", "ctw", str(IMAGES / "chelsea.png"))
    assert result.returncode == 0
    (record,) = jsonl(result.stdout)
    assert record["rule"] == "ctw" and record["atd_score"] == pytest.approx(record["ctw_score"], abs=1e-6)
    assert "ATD equals CTW" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--rule", "bogus"), "--rule"),
        (("--format", "xml"), "--format"),
        (("--templates", "no-such-set"), "unknown template set"),
        (("--precision", "fp64", "--format", "json"), "--precision must be fp32, fp16 or bf16, not 'fp64'"),
        (("--precision", "fp64", "--format", "csv", "--cache", "cache-dir"), "--precision must be"),
        (("--quantize", "int4"), "--quantize must be int8"),
        (("--quantize", "int8", "--precision", "bf16"), "cannot be combined"),
        (("--device", "meta"), "--device must be auto, cpu, cuda, cuda:N or mps, not 'meta'"),
        (("--device", "mps"), "Apple MPS is not available"),
    ],
)
def test_bad_options_exit_2(tiny_weights: Path, args: tuple[str, ...], message: str) -> None:
    result = cli("detect", "-w", str(tiny_weights), "--classes", CLASSES, *args, str(IMAGES / "chelsea.png"))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1


def test_markup_in_names_and_paths_is_printed_as_written(tiny_weights: Path, tmp_path: Path) -> None:
    folder = tmp_path / "shots[b]"
    folder.mkdir()
    image = folder / "cat[red].png"
    shutil.copyfile(IMAGES / "chelsea.png", image)
    result = cli("detect", "-w", str(tiny_weights), "--classes", "cat[/x],cat[/x]", "--format", "table", "--rule", "ctw", str(image))
    assert result.returncode == 0, result.stderr
    assert "duplicate class names kept (indices follow your list): cat[/x]" in " ".join(result.stderr.split())
    assert "cat[red].png" in result.stdout and "cat[/x]" in result.stdout


@pytest.mark.parametrize("classes", ["3", '{"a": 1}', "[1, 2]"])
def test_damaged_embeddings_metadata_exit_2(tiny_weights: Path, tiny_embeddings: Path, tmp_path: Path, classes: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny_embeddings), framework="pt") as fh:
        meta = {**fh.metadata(), "classes": classes}
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(tiny_embeddings)), str(bad), metadata=meta)
    result = cli("detect", "-w", str(tiny_weights), "--embeddings", str(bad), str(IMAGES / "chelsea.png"))
    assert result.returncode == 2 and result.stdout == ""
    assert f"{bad}: damaged embeddings file (class names are not a list of strings)" in result.stderr and "Traceback" not in result.stderr


def test_embed_classes_without_classes_says_so(tiny_weights: Path) -> None:
    result = cli("embed-classes", "-w", str(tiny_weights))
    assert result.returncode == 2 and "give exactly one of --classes" in result.stderr


def test_template_file_must_have_placeholder(tiny_weights: Path, tmp_path: Path) -> None:
    bad = tmp_path / "templates.txt"
    bad.write_text("a photo of something\n")
    result = cli("embed-classes", "--classes", CLASSES, "-w", str(tiny_weights), "-o", str(tmp_path / "e.safetensors"), "--templates", str(bad))
    assert result.returncode == 2 and "exactly one '{}'" in result.stderr
    good = tmp_path / "good.txt"
    good.write_text("a photo of a {}.\nart of the {}.\n")
    result = cli("embed-classes", "--classes", CLASSES, "-w", str(tiny_weights), "-o", str(tmp_path / "e.safetensors"), "--templates", str(good))
    assert result.returncode == 0, result.stderr


def test_duplicate_classes_kept_with_warning(tiny_weights: Path, tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\n\n# a comment\n  rocket  \ncat\n", encoding="utf-8")
    out = tmp_path / "classes.safetensors"
    result = cli("embed-classes", str(classes), "-w", str(tiny_weights))
    assert result.returncode == 0 and "duplicate class names" in result.stderr
    from clipn_cli.heads.embeddings import ClassEmbeddings

    heads = ClassEmbeddings.load(out)
    assert heads.classes == ["cat", "rocket", "cat"]
    assert (heads.text_yes[0] - heads.text_yes[2]).abs().max() < 1e-6
    assert (heads.text_yes[0] - heads.text_yes[1]).abs().max() > 1e-3


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_non_utf8_file_name_is_scored_and_output_stays_valid(tiny_weights: Path, tmp_path: Path, fmt: str) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    odd = os.fsdecode(b"b\xe9.png")  # a Latin-1 name on a UTF-8 system
    for name in ("a.png", odd, "c.png"):
        shutil.copyfile(IMAGES / "chelsea.png", folder / name)
    out = tmp_path / f"out.{fmt}"
    result = cli("detect", "-w", str(tiny_weights), "--classes", CLASSES, "--format", fmt, "--output", str(out), str(folder))
    assert result.returncode == 0, result.stderr
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out.read_bytes().decode("utf-8", "surrogateescape"))))
        paths = [r["path"] for r in rows]
    else:
        text = out.read_bytes().decode("utf-8")  # strict: the file is valid UTF-8
        records = json.loads(text) if fmt == "json" else jsonl(text)
        paths = [r["path"] for r in records]
    assert paths == [str(folder / n) for n in ("a.png", odd, "c.png")]
    assert os.fsencode(paths[1]).endswith(b"b\xe9.png")


def test_output_through_a_symlink_and_to_a_pipe(tiny_weights: Path, tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    args = ["detect", "-w", str(tiny_weights), "--classes", CLASSES, "--format", "json", str(IMAGES / "chelsea.png")]
    assert cli(*args, "--output", str(link)).returncode == 0
    assert link.is_symlink() and len(json.loads(real.read_text())) == 1
    piped = run_cli(*args, "--output", "/dev/stdout")  # stdout is a pipe here: written directly, not renamed over
    assert piped.returncode == 0, piped.stderr
    assert len(json.loads(piped.stdout)) == 1 and Path("/dev/stdout").is_symlink()
    log = tmp_path / "log.txt"
    # `>> log`: /dev/stdout is that file, and it is appended to, never replaced. One process runs the
    # three formats (main() per format, each after the log is reset) to spare two start-ups.
    runs = [[*args[:-2], fmt, args[-1], "--output", "/dev/stdout"] for fmt in ("json", "jsonl", "csv")]
    script = (
        "import json, pathlib, sys\nfrom clipn_cli.cli.app import main\n"
        "for argv in json.loads(sys.argv[2]):\n"
        "    pathlib.Path(sys.argv[1]).write_text('earlier\\n')\n"
        "    try:\n        main(argv)\n    except SystemExit as exc:\n        assert exc.code == 0, exc.code\n"
        "    sys.stdout.flush()\n    text = pathlib.Path(sys.argv[1]).read_text()\n"
        "    print(argv[-4], text.startswith('earlier\\n') and len(text.splitlines()) > 1, file=sys.stderr)\n"
    )
    log.write_text("earlier\n")
    with open(log, "a") as out:
        done = subprocess.run([sys.executable, "-c", script, str(log), json.dumps(runs)], stdout=out, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if line.endswith(("True", "False"))] == ["json True", "jsonl True", "csv True"]


def test_safetensors_outputs_follow_the_umask_and_refuse_non_files(tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "classes.safetensors"
    previous = os.umask(0o022)
    try:
        result = cli("embed-classes", "--classes", CLASSES, "-w", str(tiny_weights), "--templates", "simple", "-o", str(out))
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o644
    result = cli("embed-classes", "--classes", CLASSES, "-w", str(tiny_weights), "--templates", "simple", "-o", str(tmp_path))
    assert result.returncode == 2 and f"{tmp_path}: is a directory" in result.stderr


def test_unwritable_outputs_are_refused_before_any_work(tiny_weights: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    checkpoint = tmp_path / "epoch_10.pt"
    shutil.copyfile(OFFICIAL_CHECKPOINT, checkpoint)
    image = str(IMAGES / "chelsea.png")
    common = ["-w", str(tiny_weights), "--classes", CLASSES]
    cases = [
        (["detect", *common, "--output", str(tmp_path), image], f"--output {tmp_path}: is a directory"),
        (["detect", *common, "--output", str(a_file / "out.jsonl"), image], f"{a_file} is not a directory"),
        (["eval", *common, "--id", image, "--ood", f"x={image}", "--save-scores", str(tmp_path)], f"--save-scores {tmp_path}: is a directory"),
        (["eval", *common, "--id", image, "--ood", f"x={image}", "--plots", str(a_file)], f"--plots {a_file}: exists and is not a directory"),
        (["eval", *common, "--id", image, "--ood", f"x={image}", "--plots", str(a_file / "plots")], f"{a_file} is not a directory"),
        (["embed-classes", *common, "--output", str(tmp_path)], f"--output {tmp_path}: is a directory"),
        (["convert", str(checkpoint), str(checkpoint)], "would overwrite the checkpoint"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.returncode == 2 and result.stdout == "", args
        assert message in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert a_file.read_text() == "x" and checkpoint.read_bytes() == OFFICIAL_CHECKPOINT.read_bytes()


def test_output_into_a_missing_folder_is_refused_and_no_folder_is_made(tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir" / "out.jsonl"
    args = ("detect", "-w", str(tiny_weights), "--classes", CLASSES, "--format", "jsonl", "--output", str(out), str(IMAGES / "chelsea.png"))
    result = cli(*args)
    assert result.returncode == 2 and f"the folder {out.parent} does not exist" in result.stderr
    assert not (tmp_path / "new").exists()
    out.parent.mkdir(parents=True)
    assert cli(*args).returncode == 0 and len(jsonl(out.read_text())) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("detect", "--top-k", "-1", "x.png"), "Invalid value for '--top-k'"),
        (("detect", "--no-such-option"), "No such option: --no-such-option"),
        (("eval", "--id", "x"), "Missing option '--ood'"),
        (("no-such-command",), "No such command 'no-such-command'"),
    ],
)
def test_option_errors_are_one_line(args: tuple[str, ...], message: str) -> None:
    result = cli(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("clipn: error: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_future_embeddings_format_is_refused(tiny_weights: Path, tiny_embeddings: Path, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny_embeddings), framework="pt") as fh:
        meta = {**fh.metadata(), "format_version": "2"}
    future = tmp_path / "future.safetensors"
    save_file(load_file(str(tiny_embeddings)), str(future), metadata=meta)
    result = cli("detect", "-w", str(tiny_weights), "--embeddings", str(future), str(IMAGES / "chelsea.png"))
    assert result.returncode == 2 and "embeddings format version 2 is not one this clipn-cli reads" in result.stderr


@pytest.mark.parametrize(
    "content",
    ['{"path": "a.png", "verdict": "ID"}\nmy shopping list\n', "my notes\nlast line without newline", '{"a": 1}'],
)
def test_resume_refuses_a_file_that_is_not_clipn_jsonl(tiny_weights: Path, tmp_path: Path, content: str) -> None:
    notes = tmp_path / "notes.jsonl"
    notes.write_text(content)
    result = cli("detect", "-w", str(tiny_weights), "--classes", CLASSES, "--format", "jsonl", "--output", str(notes), "--resume", str(IMAGES / "chelsea.png"))
    assert result.returncode == 2 and "is not a clipn JSON Lines record: refusing to append" in result.stderr
    assert notes.read_text() == content  # untouched: not cut, not appended to


@pytest.mark.parametrize(
    ("error", "code"),
    [(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore torch detail"), 2), (NotImplementedError("a bug"), None)],
)
def test_torch_runtime_errors_are_one_line_but_bugs_keep_their_traceback(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, code: int | None
) -> None:
    from clipn_cli import detection

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(detection, "detect", fail)
    args = ("detect", "-w", tiny_weights, "--classes", CLASSES, IMAGES / "chelsea.png")
    if code is None:
        with pytest.raises(NotImplementedError):
            cli(*args)
    else:
        result = cli(*args)
        assert result.returncode == code and result.stderr == "clipn: error: CUDA out of memory. Tried to allocate 2.00 GiB\n"
