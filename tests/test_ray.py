"""Scale-out (`--engine ray`, issue 14) on a real Ray cluster that this module starts: two nodes
simulated on this machine with `ray.cluster_utils.Cluster` (1 CPU each), the tiny official
checkpoint. Ray output must equal local detect record for record (broken inputs included), a
SIGKILLed driver must resume to every input exactly once, a lost worker must cost nothing, and
eval must give local eval's numbers. Without Ray, `--engine ray` is one line saying how to install it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import CLASSES, DIGITS_IMAGES, IMAGES, WORDS, CliResult, assert_close_records, cli, spawn

HAVE_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("pyarrow") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray[data] is not installed (pip install 'clipn-cli[ray]')")
HANG_GUARD = 600  # seconds: only against a hung cluster, never a speed limit


def invoke(*args: str, input: str | None = None) -> CliResult:
    return cli(*args, stdin=input)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_same_records(ray_records: list[dict], local_records: list[dict]) -> None:
    """Same inputs in the same order, identical fields, verdicts, classes and errors, scores within the README's grouping bound."""
    assert [r["path"] for r in ray_records] == [r["path"] for r in local_records]
    for got, want in zip(ray_records, local_records):
        assert_close_records(got, want, (want["path"],))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Real images (PNG, JPEG, GIF, digits) and broken ones: empty, text, truncated JPEG, missing, no glob match."""
    root = tmp_path_factory.mktemp("inputs")
    good = root / "good"
    shutil.copytree(IMAGES, good)
    for name in sorted(os.listdir(DIGITS_IMAGES))[:4]:
        shutil.copy(DIGITS_IMAGES / name, good / name)
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    (bad / "truncated.jpg").write_bytes((IMAGES / "rocket.jpg").read_bytes()[:300])
    return [str(good), str(bad), str(root / "missing.png"), str(root / "nothing-*.jpg")]


@pytest.fixture(scope="module")
def local_records(tiny_weights: Path, inputs: list[str], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    result = invoke("detect", "-w", str(tiny_weights), "--classes", CLASSES, "--top-k", "2", "--format", "jsonl", "--output", str(out), *inputs)
    assert result.returncode == 1, result.stderr  # some inputs are broken
    records = jsonl(out)
    assert sum("error" in r for r in records) == 5
    return records


@pytest.fixture(scope="module")
def cluster():
    """One two-node Ray cluster for the whole module (start-up is slow on a shared 2-core machine).

    Its workers run at nice 0, as clipn's own clusters do: at Ray's default nice 15 any other load
    on a shared CI machine would starve them.
    """
    if not HAVE_RAY:
        pytest.skip("ray[data] is not installed (pip install 'clipn-cli[ray]')")
    import ray
    from ray.cluster_utils import Cluster

    from clipn_cli.scale.ray_engine import NICENESS_ENV

    before = os.environ.get(NICENESS_ENV)
    os.environ[NICENESS_ENV] = "0"  # read by each raylet when it starts
    try:
        sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        sim.add_node(num_cpus=1)
    finally:
        if before is None:
            del os.environ[NICENESS_ENV]
        else:
            os.environ[NICENESS_ENV] = before
    ray.init(address=sim.address, logging_level="WARNING")
    try:
        yield sim
    finally:
        ray.shutdown()
        sim.shutdown()


@needs_ray
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_ray_detect_equals_local_detect(cluster, tiny_weights: Path, inputs: list[str], local_records: list[dict], tmp_path: Path, fmt: str) -> None:
    import ray

    from clipn_cli.scale import read_output

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    out = tmp_path / "run"
    result = invoke("detect", "--engine", "ray", "--actors", "2", "--shard-size", "5", "--format", fmt,
                    "-w", str(tiny_weights), "--classes", CLASSES, "--top-k", "2", "--output", str(out), *inputs)
    assert result.returncode == 1, result.stderr  # as locally: some inputs have error records
    assert_same_records(list(read_output(str(out))), local_records)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["inputs"] == manifest["records"] == len(local_records)
    assert manifest["errors"] == 5 and manifest["classes"] == CLASSES.split(",") and manifest["clipn_version"]
    assert len(manifest["finished_shards"]) == len(list((out / "shards").iterdir())) == -(-len(local_records) // 5)
    assert not list((out / "committed").iterdir())  # every marker folded into the manifest
    if fmt == "jsonl":  # the very lines local detect writes
        assert [json.loads(line) for f in sorted((out / "shards").iterdir()) for line in f.read_text().splitlines()] == \
               [json.loads(json.dumps(r)) for r in read_output(str(out))]
    else:
        import pyarrow.parquet as pq

        from clipn_cli.outputs.writers import CSV_COLUMNS

        table = pq.read_table(out / "shards" / "part-000000.parquet")
        assert table.column_names == [*CSV_COLUMNS, "top_k"]


@needs_ray
def test_existing_output_is_refused_without_resume_and_with_other_options(cluster, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("detect", "--engine", "ray", "--actors", "1", "-w", str(tiny_weights), "--output", str(out), str(IMAGES / "rocket.jpg"))
    assert invoke(*args, "--classes", CLASSES).returncode == 0
    again = invoke(*args, "--classes", CLASSES)
    assert again.returncode == 2 and "add --resume" in again.stderr
    other = invoke(*args, "--classes", "cat,dog", "--resume")
    assert other.returncode == 2 and "classes=" in other.stderr
    done = invoke(*args, "--classes", CLASSES, "--resume")  # a finished run: nothing to redo
    assert done.returncode == 0 and "0 shards scored now" in done.stderr


@needs_ray
def test_killed_driver_resumes_to_every_input_exactly_once(cluster, tiny_weights: Path, tmp_path: Path) -> None:
    """SIGKILL the driver (a real `clipn` process joined to the cluster) mid-run, then --resume with a
    fresh local cluster (the default): only unfinished shards are scored, each input once."""
    from clipn_cli.scale import read_output
    from clipn_cli.scale.manifest import load_manifest
    from clipn_cli.scale.store import OutputStore

    images = tmp_path / "images"
    images.mkdir()
    sources = sorted(IMAGES.iterdir())
    paths = []
    for i in range(24):
        src = sources[i % len(sources)]
        paths.append(str(shutil.copy(src, images / f"{i:02d}-{src.name}")))
    out = tmp_path / "run"
    args = [sys.executable, "-m", "clipn_cli", "detect", "--engine", "ray", "--actors", "1", "--shard-size", "2",
            "-w", str(tiny_weights), "--classes", CLASSES, "--output", str(out), "-"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = spawn([*args, "--ray-address", cluster.address], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    driver.stdin.write("".join(p + "\n" for p in paths[:12]))  # the rest never comes: the run cannot finish
    driver.stdin.flush()
    store = OutputStore.open(str(out))
    deadline = time.monotonic() + HANG_GUARD
    finished: dict = {}
    while len(finished) < 3:
        assert driver.poll() is None, driver.stderr.read()
        assert time.monotonic() < deadline, "the driver finished no shard"
        time.sleep(0.1)
        try:
            manifest = load_manifest(store) if (out / "manifest.json").exists() else None
        except Exception:  # a marker folded away between listing and reading: look again
            continue
        finished = manifest.shards if manifest else {}
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=HANG_GUARD)
    killed = load_manifest(store)
    assert not killed.complete and 3 <= len(killed.shards) <= 6
    kept = {i: os.stat(out / s["file"]) for i, s in killed.shards.items()}
    (out / "shards" / ".part-000011.parquet.deadbeef.tmp").write_bytes(b"half a shard")  # what a killed writer leaves

    resumed = subprocess.run([*args, "--resume"], input="".join(p + "\n" for p in paths), capture_output=True, text=True,
                             env=env, timeout=HANG_GUARD)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{12 - len(killed.shards)} shards scored now" in resumed.stderr
    records = list(read_output(str(out)))
    assert [r["path"] for r in records] == paths and all("error" not in r for r in records)
    for index, before in kept.items():  # finished shards were not scored or written again
        after = os.stat(out / killed.shards[index]["file"])
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]
    assert resumed.stdout == ""  # records go to --output, never to stdout


@needs_ray
def test_lost_worker_costs_nothing(cluster, tiny_weights: Path, inputs: list[str], local_records: list[dict], tmp_path: Path) -> None:
    """An actor's process killed mid-run: Ray restarts it and retries its shard; every input once."""
    import ray

    from clipn_cli.heads.embeddings import embed_classes
    from clipn_cli.inputs.sources import iter_inputs
    from clipn_cli.heads.prompts import load_templates
    from clipn_cli.scale import read_output
    from clipn_cli.scale.manifest import load_manifest
    from clipn_cli.scale.ray_engine import Cluster, ClusterSpec, detect_job, run_detect
    from clipn_cli.scale.store import OutputStore
    from clipn_cli.scale.worker import ScoreOptions, WorkerConfig
    from clipn_cli.weights.checkpoints import load_model

    model, info = load_model(tiny_weights)
    heads = embed_classes(model, CLASSES.split(","), load_templates("clipn"), info.fingerprint)
    options = ScoreOptions(top_k=2)
    store = OutputStore.open(str(tmp_path / "run"))
    gate = threading.Event()
    items = list(iter_inputs(inputs))

    def stream():
        yield from items[:6]
        gate.wait(HANG_GUARD)
        yield from items[6:]

    with Cluster(ClusterSpec(actors=2), WorkerConfig(str(tiny_weights)), heads, options) as pool:
        pids = ray.get([a.__ray_call__.remote(lambda w: w.pid) for a in pool.actors])
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(m=run_detect(
            stream(), store, detect_job(info.fingerprint, heads, options, "parquet", 2), pool, shard_size=2, manifest_interval=0)))
        runner.start()
        deadline = time.monotonic() + HANG_GUARD
        while not ((tmp_path / "run" / "manifest.json").exists() and len(load_manifest(store).shards) >= 2):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(pids[0], signal.SIGKILL)
        gate.set()
        runner.join(HANG_GUARD)
        assert result["m"].complete
        assert ray.get(pool.actors[0].__ray_call__.remote(lambda w: w.pid)) != pids[0]  # restarted
    assert_same_records(list(read_output(str(tmp_path / "run"))), local_records)


