#!/usr/bin/env bash
# Every configuration of the assignment: cnn and the transformer with 1, 2 and 4 heads, each with
# fold 1 held out for testing and with no held-out fold, k=4 validation folds in both.
# Extra arguments go to every run:   bash run.sh --epochs 5 --wandb disabled
# A finished configuration is recognised by audiotx.py and not retrained, so rerunning continues.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
configs=()
for split in "--test-fold 1" "--test-fold 0"; do
  configs+=("--arch cnn $split")
  for heads in 1 2 4; do configs+=("--arch transformer --heads $heads $split"); done
done
start=$SECONDS
for i in "${!configs[@]}"; do
  echo "== configuration $((i + 1))/${#configs[@]}: ${configs[$i]} --kfold 4 ($(( (SECONDS - start) / 60 )) min so far)"
  # shellcheck disable=SC2086  # the configuration is a list of words on purpose
  $PY audiotx.py ${configs[$i]} --kfold 4 "$@"
done
echo "== all ${#configs[@]} configurations done in $(( (SECONDS - start) / 60 )) min"
