"""Defect masks: Bezier blobs and strokes, cracks, bivariate-Gaussian clouds, Perlin stains, rectangles, elastic
warp.

Each shape draws its parameters with `get_params(rng, size)` (ranges are fractions of the crop size) and
renders them with the pure `render(params, size) -> uint8 {0, 1} mask`, so a recorded sample can be replayed.
"""

from __future__ import annotations

import math

import cv2
import elasticdeform
import numpy as np

from .params import Sized, check_range, integer, rounded, sub_seed, uniform

_SHIFT = 4  # sub-pixel bits for cv2 polygon filling
_ONE = 1 << _SHIFT


def _fill_polygon(points: np.ndarray, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    pts = np.round(np.asarray(points) * _ONE).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return mask


def _center(rng: np.random.Generator, size: int, margin: float = 0.05) -> list[float]:
    return [uniform(rng, (margin * size, (1 - margin) * size)) for _ in range(2)]


class Shape(Sized):
    """Base class: a named mask generator with validated ranges."""

    name = ""

    def get_params(self, rng: np.random.Generator, size: int) -> dict:
        raise NotImplementedError

    @staticmethod
    def render(params: dict, size: int) -> np.ndarray:
        raise NotImplementedError


class BezierBlob(Shape):
    """Closed, filled curve through jittered points on a circle (spots, blocks, notches)."""

    name = "bezier_blob"

    def __init__(self, scale_range=(0.03, 0.2), points_range=(4, 8), irregularity_range=(0.1, 0.6),
                 aspect_range=(0.3, 1.0)):
        self.scale_range = check_range("bezier_blob.scale_range", scale_range, 0.005, 1)
        self.points_range = check_range("bezier_blob.points_range", points_range, 3, 32)
        self.irregularity_range = check_range("bezier_blob.irregularity_range", irregularity_range, 0, 0.95)
        self.aspect_range = check_range("bezier_blob.aspect_range", aspect_range, 0.05, 1)

    def get_params(self, rng, size):
        n = integer(rng, self.points_range)
        radius = self.size_in(rng, self.scale_range) * size
        aspect = uniform(rng, self.aspect_range)
        theta = uniform(rng, (0, math.pi))
        irr = uniform(rng, self.irregularity_range)
        cx, cy = _center(rng, size)
        ang = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * math.pi / n
        rad = radius * (1 - irr * rng.uniform(0, 1, n))
        x, y = rad * np.cos(ang), rad * np.sin(ang) * aspect
        c, s = math.cos(theta), math.sin(theta)
        pts = np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)
        return {"points": rounded(pts, 2)}

    @staticmethod
    def render(params, size):
        p = np.asarray(params["points"], np.float64)
        n, k = len(p), 1 / 6  # Catmull-Rom tangents turned into cubic Bezier control points
        t = np.linspace(0, 1, 12, endpoint=False)[:, None]
        curve = []
        for i in range(n):
            p0, p1, p2, p3 = p[i - 1], p[i], p[(i + 1) % n], p[(i + 2) % n]
            c1, c2 = p1 + k * (p2 - p0), p2 - k * (p3 - p1)
            curve.append((1 - t) ** 3 * p1 + 3 * (1 - t) ** 2 * t * c1 + 3 * (1 - t) * t**2 * c2 + t**3 * p2)
        return _fill_polygon(np.concatenate(curve), size)


class BezierStroke(Shape):
    """Open Bezier curve drawn with a width (scratches, cracks, lines)."""

    name = "bezier_stroke"

    def __init__(self, length_range=(0.1, 0.7), width_range=(0.008, 0.04), bend_range=(0.0, 0.3),
                 points_range=(3, 5)):
        self.length_range = check_range("bezier_stroke.length_range", length_range, 0.01, 2)
        self.width_range = check_range("bezier_stroke.width_range", width_range, 0.001, 0.5)
        self.bend_range = check_range("bezier_stroke.bend_range", bend_range, 0, 1)
        self.points_range = check_range("bezier_stroke.points_range", points_range, 2, 12)

    def get_params(self, rng, size):
        n = integer(rng, self.points_range)
        length = self.size_in(rng, self.length_range) * size
        bend = uniform(rng, self.bend_range)
        theta = uniform(rng, (0, 2 * math.pi))
        cx, cy = _center(rng, size, 0.1)
        d = np.array([math.cos(theta), math.sin(theta)])
        normal = np.array([-d[1], d[0]])
        s = np.linspace(-0.5, 0.5, n)[:, None]
        pts = np.array([cx, cy]) + s * length * d + rng.uniform(-1, 1, (n, 1)) * bend * length * normal
        width = max(1.0, self.size_in(rng, self.width_range) * size)
        return {"points": rounded(pts, 2), "width": round(width, 2)}

    @staticmethod
    def render(params, size):
        p = np.asarray(params["points"], np.float64)
        n = len(p) - 1
        t = np.linspace(0, 1, 64)[:, None]
        curve = sum(math.comb(n, i) * (1 - t) ** (n - i) * t**i * p[i] for i in range(n + 1))
        mask = np.zeros((size, size), np.uint8)
        pts = np.round(curve * _ONE).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(mask, [pts], False, 1, thickness=max(1, int(round(params["width"]))), shift=_SHIFT)
        return mask