@needs_ray
def test_ray_eval_equals_local_eval_and_uses_the_cache(cluster, tiny_weights: Path, tmp_path: Path) -> None:
    ood = tmp_path / "ood"
    shutil.copytree(DIGITS_IMAGES, ood)
    common = ("eval", "-w", str(tiny_weights), "--classes", CLASSES, "--id", str(IMAGES), "--ood", f"digits={ood}", "--format", "json")
    local = invoke(*common, "--output", str(tmp_path / "local.json"), "--save-scores", str(tmp_path / "local.jsonl"))
    assert local.returncode == 0, local.stderr
    cache = tmp_path / "cache"
    for run in ("first", "second"):
        result = invoke(*common, "--engine", "ray", "--actors", "2", "--cache", str(cache),
                        "--output", str(tmp_path / f"{run}.json"), "--save-scores", str(tmp_path / f"{run}.jsonl"))
        assert result.returncode == 0, result.stderr
        want, got = json.loads((tmp_path / "local.json").read_text()), json.loads((tmp_path / f"{run}.json").read_text())
        assert got["images"] == want["images"] and got["id_accuracy"] == want["id_accuracy"]
        for a, b in zip(got["results"], want["results"]):
            assert a.keys() == b.keys()
            for key, value in b.items():
                assert_close_records(a[key], value, (b["ood"], b["method"], key), key)
        for a, b in zip(jsonl(tmp_path / f"{run}.jsonl"), jsonl(tmp_path / "local.jsonl")):
            assert a["path"] == b["path"]
            for m in ("ctw", "atd", "msp", "energy", "mcm"):
                assert_close_records(a[m], b[m], (a["path"], m), m)
    total = len(list(IMAGES.iterdir())) + len(list(DIGITS_IMAGES.iterdir()))
    assert f"{total} reused, 0 encoded" in result.stderr  # the second run sent nothing to the cluster


