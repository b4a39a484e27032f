"""What a calibrated model catches, measured on OK images alone: `ensemble probe`.

A line engineer's first question about a model is not its score on defects nobody has yet, but its limits: how
faint, how small, how thin a defect it still flags, and whether a thin one along the surface's own texture is
seen as well as one across it. The probe answers that from the held-out OK images (the crops calibration draws
from; never trained on). Each of `n` real normal crops gets one plain defect at a random place: a round spot of a
given diameter, or a straight line of a given width, half the crop long, along the texture's direction or across
it (`synth.texture.CropContext.direction`). Its pixels are made `contrast` grey levels darker (or brighter) with an
anti-aliased edge. Every cell of (kind, size, contrast) uses the same crops, and the contrasts of one (kind, size)
the same places. A probe counts as caught when the crop
is judged defective at the model's calibrated operating point, exactly as `ensemble predict` judges it, and its
mask touches the probe (within 2 px). The same crops without a probe give the false-alarm rate the catches are to
be read against.

Probes are not defects the model was trained on, nor real ones: they measure how the detector responds, by
kind, size and contrast. A high catch rate on them does not promise one on real defects (README, benchmark section
"A crack family"); a low one on a kind of defect you expect is worth knowing before deployment.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from core.io import atomic_write_bytes, write_json, write_png
from synth.preview import caption, grid, outline
from synth.streams import PROBE, stream
from synth.texture import CropContext

from .calibrate import rois_for
from .models import Ensemble

KINDS = ("spot", "line along", "line across")
SIZES = {"spot": (3, 6, 12), "line": (1, 2, 4)}  # spot diameters, line widths (px)
CONTRASTS = (10, 20, 40)  # grey levels
TOUCH = 2  # px: a flagged mask this close to the probe has found it


def probe_profile(size: int, kind: str, width: float, rng: np.random.Generator, direction: float) -> np.ndarray:
    """(size, size) float32 in [0, 1]: 1 on the probe, an anti-aliased 1-px edge. A spot of diameter `width`, or a
    straight line `width` wide and half the crop long, at `direction` (radians, image x/y) for "line along" and at
    right angles to it for "line across"; its centre is drawn from `rng`, far enough inside for the whole probe."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    if kind == "spot":
        r = width / 2
        cx, cy = rng.uniform(r + 2, size - r - 2, 2)
        dist = np.hypot(xx - cx, yy - cy)
        return np.clip(r + 0.5 - dist, 0, 1).astype(np.float32)
    angle = direction if kind == "line along" else direction + math.pi / 2
    half = size / 4  # half of a line half the crop long
    d = np.array([math.cos(angle), math.sin(angle)])
    reach = np.abs(d) * half + width / 2 + 2
    cx, cy = (rng.uniform(reach[k], size - reach[k]) for k in range(2))
    along = (xx - cx) * d[0] + (yy - cy) * d[1]
    across = np.abs(-(xx - cx) * d[1] + (yy - cy) * d[0])
    core = np.clip(width / 2 + 0.5 - across, 0, 1)
    return (core * np.clip(half + 0.5 - np.abs(along), 0, 1)).astype(np.float32)


def with_probe(crop: np.ndarray, profile: np.ndarray, contrast: float, sign: int) -> np.ndarray:
    """The crop with `contrast` grey levels added (sign +1) or taken away (-1) along `profile`, clipped to uint8."""
    p = profile[..., None] if crop.ndim == 3 else profile
    return np.clip(np.round(crop.astype(np.float32) + sign * contrast * p), 0, 255).astype(np.uint8)


def _judge(ens: Ensemble, params: dict, images: list[np.ndarray]) -> list[np.ndarray]:
    """Each image's final mask (empty: judged normal), as `ensemble predict` makes it."""
    rois = rois_for(images, params.get("roi")) or [None] * len(images)
    return [ens.judge(r, params, roi)[0] for r, roi in zip(ens.predict(images), rois)]


def cells(sizes: dict | None = None, contrasts: Sequence[float] = CONTRASTS) -> list[tuple[str, float, float]]:
    """Every (kind, size, contrast) of a probe run, in report order."""
    sizes = sizes or SIZES
    return [(kind, float(s), float(c)) for kind in KINDS for s in sizes["spot" if kind == "spot" else "line"]
            for c in contrasts]


