"""What a defect looks like inside its mask (fills) and how it is merged into the image (blends).

A fill maps (crop, mask, params, source) to a float32 image of the crop's shape; a blend merges that fill into
the crop inside the mask. Both are pure functions of their recorded parameters.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .params import check_range, sub_seed, uniform


def _expand(a: np.ndarray, img: np.ndarray) -> np.ndarray:
    return a[..., None] if img.ndim == 3 else a


def ramp(mask: np.ndarray, edge_level: float, gamma: float) -> np.ndarray:
    """A level rising from `edge_level` on the mask's rim to 1 at its deepest point (distance to the rim ** gamma)."""
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    r = (dist / dist.max()) ** gamma if dist.max() > 0 else dist
    return edge_level + (1 - edge_level) * r


class Shade:
    """Darker or brighter fill with a grey-level ramp from the edge (`edge_level` of the full step) to the centre."""

    name = "shade"

    def __init__(self, strength_range=(0.06, 0.4), edge_level_range=(0.3, 1.0), gamma_range=(0.3, 2.0),
                 dark_probability=0.7):
        self.strength_range = check_range("shade.strength_range", strength_range, 0, 1)
        self.edge_level_range = check_range("shade.edge_level_range", edge_level_range, 0, 1)
        self.gamma_range = check_range("shade.gamma_range", gamma_range, 0.05, 10)
        self.dark_probability = check_range("shade.dark_probability", (dark_probability,) * 2, 0, 1)[0]

    def get_params(self, rng, size):
        return {"sign": -1 if rng.uniform() < self.dark_probability else 1,
                "strength": round(uniform(rng, self.strength_range) * 255, 2),
                "edge_level": round(uniform(rng, self.edge_level_range), 3),
                "gamma": round(uniform(rng, self.gamma_range), 3)}

    @staticmethod
    def render(crop, mask, params, source):
        level = ramp(mask, params["edge_level"], params["gamma"])
        return crop.astype(np.float32) + params["sign"] * params["strength"] * _expand(level, crop)


class Texture:
    """Fill from another patch of the same OK image (flipped, gain and offset), e.g. foreign material."""

    name = "texture"

    def __init__(self, gain_range=(0.6, 1.4), offset_range=(-0.2, 0.2)):
        self.gain_range = check_range("texture.gain_range", gain_range, 0, 5)
        self.offset_range = check_range("texture.offset_range", offset_range, -1, 1)

    def get_params(self, rng, size, source_shape=None):
        h, w = source_shape[:2]
        return {"box": [int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))],
                "flip": int(rng.integers(-1, 3)), "gain": round(uniform(rng, self.gain_range), 3),
                "offset": round(uniform(rng, self.offset_range) * 255, 2)}

    @staticmethod
    def render(crop, mask, params, source):
        x, y = params["box"]
        h, w = crop.shape[:2]
        patch = source[y:y + h, x:x + w]
        if params["flip"] < 2:
            patch = cv2.flip(patch, params["flip"])
        mean = patch.mean()
        return (patch.astype(np.float32) - mean) * params["gain"] + mean + params["offset"]


class Noise:
    """Grainy fill: Gaussian noise around a shifted grey level."""

    name = "noise"

    def __init__(self, sigma_range=(0.04, 0.15), offset_range=(-0.3, 0.3)):
        self.sigma_range = check_range("noise.sigma_range", sigma_range, 0, 1)
        self.offset_range = check_range("noise.offset_range", offset_range, -1, 1)

    def get_params(self, rng, size):
        return {"sigma": round(uniform(rng, self.sigma_range) * 255, 2),
                "offset": round(uniform(rng, self.offset_range) * 255, 2), "seed": sub_seed(rng)}

    @staticmethod
    def render(crop, mask, params, source):
        g = np.random.default_rng(params["seed"])
        noise = g.standard_normal(crop.shape).astype(np.float32) * params["sigma"]
        return crop.astype(np.float32) + params["offset"] + noise


FILLS = {cls.name: cls for cls in (Shade, Texture, Noise)}


def edge_radius(softness: float) -> int:
    """How far (px) a soft edge of Gaussian sigma `softness` may reach outside the mask."""
    return int(math.ceil(2 * softness))


class AlphaBlend:
    """Soft alpha blending; the alpha is the mask blurred by a Gaussian of sigma `softness` px, and is zero
    beyond `edge_radius(softness)` px outside the mask, so the image is unchanged there."""

    name = "alpha"

    def __init__(self, softness_range=(0.0, 1.5)):
        self.softness_range = check_range("alpha.softness_range", softness_range, 0, 10)

    def get_params(self, rng, size):
        return {"softness": round(uniform(rng, self.softness_range), 3)}

    @staticmethod
    def render(crop, fill, mask, params):
        s = params["softness"]
        alpha = mask.astype(np.float32)
        if s > 0:
            r = edge_radius(s)
            alpha = cv2.GaussianBlur(alpha, (2 * r + 1, 2 * r + 1), s)
            support = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
            alpha = np.maximum(alpha * support, mask * 0.5)  # the labelled pixels keep at least half the defect
        alpha = _expand(alpha, crop)
        out = crop.astype(np.float32) * (1 - alpha) + fill * alpha
        return np.clip(np.round(out), 0, 255).astype(np.uint8)


class PoissonBlend:
    """Poisson (gradient-domain) blending with `cv2.seamlessClone`, on a padded canvas so masks touching the
    border work. Masks under `MIN_AREA` pixels or without an interior (nothing left after a 3x3 erosion, e.g.
    1-px lines) fall back to hard alpha blending: seamlessClone needs room and fails on them."""

    name = "poisson"
    MIN_AREA = 9
    PAD = 8

    def get_params(self, rng, size):
        return {}

    @staticmethod
    def render(crop, fill, mask, params):
        if int(mask.sum()) < PoissonBlend.MIN_AREA or not cv2.erode(mask, np.ones((3, 3), np.uint8)).any():
            return AlphaBlend.render(crop, fill, mask, {"softness": 0.0})
        p = PoissonBlend.PAD
        gray = crop.ndim == 2
        dst = cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR) if gray else crop
        src = np.clip(np.round(fill), 0, 255).astype(np.uint8)
        src = cv2.cvtColor(src, cv2.COLOR_GRAY2BGR) if gray else src
        dst = cv2.copyMakeBorder(dst, p, p, p, p, cv2.BORDER_REFLECT_101)
        src = cv2.copyMakeBorder(src, p, p, p, p, cv2.BORDER_REFLECT_101)
        m = cv2.copyMakeBorder(mask * 255, p, p, p, p, cv2.BORDER_CONSTANT, value=0)
        x, y, w, h = cv2.boundingRect(m)
        try:
            out = cv2.seamlessClone(src, dst, m, (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)
        except cv2.error:  # any other shape OpenCV cannot clone: the same deterministic fallback
            return AlphaBlend.render(crop, fill, mask, {"softness": 0.0})
        out = out[p:-p, p:-p]
        out = np.where(mask[..., None] > 0, out, crop[..., None] if gray else crop)  # exact outside the mask
        return out[..., 0] if gray else out


BLENDS = {cls.name: cls for cls in (AlphaBlend, PoissonBlend)}
