#!/usr/bin/env bash
# Set up the environment, then run the main job end to end on the shipped sample (data/sample, part 1):
# synthesise defects (+ a preview), train the default segmenter (evidence UNet) briefly on the fly, fit PatchCore,
# calibrate the two as one hybrid from held-out OK images, predict the test crops, evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-runs/demo}
$PY cli.py synth generate --part 1 --out "$OUT/synth" --n 600 --workers 2 --seed 0
$PY cli.py synth preview "$OUT/synth" --output "$OUT/synth_preview.png" --defective-only
$PY cli.py seg train --part 1 --out "$OUT/segmenter" --epochs 6 -s train.steps_per_epoch=25 -s train.val_n=96
$PY cli.py baseline fit --method patchcore --part 1 --out "$OUT/patchcore.pt"
$PY cli.py ensemble calibrate -m "$OUT/segmenter" -m "$OUT/patchcore.pt" --tta flip -o "$OUT/hybrid.json"
$PY cli.py ensemble predict -e "$OUT/hybrid.json" --part 1 --data data/sample --out "$OUT/pred"
$PY cli.py ensemble evaluate --pred "$OUT/pred" --part 1 --data data/sample --name "demo hybrid"
echo "demo outputs in $OUT: synth_preview.png, segmenter/curves.png, pred/overlays/, pred/submission.zip, pred/eval.html"