@needs_ray
def test_score_dataset_maps_paths_or_bytes_to_records(cluster, tiny_weights: Path, local_records: list[dict], inputs: list[str]) -> None:
    """The Python API for Ray Data pipelines: a Dataset of paths, or of read_binary_files bytes."""
    import ray

    from clipn_cli.heads.embeddings import embed_classes
    from clipn_cli.heads.prompts import load_templates
    from clipn_cli.scale import ScoreOptions, score_dataset
    from clipn_cli.weights.checkpoints import load_model

    model, info = load_model(tiny_weights)
    heads = embed_classes(model, CLASSES.split(","), load_templates("clipn"), info.fingerprint)
    files = [r for r in local_records if os.path.isfile(r["path"])]
    by_paths = ray.data.from_items([{"path": r["path"]} for r in files])
    rows = score_dataset(by_paths, str(tiny_weights), heads, ScoreOptions(top_k=2), batch_size=4).take_all()
    # rows come in Ray Data's order (README: not the input's): compared by path, as below
    assert_same_records(sorted((_record(r) for r in rows), key=lambda r: r["path"]), sorted(files, key=lambda r: r["path"]))

    good = [r for r in files if "error" not in r]
    raw = ray.data.read_binary_files([r["path"] for r in good], include_paths=True)
    rows = score_dataset(raw, str(tiny_weights), heads, ScoreOptions(top_k=2), bytes_column="bytes", batch_size=4).take_all()
    assert_same_records(sorted((_record(r) for r in rows), key=lambda r: r["path"]), sorted(good, key=lambda r: r["path"]))

    from clipn_cli.scores.calibration import CalibratedVerdicts, Calibration

    calib = Calibration({"atd": [r["atd_score"] for r in good]}, info.fingerprint, heads.classes, heads.templates, heads.templates_sha256)
    verdicts = CalibratedVerdicts(calib, "atd", 0.25)
    rows = score_dataset(raw, str(tiny_weights), heads, ScoreOptions(top_k=2), bytes_column="bytes", batch_size=4, verdicts=verdicts).take_all()
    want = [verdicts.apply(dict(r)) for r in good]
    assert {r["verdict"] for r in want} == {"ID", "OOD"}
    assert_same_records(sorted((_record(r) for r in rows), key=lambda r: r["path"]), sorted(want, key=lambda r: r["path"]))


