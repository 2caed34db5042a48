#!/usr/bin/env bash
# The GPU session in one call, from the repo root of the device machine:
#
#     bash bench/gpu_session.sh              # every step below, in order, in <= 585 s
#     bash bench/gpu_session.sh rollout sync # a rerun of chosen steps (same slots)
#
# Runs from the source tree (the device machine has no network, so nothing is installed): PYTHONPATH=src:bench.
# Each step runs under its own `timeout` (SIGINT first, so Python prints where it was, the benches write
# the figures they have and pytest its summary; SIGKILL 10 s later), its output is tee'd to logs/<step>.log,
# a failing step does not stop the next one, the GPU benches' JSON is copied to results/ as soon as each step
# ends, and everything is packed into $OUT/session.tgz after every step (bench/_session_out.sh: the device
# tool returns at most 8 files). The last lines printed are one status line per step (also $OUT/summary.txt).
#
# Time budget (GPU_SESSION_BUDGET_S, default 585 s; the device tool allows 600 s per call). The slots are
# estimates from the scripts' loops on an H100/H200, with Triton's first compiles included:
#   env            15 s  nvidia-smi, versions, environment() + the 1 GiB copy_ roofline (results/environment.json);
#                        no slot of its own: its commands are capped at 20 + 20 + 45 s, an overrun delays pytest-gpu
#   pytest-gpu    140 s  -m gpu over tests/ (~80 tests: test_kernels_gpu at full size, gptq, the engine's CUDA
#                        graphs and three short RL runs on CUDA); mostly
#                        Triton compiles (~40 variants x ~1.5 s) plus fp64 references; warms Triton's cache
#   pytest-triton  60 s  test_kernels_triton + test_linear_kernels + test_fp8_training on CUDA (~170 small tests)
#   kernels       120 s  kernels_gpu.py, all 9 shapes, --reps 7: correctness gate (9 shapes x ~8 kernel calls,
#                        compiles mostly cached by now), then 9 shapes x 60 graph-timed figures (~30 ms each;
#                        NVFP4A16 at the 9 W4A16 M values included)
#                        + 6 quantizers; ~100 s expected
#   attention      20 s  attention_gpu.py, decode attention (kernel vs SDPA, BF16 / FP8 cache) at batches
#                        1/8/64/256 x ctx 1024/4096: 8 rows x 5 variants x 7 replays of <= ~2 ms, 2 compiles
#   moe            25 s  moe_gpu.py, one Qwen3-30B-A3B MoE layer (128 experts; INT4, FP8 and BF16 builds, the
#                        experts' first-call probes), T = 1/8/64/256 x 8 dispatches x 7 runs of <= ~10 ms
#   rollout        85 s  rollout_gpu.py, batches 1/8/64/256 x bf16/fp8/int4 with CUDA graphs: 12 engines x
#                        (warm 16+144 steps + 2 x (16+144)) = 480 decode steps each at ~1-5 ms, 3 model builds,
#                        ~15 kernel compiles; --repeats 2 (best of 2, not 3) and the transformers baseline at
#                        batches 1 and 8 only (the target needs batch 1; each HF batch is ~480 eager steps at
#                        ~25 ms = ~12 s): ~80 s expected (defaults: ~150 s)
#   sync           50 s  sync_gpu.py, defaults: 4 formats x (2 model builds + 35 syncs/phases of ~10-50 ms) + floor
#   train          70 s  train_gpu.py, defaults (batch 16 x 1024 tokens, 2 warm-up + 5 steps, 3 modes):
#                        21 steps of ~0.2-0.5 s, 3 builds with fp32 master + AdamW, FP8 compiles: ~50 s expected
#   kernels-sweep   -    optional, only with >= 45 s left: the W4A16 tile sweep (log only, no JSON)
# A step's timeout is what is left before the deadline minus the slots of the steps after it, so time an
# early step does not use passes on to the later ones, and an overrun never eats a later step's slot.
set -uo pipefail
cd "$(dirname "$0")/.."

