"""Operating points that hold on real defects, chosen from OK images only.

What a user really has is many OK images, so calibration works from the share of them that training never saw
(`data.holdout`, see `SourcePool.split`):

1. every model's map is standardised on real normal crops of the held-out images (`fit_norms`: 0 at the normal
   maps' 99.9th percentile, one unit = the distance from their median to it), so any model, segmenter or baseline,
   lives on the same scale and a mean or a vote of several is meaningful;
2. those normal crops fix the image threshold at a target false-alarm rate (`target_overkill`): a real quantity,
   measured on real images, that transfers to real normal crops;
3. synthetic defects drawn on the held-out images fix the pixel threshold and `min_area` (they are what has masks).

Thresholds are searched on each ensemble's own scale (quantiles of its normal and defect maps), never on a fixed
probability grid. With labelled real crops (`labelled`), the score on them chooses everything instead
(`best_on_labelled`), which is also the oracle that `bench` and `evaluate` report beside the calibrated score.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from core.io import write_json, write_png
from core.progress import task
from core.metrics import competition_score
from core.modelfile import load_model_file, relative_checkpoints, set_calibration
from core.postprocess import (OUTLINE_RULES, agreement, decide, evidence, final_mask, flagged_outline,
                              outline_level, peak_cut, postprocess)
from seg.models.features import tail_standardiser
from synth.engine import DefectSynthesizer, SourcePool, SynthConfig, part_region
from synth.preview import caption, grid, outline
from synth.streams import CALIBRATION, stream

from .models import Ensemble

NORMAL_QUANTILES = (0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 1.0)
DEFECT_QUANTILES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_AREAS = (0, 3, 5, 10, 20, 40, 80)
SIZE_EDGES = (0.005, 0.02)  # defect area / crop area: small, medium, large (see `size_bins`)
RESCORED = 8  # `best_on_labelled` with the graph cut: how many of its best points are scored again with it
POINT = ("threshold", "min_area", "image_threshold")  # what an operating point's search chooses
FLAG_ALL = -1e30  # an image threshold below every evidence: any non-empty mask is flagged (finite: valid JSON)


# ------------------------------------------------------------------------------------------------ data
def normal_crops(pool: SourcePool, n: int, seed: int, where: list | None = None) -> list[np.ndarray]:
    """n random uint8 crops of the pool's size from its images (real normal crops); `where` receives their origins
    (image path, y, x)."""
    return pool.random_crops(n, [CALIBRATION, seed, 0], where)


def synthetic_defects(cfg: dict, pool: SourcePool, n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """n synthetic defective crops (image, mask) drawn on `pool` with the config's synthesis settings; without
    transplanted real defects (their folder stays on the machine that trained; they are not synthetic)."""
    families = {k: v for k, v in cfg["synth"]["families"].items() if k != "transplant"}
    if not any(v > 0 for v in families.values()):  # trained on transplants only: the default synthetic mix
        families = SynthConfig().families
    engine = DefectSynthesizer(SynthConfig.from_dict({**cfg["synth"], "normal_ratio": 0.0, "transplant": None,
                                                      "families": families}))
    images, masks = [], []
    for i in range(4 * n):  # a draw that could place no defect (e.g. outside the ROI) is skipped
        image, mask, _ = engine.draw(stream(CALIBRATION, seed, 1, i), pool)
        if mask.any():
            images.append(image)
            masks.append(mask)
        if len(images) == n:
            break
    return images, masks


def calibration_pools(cfg: dict, warn=None) -> tuple[SourcePool, bool]:
    """(the pool calibration draws from, whether it is a true hold-out): the held-out OK images of the config's
    split, or all of them (with a warning) when there are too few to hold any out."""
    from seg.config import ok_pools

    train, held = ok_pools(cfg)
    if held is None:
        if warn:
            warn(f"{train.root}: no held-out OK images (data.holdout={cfg['data']['holdout']}, {len(train)} "
                 "image(s)); calibrating on training images, thresholds will be optimistic")
        return train, False
    return held, True


# ------------------------------------------------------------------------------------------------ scale
@torch.no_grad()
def fit_norms(ens: Ensemble, images: Sequence[np.ndarray]) -> list[dict]:
    """One normaliser per model from its raw (TTA-averaged) maps on normal crops of the model's tile size; set on
    `ens` too."""
    return predict_normal(ens, images)[0]


def predict_normal(ens: Ensemble, images: Sequence[np.ndarray]) -> tuple[list[dict], list[dict]]:
    """(`fit_norms`' normalisers, set on `ens`; the crops' `predict` results with them) from one pass (a second
    one when the crops are not of the ensemble's tile size: `predict` tiles those)."""
    x = torch.from_numpy(np.stack([im if im.ndim == 3 else im[..., None] for im in images])).permute(0, 3, 1, 2)
    x = x.float().div_(255)
    raw: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = []  # per batch, per model: (maps, heads) on CPU
    with task("calibrate: held-out normal crops", len(x)) as bar:
        for k in range(0, len(x), ens.batch_size):
            raw.append([(m.cpu(), h.cpu() if h is not None else None)
                        for m, h in ens.raw_forward(x[k:k + ens.batch_size])])
            bar(len(x[k:k + ens.batch_size]))
    norms = []
    for i in range(len(ens.models)):
        pix = torch.cat([b[i][0].flatten() for b in raw]).double()
        heads = [b[i][1] for b in raw if b[i][1] is not None]
        norms.append({"pixel": list(tail_standardiser(pix, 0.999, cap=2_000_000)),
                      "image": list(tail_standardiser(torch.cat(heads).double(), 0.99)) if heads else None})
    ens.set_norms(norms)
    if any(im.shape[:2] != (ens.tile, ens.tile) for im in images):  # predicted as `predict` would (tiles, windows)
        return norms, predict_shown(ens, images, "held-out normal crops, normalised")
    return norms, [r for b in raw for r in ens.crop_results(b)]


def candidate_thresholds(normal_pixels: np.ndarray, defect_pixels: np.ndarray) -> np.ndarray:
    """Pixel thresholds on the maps' own scale: upper quantiles of normal pixels and quantiles of defect pixels."""
    cands = [np.quantile(normal_pixels, NORMAL_QUANTILES)]
    if len(defect_pixels):
        cands.append(np.quantile(defect_pixels, DEFECT_QUANTILES))
    return np.unique(np.concatenate(cands).astype(np.float64))


def _pool(maps: list[np.ndarray], masks: list[np.ndarray] | None, inside: bool, cap: int = 1_000_000) -> np.ndarray:
    vals = [m[(g > 0) == inside] if masks is not None else m.ravel() for m, g in
            zip(maps, masks if masks is not None else [None] * len(maps))]
    flat = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    if len(flat) > cap:
        flat = flat[np.random.default_rng(0).choice(len(flat), cap, replace=False)]
    return flat


# ------------------------------------------------------------------------------------------------ search
class _Components:
    """One image's post-processed mask at a pixel threshold, before `min_area`: its connected components with
    their sizes, the peak of the map in each and (with ground truth) their overlap with it, so every `min_area`
    of the search is a cheap selection instead of another pass of `postprocess`. The overlap is that of each
    component cut towards its peak (`peak_frac`, see `core.postprocess.to_peak`; measured from `level`, the
    image's `core.postprocess.outline_level`, where that lies above `thr`), as a flagged mask is. With an ensemble's
    agreement (`gate`, see `core.postprocess.shaped`), also the components of that mask cut to it, each with its
    parent component: the IoU is then that of the shaped mask, as `final_mask` makes it."""

    def __init__(self, r: dict, hits: np.ndarray, opening: int, roi, gt: np.ndarray | None,
                 gate: np.ndarray | None = None, thr: float = 0.0, peak_frac: float = 0.0,
                 level: float | None = None):
        mask = postprocess(r["map"], 0.0, 0, opening, roi, hits)
        self.head = r["image"]
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        self.sizes = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
        flat = labels.ravel()
        peak = np.full(n, -np.inf)
        np.maximum.at(peak, flat, r["map"].ravel().astype(np.float64))
        self.peaks = peak[1:]
        self.inter = self.cut = None
        if gt is not None:
            g = gt.ravel() > 0
            level = level if level is not None and level > thr else None
            body = (peak_cut(labels, n, r["map"], thr, peak_frac, level) if peak_frac or level is not None
                    else labels > 0).ravel()
            self.body = np.bincount(flat[body], minlength=n)[1:]  # each component's size after the cut
            self.inter = np.bincount(flat[body], weights=g[body], minlength=n)[1:]
            self.gt_area = float(g.sum())
            if gate is not None:  # a cut component lies inside one component of the mask: its parent
                cut_mask = (body.reshape(mask.shape) & (gate > 0)).astype(np.uint8)
                m, cut_labels, cut_stats, _ = cv2.connectedComponentsWithStats(cut_mask, connectivity=8)
                parent = np.zeros(m, np.int64)
                parent[cut_labels.ravel()] = flat
                self.cut = (cut_stats[1:, cv2.CC_STAT_AREA].astype(np.int64), parent[1:] - 1,
                            np.bincount(cut_labels.ravel(), weights=g, minlength=m)[1:])

    def select(self, area: int):
        """(non-empty, evidence, IoU or None) with components under `area` pixels dropped (as `remove_small`)."""
        keep = self.sizes >= area if area > 1 else np.ones(len(self.sizes), bool)
        nonempty = bool(keep.any())
        ev = float(self.head) if self.head is not None else (float(self.peaks[keep].max()) if nonempty else -np.inf)
        if self.inter is None:
            return nonempty, ev, None
        inter, size = float(self.inter[keep].sum()), float(self.body[keep].sum())
        if self.cut is not None:
            sizes, parent, cut_inter = self.cut
            kept = keep[parent] & (sizes >= area if area > 1 else True)
            if kept.any():  # else the mask keeps its own shape (`shaped`)
                inter, size = float(cut_inter[kept].sum()), float(sizes[kept].sum())
        union = size + self.gt_area - inter
        return nonempty, ev, (inter / union if union else 1.0)


def _sweep_areas(results, rehit: Callable, thr: float, opening: int, rois=None, gt=None, gates=None,
                 peak_frac: float = 0.0, levels=None):
    """For every `min_area` of the grid: (non-empty flags, evidences, IoUs or None) at pixel threshold `thr`.
    `levels`: each image's `core.postprocess.outline_level` (None: none)."""
    rois = rois if rois is not None else [None] * len(results)
    gts = gt if gt is not None else [None] * len(results)
    gates = gates if gates is not None else [None] * len(results)
    levels = levels if levels is not None else [None] * len(results)
    comps = [_Components(r, rehit(r, thr), opening, roi, g, a, thr, peak_frac, v)
             for r, roi, g, a, v in zip(results, rois, gts, gates, levels)]
    out = {}
    for area in MIN_AREAS:
        sel = [c.select(area) for c in comps]
        out[area] = (np.array([x[0] for x in sel], bool), np.array([x[1] for x in sel], np.float64),
                     None if gt is None else np.array([x[2] for x in sel], np.float64))
    return out


def threshold_at_rate(ev: np.ndarray, nonempty: np.ndarray, rate: float) -> float:
    """The lowest image threshold that flags at most `rate` of the images (ties at the cut are not flagged)."""
    vals = np.sort(ev[nonempty])[::-1]
    k = int(np.floor(rate * len(ev) + 1e-9))
    if k >= len(vals):
        return FLAG_ALL
    return max(float(np.nextafter(vals[k], np.inf)), FLAG_ALL)


def size_bins(masks: list[np.ndarray]) -> np.ndarray:
    """Size class of each defect mask, relative to its crop: 0 under 0.5 % of the area, 1 under 2 %, 2 above."""
    frac = np.array([m.mean() for m in masks])
    return np.digitize(frac, SIZE_EDGES)


def operating_point(normal: list[dict], synthetic: list[dict], synthetic_gt: list[np.ndarray], rehit: Callable,
                    opening: int, target_overkill: float, rois: tuple[list, list] | None = None,
                    balance_sizes: bool = False, gates: list | None = None, spend_budget: bool = False) -> dict:
    """Pixel threshold and min_area that maximise the competition score with escape and mIoU measured on the
    synthetic defects and overkill on the real normal crops, the image threshold fixed at `target_overkill`.
    `balance_sizes`: escape is the mean of the escapes of small, medium and large synthetic defects, so the choice
    does not lean on the synthesis' size mix (which need not be the real one: e.g. a min_area that only large
    synthetic defects survive). `gates`: the synthetic defects' agreement masks, when the ensemble shapes its masks
    (their mIoU is then the shaped masks'). The masks are scored before the cut towards each component's peak
    (`predict.peak_frac`, `core.postprocess.to_peak`): synthetic defects cannot judge it (a segmenter trained on
    them outlines them sharply at any strength), and scored on them the cut would only pull the pixel threshold
    down to undo itself. Labelled real crops judge it (`best_on_labelled`).
    `spend_budget`: only operating points at which more held-out normal crops have a mask than the budget allows
    are searched, so the image threshold at the budget decides and the false alarms the user accepts buy
    sensitivity; real defects fainter than the synthetic ones are then not traded for the synthetic defects'
    mIoU. When no point qualifies (a model quiet on every normal crop), the whole grid is searched."""
    normal_pix = _pool([r["map"] for r in normal], None, True)
    defect_pix = _pool([r["map"] for r in synthetic], synthetic_gt, True)
    bins = size_bins(synthetic_gt)
    present = [b for b in range(len(SIZE_EDGES) + 1) if (bins == b).any()]
    best = spent = None
    for thr in candidate_thresholds(normal_pix, defect_pix):
        on_normal = _sweep_areas(normal, rehit, thr, opening, rois and rois[0])
        on_synthetic = _sweep_areas(synthetic, rehit, thr, opening, rois and rois[1], synthetic_gt, gates)
        for area in MIN_AREAS:
            ne_n, ev_n, _ = on_normal[area]
            tau = threshold_at_rate(ev_n, ne_n, target_overkill)
            ne_s, ev_s, ious_s = on_synthetic[area]
            det = ne_s & (ev_s >= tau)
            overkill = float(np.mean(ne_n & (ev_n >= tau)))
            if balance_sizes:
                escape = 1.0 - float(np.mean([det[bins == b].mean() for b in present]))
            else:
                escape = 1.0 - float(det.mean())
            miou = float(ious_s[det].mean()) if det.any() else 0.0
            score = 0.5 * (1 - escape) + 0.3 * (1 - overkill) + 0.2 * miou
            point = {"score": score, "threshold": float(thr), "min_area": int(area), "image_threshold": tau,
                     "synthetic_escape": escape, "synthetic_miou": miou, "normal_overkill": overkill}
            if best is None or score > best["score"] + 1e-12:
                best = point
            if ne_n.mean() > target_overkill and (spent is None or score > spent["score"] + 1e-12):
                spent = point  # the image threshold at the budget decides here
    return spent if spend_budget and spent is not None else best


def best_on_labelled(results: list[dict], gt: list[np.ndarray], rehit: Callable, opening: int,
                     rois: list | None = None, extra_thresholds: Sequence[float] = (),
                     gates: list | None = None, peak_frac: float = 0.0, median_base: bool = False,
                     grabcut: float = 0.0, also: dict | None = None) -> dict:
    """Thresholds that maximise the competition score on a labelled set (real crops of a user, or the test crops
    themselves for the oracle that measures calibration loss: then it reports, it chooses nothing). `gates`: each
    image's agreement mask when the ensemble shapes its masks (`core.postprocess.shaped`). `peak_frac`: the masks
    scored are cut towards each component's peak (`core.postprocess.to_peak`), as prediction cuts them (fixed, not
    searched); `median_base`: measured from each image's median where it lies above the threshold, as prediction
    measures them (`core.postprocess.outline_level`). `grabcut`: the masks prediction writes are redrawn on the image
    (`core.postprocess.grabcut_outline`; results with their "pixels"): too slow for every point of the search, so
    the RESCORED best points on the masks before it are scored again on the masks as prediction writes them, with
    `also` (a point of its own: the calibrated one, so the oracle never lies below it), and the best of those is
    returned with those figures (the decisions are the same, only mIoU moves)."""
    labels = np.array([g.any() for g in gt])
    n_def, n_norm = int(labels.sum()), int((~labels).sum())
    maps = [r["map"] for r in results]
    cands = np.unique(np.r_[candidate_thresholds(_pool(maps, gt, False), _pool(maps, gt, True)),
                            np.asarray(extra_thresholds, np.float64)])
    levels = [outline_level(m, {"median_base": median_base}) for m in maps]  # once: they do not depend on thr
    drawn = grabcut and all(r.get("pixels") is not None for r in results)
    top: list = []  # with the graph cut: the RESCORED best points before it, as (score, -order, point)
    best, order = None, 0
    for thr in cands:
        sweeps = _sweep_areas(results, rehit, thr, opening, rois, gt, gates, peak_frac, levels)
        for area in MIN_AREAS:
            nonempty, ev, ious = sweeps[area]
            for tau in np.unique(np.r_[FLAG_ALL, ev[nonempty]]):
                sub = nonempty & (ev >= tau)
                escape = float(np.sum(labels & ~sub) / n_def) if n_def else 0.0
                overkill = float(np.sum(~labels & sub) / n_norm) if n_norm else 0.0
                tp = labels & sub
                miou = float(ious[tp].mean()) if tp.any() else 0.0
                score = 0.5 * (1 - escape) + 0.3 * (1 - overkill) + 0.2 * miou
                point = None
                if best is None or score > best["score"] + 1e-12:
                    best = point = {"score": score, "threshold": float(thr), "min_area": int(area),
                                    "image_threshold": float(tau), "escape": escape, "overkill": overkill,
                                    "miou": miou}
                order += 1
                if drawn and (len(top) < RESCORED or score > top[0][0] + 1e-12):
                    point = point or {"threshold": float(thr), "min_area": int(area), "image_threshold": float(tau)}
                    entry = (score, -order, point)  # among equals the earlier point ranks higher
                    (heapq.heappush if len(top) < RESCORED else heapq.heapreplace)(top, entry)
    if not drawn or best is None:
        return best
    rescored = []
    for point in [e[2] for e in sorted(top, key=lambda e: (-e[0], -e[1]))] + ([also] if also else []):
        p = {**{k: point[k] for k in POINT}, "opening": opening,
             "peak_frac": peak_frac, "median_base": median_base, "grabcut": grabcut}
        masks = [final_mask(r["map"], r["image"], p, roi, rehit(r, p["threshold"]), g, r["pixels"]) for r, roi, g in
                 zip(results, rois or [None] * len(results), gates or [None] * len(results))]
        got = competition_score(masks, list(gt))
        rescored.append({**p, **{k: got[k] for k in ("score", "escape", "overkill", "miou")}})
    best = max(rescored, key=lambda x: x["score"])  # the first of equals: the best before the cut
    return {k: best[k] for k in ("score", *POINT, "escape", "overkill", "miou")}


def rois_for(images: Sequence[np.ndarray], roi) -> list | None:
    """The region of interest of each image, as prediction applies it (`predict.roi`): None, "auto" (each image's
    part) or a mask file resized to each image."""
    if roi is None:
        return None
    if str(roi) == "auto":
        return [part_region(im) for im in images]
    from core.io import read_mask

    mask = read_mask(roi)
    return [cv2.resize(mask, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_NEAREST) for im in images]


def member_thresholds(ens: Ensemble, norms: Sequence[dict]) -> list[float] | None:
    """Each model's own calibrated pixel threshold (what `seg train` / `baseline fit` stored in its model file: where
    that model alone calls a pixel defective), moved to the ensemble's scale (`norms`) through the raw map values;
    a model calibrated with another TTA than the ensemble's (PatchCore files: none) keeps its raw threshold. A model
    of weight 0 agrees everywhere. None for a single model, or when a model file carries no calibration (or one
    without its normaliser)."""
    cals = ens.member_calibrations
    if len(ens.models) < 2 or not cals or any(not c or not c.get("norm") for c in cals):
        return None
    out = []
    for cal, norm, weight in zip(cals, norms, ens.weights):
        (c_own, s_own), (c, s) = cal["norm"]["pixel"], norm["pixel"]
        out.append(float((cal["params"]["threshold"] * s_own + c_own - c) / s) if weight > 0 else FLAG_ALL)
    return out


# ------------------------------------------------------------------------------------------------ driver
def predict_shown(ens: Ensemble, images: Sequence[np.ndarray], what: str) -> list[dict]:
    """`ens.predict` in chunks of a few batches, on a progress bar when the caller set one up (core.progress)."""
    images, out, step = list(images), [], 4 * ens.batch_size
    with task(f"calibrate: {what}", len(images)) as bar:
        for k in range(0, len(images), step):
            out += ens.predict(images[k:k + step])
            bar(len(images[k:k + step]))
    return out


def calibrate(ens: Ensemble, normal: Sequence[np.ndarray], synthetic: tuple[list, list] | None, defaults: dict,
              target_overkill: float, labelled: tuple[list, list] | None = None, balance_sizes: bool = False,
              sheet: str | Path | None = None, normal_where: Sequence[tuple] | None = None, warn=None,
              shape: bool = True, spend_budget: bool = False) -> dict:
    """Fit the ensemble's normalisers on `normal` crops, then choose its operating point: from `labelled` real crops
    when given, else from the normal crops (image threshold) and the `synthetic` (images, masks) defects.
    `shape`: an ensemble of calibrated model files trims each flagged mask to where its models agree, each at its
    own calibrated threshold (`member_thresholds`, `core.postprocess.shaped`); stored as params["shape"].
    `spend_budget`: the operating point is one where the image threshold at `target_overkill` decides (see
    `operating_point`).
    `sheet`: a PNG of what set the operating point (`calibration_sheet`; `normal_where`: the normal crops' origins,
    for its captions). Returns {"params", "norms", "mode", "report", ...}; the ensemble keeps the fitted
    normalisers."""
    if not 0 <= target_overkill < 1:
        raise ValueError(f"target_overkill: expected a rate in [0, 1), got {target_overkill}")
    if not len(normal):
        raise ValueError("calibration needs normal images (held-out OK crops); none were given")
    norms, on_normal = predict_normal(ens, normal)  # one pass: the normalisers, then the crops with them
    params = {k: defaults[k] for k in ("threshold", "image_threshold", "min_area", "opening")}
    params["roi"] = roi = defaults.get("roi")
    # a rule absent from an older file's config is off: no cut, outlines from the threshold, not redrawn
    params.update({key: type(off)(defaults.get(key, off)) for key, off in OUTLINE_RULES.items()})
    params["shape"] = member_thresholds(ens, norms) if shape else None
    if shape and params["shape"] is None and len(ens.models) > 1 and warn:
        warn("masks not trimmed to where the models agree: a model file carries no calibration of its own "
             "(calibrate it alone first: `seg train` and `baseline fit` do it at the end)")

    def gates(results):
        return None if params["shape"] is None else [agreement(r["per_model"], params["shape"]) for r in results]

    if labelled is not None:
        images, gt = labelled
        results = predict_shown(ens, images, "labelled crops")
        best = best_on_labelled(results, list(gt), ens.rehit, params["opening"], rois_for(images, roi),
                                gates=gates(results), **{k: params[k] for k in OUTLINE_RULES})
        mode = "labelled"
    else:
        if synthetic is None or not len(synthetic[0]):
            raise ValueError("calibration needs synthetic defects (or labelled real crops); none were given")
        rois = None if roi is None else (rois_for(normal, roi), rois_for(synthetic[0], roi))
        on_synthetic = predict_shown(ens, synthetic[0], "synthetic defects")
        best = operating_point(on_normal, on_synthetic, list(synthetic[1]), ens.rehit, params["opening"],
                               target_overkill, rois, balance_sizes, gates(on_synthetic), spend_budget)
        mode = "ok-images"
    params.update(threshold=best["threshold"], min_area=best["min_area"], image_threshold=best["image_threshold"])
    if mode == "ok-images":  # the normal crops that set the image threshold: in the report, and drawn in `sheet`
        best["loudest_normals"] = calibration_sheet(
            sheet, ens.rehit, params, (list(normal), on_normal, rois and rois[0], normal_where),
            (list(synthetic[0]), on_synthetic, rois and rois[1], list(synthetic[1])), warn=warn)
    return {"params": params, "norms": norms, "mode": mode, "target_overkill": target_overkill,
            "spend_budget": bool(spend_budget) and mode == "ok-images", "normal_crops": len(normal), "report": best}


def calibrate_from_config(ens: Ensemble, cfg: dict, defaults: dict, target_overkill: float | None = None,
                          labelled: tuple[list, list] | None = None, warn=None,
                          sheet: str | Path | None = None) -> dict:
    """`calibrate` with normal crops and synthetic defects drawn from the held-out OK images of `cfg`."""
    c = cfg["calibrate"]
    pool, held_out = calibration_pools(cfg, warn)
    where: list[tuple] = []
    normal = normal_crops(pool, c["normal_crops"], c["seed"], where)
    synthetic = None if labelled is not None else synthetic_defects(cfg, pool, c["synth_n"], c["seed"])
    rate = c["target_overkill"] if target_overkill is None else target_overkill
    out = calibrate(ens, normal, synthetic, defaults, rate, labelled, c.get("balance_sizes", False), sheet, where,
                    warn, c.get("shape", True), c.get("spend_budget", False))
    out.update(held_out=held_out, held_out_images=list(pool.paths) if held_out else [])
    band = crowded_band(out["report"].get("loudest_normals") or [], pool)
    if band and warn:
        axis, lo, hi, k, images = band
        source = f"of {images[0]}" if len(images) == 1 else f"of {len(images)} held-out images"
        box = crop_outside(band, pool)
        what = ("a flaw of that image, or a region the images you will predict never show" if len(images) == 1 else
                "if the images you will predict never show that region (a background, a fixture, a selvage), crop "
                "the OK images to the part (" + (f"-s 'data.ok_crop=[{','.join(map(str, box))}]'" if box else
                                                 "data.ok_crop") + ")")
        warn(f"the image threshold is set by held-out normal crops that all lie in {axis} {lo} - {hi} {source} "
             f"(the {k} loudest with a mask; crops at random positions would spread wider): {what}"
             + (f"; see {sheet}" if sheet and Path(sheet).is_file() else ""))
    return out


def calibrate_ensemble_file(ens: Ensemble, cfg: dict, defaults: dict, out: str | Path,
                            target_overkill: float | None = None, labelled: tuple[list, list] | None = None,
                            warn=None) -> dict:
    """`calibrate_from_config` for an ensemble, saved as the ensemble.json `out` (what `ensemble calibrate` and
    `seg train`'s hybrid with its partner write): its model files relative to `out`'s folder, so the folder moves
    with them; TTA, merge, weights, normalisers, operating point and the calibration report. The crops that set
    it are drawn beside it (`sheet_path`), unless labelled crops chose it. Returns the report."""
    sheet = None if labelled is not None else sheet_path(out)
    if sheet is None:  # chosen on labelled crops: an older sheet beside `out` would no longer describe it
        sheet_path(out).unlink(missing_ok=True)
    report = calibrate_from_config(ens, cfg, defaults, target_overkill, labelled, warn=warn, sheet=sheet)
    spec = {"checkpoints": relative_checkpoints(ens.paths, out), "relative": True, "tta": ens.tta_mode,
            "merge": ens.merge, "vote_k": ens.vote_k, "weights": [float(w) for w in ens.weights],
            "norms": report["norms"], "params": report["params"],
            "calibration": {k: v for k, v in report.items() if k not in ("norms", "params")}}
    write_json(out, spec)
    return {**report, "sheet": sheet}


def crowded_band(loudest: Sequence[dict], pool: SourcePool, p_max: float = 1e-3,
                 min_crops: int = 5) -> tuple | None:
    """(axis "x" or "y", first px, last px, count, [images]) when the loudest held-out normal crops with a mask
    (those that set the image threshold, see `calibration_sheet`; at least `min_crops`, from images of one size
    along that axis) lie in one band of at most half that size, so narrow that crops at random positions land in
    one that narrow with probability under `p_max`; else None. Positions are whole pixels 0..room (room = the
    image's size - the crop's; in the files' pixels, which `data.ok_crop` shifts by its origin: only their range
    counts): the range r of k of them, as a share of room + 1, has P(range <= r) about k r^(k-1) - (k-1) r^k. A
    region of the OK images that the model finds unusual, and that the test images may never show, is what makes
    a threshold strict."""
    index = {str(path): i for i, path in enumerate(pool.paths)}
    picked = [c for c in loudest if c.get("masked") and str(c["image"]) in index]
    if len(picked) < min_crops:
        return None
    size = pool.size
    for axis, dim in (("x", 1), ("y", 0)):
        extent = [pool.load(index[str(c["image"])]).shape[dim] for c in picked]  # the pool's cache: no reading
        common = max(sorted(set(extent)), key=extent.count)  # one image size, so the band is in pixels of it
        on = [c for c, e in zip(picked, extent) if e == common]
        k, room = len(on), common - size
        if k < min_crops or room <= 0:  # a padded axis (image smaller than a crop) has no position to compare
            continue
        lo, hi = min(c[axis] for c in on), max(c[axis] for c in on)
        r = (hi - lo + 1) / (room + 1)
        if hi - lo + size <= common / 2 and k * r ** (k - 1) - (k - 1) * r ** k < p_max:
            return axis, lo, hi + size, k, sorted({str(c["image"]) for c in on})
    return None


def crop_outside(band: tuple, pool: SourcePool) -> list[int] | None:
    """The `data.ok_crop` box [x0, y0, x1, y1] that leaves out a `crowded_band` lying at one edge of its images
    (starting or ending within a crop's size of it), in the files' own pixels; None for a band in the middle, for
    one that leaves less than a crop's size, or for images already cropped (the box is then the user's to choose)."""
    axis, lo, hi, _, images = band
    if pool.crop is not None:
        return None
    h, w = pool.load(pool.index(images[0])).shape[:2]  # the pool's cache: no reading
    extent = w if axis == "x" else h
    sides = ([(hi, extent)] if lo < pool.size else []) + ([(0, lo)] if hi > extent - pool.size else [])
    keep = max(sides, key=lambda k: k[1] - k[0], default=None)
    if keep is None or keep[1] - keep[0] < pool.size:  # in the middle, or no crop's worth of image would be left
        return None
    return [keep[0], 0, keep[1], h] if axis == "x" else [0, keep[0], w, keep[1]]


def sheet_path(path: str | Path) -> Path:
    """Where the calibration sheet of a model file or an ensemble.json goes: beside it, `<stem>_calibration.png`."""
    path = Path(path)
    return path.with_name(f"{path.stem}_calibration.png")


def calibrate_model_file(path: str | Path, device: str = "auto", warn=None) -> dict:
    """Calibrate one model file with its own config (its TTA, its held-out OK images) and store the result in it,
    so `ensemble predict -m FILE` is calibrated without another command."""
    cfg = load_model_file(path)["config"]
    ens = Ensemble.from_checkpoints([path], device, tta_mode=cfg["predict"]["tta"], norms=[None],
                                    batch_size=cfg["predict"]["batch_size"])
    out = calibrate_from_config(ens, cfg, cfg["predict"], warn=warn, sheet=sheet_path(path))
    set_calibration(path, {"norm": out["norms"][0], "params": out["params"], "tta": ens.tta_mode,
                           "mode": out["mode"], "target_overkill": out["target_overkill"],
                           "spend_budget": out["spend_budget"], "report": out["report"],
                           "held_out_images": out["held_out_images"]})
    return out


# ------------------------------------------------------------------------------------------------ picture
def _judged(r: dict, rehit: Callable, params: dict, roi) -> tuple[np.ndarray, float, bool]:
    """(post-processed mask, image evidence, flagged) of one prediction at `params`, as `ensemble predict` judges."""
    mask = postprocess(r["map"], params["threshold"], params["min_area"], params["opening"], roi,
                       rehit(r, params["threshold"]))
    ev, flagged = evidence(mask, r["map"], r["image"]), decide(mask, r["map"], r["image"], params["image_threshold"])
    if flagged:
        mask = flagged_outline(mask, r["map"], params, agreement(r.get("per_model"), params.get("shape")),
                               r.get("pixels"), roi)
    return mask, ev, flagged


def _captioned(tile: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    for line in lines:
        tile = caption(tile, line)
    return tile


def calibration_sheet(path: str | Path | None, rehit: Callable, params: dict, normal: tuple, synthetic: tuple,
                      n: int = 8, warn=None) -> list[dict]:
    """One PNG of what set the operating point, for a person to look at. Top row: the held-out normal crops with the
    highest image evidence among those with a non-empty mask (only those can be flagged: they fix the image
    threshold, and flagged ones are the false alarms the budget allows; crops with an empty mask follow), each with
    its mask outlined in red and its origin (image, y, x) below. Bottom row: the synthetic defects with the lowest
    evidence (the escapes), ground truth in green. A normal crop that scores high because of a region the test
    images never show (a selvage, a background, a fixture) makes the threshold strict: this is where to see it.
    Returns those normal crops, loudest first: {"image", "y", "x", "evidence", "flagged", "masked"} (image: the
    path in the pool, or the crop's index when `where` is not given; masked: the mask is not empty, so the crop can
    be flagged); `path` None: no picture. A picture that cannot be written is a warning: the calibration stands
    without it."""
    images, results, rois, where = normal
    # results of one pass over the crops (`predict_normal`) do not carry their image: drawn as prediction draws them
    results = [r if r.get("pixels") is not None else {**r, "pixels": im} for r, im in zip(results, images)]
    judged = [_judged(r, rehit, params, rois[i] if rois else None) for i, r in enumerate(results)]
    tiles, loudest = [], []
    for i in sorted(range(len(images)), key=lambda i: (judged[i][0].any(), judged[i][1]), reverse=True)[:n]:
        mask, ev, flagged = judged[i]
        image, y, x = where[i] if where else (i, 0, 0)
        loudest.append({"image": image, "y": int(y), "x": int(x), "evidence": ev if np.isfinite(ev) else None,
                        "flagged": flagged, "masked": bool(mask.any())})
        lines = (Path(str(image)).stem[:13], f"y {y}, x {x}", f"{ev:.2f} {'ALARM' if flagged else 'ok'}")
        tiles.append(_captioned(outline(images[i], mask), lines))
    if path is None:
        return loudest
    s_images, s_results, s_rois, s_gt = synthetic
    s_judged = [_judged(r, rehit, params, s_rois[i] if s_rois else None) for i, r in enumerate(s_results)]
    for i in sorted(range(len(s_images)), key=lambda i: s_judged[i][1])[:n]:
        mask, ev, flagged = s_judged[i]
        tile = outline(outline(s_images[i], s_gt[i], (0, 200, 0)), mask)
        tiles.append(_captioned(tile, (f"synthetic {i}", "", f"{ev:.2f} {'found' if flagged else 'ESCAPE'}")))
    try:
        write_png(path, grid(tiles, cols=min(n, len(images))))
    except (OSError, cv2.error, RuntimeError) as e:
        if warn:
            warn(f"{path}: calibration sheet not written ({e})")
    return loudest
