"""Where `clipn serve`'s memory goes under many clients (issue 22): one server per variant, its RSS
sampled in-process every 10 ms beside what it holds at that moment.

    python benchmarks/mem_serve.py                                   # the variants below, 64 clients, 64 JPEGs
    python benchmarks/mem_serve.py --variants base,arena2 --clients 64 --images 32
    python benchmarks/mem_serve.py --code /tmp/old-checkout --variants base   # the same load on another commit
    python benchmarks/mem_serve.py --forward 1,4,8,16,16,4                   # the forward pass alone, per batch size

Each variant is a fresh `clipn serve` (ViT-B-16-shaped random CLIPN as bench_serve.py builds it,
cached class embeddings) started through this file's `--child` mode, which runs the real CLI
in-process beside a sampler thread: VmRSS, the requests admitted (`clipn_queue_depth`), the
request bodies and decoded images the service holds, and (variant `trace`) tracemalloc's Python
total. The parent sends one warm-up request, then `--clients` threads send the JPEGs once between
them, one image per JSON request, as bench_serve.py does. Reported per variant: idle RSS (after the
warm-up) and the peak during the load, with the counts at the peak. Loopback only, bounded by
--images and the server's --timeout.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent

# name: (extra environment, extra `clipn serve` options)
VARIANTS: dict[str, tuple[dict[str, str], list[str]]] = {
    "base": ({}, ["--max-batch", "16"]),
    "arena2": ({"MALLOC_ARENA_MAX": "2"}, ["--max-batch", "16"]),
    "batch4": ({}, ["--max-batch", "4"]),
    "trace": ({"CLIPN_MEM_TRACE": "1"}, ["--max-batch", "16"]),
}


def rss_mb() -> float:
    found = re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(found.group(1)) / 1024 if found else float("nan")


def child(timeline: Path, argv: list[str]) -> None:
    """Run `clipn serve argv` in this process, writing (time, RSS, held counts) every 10 ms to `timeline`."""
    import tracemalloc

    from clipn_cli.cli.app import app
    from clipn_cli.serve import run

    trace = os.environ.get("CLIPN_MEM_TRACE") == "1"
    if trace:
        tracemalloc.start()
    services: list[Any] = []
    real_run = run.run_server

    def capture(service: Any, *args: Any, **kwargs: Any) -> None:
        services.append(service)
        real_run(service, *args, **kwargs)

    run.run_server = capture  # type: ignore[assignment]
    import clipn_cli.cli.serve as cli_serve  # noqa: F401  (imports run_server from run at call time)

    def sample() -> None:
        with timeline.open("w") as out:
            while True:
                row: dict[str, Any] = {"t": time.time(), "rss": rss_mb()}
                if services:
                    service = services[0]
                    row["depth"] = service.batcher.depth()
                    held = getattr(service, "held", None)
                    if held is not None:
                        row.update(held.counts())
                if trace:
                    row["py_mb"] = tracemalloc.get_traced_memory()[0] / (1 << 20)
                out.write(json.dumps(row) + "\n")
                out.flush()
                time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    app(["serve", *argv], standalone_mode=False)


def post(host: str, port: int, name: str, b64: str) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=600)
    try:
        conn.request("POST", "/v1/detect", json.dumps({"images": [b64], "names": [name]}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def variant(name: str, weights: Path, embeddings: Path, images: list[tuple[str, str]], clients: int, work: Path, code: Path) -> dict[str, Any]:
    env_extra, options = VARIANTS[name]
    timeline = work / f"{name}.jsonl"
    cmd = [sys.executable, __file__, "--child", str(timeline), "-w", str(weights), "-e", str(embeddings),
           "--host", "127.0.0.1", "--port", "0", "--queue", str(clients), "--max-images", "1", *options]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **env_extra, "PYTHONPATH": str(code)})
    assert proc.stderr is not None
    for line in proc.stderr:
        if found := re.search(r"serving on http://([\d.]+):(\d+)", line):
            host, port = found.group(1), int(found.group(2))
            break
    else:
        raise RuntimeError(f"{name}: the server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    post(host, port, *images[0])
    time.sleep(0.5)
    start = time.time()
    pending, lock, statuses = list(images), threading.Lock(), []

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                item = pending.pop()
            status = post(host, port, *item)
            with lock:
                statuses.append(status)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    load = os.getloadavg()[0]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.time()
    proc.terminate()
    proc.wait(120)
    rows = [json.loads(line) for line in timeline.read_text().splitlines() if line.strip()]
    idle = [r for r in rows if r["t"] < start]
    busy = [r for r in rows if start <= r["t"] <= end]
    peak = max(busy, key=lambda r: r["rss"])
    most = {k: max(r.get(k, 0) for r in busy) for k in busy[0] if k not in ("t", "rss")}
    return {"variant": name, "env": env_extra, "options": options, "idle_rss_mb": idle[-1]["rss"], "peak_rss_mb": peak["rss"],
            "growth_mb": peak["rss"] - idle[-1]["rss"], "at_peak": {k: v for k, v in peak.items() if k not in ("t", "rss")},
            "most": most, "seconds": end - start, "statuses": {str(s): statuses.count(s) for s in set(statuses)},
            "load_avg": [load, os.getloadavg()[0]]}


def forward_probe(batches: list[int]) -> None:
    """The forward pass alone: the image tower at each batch size on a worker thread (as the server's
    model thread), VmRSS sampled every 5 ms; peak and retained over the idle process (malloc_trim'd
    after a batch-1 warm-up, and again after each batch so that retained memory does not hide a peak)."""
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    import torch

    import bench
    from clipn_cli.weights.checkpoints import load_model

    libc = ctypes.CDLL("libc.so.6")
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_model(bench.make_weights(Path(tmp))[0])

    def forward(size: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.encode_image(torch.randn(size, 3, 224, 224), normalize=True)
        return time.perf_counter() - start

    peak, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], rss_mb())

    threading.Thread(target=sample, daemon=True).start()
    worker = ThreadPoolExecutor(1)
    worker.submit(forward, 1).result()
    for size in batches:
        libc.malloc_trim(0)
        base = peak[0] = rss_mb()
        seconds = worker.submit(forward, size).result()
        print(json.dumps({"batch": size, "idle_rss_mb": base, "peak_growth_mb": peak[0] - base, "retained_mb": rss_mb() - base,
                          "images_per_s": size / seconds, "load_avg": os.getloadavg()[0]}), flush=True)
    stop.set()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[3:])
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--forward":
        forward_probe([int(b) for b in sys.argv[2].split(",")])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose clipn_cli the servers run (e.g. an older commit's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    import bench
    from clipn_cli.weights.checkpoints import load_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights, _ = bench.make_weights(work)
        model, info = load_model(weights)
        embeddings = bench.make_embeddings(model, info, work / "classes.safetensors")
        del model
        jpgs = bench.make_jpegs(work / "jpg", args.images, (500, 375))
        images = [(p.name, base64.b64encode(p.read_bytes()).decode()) for p in sorted(jpgs.glob("*.jpg"))]
        for name in args.variants.split(","):
            result = variant(name, weights, embeddings, images, args.clients, work, args.code.resolve())
            results.append(result)
            result["code"] = str(args.code)
            print(json.dumps(result), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"clients": args.clients, "images": args.images, "cpus": os.cpu_count(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
