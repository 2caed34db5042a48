#!/usr/bin/env bash
# Issue 7's experiment on a GPU in one call (the device tool allows 600 s per call), from the repo root:
#
#     bash bench/gpu_session_rl.sh
#
# 1. warm start: `quantrl pretrain` of a ~24M-parameter Qwen3-shaped model (hidden 512, 8 layers, SwiGLU 1536)
#    on the arithmetic task, on the GPU (slot PRETRAIN_S, default 150 s: ~3000 steps of ~5k tokens, each a
#    few ms of GEMMs plus the trainer's Python; then a greedy held-out accuracy on 128 problems);
# 2. `bench/rl_recipes.py` from that checkpoint under issue 7's six recipes (the MXFP8 / NVFP4 ones are left
#    out to fit the slot), same seeds and data (slot RL_S, default 380 s: 6 x 80 GRPO steps of 16 prompts x 8
#    samples, decode under CUDA graphs; ~0.3-0.6 s a step).
# Separate from bench/gpu_session.sh (kernels/rollout/train/sync benches, 540 s): the 15-minute device budget
# holds one of the two per session. Logs go to $OUT/logs, the JSON and plots to $OUT/results; each step
# runs under `timeout` (SIGINT, then SIGKILL 10 s later) and the summary has one line per step.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu_session_out}
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH=src:bench${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
mkdir -p "$OUT/logs" "$OUT/results"
WARM=${WARM_DIR:-runs/warm24m}

declare -A STATUS=()
step() { # step NAME SECONDS CMD...
  local name=$1 slot=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (timeout ${slot} s): $*" | tee "$OUT/logs/$name.log"
  timeout -s INT -k 10 "$slot" "$@" 2>&1 | tee -a "$OUT/logs/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) STATUS[$name]="ok ($((SECONDS - t0)) s)" ;;
    124 | 137) STATUS[$name]="TIMEOUT after $((SECONDS - t0)) s" ;;
    *) STATUS[$name]="FAILED rc=$rc: $(grep -v '^[[:space:]]*$' "$OUT/logs/$name.log" | tail -n 1 | cut -c 1-110)" ;;
  esac
  return "$rc"
}

timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/logs/env.log"
if step pretrain "${PRETRAIN_S:-150}" "$PY" -m quantrl.cli pretrain --device cuda --out-dir "$WARM" \
  --hidden-size 512 --num-layers 8 --intermediate-size 1536 --steps 3000 --batch-size 128 --lr 1e-3 \
  --no-progress; then
  cp "$WARM/pretrain_summary.json" "$OUT/results/"
  step rl-recipes "${RL_S:-380}" "$PY" bench/rl_recipes.py --device cuda --model "$WARM" --num-steps 80 \
    --eval-interval 20 --cuda-graph --out runs/rl_recipes_gpu \
    --recipes bf16 fp8-rollout fp8 int4-qat int4-ptq int4-qat-bf16-rollout
  cp -r bench/results/rl_recipes_cuda.json bench/results/rl_recipes_cuda "$OUT/results/" 2>/dev/null
else
  STATUS[rl-recipes]="not run (no warm start)"
fi

{
  echo
  echo "=== gpu_session_rl summary (${SECONDS} s; logs: $OUT/logs, results: $OUT/results)"
  for name in pretrain rl-recipes; do printf '  %-12s %s\n' "$name" "${STATUS[$name]:-not run}"; done
} | tee "$OUT/summary.txt"
[[ ${STATUS[pretrain]} == ok* && ${STATUS[rl-recipes]} == ok* ]]
