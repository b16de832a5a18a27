#!/usr/bin/env bash
# The GPU throughput run of BENCHMARKS.md §3, sized for one short call on one GPU (~8 minutes on an
# H200): SmolLM2-135M's shape on the real construction FAQ, and the ~1B
# Llama shape at sequence 2048; bf16, each contender in its own process, the bf16 matmul peak
# measured in the same run. Every stage writes its JSON and log to OUT; a stage that fails or runs
# out of time leaves the others standing.
#
#   bench/gpu_run.sh OUT [SHAPE_DIR]
#
# SHAPE_DIR: SmolLM2-135M-Instruct's config and tokenizer without weights, written on a machine that
# has the real model by `python -m bench.throughput --export-shape SHAPE_DIR` (a few MiB, where the
# weights would not travel); without it the smollm2-shape stage dequantises the real model itself.
# PYTHON (default python3) must import torch with CUDA and the trainer extra's packages.
set -uo pipefail
out=${1:?usage: bench/gpu_run.sh OUT [SHAPE_DIR]}
shape=${2:-}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD:$PWD/api:$PWD/trainer_image:$PWD/registry${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$py" -c 'import sys, torch, transformers, peft, trl, datasets, accelerate
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__,
      "datasets", datasets.__version__, "accelerate", accelerate.__version__)
print("bf16", torch.cuda.is_bf16_supported(), "flash sdp", torch.backends.cuda.flash_sdp_enabled(),
      "mem-efficient sdp", torch.backends.cuda.mem_efficient_sdp_enabled())'
} >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

# Each stage runs in a process group of its own, so that a stage over its limit is stopped with the
# contender process it was running (a plain `timeout` would leave that worker on the GPU).
stage() {
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  setsid "$py" -m bench.throughput --device cuda --precision bf16 --threads 8 \
    --matmul-n 8192 --matmul-reps 10 --json "$out/$name.json" --plot "$out/$name.png" "$@" \
    >"$out/$name.log" 2>&1 &
  local pid=$!
  (sleep "$limit" && kill -TERM -- "-$pid" 2>/dev/null) &
  local watchdog=$!
  wait "$pid"
  local rc=$?
  kill "$watchdog" 2>/dev/null
  echo "== stage $name: rc=$rc in $((SECONDS - started)) s"
  tail -n 30 "$out/$name.log"
}

shape_args=()
[ -n "$shape" ] && shape_args=(--shape-dir "$shape")
stage smollm2-shape "${SHAPE_LIMIT:-210}" --sizes smollm2-shape "${shape_args[@]}" \
  --repeats 2 --steps 40 --max-length 512
stage 1b "${ONEB_LIMIT:-320}" --sizes 1b --max-length 2048 --repeats 2 --steps 20
