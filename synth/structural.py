"""Structural defects that move image content rather than paint over it: a local elastic displacement
(missing edges, burrs, dents). The mask is where the content visibly changed; outside it the image is untouched."""

from __future__ import annotations

import math

import cv2
import numpy as np

from .params import Sized, check_range, rounded, uniform


class Displacement(Sized):
    """Push the content under a Gaussian bump of radius `radius` by up to `magnitude` px along `angle`."""

    name = "displacement"

    def __init__(self, radius_range=(0.05, 0.25), magnitude_range=(0.03, 0.12), threshold=12.0):
        self.radius_range = check_range("displacement.radius_range", radius_range, 0.01, 1)
        self.magnitude_range = check_range("displacement.magnitude_range", magnitude_range, 0.001, 1)
        self.threshold = float(threshold)

    def get_params(self, rng, size):
        return {"center": rounded([uniform(rng, (0, size)) for _ in range(2)], 2),
                "radius": round(self.size_in(rng, self.radius_range) * size, 2),
                "magnitude": round(uniform(rng, self.magnitude_range) * size, 2),
                "angle": round(uniform(rng, (0, 2 * math.pi)), 3), "threshold": self.threshold}

    @staticmethod
    def render(crop: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray]:
        h, w = crop.shape[:2]
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        cx, cy = params["center"]
        bump = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * params["radius"] ** 2))
        m = params["magnitude"] * bump
        mapx = xx - m * math.cos(params["angle"])
        mapy = yy - m * math.sin(params["angle"])
        moved = cv2.remap(crop, mapx, mapy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        change = cv2.absdiff(moved, crop)
        if change.ndim == 3:
            change = change.max(2)
        mask = ((change > params["threshold"]) & (bump > 0.05)).astype(np.uint8)
        k = np.ones((3, 3), np.uint8)
        mask = cv2.morphologyEx(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, k), cv2.MORPH_OPEN, k)
        keep = mask[..., None] > 0 if crop.ndim == 3 else mask > 0
        return np.where(keep, moved, crop), mask
