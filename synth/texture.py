"""Defects drawn from the surface itself: changes relative to the local texture instead of flat fills.

Measures of the crop (`texture_mad`, `CropContext`: dominant texture direction, strong edges) and the families
built on them, each drawn from a caller-owned generator into a record that replays exactly:

- `stain`: large, low-contrast multiplicative shading that keeps the texture (dark or bright stains, uneven
  shading);
- `line`: line defects along the texture direction (or across it), from 1-px hair-lines to bands several pixels
  wide crossing the whole crop, darker, brighter or blurred;
- `crack`: hair-line cracks (`shapes.Crack`: a jagged path, maybe branched, 1 - 5 px wide on 128-px crops) along
  the texture direction half the time, much darker than the surface (a gap; brighter one time in five), with a
  sharp edge; weight 0 by default;
- `blur` and `sharpen`: the texture locally smoothed away or exaggerated;
- `shift`: the texture locally displaced by a few pixels (misaligned weave or grain, broken picks); off by
  default: on a texture without a period a shifted patch looks the same, so its label would mark nothing visible
  (the visibility measure, a pixel-wise change, cannot tell);
- `edge`: breaks and burrs where the part meets the background, on the crop's strongest edge (found
  automatically; crops without an edge draw another family).

Their records have the shape of every masked family's (shape, warp, fill, alpha blend with a narrow soft edge):
the fills here (`Gain`, `Blur`, `Sharpen`, `Shift`: `TEXTURE_FILLS`) join `appearance.FILLS` in the engine, so
they replay through the same path.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .appearance import _expand, ramp
from .params import Sized, check_range, extent, rounded, uniform
from .shapes import BezierBlob, Crack, PerlinShape

MAD_SIGMA = 3.0  # the scale that separates "texture" from "shading" in `texture_mad`


def _gray(img: np.ndarray) -> np.ndarray:
    g = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    return g.astype(np.float32)


def texture_mad(image: np.ndarray, region: np.ndarray | None = None) -> float:
    """The texture's own variation: mean |image - its Gaussian blur (sigma 3 px)|, over `region` (or all)."""
    g = _gray(image)
    dev = np.abs(g - cv2.GaussianBlur(g, (0, 0), MAD_SIGMA))
    if region is not None and region.any():
        return float(dev[region > 0].mean())
    return float(dev.mean())


