"""From an anomaly map to a binary mask and an image-level decision; shared by every method.

Maps are on the model's own scale, never squashed into probabilities: logits for an uncalibrated segmenter (0 is
probability 0.5), units of the held-out normal maps after calibration (see `ensemble.calibrate`). Thresholds are
on that same scale, so strong detections never tie at 1.0.
"""

from __future__ import annotations

import cv2
import numpy as np

from core.io import InputError


def remove_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop connected components (8-connected) smaller than `min_area` pixels."""
    if min_area <= 1 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return keep[labels].astype(np.uint8)


def postprocess(amap: np.ndarray, threshold: float = 0.0, min_area: int = 0, opening: int = 0,
                roi: np.ndarray | None = None, hits: np.ndarray | None = None) -> np.ndarray:
    """Binary uint8 {0,1} mask: `amap >= threshold` (or the given `hits`, e.g. a k-of-n vote), optional opening
    (kernel size px), region of interest, then components under `min_area` dropped."""
    mask = (amap >= threshold).astype(np.uint8) if hits is None else hits.astype(np.uint8)
    if opening and opening > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (opening,) * 2))
    if roi is not None:
        mask &= (roi > 0).astype(np.uint8)
    return remove_small(mask, min_area)


def image_score(amap: np.ndarray, image: float | None) -> float:
    """The image-level score for ranking: the image head's value when the model has one, else the peak pixel."""
    return float(image) if image is not None else float(amap.max())


def evidence(mask: np.ndarray, amap: np.ndarray, image: float | None) -> float:
    """What the image threshold is compared with: the image head's value when the model has one, else the peak of
    the map inside the post-processed mask (-inf for an empty mask)."""
    if image is not None:
        return float(image)
    return float(amap[mask > 0].max()) if mask.any() else float("-inf")


def decide(mask: np.ndarray, amap: np.ndarray, image: float | None, image_threshold: float) -> bool:
    """Defective when the post-processed mask is non-empty and its `evidence` passes the image threshold.
    The one place where an image is judged: no model blanks its own mask."""
    return bool(mask.any()) and evidence(mask, amap, image) >= image_threshold


def peak_cut(labels: np.ndarray, n: int, amap: np.ndarray, threshold: float, frac: float,
             outline: float | None = None) -> np.ndarray:
    """The pixels of labelled components (`labels` 1..n-1, 0 = background) at least `frac` of the way from their
    base to their peak: base = the threshold, or the component's lowest value where a vote's hits lie below it;
    `outline` (above the threshold): the base of each component whose peak reaches it (see `outline_level`).
    NaN pixels are ignored; a component without a finite height is kept whole. Boolean, the labels' shape."""
    flat, vals = labels.ravel(), amap.ravel().astype(np.float64)
    peak, low = np.full(n, -np.inf), np.full(n, np.inf)
    np.fmax.at(peak, flat, vals)
    np.fmin.at(low, flat, vals)
    with np.errstate(invalid="ignore"):
        base = np.minimum(threshold, low)
        if outline is not None and outline > threshold:
            base = np.where(peak >= outline, outline, base)
        floor = base + frac * (peak - base)
        floor = np.where(np.isfinite(floor), np.minimum(floor, peak), -np.inf)
        return (labels > 0) & ((amap >= floor[labels]) | (floor[labels] == -np.inf))


def to_peak(mask: np.ndarray, amap: np.ndarray, threshold: float, frac: float,
            outline: float | None = None) -> np.ndarray:
    """Each connected component of `mask` cut to the pixels at least `frac` of the way from the pixel threshold to
    the component's peak (0: the mask as it is; 0.5: the component at half its height above the threshold). A
    threshold that must catch faint defects draws a strong defect's broad halo of evidence (a feature distance
    spreads over the backbone's receptive field) into its mask; a cut relative to each component's own peak does
    not depend on how strong the defect is. The peak pixel always stays, so no component is lost (`peak_cut`).
    `outline`: a level above `threshold` (`outline_level`): a component whose peak reaches it is measured from it
    instead; a component below it keeps its cut from `threshold`."""
    above = outline is not None and outline > threshold
    if (not frac and not above) or not mask.any():
        return mask
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return peak_cut(labels, n, amap, threshold, frac, outline if above else None).astype(np.uint8)


