"""`clipn serve` against offline `clipn detect` on the same JPEGs, on this machine, over loopback (issue 22).

    python benchmarks/bench_serve.py                         # ViT-B-16-shaped random CLIPN, 64 JPEGs, 2 rounds
    python benchmarks/bench_serve.py --images 256 --rounds 3 --clients 1,4,16,64

One `clipn serve` process (default batching: --max-batch 16, --max-wait-ms 5; --queue as large as
the most clients, so none is refused) holds the model for the whole run. Each round runs the
offline command (`python -m clipn_cli detect`, a fresh process, cached class embeddings, start-up
included; also timed after its first batch) and then, for each client count, that many client
threads sending every image once, one image per request (JSON base64, keep-alive connections),
so that background load hits both sides alike; the load average is recorded with each. Reported:
images/s per side and client count, p50/p99 request latency, a lone request's latency on the
idle server against one bare image-tower forward of one decoded image in this process (alternated),
the server's RSS while idle and its peak while the most clients are sending (VmRSS sampled every
20 ms), and the largest score difference between the server's records and the offline ones.
The bare forward runs on a worker thread of this process, as the server runs its forwards on its
model thread: on a shared, oversubscribed 2-core machine a forward with torch's 2 OpenMP threads
started from a process's main thread was 2-5x slower than the same forward started from another
thread; the main-thread time is reported beside it (offline `detect` forwards on its main thread).
Bounded: --images requests per pass, and every pass stops taking new requests after --max-seconds.
Nothing leaves 127.0.0.1.

    python benchmarks/bench_serve.py --ray 2 --images 32 --rounds 2 --clients 1,4

`--ray N` instead compares `clipn serve --engine ray --replicas N` (its own local cluster, one CPU
per replica) with local serve, both up at once on the same weights, images and client counts,
alternated within each round (the order swapped every round), and the records' largest difference.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (the same weights and JPEGs as the main benchmark)

ROOT = Path(__file__).resolve().parent.parent


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident (or, with VmHWM, peak resident) memory in MB, from /proc."""
    found = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(found.group(1)) * 1024 / bench.MB if found else float("nan")


