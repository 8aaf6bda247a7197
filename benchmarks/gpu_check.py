"""The Python halves of benchmarks/gpu_check.sh (issue 23, item 6); each prints one JSON object.

    python benchmarks/gpu_check.py scores OUT.json [--device cuda]       # CUDA vs CPU scores, tiny official model
    python benchmarks/gpu_check.py throughput OUT.json [--device cuda]   # detect vs bare forward, ViT-B-16-sized

`--device cpu --small` (gpu_check.sh --dry-run) runs the same code on tiny sizes, to check it without a GPU.
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

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(Path(__file__).resolve().parent))
CLI = [sys.executable, "-m", "clipn_cli"]
CLASSES = "cat,horse,rocket,coffee,astronaut"


def detect(args: list[str], timeout: float = 300) -> tuple[list[dict], float]:
    start = time.perf_counter()
    done = subprocess.run([*CLI, "detect", "--format", "jsonl", *args], capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"detect {' '.join(args[:6])}...: exit {done.returncode}: {done.stderr.strip()[-400:]}")
    return [json.loads(line) for line in done.stdout.splitlines()], elapsed


def largest_change(a: list[dict], b: list[dict]) -> dict[str, object]:
    keys = ("ctw_score", "atd_score")
    pairs = [(x, y) for x, y in zip(a, b) if "error" not in x and "error" not in y]
    return {"images": len(pairs), "max_ctw_atd_diff": max(abs(x[k] - y[k]) for x, y in pairs for k in keys),
            "verdicts_changed": sum(x["verdict"] != y["verdict"] for x, y in pairs)}


def scores(out: Path, device: str, small: bool) -> dict[str, object]:
    """The tiny official model's records on the CPU and on `device` (torch fp32, fp16; onnx when it has CUDA)."""
    from clipn_cli.weights.checkpoints import convert_checkpoint

    images = sorted(str(p) for p in (FIXTURES / "images").iterdir())
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "tiny.safetensors"
        convert_checkpoint(FIXTURES / "clipn-tiny-official.pt", weights, config=str(FIXTURES / "clipn-tiny-config.json"))
        base = ["-w", str(weights), "-c", CLASSES, "--runtime", "torch", *images]
        cpu, _ = detect([*base, "--device", "cpu"])
        result: dict[str, object] = {"device": device, "reference": "torch fp32 on the CPU"}
        variants = {"torch fp32": ["--precision", "fp32"], "torch fp16": ["--precision", "fp16"],
                    "onnx fp32": ["--runtime", "onnx", "--precision", "fp32"]}
        for name, extra in variants.items():
            if small and name == "torch fp16":
                continue  # the CPU's fp16 autocast is not what this checks
            args = [*base[:-len(images)], *extra, "--device", device, *images]
            try:
                got, _ = detect(args)
                result[name] = largest_change(got, cpu)
            except SystemExit as exc:
                result[name] = {"error": str(exc)[:400]}
    out.write_text(json.dumps(result, indent=1))
    return result


def throughput(out: Path, device: str, small: bool) -> dict[str, object]:
    """`clipn detect` against the bare forward of the same tower, batch 256 (--small: 8), fp32 and fp16."""
    import bench
    import torch

    from clipn_cli.weights.checkpoints import load_model

    batch, count = (8, 16) if small else (256, 1024)
    result: dict[str, object] = {"device": device, "batch": batch, "images": count, "load_avg": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights, _ = bench.make_weights(work)
        model, info = load_model(weights, device=device, text=True)
        embeddings = bench.make_embeddings(model, info, work / "classes.safetensors")
        model = model.eval()
        jpgs = bench.make_jpegs(work / "jpg", count, (500, 375))
        for precision in ("fp32",) if small else ("fp32", "fp16"):
            pixels = torch.randn(batch, 3, 224, 224, device=device)
            dtype = torch.float16 if precision == "fp16" else None
            with torch.inference_mode(), torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                model.encode_image(pixels)  # warm-up
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(max(1, count // batch)):
                    model.encode_image(pixels)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                bare = count / (time.perf_counter() - start)
            records, elapsed = detect(["-w", str(weights), "-e", str(embeddings), "--runtime", "torch", "--device", device,
                                       "--precision", precision, "--batch-size", str(batch), str(jpgs)], timeout=900)
            result[precision] = {"bare_forward_img_s": round(bare, 2), "detect_img_s_incl_start": round(len(records) / elapsed, 2),
                                 "detect_seconds": round(elapsed, 2), "records": len(records)}
    out.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("scores", "throughput"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny sizes (the dry run on a CPU)")
    args = parser.parse_args()
    found = (scores if args.what == "scores" else throughput)(args.out, args.device, args.small)
    print(json.dumps(found))


if __name__ == "__main__":
    main()