def run_probe(ens: Ensemble, params: dict, crops: Sequence[np.ndarray], seed: int = 0, polarity: str = "dark",
              sizes: dict | None = None, contrasts: Sequence[float] = CONTRASTS, progress=None) -> dict:
    """{"false_alarm": share of the bare crops flagged, "cells": [{kind, size, contrast, caught, flagged}],
    "examples": {(kind, size, contrast): (image, mask, profile) of the first crop}}. `polarity`: dark or bright.
    `progress(k)` is called after each cell."""
    if polarity not in ("dark", "bright"):
        raise ValueError(f"polarity: expected dark or bright, got {polarity!r}")
    sign = -1 if polarity == "dark" else 1
    crops = list(crops)
    size = crops[0].shape[0]
    if any(c.shape[:2] != (size, size) for c in crops):
        raise ValueError("run_probe: expected square crops, all of one size")
    bare = _judge(ens, params, crops)
    directions = [CropContext(c).direction for c in crops]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * TOUCH + 1, 2 * TOUCH + 1))
    rows, examples = [], {}
    for kind, width, contrast in cells(sizes, contrasts):
        rng = stream(PROBE, seed, 1, KINDS.index(kind), round(width * 100))  # each contrast: the same places
        profiles = [probe_profile(size, kind, width, rng, d) for d in directions]
        images = [with_probe(c, p, contrast, sign) for c, p in zip(crops, profiles)]
        masks = _judge(ens, params, images)
        caught = [bool((m > 0).any() and (cv2.dilate((p >= 0.5).astype(np.uint8), kernel) & (m > 0)).any())
                  for m, p in zip(masks, profiles)]
        rows.append({"kind": kind, "size": width, "contrast": contrast, "caught": float(np.mean(caught)),
                     "flagged": float(np.mean([(m > 0).any() for m in masks]))})
        examples[kind, width, contrast] = (images[0], masks[0], profiles[0])
        if progress:
            progress(1)
    return {"n": len(crops), "polarity": polarity, "false_alarm": float(np.mean([(m > 0).any() for m in bare])),
            "cells": rows, "examples": examples}


def _table(res: dict, kind: str) -> tuple[str, list[float], list[tuple[float, dict]]]:
    """(what the size measures, the sizes in order, [(contrast, {size: share caught})] in contrast order) of one
    kind: what the markdown tables and the picture both show."""
    rows = [r for r in res["cells"] if r["kind"] == kind]
    sizes = sorted({r["size"] for r in rows})
    by_contrast = [(c, {r["size"]: r["caught"] for r in rows if r["contrast"] == c})
                   for c in sorted({r["contrast"] for r in rows})]
    return ("diameter" if kind == "spot" else "width"), sizes, by_contrast


def report_markdown(res: dict, source: str) -> str:
    """One table per kind: rows = contrast, columns = size, cells = share caught."""
    lines = [f"# What the model catches: {res['n']} held-out OK crops of {source}, {res['polarity']} probes", "",
             f"False alarms on the same crops without a probe: {100 * res['false_alarm']:.0f} %. A probe is caught "
             f"when its crop is flagged and the mask touches it (within {TOUCH} px).", ""]
    for kind in KINDS:
        what, sizes, by_contrast = _table(res, kind)
        lines += [f"## {kind}", "", "| contrast (grey levels) | " + " | ".join(f"{what} {s:g} px" for s in sizes)
                  + " |", "|---|" + "---|" * len(sizes)]
        for c, by in by_contrast:
            lines.append(f"| {c:g} | " + " | ".join(f"{100 * by[s]:.0f} %" for s in sizes) + " |")
        lines.append("")
    return "\n".join(lines)


def _heat(rate: float, label: str, side: int = 128) -> np.ndarray:
    """A square cell coloured from red (none caught) to green (all caught), its size and share in black."""
    tile = np.zeros((side, side, 3), np.uint8)
    tile[:] = (60, int(60 + 170 * rate), int(230 - 170 * rate))  # BGR
    for k, text in enumerate((label, f"{100 * rate:.0f} %")):
        cv2.putText(tile, text, (10, side // 2 - 6 + 28 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 1, cv2.LINE_AA)
    return tile


def report_picture(res: dict) -> np.ndarray:
    """A row per (kind, contrast): the share caught at each size, then the first crop with the largest probe of
    the row (green outline) and the mask the model gave it (red)."""
    tiles = []
    for kind in KINDS:
        what, sizes, by_contrast = _table(res, kind)
        for c, by in by_contrast:
            image, mask, profile = res["examples"][kind, sizes[-1], c]
            shown = cv2.resize(outline(outline(image, profile >= 0.5, (0, 200, 0)), mask, (0, 0, 255)), (128, 128),
                               interpolation=cv2.INTER_NEAREST)
            row = np.hstack([_heat(by[s], f"{s:g} px") for s in sizes] + [shown])
            tiles.append(caption(row, f"{kind}, {what} per cell, {c:g} grey levels {res['polarity']}er", 20))
    return grid(tiles, 1)


def write_report(res: dict, out: str | Path, source: str) -> dict:
    """probe.md, probe.json and probe.png in `out`; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, js, png = out / "probe.md", out / "probe.json", out / "probe.png"
    atomic_write_bytes(md, report_markdown(res, source).encode())
    write_json(js, {k: v for k, v in res.items() if k != "examples"})
    write_png(png, report_picture(res))
    return {"markdown": md, "json": js, "picture": png}


__all__ = ["KINDS", "SIZES", "CONTRASTS", "cells", "probe_profile", "with_probe", "run_probe", "report_markdown",
           "report_picture", "write_report"]
