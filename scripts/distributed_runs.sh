#!/usr/bin/env bash
# Runs recipes/sft.py (and recipes/grpo.py under ZeRO-3) briefly under every multi-GPU accelerate config and checks
# each saved checkpoint loads with trust_remote_code in a fresh process. Used on a 2-GPU machine; writes a markdown
# report to $OUT (default docs/benchmarks). Usage: bash scripts/distributed_runs.sh [NUM_GPUS]
set -u
N=${1:-2}
OUT=${OUT:-docs/benchmarks}
RUNS=${RUNS_DIR:-/tmp/ghostvis_runs}
mkdir -p "$OUT" "$RUNS"
REPORT="$OUT/distributed.md"
# The small preset's own model: clear the tiny main job's resampler/config overrides (sft_tiny.yaml is the default).
COMMON="--preset small --resampler_type perceiver --config_overrides= --max_steps 6 --num_train_samples 512 --num_eval_samples 16 --per_device_train_batch_size 8
  --bf16 true --save_strategy no --eval_after_training false --plot false --logging_steps 1 --max_length 512
  --dataloader_num_workers 2 --report_to none"
{
  echo "# Multi-GPU launches of the recipes"
  echo
  echo "- machine: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
  echo "- versions: $(python3 -c 'import torch, transformers, trl, accelerate, deepspeed; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, accelerate {accelerate.__version__}, deepspeed {deepspeed.__version__}")' 2>/dev/null)"
  echo "- command: \`bash scripts/distributed_runs.sh $N\` (each run: \`accelerate launch --config_file accelerate_configs/<config>.yaml --num_processes $N recipes/sft.py $(echo $COMMON)\`)"
  echo
  echo "| run | config | exit | steps | final loss | train s | checkpoint reloads (trust_remote_code) |"
  echo "|---|---|---|---|---|---|---|"
} > "$REPORT"

check() {  # $1 = checkpoint dir -> "yes: ..., N tokens generated" or the error (bench_scaling.py's reload check)
  python3 -c 'import sys; sys.path.insert(0, "scripts"); from bench_scaling import reload_check
print(reload_check(sys.argv[1], "cuda"))' "$1" 2>&1 | tail -1
}

row() {  # name config script extra...
  local name=$1 cfg=$2 script=$3; shift 3
  local dir="$RUNS/$name"; rm -rf "$dir"
  local t0=$(date +%s)
  timeout 240 accelerate launch --config_file "accelerate_configs/$cfg.yaml" --num_processes "$N" "$script" \
    --output_dir "$dir" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local summary=$(python3 - "$dir" <<'PY'
import json, os, sys
d = sys.argv[1]
for f in ("sft_summary.json", "rl_summary.json"):
    p = os.path.join(d, f)
    if os.path.exists(p):
        s = json.load(open(p))
        print(s.get("steps", s.get("logged_steps", "?")))
        break
else:
    print("-")
PY
)
  local loss=$(tr '\r' '\n' < "$OUT/$name.log" | sed -n "s/.*'loss': '\([-0-9.e]*\)'.*/\1/p" | tail -1)
  local rt=$(tr '\r' '\n' < "$OUT/$name.log" | sed -n "s/.*'train_runtime': '\([0-9.]*\)'.*/\1/p" | head -1)
  local ok="-"; [ "$rc" = 0 ] && ok=$(check "$dir")
  echo "| $name | $cfg | $rc | $summary | ${loss:--} | ${rt:--} | $ok |" >> "$REPORT"
  echo "$name rc=$rc wall=$(( $(date +%s) - t0 ))s"
}

row sft_ddp multi_gpu recipes/sft.py $COMMON
row sft_zero2 deepspeed_zero2 recipes/sft.py $COMMON --optim adamw_torch_fused
row sft_zero3 deepspeed_zero3 recipes/sft.py $COMMON --optim adamw_torch_fused
row sft_fsdp2 fsdp2 recipes/sft.py $COMMON
row grpo_zero3 deepspeed_zero3 recipes/grpo.py --model_name_or_path "$RUNS/sft_ddp" --max_steps 2 \
  --num_train_samples 32 --per_device_train_batch_size 8 --num_generations 4 --max_completion_length 8 \
  --bf16 true --logging_steps 1 --plot false --report_to none
cat "$REPORT"
