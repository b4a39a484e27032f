#!/usr/bin/env bash
# Set up the environment, then run the main job end to end on the shipped sample (data/sample, part 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-runs/demo}
$PY cli.py synth generate --part 1 --out "$OUT/synth" --n 600 --workers 2 --seed 0
$PY cli.py synth preview "$OUT/synth" --output "$OUT/synth_preview.png"
echo "demo outputs in $OUT"
