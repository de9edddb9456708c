#!/usr/bin/env bash
# The main job, end to end on 2 CPU cores: data -> store -> (train -> evaluate -> predict).
# Synthetic patches unless DATA names a real dataset (Kaggle folder, PCam h5 folder, image folder).
set -euo pipefail
HD=${HD:-histodetect}
DEMO=${DEMO:-demo-output}
rm -rf "$DEMO"
mkdir -p "$DEMO"
if [ -z "${DATA:-}" ]; then
  "$HD" synth --out "$DEMO/patches" --n 4000 --format folder --seed 0
  DATA="$DEMO/patches"
fi
"$HD" prepare "$DATA" --out "$DEMO/store"
"$HD" info "$DEMO/store"
