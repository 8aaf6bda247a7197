"""One image through `clipn detect --embeddings F`: the torch-free fast start (`--runtime onnx` and
`--runtime openvino`, export cached) against today's torch path (`--runtime torch`), wall and CPU
seconds of the whole process.

    python benchmarks/faststart.py                    # digits demo and a random ViT-B-16, 5 rounds
    python benchmarks/faststart.py --models digits --rounds 9 --out benchmarks/faststart.json

The three commands alternate in rounds (onnx, openvino, torch, onnx, …) so background load on a shared
machine hits both alike; the 1-minute load average is recorded before each run, and each run's
records are checked equal in verdicts and classes. The ONNX export is made by one run beforehand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "clipn_cli"]
MODELS = {
    "digits": ("zero,one,two,three,four", ROOT / "examples" / "digits" / "images" / "eight-0040.png"),
    "vitb16": ("cat,horse,rocket,coffee", ROOT / "tests" / "fixtures" / "images" / "chelsea.png"),
}
VARIANTS = {"fast (onnx, no torch)": ("--runtime", "onnx"), "fast (openvino, no torch)": ("--runtime", "openvino"),
            "today (torch)": ("--runtime", "torch")}


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, stdout) of one process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done.stdout


def weights_for(model: str, work: Path) -> str:
    if model == "digits":
        return "digits"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import make_weights  # a random ViT-B-16 CLIPN, as benchmarks/bench.py measures

    return str(make_weights(work)[0])


def measure(model: str, rounds: int, work: Path, env: dict[str, str]) -> dict:
    classes, image = MODELS[model]
    weights = weights_for(model, work)
    heads = work / f"{model}.safetensors"
    subprocess.run([*CLI, "embed-classes", "-w", weights, "-c", classes, "--templates", "simple", "-o", str(heads)], env=env, check=True,
                   capture_output=True)
    base = [*CLI, "detect", "-w", weights, "-e", str(heads), "--format", "jsonl", str(image)]
    subprocess.run([*base, "--runtime", "onnx"], env=env, check=True, capture_output=True)  # exports and caches the tower
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    outputs: dict[str, str] = {}
    for _ in range(rounds):
        for name, args in VARIANTS.items():
            load = os.getloadavg()[0]
            wall, cpu, out = timed([*base, *args], env)
            runs[name].append({"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "load_1min": round(load, 2)})
            outputs[name] = out
    fast, vino, today = (json.loads(outputs[name]) for name in VARIANTS)
    assert (fast["verdict"], fast["class"]) == (vino["verdict"], vino["class"]) == (today["verdict"], today["class"]), (fast, vino, today)
    summary = {name: {"median_wall_s": statistics.median(r["wall_s"] for r in rs), "median_cpu_s": statistics.median(r["cpu_s"] for r in rs),
                      "min_wall_s": min(r["wall_s"] for r in rs), "runs": rs} for name, rs in runs.items()}
    return {"weights": weights if model == "digits" else "random ViT-B-16 (benchmarks/bench.py make_weights)", "image": str(image.relative_to(ROOT)),
            "largest_score_change": max(abs(r[k] - today[k]) for r in (fast, vino) for k in ("ctw_score", "atd_score", "msp")), **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,vitb16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    opts = parser.parse_args()
    report: dict = {"cpu": os.cpu_count(), "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "CLIPN_HOME": str(work / "home"), "PYTHONPATH": str(ROOT)}
        for model in opts.models.split(","):
            report[model] = measure(model, opts.rounds, work, env)
            for name in VARIANTS:
                row = report[model][name]
                print(f"{model:7} {name:22} wall {row['median_wall_s']:.2f} s (min {row['min_wall_s']:.2f})  CPU {row['median_cpu_s']:.2f} s  "
                      f"load {[r['load_1min'] for r in row['runs']]}", flush=True)
    if opts.out:
        opts.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
