#!/usr/bin/env bash
# Sweeps variants of the main job (recipes/sft.py with recipes/configs/sft_tiny.yaml) side by side and tabulates the
# held-out accuracy of each. The tiny model is the same fp32 computation on any device, so a GPU machine with many
# cores runs a dozen variants at once where the 2-core CPU runs one; the chosen variant is then re-timed on the CPU.
# Usage: bash scripts/shapes_sweep.sh [EXTRA ARGS FOR EVERY RUN...]   (writes $OUT/shapes_sweep.md)
set -u
OUT=${OUT:-docs/benchmarks}
RUNS=${RUNS_DIR:-/tmp/ghostvis_sweep}
mkdir -p "$OUT" "$RUNS"
declare -A V=(
  [base]=""
  [lr2e-3]="--learning_rate 2e-3"
  [lr3e-3]="--learning_rate 3e-3"
  [resampler_none]="--resampler_type none"
  [perceiver]="--resampler_type perceiver"
  [glue_lr3e-3]="--vision_tower_lr 3e-3 --projector_lr 3e-3"
  [vision_w128]="--config_overrides vision_config.hidden_size=128,vision_config.intermediate_size=256"
  [vision_3L]="--config_overrides vision_config.num_hidden_layers=3"
  [text_3L]="--config_overrides text_config.num_hidden_layers=3"
  [bs16]="--per_device_train_batch_size 16"
  [turns1]="--shapes_max_turns 1"
  [patch8_none]="--resampler_type none --config_overrides vision_config.patch_size=8"
  [init0.02]="--config_overrides text_config.initializer_range=0.02"
  [epochs2]="--num_train_epochs 2"
  [vision_w128_3L]="--config_overrides vision_config.hidden_size=128,vision_config.intermediate_size=256,vision_config.num_hidden_layers=3"
  [patch8_none_lr2e-3]="--resampler_type none --config_overrides vision_config.patch_size=8 --learning_rate 2e-3"
  [lr2e-3_glue5e-3]="--learning_rate 2e-3 --vision_tower_lr 5e-3 --projector_lr 5e-3"
  [lr3e-3_warmup100]="--learning_rate 3e-3 --warmup_steps 100"
  [p8_w128]="--resampler_type none --config_overrides vision_config.patch_size=8,vision_config.hidden_size=128,vision_config.intermediate_size=256"
  [p8_text3L]="--resampler_type none --config_overrides vision_config.patch_size=8,text_config.num_hidden_layers=3"
  [p8_w128_text3L]="--resampler_type none --config_overrides vision_config.patch_size=8,vision_config.hidden_size=128,vision_config.intermediate_size=256,text_config.num_hidden_layers=3"
  [p8_w128_v3L_text3L]="--resampler_type none --config_overrides vision_config.patch_size=8,vision_config.hidden_size=128,vision_config.intermediate_size=256,vision_config.num_hidden_layers=3,text_config.num_hidden_layers=3"
  [p8_w128_text3L_lr2e-3]="--resampler_type none --config_overrides vision_config.patch_size=8,vision_config.hidden_size=128,vision_config.intermediate_size=256,text_config.num_hidden_layers=3 --learning_rate 2e-3"
)
# Round 3: variants of the round-2 default (sft_tiny.yaml; its config_overrides are D, repeated where a variant adds
# to them, since a command-line value replaces the YAML's).
D="vision_config.patch_size=8,vision_config.hidden_size=128,vision_config.intermediate_size=256,text_config.num_hidden_layers=3"
V+=(
  [r3_base]=""
  [r3_sincos]="--config_overrides $D,vision_position_init=sincos2d"
  [r3_glue3e-3]="--vision_tower_lr 3e-3 --projector_lr 3e-3"
  [r3_sincos_glue3e-3]="--config_overrides $D,vision_position_init=sincos2d --vision_tower_lr 3e-3 --projector_lr 3e-3"
  [r3_epochs2]="--num_train_epochs 2"
  [r3_sincos_epochs2]="--config_overrides $D,vision_position_init=sincos2d --num_train_epochs 2"
  [r3_turns6]="--shapes_max_turns 6"
  [r3_sincos_turns6]="--config_overrides $D,vision_position_init=sincos2d --shapes_max_turns 6"
  [r3_samples39k]="--num_train_samples 39000"
  [r3_lr2e-3]="--learning_rate 2e-3"
  [r3_vision3L]="--config_overrides $D,vision_config.num_hidden_layers=3"
  [r3_vision_w192]="--config_overrides $D,vision_config.hidden_size=192,vision_config.intermediate_size=384"
  [r3_vision_heads8]="--config_overrides $D,vision_config.num_attention_heads=8"
  [r3_text4L]="--config_overrides $D,text_config.num_hidden_layers=4"
  [r3_text_w192]="--config_overrides $D,text_config.hidden_size=192,text_config.intermediate_size=384"
  [r3_bs16_lr7e-4]="--per_device_train_batch_size 16 --learning_rate 7e-4"
  [r3_wd0.05]="--weight_decay 0.05"
  [r3_lr1.5e-3_warmup60]="--learning_rate 1.5e-3 --warmup_steps 60"
)
# Round 4: more passes over the data (round 3's clear winner), packed (cheaper on the CPU), and seeds for the noise.
V+=(
  [r4_pk]="--packing true"
  [r4_pk_e2]="--packing true --num_train_epochs 2"
  [r4_pk_e2_seed1]="--packing true --num_train_epochs 2 --seed 1"
  [r4_pk_e2_seed2]="--packing true --num_train_epochs 2 --seed 2"
  [r4_pk_e1.5]="--packing true --num_train_epochs 1.5"
  [r4_pk_e2_bs48_lr1.5e-3]="--packing true --num_train_epochs 2 --per_device_train_batch_size 48 --learning_rate 1.5e-3"
  [r4_pk_e2_bs64_lr2e-3]="--packing true --num_train_epochs 2 --per_device_train_batch_size 64 --learning_rate 2e-3"
  [r4_pk_e3_bs64_lr2e-3]="--packing true --num_train_epochs 3 --per_device_train_batch_size 64 --learning_rate 2e-3"
  [r4_pk_e2_turns3]="--packing true --num_train_epochs 2 --shapes_max_turns 3"
  [r4_pk_e2_lr1.5e-3]="--packing true --num_train_epochs 2 --learning_rate 1.5e-3"
  [r4_pk_e2_warmup50]="--packing true --num_train_epochs 2 --warmup_steps 50"
  [r4_pk_samples52k]="--packing true --num_train_samples 52000"
  [r4_pk_e2_text2L]="--packing true --num_train_epochs 2 --config_overrides ${D/text_config.num_hidden_layers=3/text_config.num_hidden_layers=2}"
  [r4_pk_e2_samples20k]="--packing true --num_train_epochs 2 --num_train_samples 20000"
  [r4_pk_e2.5_samples20k]="--packing true --num_train_epochs 2.5 --num_train_samples 20000"
  [r4_pk_e3_samples16k]="--packing true --num_train_epochs 3 --num_train_samples 16000"
)
# Round 5: fresh data instead of a second epoch (round 4's best), with cheaper steps (3 QA turns, 2 decoder layers),
# three seeds each.
T2="--config_overrides ${D/text_config.num_hidden_layers=3/text_config.num_hidden_layers=2}"
for s in 0 1 2; do
  V+=(
    [r5_52k_seed$s]="--packing true --num_train_samples 52000 --seed $s"
    [r5_52k_turns3_seed$s]="--packing true --num_train_samples 52000 --shapes_max_turns 3 --seed $s"
    [r5_52k_text2L_seed$s]="--packing true --num_train_samples 52000 $T2 --seed $s"
    [r5_52k_turns3_text2L_seed$s]="--packing true --num_train_samples 52000 --shapes_max_turns 3 $T2 --seed $s"
    [r5_60k_turns3_text2L_seed$s]="--packing true --num_train_samples 60000 --shapes_max_turns 3 $T2 --seed $s"
  )
