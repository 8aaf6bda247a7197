"""Scale simulation for `--engine ray` (issue 14): a synthetic stream of inputs through the planner,
the shard writer and the commit protocol, without images or a model, to measure what the driver
and the output cost per shard.

    python benchmarks/scale_sim.py                      # 10^5 and 10^6 inputs, shards of 10,000
    python benchmarks/scale_sim.py --inputs 1000000 --shard-size 10000 --format parquet

Each size runs in a fresh process, whose peak RSS (ru_maxrss) is the driver's peak memory: if it
does not grow from 10^5 to 10^6 inputs, planning streams. Per shard it times: planning (cutting
the stream and hashing the shard's paths), encoding the shard's records (as a worker would:
detect-shaped records with every score field), writing the file atomically, and committing it
(marker + throttled manifest rewrite). Records are synthetic: the scoring itself is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, random, resource, sys, time
from clipn_cli.inputs.sources import InputItem
from clipn_cli.scale.manifest import Manifest, ManifestWriter
from clipn_cli.scale.planner import plan_shards, shard_digest, shard_name
from clipn_cli.scale.records import encode_shard
from clipn_cli.scale.store import OutputStore

n, size, fmt, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
source = (InputItem(f"/data/scrape/{i // 1000:05d}/{i:09d}.jpg") for i in range(n))  # a streaming listing
store = OutputStore.open(out)
store.prepare()
writer = ManifestWriter(store, Manifest({"command": "detect", "format": fmt, "shard_size": size}), interval=2.0)
rng = random.Random(0)
t = {"plan": 0.0, "encode": 0.0, "write": 0.0, "commit": 0.0}
shards = bytes_out = 0
start = time.perf_counter()
mark = time.perf_counter()
for shard in plan_shards(source, size):
    now = time.perf_counter(); t["plan"] += now - mark
    records = [{"path": it.path, "verdict": "ID", "rule": "atd", "class": "cat", "class_index": 3,
                "ctw_score": rng.random(), "atd_score": rng.random(), "p_ood": rng.random(), "msp": rng.random(),
                "max_logit": 30 * rng.random(), "energy": 30 * rng.random()} for it in shard.items]
    data = encode_shard(records, fmt)
    b = time.perf_counter(); t["encode"] += b - now
    store.write(data, "shards", f"{shard_name(shard.index)}.{fmt}")
    c = time.perf_counter(); t["write"] += c - b
    writer.finished(shard.index, {"file": f"shards/{shard_name(shard.index)}.{fmt}", "records": len(records), "errors": 0, "digest": shard.digest})
    mark = time.perf_counter(); t["commit"] += mark - c
    shards += 1; bytes_out += len(data)
writer.manifest.inputs = n; writer.manifest.complete = True
writer.flush(force=True)
wall = time.perf_counter() - start
print(json.dumps({"inputs": n, "shard_size": size, "format": fmt, "shards": shards, "wall_s": wall,
                  "per_shard_ms": {k: 1e3 * v / shards for k, v in t.items()},
                  "bytes_per_record": bytes_out / n, "manifest_bytes": len(store.read("manifest.json")),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_at_start_mb": rss0 / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--format", default="parquet", choices=("parquet", "jsonl"))
    args = parser.parse_args()
    results = []
    for n in args.inputs:
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run([sys.executable, "-c", CHILD, str(n), str(args.shard_size), args.format, out],
                                  capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
            if done.returncode:
                raise SystemExit(done.stderr)
            results.append(json.loads(done.stdout))
        r = results[-1]
        print(f"{r['inputs']:>9,} inputs, {r['shards']} shards of {r['shard_size']:,}: driver peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(at start {r['rss_at_start_mb']:.0f} MB); per shard " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["per_shard_ms"].items())
              + f"; {r['bytes_per_record']:.1f} B/record; manifest {r['manifest_bytes'] / 1e3:.0f} kB; wall {r['wall_s']:.1f} s", flush=True)
    out = Path(__file__).with_name("scale_sim.json")
    out.write_text(json.dumps({"load_avg": [round(x, 2) for x in os.getloadavg()], "runs": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
