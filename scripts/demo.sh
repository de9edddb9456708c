#!/usr/bin/env bash
# The main job, end to end on 2 CPU cores in under 5 minutes:
# patches -> store -> train (cpu preset, capped) -> evaluate -> predict.
# Synthetic patches (not tissue) unless DATA names a real dataset: a Kaggle
# folder, a folder of PCam .h5 files or an image folder.
set -euo pipefail
HD=${HD:-histodetect}
DEMO=${DEMO:-demo-output}
MINUTES=${MINUTES:-2}
rm -rf "$DEMO"
mkdir -p "$DEMO"
if [ -z "${DATA:-}" ]; then
  "$HD" synth --out "$DEMO/patches" --n 3000 --format folder --seed 0
  DATA="$DEMO/patches"
fi
"$HD" prepare "$DATA" --out "$DEMO/store" --quiet
"$HD" info "$DEMO/store"
# A small real dataset (the Kaggle sample has 15 labelled patches) gets batches that fit it:
# the cpu preset's 128 needs at least that many training patches.
N_TRAIN=$("$HD" info "$DEMO/store" --json | python3 -c \
  'import json, sys; s = json.load(sys.stdin)["splits"].get("train", {}); print(s.get("positive", 0) + s.get("negative", 0))')
BATCH=()
if [ "$N_TRAIN" -lt 256 ]; then
  BATCH=(--batch-size "$(( N_TRAIN / 2 > 1 ? N_TRAIN / 2 : 1 ))")
  echo "demo: only $N_TRAIN training patches; training with ${BATCH[*]}"
fi
"$HD" train --data "$DEMO/store" --preset cpu --out "$DEMO/run" --max-minutes "$MINUTES" "${BATCH[@]}"
"$HD" evaluate "$DEMO/run" --data "$DEMO/store:valid" --tta 8 --json > "$DEMO/metrics.json"
"$HD" predict "$DEMO/run" "$DEMO/store" --split valid --out "$DEMO/predictions.csv" --quiet
python3 - "$DEMO/metrics.json" "$DEMO/predictions.csv" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
n = sum(1 for _ in open(sys.argv[2])) - 1
print(f"report: {m['report']}")
print(f"summary: {m['split']} split of {m['store']}: ROC AUC {m['roc_auc']:.3f} "
      f"[{m['roc_auc_ci'][0]:.3f}, {m['roc_auc_ci'][1]:.3f}], accuracy {m['accuracy']:.3f} (TTA 8); "
      f"{n} predictions in {sys.argv[2]}")
PY