done
NAMES=${SWEEP:-${!V[@]}}
for name in $NAMES; do
  OMP_NUM_THREADS=1 timeout "${SWEEP_TIMEOUT:-1500}" python3 recipes/sft.py --output_dir "$RUNS/$name" --plot false \
    --save_strategy no --kernels false ${V[$name]} "$@" > "$OUT/sweep_$name.log" 2>&1 &
done
wait
{
  echo "# Main-job variants (shapes, tiny preset from scratch)"
  echo
  echo "- machine: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo cpu), $(nproc) cores"
  echo "- versions: $(python3 -c 'import torch, transformers, trl; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")')"
  echo "- command: \`bash scripts/shapes_sweep.sh $*\` (each: \`recipes/sft.py\` with sft_tiny.yaml + the variant's flags)"
  echo
  echo "| variant | flags | steps | train s | colour+shape | colour | shape | count | position | caption |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for name in $NAMES; do
    python3 - "$RUNS/$name/sft_summary.json" "$name" "${V[$name]}" "$OUT/sweep_$name.log" <<'PY'
import json, os, re, sys
path, name, flags, log = sys.argv[1:]
if not os.path.exists(path):
    tail = open(log).read().strip().splitlines()[-1:] if os.path.exists(log) else ["no log"]
    print(f"| {name} | `{flags}` | failed: {tail[0][:80]} |||||||")
    sys.exit()
s = json.load(open(path))
e = s.get("eval", {})
acc = {q: v["exact_match"] for q, v in e.get("by_question_type", {}).items()}
rt = re.findall(r"'train_runtime': '?([0-9.]+)", open(log).read())
f = lambda k: f"{100 * acc[k]:.1f}" if isinstance(acc.get(k), (int, float)) else "-"
cs = e.get("color_shape_accuracy")
print(f"| {name} | `{flags}` | {s['steps']} | {rt[0] if rt else '-'} | {100 * cs:.1f} | {f('color')} | {f('shape')} | "
      f"{f('count')} | {f('position')} | {f('caption')} |")
PY
  done
} > "$OUT/shapes_sweep.md"
cat "$OUT/shapes_sweep.md"
