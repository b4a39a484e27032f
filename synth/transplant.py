"""Real defects transplanted: the `transplant` family.

A user with a few labelled real defects (even five) points `synth.transplant` at them (an images folder with
masks beside it). Each connected defect region is cut out once with a margin of its normal surroundings; a drawn
sample pastes one onto an OK crop, turned by quarter turns and up to 15 degrees, rescaled, maybe mirrored,
re-shaded to the crop's brightness and blended over `RING` px of its own surroundings (so it keeps its own
contrast). The label is the real mask under the same warp, exactly; pixels beyond it change only within `RING` px.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from core.io import InputError, half_of, labelled_defects, read_image, read_mask

from .params import check_range, rounded, uniform

RING = 3  # px of the defect's own surroundings blended with it (the Poisson boundary)


class TransplantBank:
    """The real defects of `folder` (one half of them, at most `limit`; 0: all), cut out once per engine."""

    MARGIN = 8

    def __init__(self, folder: str | Path, channels: int = 1, half: str = "all", limit: int = 0,
                 scale_range=(0.7, 1.3), gain_range=(0.85, 1.15)):
        self.scale_range = check_range("transplant.scale_range", scale_range, 0.1, 10)
        self.gain_range = check_range("transplant.gain_range", gain_range, 0, 5)
        pairs = half_of(labelled_defects(folder), half)
        if limit:
            pairs = pairs[:limit]
        self.items: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for image_path, mask_path in pairs:
            img = read_image(image_path, channels)
            m = read_mask(mask_path, img.shape[:2])
            n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
            for k in range(1, n):
                x, y, w, h, area = stats[k]
                if area < 4:
                    continue
                g = self.MARGIN
                y0, y1, x0, x1 = max(0, y - g), min(m.shape[0], y + h + g), max(0, x - g), min(m.shape[1], x + w + g)
                rel = Path(image_path).relative_to(folder).as_posix()  # unique in a recursive folder
                self.items[f"{rel}#{k}"] = (img[y0:y1, x0:x1].copy(),
                                                              (labels[y0:y1, x0:x1] == k).astype(np.uint8))
        if not self.items:
            raise InputError(f"{folder}: no labelled defect to transplant (masks with a region of 4 px or more)")
        self.names = sorted(self.items)

    def get_params(self, rng, size: int) -> dict:
        return {"defect": self.names[int(rng.integers(len(self.names)))],
                # a quarter turn and a little: real defects run along or across the surface's own directions
                "angle": round(90 * int(rng.integers(4)) + uniform(rng, (-15, 15)), 2),
                "scale": round(uniform(rng, self.scale_range), 3),
                "flip": int(rng.integers(0, 2)), "center": rounded([uniform(rng, (0.1 * size, 0.9 * size))
                                                                    for _ in range(2)], 2),
                "gain": round(uniform(rng, self.gain_range), 3)}

    def warp(self, params: dict, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(patch warped into the crop's frame as float32, its exact mask, where the warped patch has data)."""
        if params["defect"] not in self.items:
            raise InputError(f"transplant: the record names defect {params['defect']!r}, which is not among the "
                             "transplant folder's defects (another folder or half than the one it was drawn from)")
        patch, pm = self.items[params["defect"]]
        if params["flip"]:
            patch, pm = patch[:, ::-1], pm[:, ::-1]
        h, w = pm.shape
        m = cv2.getRotationMatrix2D((w / 2, h / 2), params["angle"], params["scale"])
        m[:, 2] += np.asarray(params["center"]) - (w / 2, h / 2)
        warped = cv2.warpAffine(np.ascontiguousarray(patch).astype(np.float32), m, (size, size),
                                flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        mask = cv2.warpAffine(np.ascontiguousarray(pm) * 255, m, (size, size), flags=cv2.INTER_NEAREST) > 127
        support = cv2.warpAffine(np.full((h, w), 255, np.uint8), m, (size, size), flags=cv2.INTER_NEAREST) > 127
        return warped, mask.astype(np.uint8), support

    def render(self, crop: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray]:
        """(crop with the defect pasted, its exact warped mask)."""
        size = crop.shape[0]
        warped, mask, support = self.warp(params, size)
        if not mask.any():
            return crop, mask
        # alpha 1 on the defect, fading to 0 over RING px of its own surroundings (OpenCV's seamlessClone loses
        # small dark defects whose boundary band is thin, so the blend is a feathered paste of the re-shaded patch)
        dist = cv2.distanceTransform((1 - mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        alpha = np.where(dist <= RING, 1 - dist / (RING + 1), 0).astype(np.float32) * support
        context = (alpha > 0) & (mask == 0)  # the defect's own normal surroundings
        src_mean = float(warped[context].mean()) if context.any() else float(warped[mask > 0].mean())
        dst_mean = float(crop[alpha > 0].mean())
        fill = (warped - src_mean) * params["gain"] + dst_mean  # re-shaded to the crop's brightness
        a = alpha[..., None] if crop.ndim == 3 else alpha
        out = crop.astype(np.float32) * (1 - a) + fill * a
        return np.clip(np.round(out), 0, 255).astype(np.uint8), mask


__all__ = ["TransplantBank", "RING"]