def visibility(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(contrast, visibility) of a change inside `mask`: contrast is the mean |after - before| in grey levels,
    visibility the same over the texture's own variation around it (`texture_mad` of `before` on the mask grown
    by 4 px, at least 1 grey level): a change counts as seen when it stands out from what the surface does
    anyway, so a busy texture needs a stronger change than a flat one."""
    m = mask > 0
    if not m.any():
        return 0.0, 0.0
    diff = np.abs(after.astype(np.float32) - before.astype(np.float32))
    if diff.ndim == 3:
        diff = diff.mean(2)
    contrast = float(diff[m].mean())
    around = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
    return contrast, contrast / max(texture_mad(before, around), 1.0)


class CropContext:
    """What the texture-relative families need to know about a crop, computed once per draw."""

    def __init__(self, crop: np.ndarray):
        self.crop = crop
        self._direction = None
        self._edges = None

    @property
    def direction(self) -> float:
        """Angle (radians, image x to the right, y down) along which the texture runs: perpendicular to the
        dominant gradient of the structure tensor. A texture without a direction gives an arbitrary angle (pi / 2
        for a flat crop), which is harmless: lines on it may run any way."""
        if self._direction is None:
            g = _gray(self.crop)
            gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)
            jxx, jyy, jxy = float((gx * gx).mean()), float((gy * gy).mean()), float((gx * gy).mean())
            grad = 0.5 * math.atan2(2 * jxy, jxx - jyy) if jxx + jyy > 0 else 0.0
            self._direction = grad + math.pi / 2
        return self._direction

    def edges(self, min_step: float) -> tuple[np.ndarray, np.ndarray]:
        """Points on the crop's strong edges, where the brightness steps by about `min_step` grey levels or more
        at a scale of a few pixels (tile border, part boundary), and the gradient angle there. The crop is blurred
        first (sigma 3 px) so that texture and grain do not count. Returns (points (n, 2) as x, y; angles)."""
        if self._edges is None:
            g = cv2.GaussianBlur(_gray(self.crop), (0, 0), 3.0)
            gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0) / 8, cv2.Sobel(g, cv2.CV_32F, 0, 1) / 8
            self._edges = (np.hypot(gx, gy), np.arctan2(gy, gx))
        mag, ang = self._edges
        # a step of height H blurred with sigma 3 has a peak slope of H / (3 sqrt(2 pi)), about H / 7.5
        ys, xs = np.nonzero(mag >= max(min_step / 7.5, 0.5 * float(mag.max())))
        return np.stack([xs, ys], 1), ang[ys, xs]


# ------------------------------------------------------------------------------------------------------ fills
class Gain:
    """Multiplicative shading that keeps the texture: the local mean (blur, sigma 3 px) is scaled by
    1 + sign * strength and the texture around it by `contrast`, both fading from the mask's centre to
    `edge_level` at its rim."""

    name = "gain"

    def __init__(self, strength_range=(0.04, 0.3), contrast_range=(0.6, 1.3), edge_level_range=(0.1, 0.6),
                 dark_probability=0.6):
        self.strength_range = check_range("gain.strength_range", strength_range, 0, 1)
        self.contrast_range = check_range("gain.contrast_range", contrast_range, 0, 4)
        self.edge_level_range = check_range("gain.edge_level_range", edge_level_range, 0, 1)
        self.dark_probability = check_range("gain.dark_probability", (dark_probability,) * 2, 0, 1)[0]

    def get_params(self, rng, size):
        return {"sign": -1 if rng.uniform() < self.dark_probability else 1,
                "strength": round(uniform(rng, self.strength_range), 3),
                "contrast": round(uniform(rng, self.contrast_range), 3),
                "edge_level": round(uniform(rng, self.edge_level_range), 3),
                "gamma": round(uniform(rng, (0.5, 1.5)), 3)}

    @staticmethod
    def render(crop, mask, params, source):
        f = crop.astype(np.float32)
        mean = cv2.GaussianBlur(f, (0, 0), MAD_SIGMA)
        level = _expand(ramp(mask, params["edge_level"], params["gamma"]), crop)
        gain = 1 + params["sign"] * params["strength"] * level
        texture = 1 + (params["contrast"] - 1) * level
        return mean * gain + (f - mean) * texture


class Blur:
    """The texture smoothed away: Gaussian blur of `sigma` px."""

    name = "blur"

    def __init__(self, sigma_range=(0.8, 4.0)):
        self.sigma_range = check_range("blur.sigma_range", sigma_range, 0.1, 50)

    def get_params(self, rng, size):
        return {"sigma": round(uniform(rng, self.sigma_range), 3)}

    @staticmethod
    def render(crop, mask, params, source):
        return cv2.GaussianBlur(crop.astype(np.float32), (0, 0), params["sigma"])


class Sharpen:
    """The texture exaggerated: unsharp masking by `amount` at `sigma` px."""

    name = "sharpen"

    def __init__(self, amount_range=(0.8, 3.0), sigma_range=(0.8, 2.5)):
        self.amount_range = check_range("sharpen.amount_range", amount_range, 0, 20)
        self.sigma_range = check_range("sharpen.sigma_range", sigma_range, 0.1, 20)

    def get_params(self, rng, size):
        return {"amount": round(uniform(rng, self.amount_range), 3),
                "sigma": round(uniform(rng, self.sigma_range), 3)}

    @staticmethod
    def render(crop, mask, params, source):
        f = crop.astype(np.float32)
        return f + params["amount"] * (f - cv2.GaussianBlur(f, (0, 0), params["sigma"]))


class Shift:
    """The texture displaced by (dx, dy) px (sub-pixel, reflected at the border): a misaligned weave or grain."""

    name = "shift"

    def __init__(self, distance_range=(0.01, 0.06)):
        self.distance_range = check_range("shift.distance_range", distance_range, 0, 0.5)

    def get_params(self, rng, size):
        d = max(1.0, uniform(rng, self.distance_range) * size)
        a = uniform(rng, (0, 2 * math.pi))
        return {"offset": rounded([d * math.cos(a), d * math.sin(a)], 2)}

    @staticmethod
    def render(crop, mask, params, source):
        dx, dy = params["offset"]
        h, w = crop.shape[:2]
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        return cv2.warpAffine(crop.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT_101)


TEXTURE_FILLS = {cls.name: cls for cls in (Gain, Blur, Sharpen, Shift)}


# --------------------------------------------------------------------------------------------------- families
def line_shape(rng, size: int, angle: float, length: float, width: float, bend: float) -> dict:
    """A `bezier_stroke` record: a line through a random point at `angle`, `length` px long (longer than the
    crop means it crosses it), bent sideways by up to `bend` of its length."""
    cx, cy = (uniform(rng, (0.1 * size, 0.9 * size)) for _ in range(2))
    d = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-d[1], d[0]])
    s = np.linspace(-0.5, 0.5, 4)[:, None]
    pts = np.array([cx, cy]) + s * length * d + rng.uniform(-1, 1, (4, 1)) * bend * length * normal
    return {"kind": "bezier_stroke", "points": rounded(pts, 2), "width": round(width, 2)}


class TextureFamilies(Sized):
    """Draws the records of the texture-relative families; the engine renders them like every masked family
    (shape -> mask, fill -> what the surface becomes, alpha blend with a narrow soft edge; a crack's is sharper).
    Their blend is always that alpha (a Poisson blend would remove the change they make) and their blob masks are
    warped half the time, whatever `synth.blends` and `synth.warp_probability` say; `stain` draws its own Perlin
    window and threshold."""

    NAMES = ("stain", "line", "crack", "blur", "sharpen", "shift")

    KEYS = {"line": {"width_range", "length_range", "along_probability"}, "stain": {"window_range"}}

    def __init__(self, params: dict):
        p = params
        for name, known in self.KEYS.items():
            unknown = set(p.get(name, {})) - known
            if unknown:
                raise ValueError(f"params.{name}: unknown key {sorted(unknown)[0]!r} "
                                 f"(known: {', '.join(sorted(known))})")
        self.perlin = PerlinShape(**p.get("perlin", {}))
        self.blob = BezierBlob(**{"scale_range": (0.04, 0.25), **p.get("bezier_blob", {})})
        self.gain = Gain(**p.get("gain", {}))
        self.stain_gain = Gain(**{"strength_range": (0.05, 0.35), "contrast_range": (0.5, 1.2),  # large, so faint
                                  **p.get("gain", {})})
        self.crack = Crack(**p.get("crack", {}))
        self.crack_gain = Gain(**{"strength_range": (0.2, 0.6), "contrast_range": (0.3, 1.0),  # a gap: dark, sharp
                                  "edge_level_range": (0.6, 1.0), "dark_probability": 0.8, **p.get("gain", {})})
        self.blur = Blur(**p.get("blur", {}))
        self.sharpen = Sharpen(**p.get("sharpen", {}))
        self.shift = Shift(**p.get("shift", {}))
        lp = p.get("line", {})
        self.line_width = check_range("line.width_range", lp.get("width_range", (0.006, 0.08)), 0.001, 0.5)
        self.line_length = check_range("line.length_range", lp.get("length_range", (0.4, 1.6)), 0.05, 4)
        self.line_along = check_range("line.along_probability", (lp.get("along_probability", 0.6),) * 2, 0, 1)[0]
        sp = p.get("stain", {})
        self.stain_window = check_range("stain.window_range", sp.get("window_range", (0.12, 0.5)), 0.01, 2)

    def draw(self, family: str, rng, size: int, ctx: CropContext, warp) -> dict:
        soft = {"kind": "alpha", "softness": round(uniform(rng, (0.5, 1.5)), 3)}
        if family == "stain":  # large Perlin region, multiplicative shading with a soft ramp into the texture
            shape = {"kind": "perlin", **self.perlin.get_params(rng, size)}
            shape["window"] = round(self.size_in(rng, self.stain_window) * size, 2)
            shape["threshold"] = round(uniform(rng, (0.15, 0.45)), 3)
            return {"family": family, "shape": shape, "warp": None,
                    "fill": {"kind": "gain", **self.stain_gain.get_params(rng, size)}, "blend": soft}
        if family == "line":
            u = rng.uniform()
            angle = ctx.direction if u < self.line_along else (
                ctx.direction + math.pi / 2 if u < (1 + self.line_along) / 2 else uniform(rng, (0, math.pi)))
            angle += float(rng.normal(0, 0.05))
            width = max(1.0, extent(rng, self.line_width) * size)  # hair-lines to bands: always log-uniform
            length = self.size_in(rng, self.line_length) * size
            shape = line_shape(rng, size, angle, length, width, uniform(rng, (0, 0.08)))
            kind = ("gain", "blur", "shift")[int(rng.choice(3, p=[0.7, 0.15, 0.15]))]
            fill = {"kind": kind, **{"gain": self.gain, "blur": self.blur, "shift": self.shift}[kind]
                    .get_params(rng, size)}
            return {"family": family, "shape": shape, "warp": None, "fill": fill, "blend": soft}
        if family == "crack":  # thin, jagged, much darker than the surface (or brighter), with a sharp edge
            angle = None
            if rng.uniform() < self.crack.along_probability:
                angle = ctx.direction + float(rng.normal(0, 0.05))
            shape = {"kind": "crack", **self.crack.get_params(rng, size, angle)}
            return {"family": family, "shape": shape, "warp": None,
                    "fill": {"kind": "gain", **self.crack_gain.get_params(rng, size)},
                    "blend": {"kind": "alpha", "softness": round(uniform(rng, (0.0, 0.6)), 3)}}
        fill_of = {"blur": self.blur, "sharpen": self.sharpen, "shift": self.shift}
        if family not in fill_of:
            raise ValueError(f"unknown texture family {family!r}")
        shape = {"kind": "bezier_blob", **self.blob.get_params(rng, size)}
        if family == "shift" and rng.uniform() < 0.5:  # a band along the texture: a misaligned row of weave
            shape = line_shape(rng, size, ctx.direction, 2 * size,
                               max(2.0, self.size_in(rng, (0.03, 0.2)) * size), 0.0)
        w = warp.get_params(rng, size) if shape["kind"] == "bezier_blob" and rng.uniform() < 0.5 else None
        return {"family": family, "shape": shape, "warp": w,
                "fill": {"kind": family, **fill_of[family].get_params(rng, size)}, "blend": soft}


class EdgeDefect(Sized):
    """A break or burr on the part's edge: a displacement (see `structural.Displacement`) centred on a point of
    the crop's strongest edge, pushing the boundary along its gradient (into the part or out of it)."""

    name = "edge"

    def __init__(self, min_step=40.0, radius_range=(0.04, 0.15), magnitude_range=(0.03, 0.12), threshold=12.0):
        self.min_step = float(min_step)
        self.radius_range = check_range("edge.radius_range", radius_range, 0.01, 1)
        self.magnitude_range = check_range("edge.magnitude_range", magnitude_range, 0.001, 1)
        self.threshold = float(threshold)

    def get_params(self, rng, size, ctx: CropContext) -> dict | None:
        """Parameters of a `Displacement` on a strong edge of the crop; None when the crop has no edge."""
        pts, angles = ctx.edges(self.min_step)
        if not len(pts):
            return None
        i = int(rng.integers(len(pts)))
        sign = 1 if rng.uniform() < 0.5 else -1
        return {"center": [float(pts[i][0]), float(pts[i][1])],
                "radius": round(self.size_in(rng, self.radius_range) * size, 2),
                "magnitude": round(sign * uniform(rng, self.magnitude_range) * size, 2),
                "angle": round(float(angles[i]), 3), "threshold": self.threshold}


__all__ = ["texture_mad", "visibility", "CropContext", "TEXTURE_FILLS", "TextureFamilies", "EdgeDefect"]