def agreement(per_model: np.ndarray | None, shape) -> np.ndarray | None:
    """Where every model of an ensemble passes its own calibrated pixel threshold (`shape`: one per model, on the
    ensemble's scale, see `ensemble.calibrate.member_thresholds`), as uint8 {0,1}; None without `shape`."""
    if shape is None or per_model is None:
        return None
    thr = np.asarray(shape, np.float32).reshape(-1, 1, 1)
    if len(thr) != len(per_model):
        raise InputError(f"params.shape: {len(thr)} thresholds for {len(per_model)} models (calibrate the "
                         "ensemble again)")
    return np.all(per_model >= thr, axis=0).astype(np.uint8)


def shaped(mask: np.ndarray, gate: np.ndarray | None, min_area: int) -> np.ndarray:
    """A flagged crop's mask cut to where every model agrees (`agreement`), components under `min_area` dropped;
    the mask itself when nothing is left, so a defect only one model sees keeps the merged map's shape. The
    merged map decides and finds; the agreement only trims the outline (a broad feature-distance blob around a
    defect the segmenter outlines sharply)."""
    if gate is None or not mask.any():
        return mask
    cut = remove_small(mask & gate, min_area)
    return cut if cut.any() else mask


def map_median(amap: np.ndarray) -> float | None:
    """The median of a map's finite values (None when it has none): where it lies above the pixel threshold, half
    of the image or more is above it (`outline_level`, and `ensemble predict`'s count of such images)."""
    finite = amap[np.isfinite(amap)]
    return float(np.median(finite)) if finite.size else None


def outline_level(amap: np.ndarray, p: dict) -> float | None:
    """With `p["median_base"]`, the image's own median map value: where it lies above the pixel threshold, the
    flagged components whose peak reaches it are measured from it (`to_peak`'s `outline`). Where half an image's
    map or more lies above the threshold (its background has drifted from the held-out normal crops'), the
    threshold is no base for an outline: measured from it, a defect's component spreads over the background and
    its cut keeps the background's texture. None: measured from the threshold (off, or a map without a finite
    value); an image whose median lies below the threshold (the usual one) is cut as without it."""
    return map_median(amap) if p.get("median_base") else None


# The rules that draw a flagged mask's outline (`flagged_outline`), each with its value when off: what a model file
# or ensemble.json calibrated before a rule existed predicts with, and what scoring synthetic defects uses
OUTLINE_RULES = {"peak_frac": 0.0, "median_base": False, "grabcut": 0.0}
GRABCUT_RING = 4  # px (3x3 dilations of the outline) an outline may grow by: the "probably normal" band
GRABCUT_MARGIN = 8  # px of sure normal around that band, from which the surroundings' grey levels are learnt
GRABCUT_ITERATIONS = 1
GRABCUT_MAX_PIXELS = 1 << 20  # a larger window (a defect's band over most of a large image) keeps its outline
_K3 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))


def _bgr(pixels: np.ndarray) -> np.ndarray:
    """An 8-bit image (gray, or with channels) as the 3-channel array `cv2.grabCut` takes."""
    img = np.asarray(pixels)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img[:, :, :3])