source bench/_session_out.sh # OUT, STAGE (logs/, results/), pack_out
PY=${PYTHON:-$(command -v python3 || command -v python)} # the device machine's python3 holds torch
BUDGET_S=${GPU_SESSION_BUDGET_S:-585}
export PYTHONPATH=src:bench${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 # live logs through tee
unset TRITON_INTERPRET    # the kernels must compile for the GPU, not run in the CPU interpreter

ORDER=(env pytest-gpu pytest-triton kernels attention moe rollout sync train kernels-sweep)
declare -A SLOT=([env]=15 [pytest-gpu]=140 [pytest-triton]=60 [kernels]=120 [attention]=20 [moe]=25 [rollout]=85 [sync]=50 [train]=70
  [kernels-sweep]=0)
declare -A STATUS=()
MIN_STEP_S=${GPU_SESSION_MIN_STEP_S:-20} # below this a step cannot even import torch: skip it, say so
SWEEP_MIN_S=45

if (($# > 0)); then STEPS=("$@"); else STEPS=("${ORDER[@]}"); fi
for s in "${STEPS[@]}"; do
  [[ -v SLOT[$s] ]] || {
    echo "unknown step '$s' (steps: ${ORDER[*]})" >&2
    exit 2
  }
done
DEADLINE=$((SECONDS + BUDGET_S - 5)) # 5 s for the summary

later_slots() { # sum of the slots of the steps after position $1
  local i sum=0
  for ((i = $1 + 1; i < ${#STEPS[@]}; i++)); do sum=$((sum + SLOT[${STEPS[$i]}])); done
  echo "$sum"
}

# run_step NAME INDEX CMD...: the command under timeout, tee'd; STATUS[NAME] = ok / FAILED / TIMEOUT / SKIPPED
run_step() {
  local name=$1 idx=$2
  shift 2
  local left=$((DEADLINE - SECONDS - $(later_slots "$idx")))
  if ((left < MIN_STEP_S)); then
    STATUS[$name]="SKIPPED (${left} s left in the budget)"
    return
  fi
  local t0=$SECONDS rc
  touch "$STAGE/.start_$name"
  echo "=== $name (timeout ${left} s): $*" | tee "$STAGE/logs/$name.log"
  timeout -s INT -k 10 "$left" "$@" 2>&1 | tee -a "$STAGE/logs/$name.log"
  rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0))
  case $rc in
    0) STATUS[$name]="ok (${dt} s)" ;;
    124 | 137) STATUS[$name]="TIMEOUT after ${dt} s (slot ${left} s)" ;;
    *) STATUS[$name]="FAILED rc=$rc (${dt} s)" ;;
  esac
  if ((rc != 0)); then # the log's last line: pytest's summary or Python's exception
    STATUS[$name]+=": $(grep -v '^[[:space:]]*$' "$STAGE/logs/$name.log" | tail -n 1 | cut -c 1-110)"
  fi
  collect_results "$name"
  pack_out
}

collect_results() { # the GPU benches' JSON written during step $1
  local f
  for f in bench/results/kernels_gpu.json bench/results/attention_gpu.json bench/results/moe_gpu.json \
    bench/results/rollout_gpu.json bench/results/train_gpu.json bench/results/sync_gpu.json; do
    if [[ -f $f && $f -nt "$STAGE/.start_$1" ]]; then cp "$f" "$STAGE/results/"; fi
  done
}

env_report() {
  echo "date: $(date -u +%FT%TZ)  host: $(hostname 2>/dev/null || cat /etc/hostname 2>/dev/null)  python: $PY"
  timeout 20 nvidia-smi || echo "nvidia-smi: not available"
  timeout 20 "$PY" -m pip list 2>/dev/null |
    grep -i -E '^(torch|triton|transformers|safetensors|numpy|tqdm|pytest|hypothesis|compressed|nvidia-cu)' || true
  timeout 45 "$PY" -c '
import json, sys
from _common import describe_roofline, environment, roofline
import torch
env = environment()
env["roofline"] = roofline("cuda") if torch.cuda.is_available() else None
print(json.dumps(env, indent=2))
if env["roofline"]:
    print(describe_roofline(env["roofline"]))
json.dump(env, open(sys.argv[1], "w"), indent=2)
' "$STAGE/results/environment.json"
}

# set_cmd STEP: CMD = the step's argv (tests/test_bench_smoke.py checks every bench flag here against the
# bench's argparse: keep each command a literal CMD=(...) in this function)
set_cmd() {
  case $1 in
    pytest-gpu) CMD=("$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m gpu tests/
      "--junitxml=$STAGE/results/pytest-gpu.xml") ;;
    pytest-triton) CMD=("$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_linear_kernels.py tests/test_fp8_training.py
      "--junitxml=$STAGE/results/pytest-triton.xml") ;;
    kernels) CMD=("$PY" bench/kernels_gpu.py --reps 7) ;;
    attention) CMD=("$PY" bench/attention_gpu.py --reps 7) ;;
    moe) CMD=("$PY" bench/moe_gpu.py --reps 7) ;;
    rollout) CMD=("$PY" bench/rollout_gpu.py --batches 1 8 64 256 --repeats 2 --hf-batches 1 8) ;;
    sync) CMD=("$PY" bench/sync_gpu.py --repeats 10 --warmup 2) ;;
    train) CMD=("$PY" bench/train_gpu.py --modes bf16 int4-qat fp8 --steps 5 --warmup 2) ;;
    kernels-sweep) CMD=("$PY" bench/kernels_gpu.py --sweep --skip-checks --no-write --reps 5
      --shapes 14336x4096 4096x14336 8192x8192 --ms 1 4 16) ;;
  esac
}

for i in "${!STEPS[@]}"; do
  name=${STEPS[$i]}
  if [[ $name == env ]]; then
    t0=$SECONDS
    env_report 2>&1 | tee "$STAGE/logs/env.log"
    STATUS[env]="ok ($((SECONDS - t0)) s)"
    pack_out
    continue
  fi
  if [[ $name == kernels-sweep ]] && ((DEADLINE - SECONDS < SWEEP_MIN_S)); then
    STATUS[$name]="skipped (optional; $((DEADLINE - SECONDS)) s left, it needs ${SWEEP_MIN_S} s)"
    continue
  fi
  set_cmd "$name"
  run_step "$name" "$i" "${CMD[@]}"
done

{
  echo
  echo "=== gpu_session summary (${SECONDS} s of ${BUDGET_S} s; logs/ and results/ in $OUT/session.tgz)"
  for name in "${STEPS[@]}"; do printf '  %-14s %s\n' "$name" "${STATUS[$name]:-not run}"; done
} | tee "$STAGE/summary.txt"
cp "$STAGE/summary.txt" "$OUT/summary.txt"
rm -f "$STAGE"/.start_*
pack_out
for name in "${STEPS[@]}"; do [[ ${STATUS[$name]:-} == ok* || ${STATUS[$name]:-} == skipped* ]] || exit 1; done
exit 0
