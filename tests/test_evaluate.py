"""`clipn eval` and the evaluation library: image sets, metrics per method, reports, plots, cache."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.interpolate import interp1d
from sklearn.metrics import roc_auc_score, roc_curve

from clipn_cli.scores import methods as method_table
from clipn_cli.scores import metrics
from clipn_cli.errors import EvaluationError
from clipn_cli.evaluation import compute_results, id_accuracy
from clipn_cli.inputs.sets import collect, collect_sets, group_ood_specs, parse_ood_spec
from clipn_cli.outputs.results import METHODS, SetScores
from conftest import cli

CLASSES = "cat,horse,rocket,coffee"
ID_LAYOUT = {"cat": ["chelsea.png"], "Horse": ["horse.png", "astronaut.png"], "rocket": ["rocket.jpg", "motorcycle_left.png"], "coffee": ["coffee.png"]}
OOD_IMAGES = ["brick.png", "camera.png", "hubble_deep_field.jpg", "logo.png", "retina.jpg", "no_time_for_that_tiny.gif"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

RECORDED = [(m.name, m.record) for m in method_table.available() if m.record]  # method -> its detection-record field


def make_sets(root: Path, images: Path) -> tuple[Path, Path]:
    """ID images in class-named folders, OOD images in one flat folder."""
    for folder, names in ID_LAYOUT.items():
        (root / "ID" / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(images / name, root / "ID" / folder / name)
    (root / "OOD").mkdir()
    for name in OOD_IMAGES:
        shutil.copy(images / name, root / "OOD" / name)
    return root / "ID", root / "OOD"


@pytest.fixture
def sets(tmp_path: Path, images_dir: Path) -> tuple[Path, Path]:
    return make_sets(tmp_path / "data", images_dir)


def fake_scores(name: str, role: str, rng: np.random.Generator, n: int, shift: float) -> SetScores:
    return SetScores(
        name=name, role=role, paths=[f"{name}/{i}.png" for i in range(n)], labels=[None] * n,
        pred=np.zeros(n, dtype=np.int64),
        scores={m: rng.normal(shift, 1.0, n).round(1) for m in METHODS},
        flagged={"ctw": rng.random(n) < 0.3, "atd": rng.random(n) < 0.4},
        atd_margin=rng.normal(size=n), failures=[],
    )


# ---------------------------------------------------------------- library: image sets


def test_collect_directory_glob_list_and_image(sets: tuple[Path, Path], tmp_path: Path) -> None:
    id_dir, ood_dir = sets
    items, labels = collect(str(id_dir))
    names = [Path(i.path).name for i in items]
    assert names == ["astronaut.png", "horse.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg"]
    assert labels == ["Horse", "Horse", "cat", "coffee", "rocket", "rocket"]

    items, labels = collect(str(ood_dir / "*.jpg"))
    assert [Path(i.path).name for i in items] == ["hubble_deep_field.jpg", "retina.jpg"] and labels == [None, None]

    listing = tmp_path / "lists" / "ood.txt"
    listing.parent.mkdir()
    listing.write_text(f"# OOD images\n../data/OOD/logo.png\n\n{ood_dir / 'brick.png'}\n", encoding="utf-8")
    items, _ = collect(str(listing))
    assert [os.path.normpath(i.path) for i in items] == [str(ood_dir / "logo.png"), str(ood_dir / "brick.png")]

    items, labels = collect(str(ood_dir / "logo.png"))
    assert [i.path for i in items] == [str(ood_dir / "logo.png")] and labels == [None]


@pytest.mark.parametrize("spec, message", [("missing-dir", "no such file or directory"), ("empty", "no images found"), ("nothing*.png", "no file matches")])
def test_collect_refuses_missing_and_empty(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match=message):
        collect(str(tmp_path / spec))


def test_ood_specs() -> None:
    assert parse_ood_spec("inat=/data/iNaturalist") == ("inat", "/data/iNaturalist")
    assert parse_ood_spec("/data/Places/") == ("Places", "/data/Places/")
    assert parse_ood_spec("lists/sun.txt") == ("sun", "lists/sun.txt")
    assert group_ood_specs(["a=x", "b=y", "a=z"]) == {"a": ["x", "z"], "b": ["y"]}
    with pytest.raises(EvaluationError, match="no ID images"):
        collect_sets([], {"x": "y"})
    for reserved in ("Average", "id"):
        with pytest.raises(EvaluationError, match="reserved"):
            collect_sets(["."], {reserved: "."})


# ---------------------------------------------------------------- library: metrics per method


@pytest.mark.parametrize("convention", ["clipn", "openood"])
def test_compute_results(convention: str) -> None:
    rng = np.random.default_rng(3)
    id_set = fake_scores("ID", "id", rng, 40, 1.0)
    oods = [fake_scores("a", "ood", rng, 30, 0.0), fake_scores("b", "ood", rng, 25, -0.5)]
    results = compute_results(id_set, oods, convention)
    assert [(r.ood, r.method) for r in results] == [(s, m) for s in ("a", "b", "average") for m in METHODS]
    by_key = {(r.ood, r.method): r for r in results}
    for ood in oods:
        for m in METHODS:
            r = by_key[(ood.name, m)]
            expected = metrics.ood_metrics(id_set.scores[m], ood.scores[m], convention)
            assert {k: getattr(r, k) for k in expected} == expected
            assert r.threshold_95 == metrics.threshold_at_recall(id_set.scores[m], 0.95)
            if m in ("ctw", "atd"):
                assert r.id_flagged == id_set.flagged[m].mean() and r.ood_caught == ood.flagged[m].mean()
            else:
                assert r.id_flagged is None and "id_flagged" not in r.as_dict()
    for m in METHODS:
        avg = by_key[("average", m)]
        assert avg.auroc == pytest.approx((by_key[("a", m)].auroc + by_key[("b", m)].auroc) / 2, abs=1e-15)
        assert avg.fpr95 == pytest.approx((by_key[("a", m)].fpr95 + by_key[("b", m)].fpr95) / 2, abs=1e-15)
    with pytest.raises(EvaluationError, match="convention"):
        compute_results(id_set, oods, "sklearn")


def test_id_accuracy_matches_names_not_indices() -> None:
    rng = np.random.default_rng(0)
    s = fake_scores("ID", "id", rng, 4, 0.0)
    classes = ["missile", "Sea lion", "missile", "tench"]  # duplicate name, as in ImageNet
    s.labels = ["missile", "sea_lion", "missile", "tench"]
    s.pred = np.array([2, 1, 0, 1])  # both "missile" indices count; the last one is wrong
    assert id_accuracy(s, classes) == (0.75, None)
    s.labels = ["missile", "sea_lion", "n01440764", "tench"]
    accuracy, note = id_accuracy(s, classes)
    assert accuracy is None and "n01440764" in note
    s.labels = [None, "tench", "tench", "tench"]
    assert id_accuracy(s, classes) == (None, None)


# ---------------------------------------------------------------- the CLI, end to end


def official_fpr95(id_scores: list[float], ood_scores: list[float]) -> float:
    labels = [1] * len(id_scores) + [0] * len(ood_scores)
    fpr, tpr, _ = roc_curve(labels, id_scores + ood_scores, pos_label=1)
    return float(interp1d(tpr, fpr)(0.95))


def test_eval_equals_metrics_from_detect_scores(tiny_weights: Path, sets: tuple[Path, Path], tmp_path: Path) -> None:
    id_dir, ood_dir = sets
    common = ["-w", str(tiny_weights), "--classes", CLASSES, "--batch-size", "1"]
    ev = cli("eval", *common, "--id", str(id_dir), "--ood", f"misc={ood_dir}", "--format", "json",
                 "--plots", str(tmp_path / "plots"), "--save-scores", str(tmp_path / "scores.csv"))
    assert ev.returncode == 0, ev.stderr
    report = json.loads(ev.stdout)
    det = cli("detect", *common, "--rule", "atd", "--format", "jsonl", str(id_dir), str(ood_dir))
    assert det.returncode == 0, det.stderr
    records = [json.loads(line) for line in det.stdout.splitlines()]
    is_id = [r["path"].startswith(str(id_dir)) for r in records]
    assert sum(is_id) == 6 and len(records) == 12

    assert report["fpr95_convention"] == "clipn" and "95% ID recall" in report["fpr95_definition"]
    assert report["images"] == {"ID": 6, "misc": 6} and report["failed"] == []
    results = {(r["ood"], r["method"]): r for r in report["results"]}
    for method, field in RECORDED:
        id_scores = [r[field] for r, i in zip(records, is_id) if i]
        ood_scores = [r[field] for r, i in zip(records, is_id) if not i]
        labels = [1] * 6 + [0] * 6
        r = results[("misc", method)]
        assert r["auroc"] == pytest.approx(roc_auc_score(labels, id_scores + ood_scores), abs=1e-12)
        assert r["fpr95"] == pytest.approx(official_fpr95(id_scores, ood_scores), abs=1e-12)
        assert results[("average", method)]["auroc"] == r["auroc"]
    atd_flags = [r["verdict"] == "OOD" for r in records]
    ctw_flags = [r["ctw_score"] < 0.5 for r in records]
    for method, flags in (("ctw", ctw_flags), ("atd", atd_flags)):
        assert results[("misc", method)]["id_flagged"] == pytest.approx(np.mean([f for f, i in zip(flags, is_id) if i]))
        assert results[("misc", method)]["ood_caught"] == pytest.approx(np.mean([f for f, i in zip(flags, is_id) if not i]))
    folder_of = {name: folder for folder, names in ID_LAYOUT.items() for name in names}
    correct = [r["class"].lower() == folder_of[Path(r["path"]).name].lower() for r, i in zip(records, is_id) if i]
    assert report["id_accuracy"] == pytest.approx(np.mean(correct))

    rows = list(csv.DictReader((tmp_path / "scores.csv").open(encoding="utf-8")))
    assert len(rows) == 12 and {r["set"] for r in rows} == {"ID", "misc"}
    by_path = {r["path"]: r for r in records}
    for row in rows:  # same features, scored in the same chunks: the very same numbers
        record = by_path[row["path"]]
        for method, field in RECORDED:
            assert float(row[method]) == record[field]
        assert row["pred"] == record["class"] and row["atd_ood"] == str(record["verdict"] == "OOD")

    pngs = sorted((tmp_path / "plots").iterdir())
    assert [p.name for p in pngs] == ["roc-misc.png", "scores-misc.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(png) as img:
            img.load()
            assert img.format == "PNG" and img.width >= 600 and img.height >= 500


def test_cached_rerun_encodes_nothing(tiny_weights: Path, sets: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clipn_cli.model.encode as inference

    encoded: list[int] = []
    real = inference.encode_batch

    def counting(model, pixels, device, precision="fp32"):
        encoded.append(len(pixels))
        return real(model, pixels, device, precision)

    monkeypatch.setattr(inference, "encode_batch", counting)
    id_dir, ood_dir = sets
    args = ["eval", "-w", str(tiny_weights), "--classes", CLASSES, "--id", str(id_dir), "--ood", f"misc={ood_dir}",
            "--format", "json", "--cache", str(tmp_path / "cache")]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    assert sum(encoded) == 12 and "0 reused, 12 encoded and stored" in first.stderr

    # Overwrite every image with garbage of the same size and put its mtime back: the files
    # keep their identity, so any attempt to decode one would now fail the run.
    for image in [p for p in [*id_dir.rglob("*"), *ood_dir.iterdir()] if p.is_file()]:
        st = image.stat()
        image.write_bytes(b"\0" * st.st_size)
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    encoded.clear()
    second = cli(*args)
    assert second.exit_code == 0, second.output
    assert encoded == [] and "12 reused, 0 encoded" in second.stderr
    assert json.loads(second.stdout) == json.loads(first.stdout)

    # other classes reuse the same features: no image encoded, other numbers
    third = cli(*args[:4], "cat,dog", *args[5:])
    assert third.exit_code == 0 and encoded == []


def test_table_csv_and_openood(tiny_weights: Path, sets: tuple[Path, Path], tmp_path: Path) -> None:
    id_dir, ood_dir = sets
    base = ["eval", "-w", str(tiny_weights), "--classes", CLASSES, "--id", str(id_dir), "--ood", f"misc={ood_dir}",
            "--ood", f"p\rngs={ood_dir / '*.png'}", "--cache", str(tmp_path / "cache")]  # a carriage return stays in its quoted CSV field
    clipn_json = json.loads(cli(*base, "--format", "json").stdout)
    out = cli(*base, "--format", "csv", "--fpr-convention", "openood")
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len(rows) == 3 * len(METHODS) and {r["fpr95_convention"] for r in rows} == {"openood"}
    assert {r["ood"] for r in rows} == {"misc", "p\rngs", "average"}
    by_key = {(r["ood"], r["method"]): r for r in clipn_json["results"]}
    for row in rows:  # the convention changes FPR95 only
        assert float(row["auroc"]) == by_key[(row["ood"], row["method"])]["auroc"]
    table = cli(*base, "--format", "table", "--output", str(tmp_path / "report.txt"))
    assert table.exit_code == 0 and table.stdout == ""
    text = (tmp_path / "report.txt").read_text(encoding="utf-8")
    for needle in ("AUROC", "FPR95", "MaxLogit", "MCM", "average", "ID top-1 accuracy", "95% ID recall"):
        assert needle in text


@pytest.mark.parametrize("extra, message", [
    (["--ood", "x=/no/such/dir"], "/no/such/dir: no such file or directory"),
    (["--ood", "average=."], "reserved"),
    (["--ood", "x=.", "--fpr-convention", "tpr"], "unknown FPR95 convention 'tpr'"),
    (["--ood", "x=.", "--format", "xml"], "--format must be table, json or csv"),
])
def test_usage_errors_are_one_line(tiny_weights: Path, sets: tuple[Path, Path], extra: list[str], message: str) -> None:
    result = cli("eval", "-w", str(tiny_weights), "--classes", CLASSES, "--id", str(sets[0]), *extra)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreadable_images_are_left_out_with_exit_1(tiny_weights: Path, sets: tuple[Path, Path]) -> None:
    id_dir, ood_dir = sets
    (ood_dir / "broken.png").write_bytes(b"not a png")
    result = cli("eval", "-w", str(tiny_weights), "--classes", CLASSES, "--id", str(id_dir), "--ood", f"misc={ood_dir}", "--format", "json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["images"]["misc"] == 6 and report["failed"][0]["path"].endswith("broken.png")
    assert "1 images could not be read" in result.stderr


def test_an_unreadable_ood_set_is_left_out_not_the_whole_run(tiny_weights: Path, sets: tuple[Path, Path], tmp_path: Path) -> None:
    id_dir, ood_dir = sets
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(2):
        (broken / f"b{i}.png").write_bytes(PNG_SIGNATURE + b"cut")
    args = ["eval", "-w", str(tiny_weights), "--classes", CLASSES, "--id", str(id_dir), "--format", "json"]
    result = cli(*args, "--ood", f"misc={ood_dir}", "--ood", f"bad={broken}", "--save-scores", str(tmp_path / "s.jsonl"))
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert {r["ood"] for r in report["results"]} == {"misc", "average"}
    assert report["images"]["bad"] == 0 and len(report["failed"]) == 2
    assert "bad set: none of its 2 images could be read" in result.stderr and "left out of the metrics" in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert sum(r["set"] == "bad" and r["error"] is not None for r in rows) == 2
    alone = cli(*args, "--ood", f"bad={broken}")
    assert alone.exit_code == 2 and "bad set: none of its 2 images could be read" in alone.stderr


def test_one_id_folder_per_class_is_the_labelling(tiny_weights: Path, sets: tuple[Path, Path]) -> None:
    """The README recipe passes one --id per class folder: the folder names label the ID images,
    and the accuracy is the one the nested layout (one --id with class sub-folders) gives."""
    id_dir, ood_dir = sets
    per_class = [str(id_dir / folder) for folder in ID_LAYOUT]
    built = collect_sets(per_class, {"misc": str(ood_dir)})
    assert built[0].labels == [folder for folder, names in ID_LAYOUT.items() for _ in names]
    assert collect_sets([str(id_dir / "cat")], {"misc": str(ood_dir)})[0].labels == [None]  # one folder alone: no labelling
    common = ["eval", "-w", str(tiny_weights), "--classes", CLASSES, "--ood", f"misc={ood_dir}", "--format", "json"]
    split = cli(*common, *[arg for path in per_class for arg in ("--id", path)])
    nested = cli(*common, "--id", str(id_dir))
    assert split.exit_code == 0 and nested.exit_code == 0, split.output
    accuracy = json.loads(split.stdout)["id_accuracy"]
    assert accuracy is not None and accuracy == json.loads(nested.stdout)["id_accuracy"]
    odd = id_dir.parent / "not-a-class"
    shutil.copytree(id_dir / "cat", odd)
    mixed = cli(*common, *[arg for path in [*per_class, str(odd)] for arg in ("--id", path)])
    assert json.loads(mixed.stdout)["id_accuracy"] is None and "match no class name: not-a-class" in mixed.stderr
