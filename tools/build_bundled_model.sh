#!/usr/bin/env bash
# Rebuilds the bundled default model (blockffn/bundled/blockffn-tiny) from the offline corpus mix.
# Not run by tests or CI: it trains for 2 x 30 minutes.  Usage: tools/build_bundled_model.sh [CORPUS_DIR] [WORK_DIR]
#
# Two runs share one budget and one machine (one thread each, side by side, so both see the same contention):
#   main   - LM + activation locality (λ_al 2e-3) + adaptive chunk sparsification (λ_cs0 0.2, chunk 32)
#   ablate - LM only (λ_al = λ_cs = 0), the same steps budget, data and seed
# The main run is shipped; both evaluations go into MODEL_CARD.md.
set -euo pipefail
CORPUS=${1:-../shared/data/corpus}
WORK=${2:-/tmp/blockffn-bundle}
BUDGET=${BUDGET:-1800}
BIN=${BIN:-.venv/bin}
mkdir -p "$WORK"
"$BIN/blockffn" data prepare "$CORPUS"/*.txt.xz --output "$WORK/data" --vocab-size 4096 --val-fraction 0.02
common=(--data "$WORK/data" --preset tiny --steps 100000 --batch-size 8 --seq-len 256 --lr 1e-2 --chunk-len 32
        --cs-stable-steps 150 --cs-adjust-every 50 --eval-every 100 --eval-tokens 32768 --save-every 200
        --time-budget "$BUDGET" --threads 1 --seed 0)
OMP_NUM_THREADS=1 "$BIN/blockffn" train "${common[@]}" --output "$WORK/main" --lambda-al 2e-3 --lambda-cs 0.2 \
  > "$WORK/main.log" 2>&1 &
OMP_NUM_THREADS=1 "$BIN/blockffn" train "${common[@]}" --output "$WORK/ablate" --lambda-al 0 --lambda-cs 0 \
  > "$WORK/ablate.log" 2>&1 &
wait
for run in main ablate; do
  "$BIN/blockffn" eval --model "$WORK/$run/model" --text "$WORK/data/val.txt" --json > "$WORK/$run.eval.json"
done
"$BIN/blockffn" convert --model "$WORK/main/model" --output blockffn/bundled/blockffn-tiny --dtype bfloat16 --overwrite
xz -9 -c "$WORK/data/val.txt" > blockffn/bundled/heldout.txt.xz
echo "now update blockffn/bundled/blockffn-tiny/MODEL_CARD.md from $WORK/*.eval.json and $WORK/*.log"
