#!/usr/bin/env bash
# The main job on the bundled default data: L10N-10 sample -> SentencePiece -> indexed datasets ->
# a small MoE translator trained on CPU for $MINUTES minutes (progress bar and ETA in the log) ->
# validation loss and the per-language BLEU / chrF table on the sample's test pairs.
#
#   bash examples/translate_sample.sh                 # MINUTES=5 OUT=runs/sample
#   MINUTES=30 OUT=runs/long bash examples/translate_sample.sh
#   NPROC=2 EXTRA="--set parallel.ep=2" bash examples/translate_sample.sh   # 2 processes, EP=2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/sample}
MINUTES=${MINUTES:-5}
NPROC=${NPROC:-1}
EXTRA=${EXTRA:-}
CONFIG=examples/configs/l10n10_cpu.yaml
LAUNCH="$PY -m megatron_moe"
[ "$NPROC" -gt 1 ] && LAUNCH="$PY -m torch.distributed.run --standalone --nproc_per_node $NPROC -m megatron_moe"

echo "== 1/3 preprocess the bundled L10N-10 sample -> $OUT/data"
[ -f "$OUT/data/meta.json" ] || $PY -m megatron_moe preprocess --output "$OUT/data" --vocab-size 4000 --force

echo "== 2/3 train for at most $MINUTES minutes -> $OUT/ckpt"
rm -rf "$OUT/ckpt"
# the run times its first steps and fits the LR schedule to the budget (train.steps: a cap)
$LAUNCH train --config $CONFIG --set data.dir="$OUT/data" --set checkpoint.save="$OUT/ckpt" \
  --set train.time_budget_minutes="$MINUTES" --set train.steps=$((MINUTES * 2000)) \
  --set train.warmup_steps=$((MINUTES * 5)) $EXTRA

echo "== 3/3 evaluate: loss, BLEU and chrF per language"
$LAUNCH evaluate --config $CONFIG --set data.dir="$OUT/data" --set checkpoint.load="$OUT/ckpt" $EXTRA
