"""Metrics shared by every method (segmenters and baselines): the competition score and its parts, pixel and
image AUROC / AP, Dice and IoU. Nothing else in the toolkit computes its own."""

from __future__ import annotations

import numpy as np


def competition_score(pred: list[np.ndarray], gt: list[np.ndarray]) -> dict:
    """Score = 0.5 (1 - escape) + 0.3 (1 - overkill) + 0.2 mIoU.

    A prediction with no pixel set means "no file" (judged normal). escape: share of defective crops judged
    normal; overkill: share of normal crops judged defective; mIoU: mean IoU over defective crops submitted.
    """
    if len(pred) != len(gt):
        raise ValueError(f"{len(pred)} predictions for {len(gt)} ground-truth masks")
    defective = [g.any() for g in gt]
    submitted = [p.any() for p in pred]
    n_def = int(sum(defective))
    n_norm = len(gt) - n_def
    escape = sum(d and not s for d, s in zip(defective, submitted)) / n_def if n_def else 0.0
    overkill = sum(s and not d for d, s in zip(defective, submitted)) / n_norm if n_norm else 0.0
    ious = [iou(p, g) for p, g, d, s in zip(pred, gt, defective, submitted) if d and s]
    miou = float(np.mean(ious)) if ious else 0.0
    score = 0.5 * (1 - escape) + 0.3 * (1 - overkill) + 0.2 * miou
    return {"score": score, "escape": escape, "overkill": overkill, "miou": miou,
            "defective": n_def, "normal": n_norm}


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    p, g = pred > 0, gt > 0
    union = np.logical_or(p, g).sum()
    return float(np.logical_and(p, g).sum() / union) if union else 1.0


def dice_iou(pred: list[np.ndarray], gt: list[np.ndarray]) -> tuple[float, float]:
    """Pixel Dice and IoU over the whole set (pixels pooled), 1.0 when both are empty."""
    tp = sum(int(np.logical_and(p > 0, g > 0).sum()) for p, g in zip(pred, gt))
    fp = sum(int(np.logical_and(p > 0, g == 0).sum()) for p, g in zip(pred, gt))
    fn = sum(int(np.logical_and(p == 0, g > 0).sum()) for p, g in zip(pred, gt))
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN if one class is missing."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s))
    # average ranks for ties
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_recall(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score threshold, from the highest score down."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return tp / np.maximum(tp + fp, 1), tp / max(int(y.sum()), 1)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision (area under the step PR curve, as sklearn computes it); NaN without positives."""
    labels = np.asarray(labels).ravel() > 0
    if not labels.any():
        return float("nan")
    precision, recall = precision_recall(scores, labels)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
