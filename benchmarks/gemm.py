"""fp32 matrix products in torch (MKL), ONNX Runtime (MLAS) and OpenVINO (oneDNN) on this CPU (issue 23, item 3).

    python benchmarks/gemm.py                                  # 3 rounds, 1 and 2 threads
    python benchmarks/gemm.py --rounds 5 --out benchmarks/gemm.json

Is torch's fp32 GEMM behind the other runtimes' on this processor? Each library runs in a fresh
process per round (their thread pools never share a process), libraries alternated round by round
so background load hits all alike; the 1-minute load average is recorded before each. Shapes: one
4096² square product, and the two largest products of a ViT-B-16 image tower at batch 12 (197
tokens × 12 images = 2364 rows): the MLP's 768 → 3072 and the attention's 768 → 2304. Reported:
GFLOP/s (best of 5 calls after a warm-up) per library, shape and thread count, median over rounds,
and each library's ratio to torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"square 4096": (4096, 4096, 4096), "vit mlp 2364x768x3072": (2364, 768, 3072), "vit qkv 2364x768x2304": (2364, 768, 2304)}
LIBRARIES = ("torch", "onnxruntime", "openvino")


def product(library: str, threads: int, m: int, k: int, n: int):  # noqa: ANN201 - a callable of the library's own types
    import numpy as np

    a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    if library == "torch":
        import torch

        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        return lambda: torch.mm(ta, tb)
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("C", TensorProto.FLOAT, [m, n])], [numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if library == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return lambda: session.run(None, {"A": a})
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    return lambda: compiled(a)


def child(library: str, threads: int) -> dict[str, float]:
    rates = {}
    for name, (m, k, n) in SHAPES.items():
        call = product(library, threads, m, k, n)
        call()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * m * k * n / best / 1e9
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        library, threads = opts.child.split(":")
        print(json.dumps(child(library, int(threads))))
        return
    runs: dict[str, list[dict]] = {}
    for round_ in range(opts.rounds):
        for threads in opts.threads.split(","):
            for library in LIBRARIES:
                key = f"{library} x{threads}"
                load = os.getloadavg()[0]
                done = subprocess.run([sys.executable, __file__, "--child", f"{library}:{threads}"], capture_output=True, text=True, check=True)
                runs.setdefault(key, []).append({"load_1min": round(load, 2), **json.loads(done.stdout.splitlines()[-1])})
                print(f"round {round_}: {key:16} " + "  ".join(f"{s} {runs[key][-1][s]:.0f}" for s in SHAPES) + f"  (load {load:.1f})", flush=True)
    summary: dict[str, dict] = {}
    for key, got in runs.items():
        torch_key = "torch x" + key.split(" x")[1]
        summary[key] = {shape: {"gflops": round(statistics.median(r[shape] for r in got), 1),
                                "vs_torch": round(statistics.median(r[shape] for r in got) / statistics.median(r[shape] for r in runs[torch_key]), 2)}
                        for shape in SHAPES}
        summary[key]["load_1min"] = [r["load_1min"] for r in got]
        print(key, json.dumps(summary[key]), flush=True)
    if opts.out:
        conditions = {"cpus": os.cpu_count(), "rounds": opts.rounds, "cpu": _cpu_model()}
        opts.out.write_text(json.dumps({"conditions": conditions, "summary": summary}, indent=1) + "\n")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