def _record(row: dict) -> dict:
    """A Dataset row as detect's record (drop the nulls of fields the record does not have)."""
    import numpy as np

    def plain(v):
        if isinstance(v, np.ndarray):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v.item() if isinstance(v, np.generic) else v

    row = {k: plain(v) for k, v in row.items()}
    if row.get("error") is not None:
        return {"path": row["path"], "error": row["error"]}
    return {k: v for k, v in row.items() if v is not None and not (k == "top_k" and v == [])}


def test_without_ray_the_engine_is_one_line_saying_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    for args in (("detect", "--engine", "ray", "--classes", CLASSES, "--output", str(tmp_path / "o"), str(IMAGES)),
                 ("eval", "--engine", "ray", "--classes", CLASSES, "--id", str(IMAGES), "--ood", f"d={DIGITS_IMAGES}")):
        result = invoke(*args)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert lines == ["clipn: error: --engine ray needs Ray, which is not installed: pip install 'clipn-cli[ray]'"]


def test_ray_options_need_the_ray_engine() -> None:
    result = invoke("detect", "--actors", "2", "--classes", CLASSES, str(IMAGES))
    assert result.returncode == 2 and "need --engine ray" in result.stderr


def test_plan_shards_is_lazy_and_deterministic() -> None:
    import itertools

    from clipn_cli.inputs.sources import InputItem
    from clipn_cli.scale.planner import plan_shards

    endless = (InputItem(f"img/{i}.jpg") for i in itertools.count())  # a listing that never ends still plans
    first, second = itertools.islice(plan_shards(endless, 1000), 2)
    assert (first.index, len(first.items), first.items[0].path, second.items[0].path) == (0, 1000, "img/0.jpg", "img/1000.jpg")
    again = next(plan_shards((InputItem(f"img/{i}.jpg") for i in range(1500)), 1000))
    assert again.digest == first.digest
    moved = next(plan_shards([InputItem("img/x.jpg"), *first.items[1:]], 1000))
    assert moved.digest != first.digest
    tail = list(plan_shards((InputItem(str(i)) for i in range(2500)), 1000))
    assert [len(s.items) for s in tail] == [1000, 1000, 500] and [s.name for s in tail] == ["part-000000", "part-000001", "part-000002"]


