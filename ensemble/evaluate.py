"""`ensemble evaluate`: predictions (mask PNGs or submission JSONs, plus probabilities and scores when present)
against ground truth (mask PNGs or submission-format JSONs). Writes eval.json, eval.md and eval.html."""

from __future__ import annotations

import base64
import csv
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.io import InputError, atomic_write_bytes, encode_png, find_images, read_image, read_json_file, \
    read_mask, stem_of, write_json
from synth.preview import outline

from core.metrics import average_precision, competition_score, dice_iou, iou, roc_auc
from core.postprocess import OUTLINE_RULES
from .submission import read_submission, record_to_mask, text_name

GT_MASK_DIRS = ("TC_Masks", "masks", "Masks")
GT_LABEL_DIRS = ("TC_Labels", "labels")


def load_ground_truth(image_dir: str | Path) -> tuple[list[Path], list[str], list[np.ndarray]]:
    """Test images and their masks: PNG masks in TC_Masks/masks beside `image_dir`, else submission-format
    JSONs in TC_Labels/labels (a crop with no JSON is normal)."""
    image_dir = Path(image_dir)
    paths = find_images(image_dir)
    stems = [stem_of(p, image_dir) for p in paths]
    for name in GT_MASK_DIRS:
        d = image_dir.parent / name
        if d.is_dir():
            masks = []
            for p in paths:
                m = d / p.relative_to(image_dir).with_suffix(".png")
                if not m.exists():
                    raise InputError(f"{m}: ground-truth mask missing for {p}")
                masks.append(read_mask(m, read_image(p).shape[:2]))  # a mask of another size is refused
            return paths, stems, masks
    for name in GT_LABEL_DIRS:
        d = image_dir.parent / name
        if d.is_dir():
            shapes = [read_image(p).shape[:2] for p in paths]
            masks = []
            for p, s, shape in zip(paths, stems, shapes):
                j = d / f"{p.stem}.json"
                masks.append(record_to_mask(read_json_file(j), j) if j.exists() else np.zeros(shape, np.uint8))
            return paths, stems, masks
    raise InputError(f"{image_dir}: no ground truth beside it ({', '.join(GT_MASK_DIRS + GT_LABEL_DIRS)})")


def has_ground_truth(image_dir: str | Path) -> bool:
    return any((Path(image_dir).parent / n).is_dir() for n in GT_MASK_DIRS + GT_LABEL_DIRS)


def load_normals(image_dir: str | Path) -> tuple[list[Path], list[str], list[np.ndarray]]:
    """A folder without ground truth beside it, taken as normal images only (empty masks)."""
    image_dir = Path(image_dir)
    paths = find_images(image_dir)
    return paths, [stem_of(p, image_dir) for p in paths], [np.zeros(read_image(p).shape[:2], np.uint8) for p in paths]


def load_predictions(pred: str | Path, stems: list[str], shapes) -> tuple[list[np.ndarray], list | None, dict | None]:
    """(masks, probability maps or None, image scores or None) from a predict folder or a folder of JSONs."""
    pred = Path(pred)
    if not pred.is_dir():
        raise InputError(f"{pred}: prediction folder does not exist")
    if (pred / "masks").is_dir():
        masks = []
        for s, shape in zip(stems, shapes):
            p = pred / "masks" / f"{s}.png"
            if not p.exists():
                raise InputError(f"{p}: no predicted mask for test image {s}")
            masks.append(read_mask(p, shape))
    else:
        json_dir = pred / "submission" if (pred / "submission").is_dir() else pred
        masks = [read_submission(json_dir, [s], shape)[0] for s, shape in zip(stems, shapes)]
    probs = None
    if (pred / "maps").is_dir():
        probs = [load_map(pred / "maps" / f"{s}.npy") for s in stems]
    scores = None
    if (pred / "scores.csv").exists():
        with open(pred / "scores.csv") as f:
            scores = {r["stem"]: float(r["image_score"]) for r in csv.DictReader(f)}
        scores = {s: scores[text_name(s)] for s in stems if text_name(s) in scores}  # CSV stems are text
    return masks, probs, scores