def grabcut_outline(outline: np.ndarray, mask: np.ndarray, amap: np.ndarray, p: dict, pixels: np.ndarray,
                    level: float | None = None, roi: np.ndarray | None = None) -> np.ndarray:
    """A flagged mask's outline redrawn on the image itself (`cv2.grabCut`, a graph cut between a Gaussian-mixture
    model of the defect's grey levels and one of its surroundings'): each component's core, the pixels of the
    post-processed `mask` at least `p["grabcut"]` of the way from its base to its peak (`to_peak`, from `level`
    where it applies), is sure defect; the outline so far (`outline`) is probably defect; a band of GRABCUT_RING px
    around it is probably normal; the rest of a window GRABCUT_MARGIN px wider is sure normal. The map says where a
    defect is; its edges are the image's: a feature distance spreads a strong defect's evidence over the
    backbone's receptive field, and the cut at half height cannot know how far.
    Each region (a component of the band) is cut on its own window, so an image costs what its outlines cover. A
    region without a core, without sure-normal pixels (an outline over its whole window), larger than
    GRABCUT_MAX_PIXELS, or one the cut cannot split, keeps its outline. Nothing is added outside the band or the
    `roi`, and the core always stays, so the decision never changes. Deterministic (OpenCV's RNG seeded for each
    cut)."""
    core = to_peak(mask, amap, p["threshold"], p["grabcut"], level).astype(bool) & (outline > 0)
    if not core.any() or pixels is None or np.asarray(pixels).shape[:2] != outline.shape:
        return outline
    band = cv2.dilate(outline.astype(np.uint8), _K3, iterations=GRABCUT_RING)
    if roi is not None:
        band &= (roi > 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(band, connectivity=8)
    out = outline.astype(np.uint8).copy()
    H, W = outline.shape
    m = GRABCUT_MARGIN
    for i in range(1, n):
        x, y, w, h = stats[i, :4]
        win = np.s_[max(0, y - m):min(H, y + h + m), max(0, x - m):min(W, x + w + m)]
        region = labels[win] == i
        sure = core[win] & region
        if not sure.any() or region.all() or region.size > GRABCUT_MAX_PIXELS:
            continue
        gc = np.full(region.shape, cv2.GC_BGD, np.uint8)
        gc[region] = cv2.GC_PR_BGD
        gc[region & (outline[win] > 0)] = cv2.GC_PR_FGD
        gc[sure] = cv2.GC_FGD
        cv2.setRNGSeed(0)
        try:
            cv2.grabCut(_bgr(pixels[win]), gc, None, np.zeros((1, 65)), np.zeros((1, 65)), GRABCUT_ITERATIONS,
                        cv2.GC_INIT_WITH_MASK)
        except cv2.error:  # one model without samples: the region keeps its outline
            continue
        out[win][region] = ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD))[region]
    return out


def flagged_outline(mask: np.ndarray, amap: np.ndarray, p: dict, gate: np.ndarray | None = None,
                    pixels: np.ndarray | None = None, roi: np.ndarray | None = None) -> np.ndarray:
    """What the post-processed mask of a crop judged defective becomes: cut towards each component's peak
    (`to_peak`, `p["peak_frac"]`, absent: 0), measured from `outline_level` for the components that reach it
    (`p["median_base"]`, absent: off), then, with an ensemble's `agreement` (`gate`), trimmed to where its models
    agree (`shaped`), then, with the image's `pixels` and `p["grabcut"]` (absent: 0, off), redrawn on the image
    within the `roi` (`grabcut_outline`). None of it changes the decision."""
    level = outline_level(amap, p)
    cut = shaped(to_peak(mask, amap, p["threshold"], p.get("peak_frac", 0.0), level), gate, p["min_area"])
    if p.get("grabcut") and pixels is not None and cut.any():
        return grabcut_outline(cut, mask, amap, p, pixels, level, roi)
    return cut


def final_mask(amap: np.ndarray, image: float | None, p: dict, roi: np.ndarray | None = None,
               hits: np.ndarray | None = None, gate: np.ndarray | None = None,
               pixels: np.ndarray | None = None) -> np.ndarray:
    """Post-processed mask, emptied when the image is judged normal (what the submission writer sees), else outlined
    by `flagged_outline` (`gate`: an ensemble's `agreement`; `pixels`: the image, for `grabcut_outline`)."""
    mask = postprocess(amap, p["threshold"], p["min_area"], p["opening"], roi, hits)
    if not decide(mask, amap, image, p["image_threshold"]):
        return np.zeros_like(mask)
    return flagged_outline(mask, amap, p, gate, pixels, roi)