class Crack(Shape):
    """A hair-line crack: a jagged path that wanders about one direction in steps of about 4 px (each turn drawn
    around the main direction, pulled back towards it), maybe with one branch, `width_range` of the crop wide (1 - 5
    px on a 128-px crop: cv2 line thicknesses 1 - 4). `angle` (radians) gives the main direction; None draws one.
    `along_probability` is the share the `crack` family draws along the texture's direction (`synth/texture.py`)."""

    name = "crack"
    STEP = 4.0  # px between the path's points

    def __init__(self, length_range=(0.3, 1.2), width_range=(0.008, 0.03), wander_range=(0.1, 0.4),
                 branch_probability=0.3, along_probability=0.5):
        self.along_probability = check_range("crack.along_probability", (along_probability,) * 2, 0, 1)[0]
        self.length_range = check_range("crack.length_range", length_range, 0.05, 4)
        self.width_range = check_range("crack.width_range", width_range, 0.001, 0.2)
        self.wander_range = check_range("crack.wander_range", wander_range, 0, 1.5)
        self.branch_probability = check_range("crack.branch_probability", (branch_probability,) * 2, 0, 1)[0]

    def _walk(self, rng, start, angle: float, length: float, wander: float) -> np.ndarray:
        n = max(2, int(round(length / self.STEP)))
        heading, pts = angle, [np.asarray(start, np.float64)]
        for _ in range(n):
            heading = angle + 0.6 * (heading - angle) + float(rng.normal(0, wander))
            pts.append(pts[-1] + length / n * np.array([math.cos(heading), math.sin(heading)]))
        return np.stack(pts)

    def get_params(self, rng, size, angle: float | None = None):
        angle = uniform(rng, (0, math.pi)) if angle is None else angle
        length = self.size_in(rng, self.length_range) * size
        wander = uniform(rng, self.wander_range)
        cx, cy = _center(rng, size, 0.1)
        start = np.array([cx, cy]) - 0.5 * length * np.array([math.cos(angle), math.sin(angle)])
        paths = [self._walk(rng, start, angle, length, wander)]
        if rng.uniform() < self.branch_probability:
            main = paths[0]
            root = main[integer(rng, (len(main) // 4, max(len(main) // 4, 3 * len(main) // 4)))]
            turn = uniform(rng, (0.3, 1.0)) * (1 if rng.uniform() < 0.5 else -1)
            paths.append(self._walk(rng, root, angle + turn, uniform(rng, (0.2, 0.5)) * length, wander))
        width = max(1.0, self.size_in(rng, self.width_range) * size)
        return {"paths": [rounded(q, 2) for q in paths], "width": round(width, 2)}

    @staticmethod
    def render(params, size):
        mask = np.zeros((size, size), np.uint8)
        pts = [np.round(np.asarray(q, np.float64) * _ONE).astype(np.int32).reshape(-1, 1, 2) for q in params["paths"]]
        cv2.polylines(mask, pts, False, 1, thickness=max(1, int(round(params["width"]))), shift=_SHIFT)
        return mask


class GaussianShape(Shape):
    """Point cloud from a bivariate Gaussian (random mean and covariance), grown into a region."""

    name = "gaussian"

    def __init__(self, sigma_range=(0.02, 0.12), points_range=(20, 200), grow_range=(0.01, 0.03)):
        self.sigma_range = check_range("gaussian.sigma_range", sigma_range, 0.002, 1)
        self.points_range = check_range("gaussian.points_range", points_range, 1, 5000)
        self.grow_range = check_range("gaussian.grow_range", grow_range, 0, 0.2)

    def get_params(self, rng, size):
        return {"mean": rounded(_center(rng, size), 2),
                "sigma": rounded([self.size_in(rng, self.sigma_range) * size for _ in range(2)], 2),
                "theta": round(uniform(rng, (0, math.pi)), 3),
                "n_points": integer(rng, self.points_range),
                "grow": round(max(1.0, self.size_in(rng, self.grow_range) * size), 2),
                "seed": sub_seed(rng)}

    @staticmethod
    def render(params, size):
        g = np.random.default_rng(params["seed"])
        z = g.standard_normal((params["n_points"], 2)) * np.asarray(params["sigma"])
        c, s = math.cos(params["theta"]), math.sin(params["theta"])
        pts = z @ np.array([[c, s], [-s, c]]) + np.asarray(params["mean"])
        pts = np.round(pts).astype(int)
        pts = pts[(pts >= 0).all(1) & (pts < size).all(1)]
        mask = np.zeros((size, size), np.uint8)
        mask[pts[:, 1], pts[:, 0]] = 1
        r = int(round(params["grow"]))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        mask = cv2.dilate(mask, kernel)
        return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)


def perlin_noise(size: int, res: int, seed: int) -> np.ndarray:
    """2-D gradient (Perlin) noise of shape (size, size), roughly in [-1, 1], with `res` cells across."""
    g = np.random.default_rng(seed)
    cells = res
    n = int(math.ceil(size / cells)) * cells
    angles = g.uniform(0, 2 * math.pi, (cells + 1, cells + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], -1)
    lin = np.arange(n) * cells / n
    gy, gx = np.meshgrid(lin, lin, indexing="ij")
    iy, ix = gy.astype(int), gx.astype(int)
    fy, fx = gy - iy, gx - ix

    def dot(dy, dx):
        gr = grads[iy + dy, ix + dx]
        return gr[..., 0] * (fx - dx) + gr[..., 1] * (fy - dy)

    def fade(t):
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    u, v = fade(fx), fade(fy)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return (math.sqrt(2) * (top * (1 - v) + bottom * v))[:size, :size]


class PerlinShape(Shape):
    """Thresholded Perlin noise under a Gaussian window (DRAEM-style irregular stains)."""

    name = "perlin"

    def __init__(self, res_range=(2, 6), threshold_range=(0.3, 0.6), window_range=(0.08, 0.3)):
        self.res_range = check_range("perlin.res_range", res_range, 1, 64)
        self.threshold_range = check_range("perlin.threshold_range", threshold_range, 0.01, 0.99)
        self.window_range = check_range("perlin.window_range", window_range, 0.01, 2)

    def get_params(self, rng, size):
        return {"res": integer(rng, self.res_range), "threshold": round(uniform(rng, self.threshold_range), 3),
                "center": rounded(_center(rng, size), 2),
                "window": round(self.size_in(rng, self.window_range) * size, 2), "seed": sub_seed(rng)}

    @staticmethod
    def render(params, size):
        noise = perlin_noise(size, params["res"], params["seed"])
        yy, xx = np.mgrid[:size, :size]
        cx, cy = params["center"]
        window = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * params["window"] ** 2))
        field = (noise + 1) / 2 * window
        return (field > params["threshold"] * field.max()).astype(np.uint8) if field.max() > 0 else \
            np.zeros((size, size), np.uint8)


