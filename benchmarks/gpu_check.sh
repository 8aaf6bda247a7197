#!/usr/bin/env bash
# One prepared GPU check (issue 23, item 6), under 8 minutes on one GPU. Results: $OUT (or
# benchmarks/gpu_check_out/), one file per step and summary.txt. Every step has its own timeout and a
# failed step does not stop the others; the exit status is 1 when any failed.
#
#   bash benchmarks/gpu_check.sh            # on a machine with CUDA
#   bash benchmarks/gpu_check.sh --dry-run  # without a GPU: the same steps on the CPU at tiny sizes
#
# Steps: CUDA vs CPU scores on the tiny official model (torch fp32/fp16, onnx on CUDA when onnxruntime
# has its CUDA provider); detect vs the bare forward at batch 256, fp32 and fp16, ViT-B-16-sized; the
# NegLabel permutation drawn on CUDA against the official convention (tests/test_neglabel.py); the
# server's throughput (benchmarks/bench_serve.py, small).
set -euo pipefail

cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY="${PYTHON:-python}"
RESULTS="${OUT:-benchmarks/gpu_check_out}"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"
FAILED=0

if (( DRY )); then
  DEVICE=cpu; SMALL=(--small); SERVE_LIMIT=400; SERVE_IMAGES=8; SERVE=(--images 8 --rounds 1 --clients 1,2 --lone 2 --max-seconds 30)
else
  DEVICE=cuda; SMALL=(); SERVE_LIMIT=120; SERVE_IMAGES=48; SERVE=(--images 48 --rounds 1 --clients 1,16,64 --lone 4 --max-seconds 60)
fi

step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to $RESULTS/NAME.log, record the outcome
  local name=$1 limit=$2 rc=0 start=$SECONDS
  shift 2
  timeout --kill-after=10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1 || rc=$?
  local line="$name: rc=$rc in $((SECONDS - start)) s"
  (( rc == 124 || rc == 137 )) && line+=" (timed out at $limit s)"
  echo "$line" | tee -a "$SUMMARY"
  (( rc == 0 )) || FAILED=1
}

{
  echo "dry run: $DRY, device: $DEVICE, date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  "$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())' 2>/dev/null || echo "no onnxruntime"
} | tee -a "$SUMMARY"

step scores 90 "$PY" benchmarks/gpu_check.py scores "$RESULTS/scores.json" --device "$DEVICE" "${SMALL[@]}"
step throughput 180 "$PY" benchmarks/gpu_check.py throughput "$RESULTS/throughput.json" --device "$DEVICE" "${SMALL[@]}"
step permutation 60 "$PY" -m pytest -q -rs tests/test_neglabel.py -k permutation
step serve "$SERVE_LIMIT" "$PY" benchmarks/bench_serve.py "${SERVE[@]}"
mv -f "benchmarks/bench_serve-$SERVE_IMAGES.json" "$RESULTS/" 2>/dev/null || true  # its own output file, kept with the others
if (( ! DRY )) && grep -q "skipped" "$RESULTS/permutation.log"; then
  echo "permutation: the CUDA test was skipped on a GPU machine" | tee -a "$SUMMARY"; FAILED=1
fi
for f in scores throughput; do [[ -s "$RESULTS/$f.json" ]] && { echo "$f:"; cat "$RESULTS/$f.json"; echo; } >> "$SUMMARY"; done
exit "$FAILED"
