#!/usr/bin/env bash
# Rebuilds the bundled EAGLE draft head (blockffn/bundled/blockffn-tiny/draft) for the bundled model, on one GPU.
# Not run by tests or CI: it trains for 2 minutes on an H200.  Usage: tools/build_bundled_draft.sh [CORPUS_DIR] [WORK_DIR]
#
# The draft reads the same corpus files as the bundled model, tokenized with the bundled model's own tokenizer;
# --holdout-fraction 0.02 leaves out the documents `blockffn data prepare --val-fraction 0.02` held out for the
# model (they are blockffn/bundled/heldout.txt.xz), so acceptance is measured on text neither model saw.
set -euo pipefail
CORPUS=${1:-../shared/data/corpus}
WORK=${2:-$(mktemp -d)}
BIN=${BIN:-.venv/bin}
OUT=blockffn/bundled/blockffn-tiny/draft
mkdir -p "$WORK"
"$BIN/blockffn" train-draft --text "$CORPUS"/*.txt.xz --output "$WORK/draft" --steps 20000 --time-budget 2 \
  --batch-size 32 --seq-len 256 --lr 3e-3 --warmup-steps 50 --holdout-fraction 0.02 --threads 4 --seed 0 \
  --dtype bfloat16 --device "${DEVICE:-cuda}" --overwrite 2>&1 | tee "$WORK/train-draft.log"
mkdir -p "$OUT"
cp "$WORK/draft/config.json" "$WORK/draft/model.safetensors" "$OUT/"
OMP_NUM_THREADS=2 "$BIN/python" benchmarks/spec_acceptance.py --json "$WORK/acceptance.json"
OMP_NUM_THREADS=2 "$BIN/python" benchmarks/spec_acceptance.py --temperature 0.8 --json "$WORK/acceptance-t08.json"
echo "now update $OUT/DRAFT_CARD.md from $WORK/draft/training_summary.json and $WORK/acceptance*.json"