@needs_ray
def test_tables_of_paths_are_inputs(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipn_cli.inputs.sources import iter_inputs

    names = ["rocket.jpg", "coffee.png", "nope.png"]
    pq.write_table(pa.table({"path": [str(IMAGES / n) for n in names], "label": [1, 2, 3]}), tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text("label,path\n1,imgs/a.png\n2,/abs/b.png\n", encoding="utf-8")
    (tmp_path / "bad.csv").write_text("file\nx.png\n", encoding="utf-8")
    assert [i.path for i in iter_inputs([str(tmp_path / "t.parquet")])] == [str(IMAGES / n) for n in names]
    assert [i.path for i in iter_inputs([str(tmp_path / "t.csv")])] == [str(tmp_path / "imgs" / "a.png"), "/abs/b.png"]
    # an unreadable table is one error record naming it; the inputs after it still come
    bad = [(i.path, i.error) for i in iter_inputs([str(tmp_path / "bad.csv"), str(IMAGES / "rocket.jpg")])]
    assert bad == [(str(tmp_path / "bad.csv"), "the CSV table has no 'path' column in its header"), (str(IMAGES / "rocket.jpg"), None)]


@needs_ray
def test_object_store_mode_writes_in_place_and_commits_through_the_manifest(tmp_path: Path) -> None:
    """On S3-like stores a PUT is atomic: no temporary + rename; a shard counts once the manifest has it."""
    from clipn_cli.scale.manifest import Manifest, ManifestWriter, load_manifest
    from clipn_cli.scale.output import read_output
    from clipn_cli.outputs.records import encode_shard
    from clipn_cli.scale.store import OutputStore

    store = OutputStore.open(str(tmp_path / "run"))
    store.atomic_rename = False
    store.prepare()
    writer = ManifestWriter(store, Manifest({"command": "detect", "format": "jsonl"}), interval=3600)
    writer.flush()
    store.write(encode_shard([{"path": "a.png", "error": "no such file"}], "jsonl"), "shards", "part-000000.jsonl")
    store.write(encode_shard([{"path": "b.png", "error": "no such file"}], "jsonl"), "shards", "part-000001.jsonl")
    writer.finished(0, {"file": "shards/part-000000.jsonl", "records": 1, "errors": 1, "digest": "ab12"})
    assert sorted(load_manifest(store).shards) == [0]  # shard 1's file exists but was never committed
    assert [r["path"] for r in read_output(str(tmp_path / "run"), require_complete=False)] == ["a.png"]
    with pytest.raises(Exception, match="not finished"):
        list(read_output(str(tmp_path / "run")))


@needs_ray
@pytest.mark.parametrize("how", ["calibrated", "neglabel"])
def test_ray_gives_calibrated_and_negative_label_verdicts_as_local_detect(
    cluster, tiny_weights: Path, inputs: list[str], tmp_path: Path, how: str
) -> None:
    """--calibration/--alpha, --negatives/--words, --threshold and --report on Ray: local detect's records
    and report, p_value column even in a shard of error records only; a resume with another calibration
    is refused."""
    from clipn_cli.scale import read_output

    base = ["-w", str(tiny_weights), "--classes", CLASSES, "--words", str(WORDS), "--negatives", "neglabel"]
    if how == "calibrated":
        calib = tmp_path / "calib.json"
        made = invoke("calibrate", "-w", str(tiny_weights), "--classes", CLASSES, "--alpha", "0.3", "-o", str(calib), str(IMAGES))
        assert made.returncode == 0, made.stderr
        base += ["--calibration", str(calib), "--alpha", "0.3"]
    else:
        base += ["--rule", "neglabel", "--threshold", "0.4"]
    local = tmp_path / "local.jsonl"
    assert invoke("detect", *base, "--format", "jsonl", "--output", str(local), *inputs).returncode == 1
    want = jsonl(local)
    out = tmp_path / "run"
    report = tmp_path / "report.html"
    result = invoke("detect", "--engine", "ray", "--actors", "2", "--shard-size", "4", *base, "--output", str(out),
                    "--report", str(report), *inputs)
    assert result.returncode == 1, result.stderr
    got = list(read_output(str(out)))
    assert_same_records(got, want)
    # the report is the one local detect writes for the same records, built from every shard
    local_report = tmp_path / "local.html"
    assert invoke("detect", *base, "--format", "jsonl", "--output", str(tmp_path / "again.jsonl"), "--report", str(local_report), *inputs).returncode == 1
    made_by = re.compile(r'<table class="prov">.*?</table>')  # the provenance: its date, and engine: ray
    assert made_by.sub("", report.read_text()) == made_by.sub("", local_report.read_text())
    assert "<th>engine</th><td>ray</td>" in report.read_text() and "<th>engine</th>" not in local_report.read_text()
    scored = [r for r in want if "error" not in r]
    assert all("neglabel_score" in r for r in scored)
    if how == "calibrated":
        assert {r["verdict"] for r in scored} == {"ID", "OOD"} and all(("p_value" in r) == ("error" not in r) for r in got)
        import pyarrow.parquet as pq

        assert all("p_value" in pq.read_schema(f).names for f in (out / "shards").iterdir())
        other = invoke("detect", "--engine", "ray", "--actors", "2", "--shard-size", "4", *base[:-1], "0.4", "--resume",
                       "--output", str(out), *inputs)
        assert other.returncode == 2 and "calibration=" in other.stderr
    else:
        assert all(r["verdict"] == ("OOD" if r["neglabel_score"] < 0.4 else "ID") for r in scored)


def test_ray_refuses_bad_option_combinations_before_starting(tiny_weights: Path, tmp_path: Path) -> None:
    args = ["detect", "--engine", "ray", "-w", str(tiny_weights), "--classes", CLASSES, "--output", str(tmp_path / "run"), str(IMAGES)]
    fdr = invoke(*args, "--fdr", "0.1")
    assert fdr.returncode == 2 and "--fdr needs --calibration FILE" in fdr.stderr
    both = invoke(*args, "--calibration", str(tmp_path / "c.json"), "--fdr", "0.1", "--alpha", "0.1")
    assert both.returncode == 2 and "not both" in both.stderr
    rule = invoke(*args, "--rule", "neglabel")
    assert rule.returncode == 2 and "--threshold" in rule.stderr
    assert not (tmp_path / "run").exists()


@needs_ray
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_ray_fdr_rewrites_every_shard_with_the_q_values_of_the_whole_run(
    cluster, tiny_weights: Path, inputs: list[str], tmp_path: Path, fmt: str
) -> None:
    """--fdr on Ray: Benjamini-Hochberg over every p-value of the run, as local detect computes it, in a
    last pass that rewrites each shard; running that pass again changes nothing."""
    from clipn_cli.scale import read_output
    from clipn_cli.scale.manifest import load_manifest
    from clipn_cli.scale.output import apply_fdr
    from clipn_cli.scale.store import OutputStore

    calib = tmp_path / "calib.json"
    assert invoke("calibrate", "-w", str(tiny_weights), "--classes", CLASSES, "--alpha", "0.3", "-o", str(calib), str(IMAGES)).returncode == 0
    base = ["-w", str(tiny_weights), "--classes", CLASSES, "--calibration", str(calib), "--fdr", "0.75"]
    local = tmp_path / "local.jsonl"
    assert invoke("detect", *base, "--format", "jsonl", "--output", str(local), *inputs).returncode == 1
    want = jsonl(local)
    scored = [r for r in want if "error" not in r]
    assert all("q_value" in r for r in scored) and {r["verdict"] for r in scored} == {"ID", "OOD"}
    out = tmp_path / "run"
    result = invoke("detect", "--engine", "ray", "--actors", "2", "--shard-size", "4", "--format", fmt, *base,
                    "--output", str(out), *inputs)
    assert result.returncode == 1, result.stderr
    assert "Benjamini-Hochberg at FDR 0.75" in result.stderr
    assert_same_records(list(read_output(str(out))), want)
    files = sorted((out / "shards").iterdir())
    before = [f.read_bytes() for f in files]
    store = OutputStore.open(str(out))
    assert apply_fdr(store, load_manifest(store), 0.75) == sum(r.get("verdict") == "OOD" for r in want)
    assert [f.read_bytes() for f in files] == before


@needs_ray
def test_ray_detect_reads_a_csv_table(cluster, tiny_weights: Path, local_records: list[dict], tmp_path: Path) -> None:
    from clipn_cli.scale import read_output

    chosen = local_records[:3] + [r for r in local_records if "error" in r][:2]
    (tmp_path / "index.csv").write_text("path\n" + "".join(r["path"] + "\n" for r in chosen), encoding="utf-8")
    result = invoke("detect", "--engine", "ray", "--actors", "1", "--format", "jsonl", "-w", str(tiny_weights), "--classes", CLASSES,
                    "--top-k", "2", "--output", str(tmp_path / "run"), str(tmp_path / "index.csv"))
    assert result.returncode == 1, result.stderr
    assert_same_records(list(read_output(str(tmp_path / "run"))), chosen)


@needs_ray
def test_shards_keep_non_utf8_file_names() -> None:
    """A file name whose bytes are not UTF-8 (lone surrogates in Python) must not cost its shard."""
    from clipn_cli.outputs.records import decode_shard, encode_shard

    records = [{"path": "/x/caf\udce9.jpg", "error": "no such file"}, {"path": "/x/ok.jpg", "error": "no such file"}]
    assert list(decode_shard(encode_shard(records, "jsonl"), "jsonl")) == records  # exact, as local JSON Lines
    back = list(decode_shard(encode_shard(records, "parquet"), "parquet"))
    assert back == [{"path": "/x/caf\\xe9.jpg", "error": "no such file"}, records[1]]


@needs_ray
def test_default_actors_take_a_node_each_and_niced_workers_are_reported(cluster, tiny_weights: Path) -> None:
    """Joined cluster of two 1-CPU nodes: one 1-CPU actor per node (its threads); a worker at nice 15
    (Ray's default, which lets every other process preempt it) is found and reported."""
    import ray

    from clipn_cli.scale.ray_engine import Cluster, ClusterSpec
    from clipn_cli.scale.worker import ScoreOptions, WorkerConfig

    with Cluster(ClusterSpec(), WorkerConfig(str(tiny_weights)), None, ScoreOptions()) as pool:
        assert (len(pool.actors), pool.cpus_per_actor) == (2, 1.0)
        assert ray.get([a.__ray_call__.remote(lambda w: (w.config.threads, w.config.run.decode_workers)) for a in pool.actors]) == [(1, 1), (1, 1)]
        assert (pool.niceness, pool.niceness_warning()) == (0, None)
        ray.get(pool.actors[1].__ray_call__.remote(lambda w: os.setpriority(os.PRIO_PROCESS, 0, 15)))  # as Ray's default starts it
        pool._check_ready()
        assert pool.niceness == 15
        assert "RAY_worker_niceness=0" in pool.niceness_warning()
    with Cluster(ClusterSpec(actors=4), WorkerConfig(str(tiny_weights)), None, ScoreOptions()) as pool:
        assert (len(pool.actors), pool.cpus_per_actor) == (4, 0.5)  # an equal share of the 2 CPUs, so that all 4 start


@needs_ray
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None, reason="needs the onnx extra")
def test_ray_runtime_onnx_equals_local_runtime_onnx(cluster, tiny_weights: Path, inputs: list[str], tmp_path: Path) -> None:
    """Each actor loads the export its driver made once (README "Runtimes"); records equal local
    `detect --runtime onnx` within the README's reproducibility bound, and the manifest names the runtime."""
    from clipn_cli.scale import read_output
    from clipn_cli.weights.home import weights_home

    local = tmp_path / "local.jsonl"
    result = invoke("detect", "-w", str(tiny_weights), "--classes", CLASSES, "--top-k", "2", "--runtime", "onnx",
                    "--format", "jsonl", "--output", str(local), *inputs)
    assert result.exit_code == 1, result.output
    exports = sorted((weights_home() / "runtimes").glob("*.onnx"))
    shutil.rmtree(weights_home() / "runtimes")  # the driver exports again, before any actor starts
    out = tmp_path / "run"
    result = invoke("detect", "--engine", "ray", "--actors", "2", "--shard-size", "5", "--runtime", "onnx", "--format", "jsonl",
                    "-w", str(tiny_weights), "--classes", CLASSES, "--top-k", "2", "--output", str(out), *inputs)
    assert result.exit_code == 1, result.output
    assert sorted((weights_home() / "runtimes").glob("*.onnx")) == exports
    assert_same_records(list(read_output(str(out))), jsonl(local))
    assert json.loads((out / "manifest.json").read_text())["runtime"] == "onnx"
