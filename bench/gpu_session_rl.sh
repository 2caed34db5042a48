#!/usr/bin/env bash
# Issue 7's experiment on a GPU in one call (the device tool allows 600 s per call), from the repo root:
#
#     bash bench/gpu_session_rl.sh
#
# 1. warm start: `quantrl pretrain` of a ~24M-parameter Qwen3-shaped model (hidden 512, 8 layers, SwiGLU 1536)
#    on the arithmetic task, on the GPU (slot PRETRAIN_S, default 150 s: ~3000 steps of ~5k tokens, each a
#    few ms of GEMMs plus the trainer's Python, stopped after PRETRAIN_S - 40 s and saved as it is, so that
#    the save and a greedy held-out accuracy on 128 problems fit the slot);
# 2. `bench/rl_recipes.py` from that checkpoint under issue 7's six recipes (the MXFP8 / NVFP4 ones are left
#    out to fit the slot), same seeds and data (slot RL_S, default 380 s: 6 x 80 GRPO steps of 16 prompts x 8
#    samples, decode under CUDA graphs; ~0.3-0.6 s a step).
# Separate from bench/gpu_session.sh (kernels/rollout/train/sync benches, 540 s): the 15-minute device budget
# holds one of the two per session. Logs, the JSON, the plots and every run's metrics.jsonl are packed into
# $OUT/session.tgz after each step (bench/_session_out.sh); each step runs under `timeout` (SIGINT, then
# SIGKILL 10 s later) and the summary ($OUT/summary.txt) has one line per step.
set -uo pipefail
cd "$(dirname "$0")/.."

source bench/_session_out.sh # OUT, STAGE (logs/, results/), pack_out
PY=${PYTHON:-$(command -v python3 || command -v python)} # the device machine's python3 holds torch
export PYTHONPATH=src:bench${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
WARM=${WARM_DIR:-runs/warm24m}
RUNS=runs/rl_recipes_gpu

declare -A STATUS=()
step() { # step NAME SECONDS CMD...
  local name=$1 slot=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (timeout ${slot} s): $*" | tee "$STAGE/logs/$name.log"
  timeout -s INT -k 10 "$slot" "$@" 2>&1 | tee -a "$STAGE/logs/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) STATUS[$name]="ok ($((SECONDS - t0)) s)" ;;
    124 | 137) STATUS[$name]="TIMEOUT after $((SECONDS - t0)) s" ;;
    *) STATUS[$name]="FAILED rc=$rc: $(grep -v '^[[:space:]]*$' "$STAGE/logs/$name.log" | tail -n 1 | cut -c 1-110)" ;;
  esac
  pack_out
  return "$rc"
}

timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$STAGE/logs/env.log"
if step pretrain "${PRETRAIN_S:-150}" "$PY" -m quantrl.cli pretrain --device cuda --out-dir "$WARM" \
  --hidden-size 512 --num-layers 8 --intermediate-size 1536 --steps 3000 --batch-size 128 --lr 1e-3 \
  --max-seconds "$((${PRETRAIN_S:-150} - 40))" --no-progress; then
  cp "$WARM/pretrain_summary.json" "$STAGE/results/"
  step rl-recipes "${RL_S:-380}" "$PY" bench/rl_recipes.py --device cuda --model "$WARM" --num-steps 80 \
    --eval-interval 20 --cuda-graph --out "$RUNS" \
    --recipes bf16 fp8-rollout fp8 int4-qat int4-ptq int4-qat-bf16-rollout
  cp -r bench/results/rl_recipes_cuda.json bench/results/rl_recipes_cuda "$STAGE/results/" 2>/dev/null
  # every recipe's per-step metrics, also those of a recipe the timeout cut short
  for run in "$RUNS"/*/; do
    [[ -f $run/metrics.jsonl ]] || continue
    mkdir -p "$STAGE/runs/$(basename "$run")"
    cp "$run"/metrics.jsonl "$run"/config.json "$STAGE/runs/$(basename "$run")/" 2>/dev/null
  done
else
  STATUS[rl-recipes]="not run (no warm start)"
fi

{
  echo
  echo "=== gpu_session_rl summary (${SECONDS} s; logs/, results/ and runs/ in $OUT/session.tgz)"
  for name in pretrain rl-recipes; do printf '  %-12s %s\n' "$name" "${STATUS[$name]:-not run}"; done
} | tee "$STAGE/summary.txt"
cp "$STAGE/summary.txt" "$OUT/summary.txt"
pack_out
[[ ${STATUS[pretrain]} == ok* && ${STATUS[rl-recipes]} == ok* ]]
