"""`clipn detect --engine ray` against local `clipn detect` on the same JPEGs, on this machine (issue 14).

    python benchmarks/bench_ray.py                       # ViT-B-16-shaped random CLIPN, 256 JPEGs, A/B alternated twice
    python benchmarks/bench_ray.py --model digits --rounds 3

Both sides are whole commands in fresh processes (`python -m clipn_cli detect`), with cached class
embeddings, on the same 500×375 JPEGs (made as `bench.py` makes them), alternated local, ray,
local, ray, … so that background load hits both alike. The Ray side starts its own local cluster
(the default), one actor with all the machine's CPUs (`--actors 1 --cpus-per-actor N`), shards of
64, Parquet output; its time includes `ray.init` and the actor loading the weights. Reported:
wall time of each run, the throughput ratio local_wall / ray_wall (target ≥ 0.8 on one node), the
Ray side's start-up (until its actor is ready, from its own stderr line) and its time after
start-up, and the largest score difference between the two sides' records.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (the same weights and JPEGs as the main benchmark)

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "clipn_cli", "detect"]


def timed(cmd: list[str]) -> tuple[float, float | None, str]:
    """Wall time of `cmd`, and when its stderr said the cluster was ready (None if it never did)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    ready = None
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if ready is None and "scoring on Ray with" in line:
            ready = time.perf_counter() - start
    rc = proc.wait()
    if rc not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}: {''.join(lines)[-800:]}")
    return time.perf_counter() - start, ready, "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("vitb16", "digits"), default="vitb16")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=64)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model == "vitb16":
            weights, _ = bench.make_weights(work)
        else:
            weights = ROOT / "weights" / "clipn-digits.safetensors"
        from clipn_cli.weights import load_model

        model, info = load_model(weights)
        embeddings = bench.make_embeddings(model, info, work / "classes.safetensors")
        del model
        jpgs = bench.make_jpegs(work / "jpg", args.images, (500, 375))
        common = ["-w", str(weights), "--embeddings", str(embeddings), str(jpgs)]
        runs: dict[str, list[dict]] = {"local": [], "ray": []}
        for n in range(args.rounds):
            local_out = work / f"local{n}.jsonl"
            wall, _, _ = timed([*CLI, *common, "--format", "jsonl", "--output", str(local_out)])
            runs["local"].append({"wall_s": wall, "load_avg": os.getloadavg()[0]})
            print(f"round {n}: local {wall:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
            ray_out = work / f"ray{n}"
            wall, ready, _ = timed([*CLI, *common, "--engine", "ray", "--actors", "1", "--cpus-per-actor", str(cpus),
                                    "--shard-size", str(args.shard_size), "--output", str(ray_out)])
            runs["ray"].append({"wall_s": wall, "startup_s": ready, "load_avg": os.getloadavg()[0]})
            print(f"round {n}: ray   {wall:.1f} s, of which start-up (cluster + actor with weights) {ready:.1f} s", flush=True)
        from clipn_cli.scale import read_output

        local = {r["path"]: r for r in map(json.loads, local_out.read_text().splitlines())}
        remote = list(read_output(str(ray_out)))
        assert len(remote) == len(local) == args.images
        deviation = max(abs(r[k] - local[r["path"]][k]) for r in remote for k in bench.SCORE_KEYS)
        verdicts = sum(r["verdict"] != local[r["path"]]["verdict"] for r in remote)
    best = {side: min(r["wall_s"] for r in rs) for side, rs in runs.items()}
    ratio = best["local"] / best["ray"]
    steady = best["local"] / min(r["wall_s"] - r["startup_s"] for r in runs["ray"])
    summary = {
        "model": args.model, "images": args.images, "cpus": cpus, "shard_size": args.shard_size, "runs": runs,
        "throughput_ratio_best": ratio,
        "throughput_ratio_median": sorted(r["wall_s"] for r in runs["local"])[len(runs["local"]) // 2]
        / sorted(r["wall_s"] for r in runs["ray"])[len(runs["ray"]) // 2],
        "ratio_after_startup": steady, "max_score_deviation": deviation, "verdicts_differing": verdicts,
    }
    print(f"Ray/local throughput (best of {args.rounds} each, whole commands): {ratio:.2f}x (target >= 0.8); "
          f"after Ray's start-up: {steady:.2f}x; max score deviation {deviation:.1e}, {verdicts} verdicts differ")
    out = Path(__file__).with_name(f"bench_ray-{args.model}.json")
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
