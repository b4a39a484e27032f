"""`ensemble calibrate`: choose the pixel threshold, the image threshold and `min_area` on a labelled validation
folder to maximise the competition score. With only normal images, thresholds come from a target false-alarm
rate on them (default 0: above every normal score seen), not from a degenerate search."""

from __future__ import annotations

import numpy as np

from .metrics import iou
from .models import Ensemble
from .postprocess import evidence, image_score, postprocess

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_AREAS = (0, 3, 5, 10, 20, 40, 80)


def calibrate(ens: Ensemble, images: list[np.ndarray], gt: list[np.ndarray], defaults: dict,
              target_overkill: float = 0.0) -> dict:
    """Returns the chosen params (threshold, image_threshold, min_area, opening) and what they scored."""
    results = ens.predict(images)
    labels = np.array([g.any() for g in gt])
    scores = np.array([image_score(r["prob"], r["image_prob"]) for r in results])
    params = {k: defaults[k] for k in ("threshold", "image_threshold", "min_area", "opening")}
    if not labels.any():  # only normal images: a false-alarm rate, never "flag nothing / flag everything"
        if target_overkill <= 0:
            params["image_threshold"] = float(np.nextafter(np.float32(scores.max()), np.float32(2)))
        else:
            params["image_threshold"] = float(np.quantile(scores, 1 - target_overkill))
        kept = float(np.mean(scores >= params["image_threshold"]))
        return {"params": params, "mode": "normal-only", "normal_images": len(images),
                "max_normal_score": float(scores.max()), "overkill_on_val": kept}
    best = None
    n_def, n_norm = int(labels.sum()), int((~labels).sum())
    for thr in THRESHOLDS:
        hits = [ens.rehit(r, thr) for r in results]
        for area in MIN_AREAS:
            masks = [postprocess(r["prob"], thr, area, params["opening"], None, h) for r, h in zip(results, hits)]
            nonempty = np.array([m.any() for m in masks])
            passes = np.array([evidence(m, r["prob"], r["image_prob"]) for r, m in zip(results, masks)])
            ious = np.array([iou(m, g) for m, g in zip(masks, gt)])
            for it in np.unique(np.r_[0.0, passes[nonempty]]):
                sub = nonempty & (passes >= it)
                escape = np.sum(labels & ~sub) / n_def
                overkill = np.sum(~labels & sub) / n_norm if n_norm else 0.0
                tp = labels & sub
                miou = float(ious[tp].mean()) if tp.any() else 0.0
                score = 0.5 * (1 - escape) + 0.3 * (1 - overkill) + 0.2 * miou
                if best is None or score > best[0] + 1e-12:
                    best = (score, thr, int(area), float(it), escape, overkill, miou)
    score, thr, area, it, escape, overkill, miou = best
    params.update(threshold=thr, min_area=area, image_threshold=it)
    return {"params": params, "mode": "labelled", "score": score, "escape": float(escape),
            "overkill": float(overkill), "miou": miou, "images": len(images), "defective": n_def}