class Server:
    """A `clipn serve` subprocess on an ephemeral loopback port."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([*bench.CLI, "serve", "--host", "127.0.0.1", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stderr is not None
        lines = []
        for line in self.proc.stderr:
            lines.append(line)
            if found := re.search(r"serving on http://([\d.]+):(\d+)", line):
                self.host, self.port = found.group(1), int(found.group(2))
                break
        else:
            raise RuntimeError("clipn serve did not start: " + "".join(lines)[-800:])
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()  # keep its pipe drained

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(300)  # Ray Serve's shutdown takes tens of seconds on a loaded machine


def post(conn: http.client.HTTPConnection, name: str, b64: str) -> tuple[float, list[dict[str, Any]]]:
    """One image in one request: its latency and the records."""
    body = json.dumps({"images": [b64], "names": [name]})
    start = time.perf_counter()
    conn.request("POST", "/v1/detect", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    answer = response.read()
    seconds = time.perf_counter() - start
    if response.status != 200:
        raise RuntimeError(f"{name}: {response.status} {answer[:200]!r}")
    return seconds, json.loads(answer)


def load(server: Server, images: list[tuple[str, str]], clients: int, max_seconds: float, sample_rss: bool) -> dict[str, Any]:
    """`clients` threads send the images once between them; throughput, latencies and (optionally) peak RSS."""
    lock, latencies, records = threading.Lock(), [], []
    pending = list(reversed(images))
    stop = threading.Event()
    peak = [rss_mb(server.proc.pid)]

    def client() -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=max_seconds + 60)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    if not pending:
                        return
                    name, b64 = pending.pop()
                seconds, got = post(conn, name, b64)
                with lock:
                    latencies.append(seconds)
                    records.extend(got)
        finally:
            conn.close()

    def sampler() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], rss_mb(server.proc.pid))

    watcher = threading.Thread(target=sampler, daemon=True)
    if sample_rss:
        watcher.start()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    deadline = start + max_seconds
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    stop.set()
    ordered = sorted(latencies)
    return {
        "clients": clients, "images": len(records), "wall_s": wall, "images_per_s": len(records) / wall,
        "p50_s": statistics.median(ordered), "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "load_avg": [load_before, os.getloadavg()[0]], "peak_rss_mb": peak[0] if sample_rss else None, "records": records,
    }


def offline(weights: Path, embeddings: Path, jpgs: Path, count: int) -> dict[str, Any]:
    """The offline command on the same JPEGs: whole-command and after-first-batch images/s, and its records."""
    load_before = os.getloadavg()[0]
    run = bench.checked([*bench.CLI, "detect", "-w", str(weights), "-e", str(embeddings), str(jpgs), "-f", "jsonl"])
    assert len(run.lines) == count, f"detect wrote {len(run.lines)} records"
    first, last = run.line_times[min(bench.BATCH, count) - 1], run.line_times[-1]
    return {
        "wall_s": run.wall_s, "images_per_s": count / run.wall_s,
        "steady_images_per_s": (count - bench.BATCH) / (last - first) if count > bench.BATCH and last > first else None,
        "peak_rss_mb": run.peak_rss_mb, "load_avg": [load_before, os.getloadavg()[0]], "records": bench.records(run),
    }


def lone_vs_bare(server: Server, model: Any, jpg: Path, b64: str, repeats: int) -> dict[str, Any]:
    """A lone request on the idle server against one bare forward of the same image (decoded beforehand), alternated."""
    import torch

    from clipn_cli.inputs.decode import image_size_of, load_one, make_transform
    from clipn_cli.inputs.sources import InputItem

    pixels = load_one(InputItem(str(jpg)), make_transform(image_size_of(model))).pixels[None]
    model_thread = ThreadPoolExecutor(1)  # where the server runs its forwards (see the module docstring)
    bench.timed_forward(model, pixels)  # warm-up, as the server's first request was
    model_thread.submit(bench.timed_forward, model, pixels).result()
    lone, bare, bare_main = [], [], []
    conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
    try:
        for _ in range(repeats):
            lone.append(post(conn, jpg.name, b64)[0])
            bare.append(model_thread.submit(bench.timed_forward, model, pixels).result()[0])
            bare_main.append(bench.timed_forward(model, pixels)[0])
    finally:
        conn.close()
        model_thread.shutdown()
    return {"lone_request_s": lone, "bare_forward_s": bare, "bare_forward_main_thread_s": bare_main, "torch_threads": torch.get_num_threads(),
            "ratio_median": statistics.median(lone) / statistics.median(bare), "ratio_best": min(lone) / min(bare)}


def deviation(served: list[dict[str, Any]], local: list[dict[str, Any]]) -> tuple[float, int]:
    """Largest score difference and verdicts that differ, matching records by image name."""
    by_name = {Path(r["path"]).name: r for r in local}
    worst, differ = 0.0, 0
    for r in served:
        other = by_name[r["path"]]
        worst = max(worst, *(abs(r[k] - other[k]) for k in bench.SCORE_KEYS))
        differ += r["verdict"] != other["verdict"]
    return worst, differ


def summarize(rounds: list[dict[str, Any]], clients: list[int], lone: dict[str, Any], idle_rss: float) -> dict[str, Any]:
    """Best (and median) of the rounds per side; ratios against the offline command."""
    best_offline = max(r["offline"]["images_per_s"] for r in rounds)
    best_steady = max((r["offline"]["steady_images_per_s"] or 0.0) for r in rounds)
    per_clients = {}
    for c in clients:
        runs = [r["serve"][str(c)] for r in rounds]
        ips = max(x["images_per_s"] for x in runs)
        per_clients[str(c)] = {
            "images_per_s_best": ips, "images_per_s_median": statistics.median(x["images_per_s"] for x in runs),
            "vs_offline_whole": ips / best_offline, "vs_offline_after_first_batch": ips / best_steady if best_steady else None,
            "p50_s": min(x["p50_s"] for x in runs), "p99_s": min(x["p99_s"] for x in runs),
        }
    peak = max(r["serve"][str(clients[-1])]["peak_rss_mb"] for r in rounds)
    return {"offline_images_per_s_best": best_offline, "offline_steady_images_per_s_best": best_steady, "serve": per_clients,
            "lone_vs_bare_median": lone["ratio_median"], "lone_vs_bare_best": lone["ratio_best"],
            "lone_request_median_s": statistics.median(lone["lone_request_s"]), "bare_forward_median_s": statistics.median(lone["bare_forward_s"]),
            "bare_forward_main_thread_median_s": statistics.median(lone["bare_forward_main_thread_s"]),
            "idle_rss_mb": idle_rss, f"peak_rss_mb_at_{clients[-1]}_clients": peak, "rss_growth_mb": peak - idle_rss}


def report(summary: dict[str, Any], clients: list[int]) -> None:
    print(f"offline detect: {summary['offline_images_per_s_best']:.2f} img/s whole command, "
          f"{summary['offline_steady_images_per_s_best']:.2f} img/s after its first batch")
    for c in clients:
        s = summary["serve"][str(c)]
        after = f", {s['vs_offline_after_first_batch']:.2f}x after-first-batch" if s["vs_offline_after_first_batch"] else ""
        print(f"serve, {c:>2} clients: {s['images_per_s_best']:.2f} img/s = {s['vs_offline_whole']:.2f}x offline whole{after}; "
              f"p50 {s['p50_s'] * 1e3:.0f} ms, p99 {s['p99_s'] * 1e3:.0f} ms")
    print(f"lone request / bare forward: {summary['lone_vs_bare_median']:.2f}x (medians), {summary['lone_vs_bare_best']:.2f}x (best) (target <= 1.1x); "
          f"medians {summary['lone_request_median_s']:.2f} s vs {summary['bare_forward_median_s']:.2f} s "
          f"(bare from the main thread: {summary['bare_forward_main_thread_median_s']:.2f} s)")
    print(f"server RSS: idle {summary['idle_rss_mb']:.0f} MB, peak at {clients[-1]} clients "
          f"{summary[f'peak_rss_mb_at_{clients[-1]}_clients']:.0f} MB (+{summary['rss_growth_mb']:.0f} MB; target <= +256 MB)")


def ray_against_local(weights: Path, embeddings: Path, images: list[tuple[str, str]], clients: list[int], rounds: int,
                      replicas: int, max_seconds: float) -> dict[str, Any]:
    """Ray Serve at `replicas` against local serve: images/s and p50/p99 per client count, alternated."""
    common = ["-w", str(weights), "-e", str(embeddings), "--max-images", "1"]
    local = Server([*common, "--queue", str(max(clients))])
    ray = Server([*common, "--engine", "ray", "--replicas", str(replicas), "--queue", str(max(clients)), "--max-ongoing", "4"])
    servers = {"local": local, "ray": ray}
    try:
        for server in servers.values():
            warm = http.client.HTTPConnection(server.host, server.port, timeout=300)
            for name, b64 in images[:2 * replicas]:
                post(warm, name, b64)  # every replica's first forward
            warm.close()
        runs: list[dict[str, Any]] = []
        for n in range(rounds):
            for c in clients:
                order = ["local", "ray"] if n % 2 == 0 else ["ray", "local"]
                for side in order:
                    got = load(servers[side], images, c, max_seconds, sample_rss=False)
                    runs.append({"round": n, "side": side, **got})
                    print(f"round {n}: {side} {c} clients {got['images_per_s']:.2f} img/s, p50 {got['p50_s']:.2f} s, "
                          f"p99 {got['p99_s']:.2f} s (load {got['load_avg'][0]:.1f})", flush=True)
    finally:
        codes = {side: server.stop() for side, server in servers.items()}
    by_name = {side: {r["path"]: r for run in runs if run["side"] == side for r in run["records"]} for side in servers}
    worst, differ = deviation(list(by_name["ray"].values()), [by_name["local"][p] for p in by_name["ray"]])
    for run in runs:
        run.pop("records")
    summary = {}
    for c in clients:
        best = {side: max(r["images_per_s"] for r in runs if r["side"] == side and r["clients"] == c) for side in servers}
        p50 = {side: min(r["p50_s"] for r in runs if r["side"] == side and r["clients"] == c) for side in servers}
        summary[str(c)] = {"local_images_per_s": best["local"], "ray_images_per_s": best["ray"], "ray_vs_local": best["ray"] / best["local"],
                           "local_p50_s": p50["local"], "ray_p50_s": p50["ray"]}
        print(f"{c:>2} clients: ray {best['ray']:.2f} img/s vs local {best['local']:.2f} img/s = {best['ray'] / best['local']:.2f}x; "
              f"p50 ray {p50['ray'] * 1e3:.0f} ms vs local {p50['local'] * 1e3:.0f} ms")
    print(f"max score deviation ray vs local {worst:.1e}, {differ} verdicts differ; exits {codes}")
    return {"summary": summary, "runs": runs, "max_score_deviation": worst, "verdicts_differing": differ, "exits": codes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", default="1,4,16,64", help="comma-separated client counts, each run every round")
    parser.add_argument("--lone", type=int, default=8, help="lone requests (and bare forwards) alternated")
    parser.add_argument("--max-seconds", type=float, default=300, help="a pass stops taking new requests after this")
    parser.add_argument("--ray", type=int, default=0, help="compare clipn serve --engine ray at this many replicas with local serve instead")
    args = parser.parse_args()
    clients = sorted(int(c) for c in args.clients.split(","))
    from clipn_cli.weights.checkpoints import load_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights, _ = bench.make_weights(work)
        model, info = load_model(weights)
        embeddings = bench.make_embeddings(model, info, work / "classes.safetensors")
        jpgs = bench.make_jpegs(work / "jpg", args.images, (500, 375))
        images = [(p.name, base64.b64encode(p.read_bytes()).decode()) for p in sorted(jpgs.glob("*.jpg"))]
        if args.ray:
            conditions = {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(), "images": args.images, "rounds": args.rounds,
                          "replicas": args.ray, "image_size": "500x375 JPEG", "one image per request": True}
            result = ray_against_local(weights, embeddings, images, clients, args.rounds, args.ray, args.max_seconds)
            conditions["load_avg_at_end"] = os.getloadavg()
            out = Path(__file__).with_name("bench_serve_ray.json")
            out.write_text(json.dumps({"conditions": conditions, **result}, indent=1) + "\n")
            print(f"wrote {out}")
            return
        conditions = {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(), "images": args.images, "rounds": args.rounds,
                      "image_size": "500x375 JPEG", "server": "defaults (--max-batch 16, --max-wait-ms 5)", "offline_batch": bench.BATCH}
        server = Server(["-w", str(weights), "-e", str(embeddings), "--queue", str(max(clients)), "--max-images", "1"])
        try:
            warm = http.client.HTTPConnection(server.host, server.port, timeout=300)
            post(warm, *images[0])  # the first forward pays one-off costs; a serving process has them behind it
            warm.close()
            idle_rss = rss_mb(server.proc.pid)
            rounds = []
            for n in range(args.rounds):
                entry: dict[str, Any] = {"offline": offline(weights, embeddings, jpgs, args.images), "serve": {}}
                print(f"round {n}: offline {entry['offline']['images_per_s']:.2f} img/s (load {entry['offline']['load_avg'][0]:.1f})", flush=True)
                for c in clients:
                    entry["serve"][str(c)] = load(server, images, c, args.max_seconds, sample_rss=c == clients[-1])
                    got = entry["serve"][str(c)]
                    print(f"round {n}: serve {c} clients {got['images_per_s']:.2f} img/s, p50 {got['p50_s']:.2f} s (load {got['load_avg'][0]:.1f})", flush=True)
                rounds.append(entry)
            lone = lone_vs_bare(server, model, sorted(jpgs.glob("*.jpg"))[0], images[0][1], args.lone)
            server_hwm = rss_mb(server.proc.pid, "VmHWM")
        finally:
            code = server.stop()
    worst, differ = 0.0, 0
    for entry in rounds:
        for c in clients:
            w, d = deviation(entry["serve"][str(c)].pop("records"), entry["offline"]["records"])
            worst, differ = max(worst, w), differ + d
        entry["offline"].pop("records")
    summary = summarize(rounds, clients, lone, idle_rss)
    report(summary, clients)
    print(f"max score deviation serve vs offline {worst:.1e}, {differ} verdicts differ; server exit {code}")
    conditions["load_avg_at_end"] = os.getloadavg()
    out = Path(__file__).with_name("bench_serve.json" if args.images == 64 else f"bench_serve-{args.images}.json")
    out.write_text(json.dumps({"conditions": conditions, "summary": summary, "lone": lone, "rounds": rounds,
                               "server_vmhwm_mb": server_hwm, "max_score_deviation": worst, "verdicts_differing": differ,
                               "server_exit": code}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
