#!/usr/bin/env bash
# Every configuration of the assignment: cnn and the transformer with 1, 2 and 4 heads, each with
# fold 1 held out for testing and with no held-out fold, k=4 validation folds in both; then the report.
#   bash run.sh                              # all 8 configurations into runs/, then runs/REPORT.md
#   bash run.sh --epochs 5 --wandb disabled  # extra arguments go to every run
#   JOBS=2 OUT=results bash run.sh           # 2 configurations at once (cores split), results in results/
#   CONFIG=3 bash run.sh                     # configuration 3 alone, no report (one task of a Slurm array)
# A finished configuration is recognised by audiotx.py and skipped, so a rerun continues where it stopped.
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
OUT=${OUT:-runs}
JOBS=${JOBS:-1}
threads=()
if [ "$JOBS" -gt 1 ]; then
  n=$(( $(nproc) / JOBS )); threads=(--threads $(( n > 0 ? n : 1 )))
  mkdir -p "$OUT/logs"
fi
configs=()
for split in "--test-fold 1" "--test-fold 0"; do
  configs+=("--arch cnn $split")
  for heads in 1 2 4; do configs+=("--arch transformer --heads $heads $split"); done
done
if [ -n "${CONFIG:-}" ] && ! { [ "$CONFIG" -ge 1 ] && [ "$CONFIG" -le "${#configs[@]}" ]; } 2>/dev/null; then
  echo "run.sh: CONFIG=$CONFIG is not one of 1..${#configs[@]}" >&2
  exit 2
fi
start=$SECONDS
failed=0
for i in "${!configs[@]}"; do
  if [ -n "${CONFIG:-}" ] && [ "$CONFIG" != "$((i + 1))" ]; then continue; fi
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || failed=1; done  # a free slot (JOBS > 1)
  echo "== configuration $((i + 1))/${#configs[@]}: ${configs[$i]} --kfold 4 ($(( (SECONDS - start) / 60 )) min so far)"
  arch=$(set -- ${configs[$i]}; echo "$2")
  tuned=()  # the best settings of this architecture's tuning, when one has run (python audiotx.py --tune N)
  if [ -f "$OUT/tune-$arch/best.json" ]; then tuned=(--hparams "$OUT/tune-$arch/best.json"); fi
  # shellcheck disable=SC2086  # a configuration is a list of words on purpose
  if [ "$JOBS" -gt 1 ]; then
    $PY audiotx.py ${configs[$i]} --kfold 4 --out "$OUT" "${tuned[@]}" "${threads[@]}" "$@" \
      > "$OUT/logs/$((i + 1)).log" 2>&1 &
  else
    $PY audiotx.py ${configs[$i]} --kfold 4 --out "$OUT" "${tuned[@]}" "$@" || failed=1
  fi
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
echo "== ${#configs[@]} configurations in $(( (SECONDS - start) / 60 )) min"
if [ "$failed" -ne 0 ]; then
  echo "run.sh: some configurations failed (see above or $OUT/logs/); rerun to continue" >&2
  exit 1
fi
if [ -n "${CONFIG:-}" ]; then exit 0; fi  # an array's tasks finish apart: the report comes after the last
$PY audiotx.py --report "$OUT"