def load_map(path: Path) -> np.ndarray:
    """One stored anomaly map (float32 .npy, never unpickled)."""
    try:
        return np.load(path, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable anomaly map ({e})") from None


def compute_metrics(pred: list[np.ndarray], gt: list[np.ndarray], probs=None, scores=None) -> dict:
    """Every figure of the shared evaluation, from masks (+ probability maps, + image scores when given)."""
    m = competition_score(pred, gt)
    m["dice"], m["iou"] = dice_iou(pred, gt)
    labels = np.array([g.any() for g in gt])
    if probs is not None:
        flat_p = np.concatenate([p.ravel() for p in probs])
        flat_g = np.concatenate([g.ravel() > 0 for g in gt])
        m["pixel_auroc"], m["pixel_ap"] = roc_auc(flat_p, flat_g), average_precision(flat_p, flat_g)
    if scores is not None:
        m["image_auroc"] = roc_auc(np.asarray(scores), labels)
    m["image_acc"] = float(np.mean([p.any() == g for p, g in zip(pred, labels)]))
    return m


COLUMNS = [("score", "score"), ("escape", "escape"), ("overkill", "overkill"), ("miou", "mIoU"),
           ("pixel_ap", "pixel AP"), ("pixel_auroc", "pixel AUROC"), ("image_auroc", "image AUROC"),
           ("dice", "Dice"), ("iou", "IoU"), ("image_acc", "image acc"), ("oracle_score", "oracle score"),
           ("calibration_loss", "calib. loss")]


def oracle(pred_dir: str | Path, image_dir: str | Path, stems: list[str], gt: list[np.ndarray],
           maps: list[np.ndarray] | None = None) -> dict | None:
    """The best score any thresholds reach on these labelled images, from a predict folder's stored maps (or
    `maps`, the same already loaded by `load_predictions`) and image scores (reporting only: it chooses nothing).
    None when the folder cannot say (no maps, a vote merge, whose hits are not a threshold of the mean map, or an
    ensemble that trimmed its masks without its gates/ beside them)."""
    from .calibrate import POINT, best_on_labelled, rois_for

    pred_dir = Path(pred_dir)
    summary = read_json_file(pred_dir / "predict.json") if (pred_dir / "predict.json").exists() else {}
    if not (pred_dir / "maps").is_dir() or summary.get("merge", "mean") != "mean":
        return None
    with open(pred_dir / "scores.csv") as f:
        heads = {r["stem"]: (float(r["image_head"]) if r.get("image_head") else None) for r in csv.DictReader(f)}
    heads = {s: heads.get(text_name(s)) for s in stems}  # CSV stems are text (see ensemble.submission.text_name)
    maps = maps if maps is not None else [load_map(pred_dir / "maps" / f"{s}.npy") for s in stems]
    params = summary.get("params", {})
    roi = params.get("roi")
    images = None
    if roi or params.get("grabcut"):  # each stem's own image, read as prediction read it (its model's channels)
        by_stem = {stem_of(p, Path(image_dir)): p for p in find_images(image_dir)}
        if not all(s in by_stem for s in stems):
            return None
        images = [read_image(by_stem[s], summary.get("channels", 1)) for s in stems]
    results = [{"map": m, "image": heads.get(s), "pixels": None if images is None else im}
               for m, s, im in zip(maps, stems, images or [None] * len(maps))]
    rois = rois_for(images, roi) if roi else None
    gates = None  # an ensemble that shaped its masks stored where its models agree: the oracle shapes them too
    if params.get("shape") is not None:
        if not all((pred_dir / "gates" / f"{s}.png").is_file() for s in stems):
            return None  # without them the oracle would score other masks than prediction wrote
        gates = [read_mask(pred_dir / "gates" / f"{s}.png") for s in stems]
    return best_on_labelled(results, gt, lambda r, t: (r["map"] >= t).astype(np.uint8), params.get("opening", 0),
                            rois, [params["threshold"]] if "threshold" in params else [], gates,
                            **{k: params.get(k, off) for k, off in OUTLINE_RULES.items()},
                            # the calibrated point: scored too, as prediction drew it
                            also={k: params[k] for k in POINT} if all(k in params for k in POINT) else None)


def markdown_table(rows: dict[str, dict]) -> str:
    """One row per method: `rows` maps a name to its metrics."""
    head = "| method | " + " | ".join(c for _, c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, m in rows.items():
        cells = [f"{m[k]:.3f}" if isinstance(m.get(k), float) and not np.isnan(m[k]) else "-" for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _img_tag(arr: np.ndarray) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(encode_png(arr)).decode()}" width="192">'


def html_report(paths, stems, gt, pred, metrics: dict, scores, k: int = 12) -> str:
    """Worst misses (defective crops escaped or with the lowest IoU) and false alarms (normal crops flagged,
    highest score first), each with ground truth in green and prediction in red."""
    idx_def = [i for i, g in enumerate(gt) if g.any()]
    misses = sorted(idx_def, key=lambda i: (pred[i].any(), iou(pred[i], gt[i])))[:k]
    alarms = [i for i, g in enumerate(gt) if not g.any() and pred[i].any()]
    alarms = sorted(alarms, key=lambda i: -(scores[i] if scores is not None else pred[i].sum()))[:k]

    def card(i):
        img = read_image(paths[i], 3)
        both = outline(outline(img, gt[i], (0, 200, 0)), pred[i], (0, 0, 255))
        note = f"IoU {iou(pred[i], gt[i]):.2f}" if gt[i].any() else "normal"
        if scores is not None:
            note += f", score {scores[i]:.3f}"
        return f'<figure>{_img_tag(both)}<figcaption>{html.escape(stems[i])}<br>{note}</figcaption></figure>'

    table = "".join(f"<tr><td>{c}</td><td>{metrics[key]:.4f}</td></tr>" for key, c in COLUMNS
                    if isinstance(metrics.get(key), float))
    return ("<!doctype html><meta charset='utf-8'><title>evaluation</title><style>body{font-family:sans-serif}"
            "figure{display:inline-block;margin:4px;font-size:11px}td{padding:2px 8px}</style>"
            f"<h1>Evaluation</h1><table>{table}</table><p>green: ground truth, red: prediction</p>"
            f"<h2>Worst misses</h2>{''.join(card(i) for i in misses)}"
            f"<h2>False alarms</h2>{''.join(card(i) for i in alarms) or '<p>none</p>'}")


@dataclass
class Evaluation:
    """A predict folder scored against labelled images: the metrics and what they were computed from."""

    paths: list[Path]
    stems: list[str]
    gt: list[np.ndarray]
    masks: list[np.ndarray]
    maps: list[np.ndarray] | None
    scores: list[float] | None
    metrics: dict


def score_folder(pred_dir: str | Path, gt_images: str | Path, with_oracle: bool = True,
                 truth: tuple[list[Path], list[str], list[np.ndarray]] | None = None) -> Evaluation:
    """Every figure of a predict folder (or a folder of submission JSONs) against the labelled images `gt_images`:
    `compute_metrics`, and with `with_oracle`, where the folder can say, the oracle score (the best thresholds on
    these labels: reporting only), the calibration loss and the oracle's thresholds. `truth`: the ground truth of
    `gt_images`, already loaded (`load_ground_truth`). The one way `ensemble evaluate`, `bench` and the benchmark
    scripts score a folder."""
    paths, stems, gt = truth if truth is not None else load_ground_truth(gt_images)
    masks, maps, score_map = load_predictions(pred_dir, stems, [g.shape for g in gt])
    scores = None
    if score_map is not None:
        missing = [s for s in stems if s not in score_map]
        if missing:
            raise InputError(f"{Path(pred_dir) / 'scores.csv'}: no score for {missing[0]}")
        scores = [score_map[s] for s in stems]
    metrics = compute_metrics(masks, gt, maps, scores)
    best = oracle(pred_dir, gt_images, stems, gt, maps) if with_oracle and any(g.any() for g in gt) else None
    if best is not None:
        metrics.update(oracle_score=best["score"], calibration_loss=best["score"] - metrics["score"],
                       oracle_params={k: best[k] for k in ("threshold", "image_threshold", "min_area")})
    return Evaluation(paths, stems, gt, masks, maps, scores, metrics)


def evaluate(pred_dir: str | Path, gt_images: str | Path, out: str | Path | None = None, name: str = "model") -> dict:
    e = score_folder(pred_dir, gt_images)
    out = Path(out or pred_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", e.metrics)
    atomic_write_bytes(out / "eval.md", markdown_table({name: e.metrics}).encode())
    atomic_write_bytes(out / "eval.html", html_report(e.paths, e.stems, e.gt, e.masks, e.metrics, e.scores).encode())
    return e.metrics