class Rectangle(Shape):
    """Rotated rectangle: the patch outline of cut-and-paste defects."""

    name = "rectangle"

    def __init__(self, side_range=(0.05, 0.3), aspect_range=(0.3, 1.0)):
        self.side_range = check_range("rectangle.side_range", side_range, 0.01, 1)
        self.aspect_range = check_range("rectangle.aspect_range", aspect_range, 0.05, 1)

    def get_params(self, rng, size):
        w = self.size_in(rng, self.side_range) * size
        h = max(2.0, w * uniform(rng, self.aspect_range))
        return {"center": rounded(_center(rng, size), 2), "size": rounded([w, h], 2),
                "angle": round(uniform(rng, (0, 180)), 2)}

    @staticmethod
    def render(params, size):
        box = cv2.boxPoints((tuple(params["center"]), tuple(params["size"]), params["angle"]))
        return _fill_polygon(box, size)


class ElasticWarp:
    """Elastic deformation of a mask (elasticdeform) on a coarse grid, to make shapes irregular."""

    name = "elastic"

    def __init__(self, sigma_range=(0.01, 0.04), grid_range=(3, 5)):
        self.sigma_range = check_range("elastic.sigma_range", sigma_range, 0, 0.5)
        self.grid_range = check_range("elastic.grid_range", grid_range, 2, 16)

    def get_params(self, rng, size):
        g = integer(rng, self.grid_range)
        sigma = uniform(rng, self.sigma_range) * size
        return {"displacement": rounded(rng.normal(0, sigma, (2, g, g)), 2)}

    @staticmethod
    def render(mask, params):
        disp = np.asarray(params["displacement"], np.float64)
        warped = elasticdeform.deform_grid(mask.astype(np.float32), disp, order=1, mode="constant")
        return (warped > 0.5).astype(np.uint8)


SHAPES = {cls.name: cls for cls in (BezierBlob, BezierStroke, Crack, GaussianShape, PerlinShape, Rectangle)}


def render_shape(params: dict, size: int) -> np.ndarray:
    """Render a recorded shape: `params["kind"]` names the shape class."""
    return SHAPES[params["kind"]].render(params, size)
