#!/usr/bin/env bash
# Set up the environment, then run the main job end to end on the shipped sample (data/sample, part 1):
# synthesise defects (+ a preview); `seg train` trains the default segmenter (evidence UNet) briefly on the fly,
# fits its partner PatchCore and calibrates the two as one hybrid from held-out OK images (the run folder's
# ensemble.json, the default method); predict the test crops with the run folder, evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-runs/demo}
$PY cli.py synth generate --part 1 --out "$OUT/synth" --n 600 --workers 2 --seed 0
$PY cli.py synth preview "$OUT/synth" --output "$OUT/synth_preview.png" --defective-only
$PY cli.py seg train --part 1 --out "$OUT/run" --epochs 6 -s train.steps_per_epoch=25 -s train.val_n=96
test -f "$OUT/run/ensemble.json" || { echo "demo: no hybrid in $OUT/run (see the warning above)" >&2; exit 1; }
$PY cli.py ensemble predict -m "$OUT/run" --part 1 --data data/sample --out "$OUT/pred"
$PY cli.py ensemble evaluate --pred "$OUT/pred" --part 1 --data data/sample --name "demo hybrid"
echo "demo outputs in $OUT: synth_preview.png, run/curves.png, run/ensemble_calibration.png, pred/overlays/, pred/submission.zip, pred/eval.html"
