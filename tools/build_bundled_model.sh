#!/usr/bin/env bash
# Rebuilds the bundled default model (blockffn/bundled/blockffn-tiny) and its ablation, on one GPU.
# Not run by tests or CI.  Usage: tools/build_bundled_model.sh [CORPUS_DIR] [WORK_DIR]; then tools/build_bundled_draft.sh.
#
# Two runs, same data, seed and step budget, side by side on one GPU (the shipped pair shared an H200 with six other
# runs of a λ sweep and took 350 s each; see MODEL_CARD.md):
#   main   - LM + adaptive chunk sparsification (λ_cs0 0.3, chunk 32), no activation-locality loss (λ_al 0)
#   ablate - LM only (λ_al = λ_cs = 0)
# NPROC=2 trains the main run under `torchrun --nproc_per_node 2` (one GPU per rank, nccl) with half the per-rank
# batch, i.e. the same global batch of 32 x 256 tokens.  DEVICE=cpu trains on the CPU instead (slow: see the card).
set -euo pipefail
CORPUS=${1:-../shared/data/corpus}
WORK=${2:-$(mktemp -d)}
STEPS=${STEPS:-3118}
NPROC=${NPROC:-1}
BIN=${BIN:-.venv/bin}
mkdir -p "$WORK"
"$BIN/blockffn" data prepare "$CORPUS"/*.txt.xz --output "$WORK/data" --vocab-size 4096 --val-fraction 0.02
common=(--data "$WORK/data" --preset mini --steps "$STEPS" --seq-len 256 --lr 1e-2 --cs-stable-steps 1000
        --cs-adjust-every 100 --eval-every 500 --eval-tokens 200000 --save-every 500 --threads 2 --seed 0
        --device "${DEVICE:-cuda}")
if [ "$NPROC" -gt 1 ]; then
  main=("$BIN/torchrun" --standalone --nproc_per_node "$NPROC" -m blockffn.cli train --batch-size $((32 / NPROC)))
else
  main=("$BIN/blockffn" train --batch-size 32)
fi
"${main[@]}" "${common[@]}" --output "$WORK/main" --lambda-al 0 --lambda-cs 0.3 --chunk-len 32 > "$WORK/main.log" 2>&1 &
"$BIN/blockffn" train "${common[@]}" --batch-size 32 --output "$WORK/ablate" --lambda-al 0 --lambda-cs 0 \
  > "$WORK/ablate.log" 2>&1 &
wait
"$BIN/blockffn" convert --model "$WORK/main/model" --output blockffn/bundled/blockffn-tiny --dtype bfloat16 --overwrite
"$BIN/blockffn" convert --model "$WORK/ablate/model" --output "$WORK/ablate-bf16" --dtype bfloat16 --overwrite
for m in blockffn/bundled/blockffn-tiny "$WORK/ablate-bf16"; do
  "$BIN/blockffn" eval --model "$m" --text "$WORK/data/val.txt" --device auto --json > "$WORK/$(basename "$m").eval.json"
done
xz -9 -c "$WORK/data/val.txt" > blockffn/bundled/heldout.txt.xz
echo "now update blockffn/bundled/blockffn-tiny/MODEL_CARD.md from $WORK/*.eval.json and $WORK/*/history.jsonl"
