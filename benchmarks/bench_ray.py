"""`clipn detect --engine ray` against local `clipn detect` on the same JPEGs, on this machine (issue 14).

    python benchmarks/bench_ray.py                       # ViT-B-16-shaped random CLIPN, 256 JPEGs, A/B alternated twice
    python benchmarks/bench_ray.py --model digits --rounds 3
    python benchmarks/bench_ray.py --variants local,ray,ray-nice15,ray-2x1   # what issue 14's 0.64x came from

Both sides are whole commands in fresh processes (`python -m clipn_cli detect`), with cached class
embeddings, on the same 500×375 JPEGs (made as `bench.py` makes them), alternated local, ray,
local, ray, … so that background load hits both alike. The Ray side starts its own local cluster
(the default) with the default actors (on CPU: one per node with all its CPUs), shards of 64,
Parquet output; its time includes `ray.init` and the actor loading the weights. Variants, to find
where Ray loses time: `ray-nice15` is one actor with all CPUs whose worker runs at Ray's default
nice 15 (what clipn did before it started its own clusters' workers at nice 0), `ray-2x1` two
actors of one CPU each (clipn's default before). Reported:
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


VARIANTS = {  # name: (extra detect arguments, extra environment)
    "ray": ([], {}),
    "ray-nice15": (["--actors", "1", "--cpus-per-actor", str(os.cpu_count() or 1)], {"RAY_worker_niceness": "15"}),
    "ray-2x1": (["--actors", "2", "--cpus-per-actor", "1"], {}),
}


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float | None, str]:
    """Wall time of `cmd`, and when its stderr said the cluster was ready (None if it never did)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
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
    parser.add_argument("--variants", default="local,ray", help=f"comma-separated, alternated in this order each round: local and any of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    variants = ["local", *(v for v in args.variants.split(",") if v != "local")]  # local first: the others compare with its records
    if "local" not in variants or any(v not in VARIANTS for v in variants if v != "local"):
        parser.error(f"--variants: local and any of {', '.join(VARIANTS)}")
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model == "vitb16":
            weights, _ = bench.make_weights(work)
        else:
            weights = ROOT / "clipn_cli" / "data" / "clipn-digits.safetensors"
        from clipn_cli.weights.checkpoints import load_model

        model, info = load_model(weights)
        embeddings = bench.make_embeddings(model, info, work / "classes.safetensors")
        del model
        jpgs = bench.make_jpegs(work / "jpg", args.images, (500, 375))
        from clipn_cli.scale import read_output

        deviation, verdicts = 0.0, 0
        common = ["-w", str(weights), "--embeddings", str(embeddings), str(jpgs)]
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for n in range(args.rounds):
            for variant in variants:
                if variant == "local":
                    local_out = work / f"local{n}.jsonl"
                    wall, _, _ = timed([*CLI, *common, "--format", "jsonl", "--output", str(local_out)])
                    runs["local"].append({"wall_s": wall, "load_avg": os.getloadavg()[0]})
                    print(f"round {n}: local {wall:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
                    continue
                extra, env = VARIANTS[variant]
                ray_out = work / f"{variant}{n}"
                wall, ready, _ = timed([*CLI, *common, "--engine", "ray", *extra, "--shard-size", str(args.shard_size), "--output", str(ray_out)], env)
                runs[variant].append({"wall_s": wall, "startup_s": ready, "load_avg": os.getloadavg()[0]})
                print(f"round {n}: {variant} {wall:.1f} s, of which start-up (cluster + actor with weights) {ready:.1f} s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
                remote = list(read_output(str(ray_out)))
                local = {r["path"]: r for r in map(json.loads, local_out.read_text().splitlines())}
                assert len(remote) == len(local) == args.images
                deviation = max(deviation, max(abs(r[k] - local[r["path"]][k]) for r in remote for k in bench.SCORE_KEYS))
                verdicts += sum(r["verdict"] != local[r["path"]]["verdict"] for r in remote)
    best = {side: min(r["wall_s"] for r in rs) for side, rs in runs.items()}
    median = {side: sorted(r["wall_s"] for r in rs)[len(rs) // 2] for side, rs in runs.items()}
    pairs = {side: [lo["wall_s"] / r["wall_s"] for lo, r in zip(runs["local"], rs)] for side, rs in runs.items() if side != "local"}
    ratios = {
        side: {
            "throughput_ratio_best": best["local"] / best[side],
            "throughput_ratio_median": median["local"] / median[side],
            "ratio_per_round": pairs[side],
            "ratio_after_startup": best["local"] / min(r["wall_s"] - r["startup_s"] for r in runs[side]),
        }
        for side in pairs
    }
    summary = {
        "model": args.model, "images": args.images, "cpus": cpus, "shard_size": args.shard_size, "runs": runs,
        "ratios": ratios, "max_score_deviation": deviation, "verdicts_differing": verdicts,
    }
    for side, r in ratios.items():
        print(f"{side}/local throughput (whole commands): best {r['throughput_ratio_best']:.2f}x, median {r['throughput_ratio_median']:.2f}x, "
              f"per round {', '.join(f'{x:.2f}' for x in r['ratio_per_round'])} (target >= 0.8); after Ray's start-up: {r['ratio_after_startup']:.2f}x")
    print(f"max score deviation {deviation:.1e}, {verdicts} verdicts differ")
    out = Path(__file__).with_name(f"bench_ray-{args.model}.json" if args.images == 256 else f"bench_ray-{args.model}-{args.images}.json")
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
