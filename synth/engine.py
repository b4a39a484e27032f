"""The synthesis engine: OK crops in, labelled defective crops (image, mask, recorded parameters) out.

`DefectSynthesizer.draw(rng, sources)` draws every random choice from the caller's generator and records it;
`DefectSynthesizer.render(record, sources)` is a pure function of that record, so any sample can be replayed.
The same engine feeds `synth generate` (files) and `SynthDataset` (on-the-fly training data).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import cv2
import numpy as np

from .appearance import BLENDS, FILLS, AlphaBlend, PoissonBlend
from core.io import InputError, find_images, read_image, read_mask
from .params import check_range, check_weights, choose, integer
from .shapes import SHAPES, ElasticWarp, render_shape
from .streams import SPLIT, stream
from .structural import Displacement
from .texture import TEXTURE_FILLS, CropContext, EdgeDefect, TextureFamilies, visibility
from .transplant import TransplantBank

MASKED_FAMILIES = ("bezier_blob", "bezier_stroke", "gaussian", "perlin")
FAMILIES = MASKED_FAMILIES + ("cut_paste", "displacement") + TextureFamilies.NAMES + ("edge", "transplant")
ALL_FILLS = {**FILLS, **TEXTURE_FILLS}


@dataclass
class SynthConfig:
    """Everything that shapes the synthetic data; validated on construction (errors name the key)."""

    size: int = 128
    channels: int = 1
    normal_ratio: float = 0.3
    max_defects: int = 2
    difficulty: tuple[float, float] = (0.0, 1.0)
    families: dict = field(default_factory=lambda: {
        "bezier_blob": 1.0, "bezier_stroke": 1.0, "gaussian": 0.7, "perlin": 0.5, "cut_paste": 0.3,
        "displacement": 0.3,
        # drawn from the surface itself (synth/texture.py): about 38 % of the defects; `shift` and `crack`
        # are off by default (README: their measurements)
        "stain": 0.6, "line": 0.8, "crack": 0.0, "blur": 0.3, "sharpen": 0.2, "shift": 0.0, "edge": 0.4,
        "transplant": 0.0})  # real defects: needs `transplant`, a folder of them
    fills: dict = field(default_factory=lambda: {"shade": 1.0, "texture": 0.3, "noise": 0.3})
    blends: dict = field(default_factory=lambda: {"alpha": 1.0, "poisson": 0.4})
    warp_probability: float = 0.4
    roi: str | None = None  # None, "auto" (bright part of the crop, Otsu) or a mask image path
    min_area: int = 4
    min_contrast: float = 3.0  # mean |change| in grey levels inside the mask for a defect to count, and
    min_visibility: float = 0.4  # that change over the texture's own variation around it (texture.visibility)
    max_attempts: int = 60
    transplant: str | None = None  # a folder of real labelled defects (images, masks beside) for `transplant`
    transplant_half: str = "all"  # which of them: all, or the fixed half fit / score (core.io.half_of)
    transplant_limit: int = 0  # at most this many labelled crops (0: all)
    params: dict = field(default_factory=dict)  # per-transform range overrides, e.g. {"bezier_blob": {...}}
    sizes: str = "uniform"  # how radii, lengths, widths and windows are drawn in their ranges: uniform or log

    def __post_init__(self):
        if not isinstance(self.size, int) or not 16 <= self.size <= 4096:
            raise ValueError(f"size: expected an integer in [16, 4096], got {self.size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, got {self.channels!r}")
        check_range("normal_ratio", (self.normal_ratio,) * 2, 0, 1)
        if not isinstance(self.max_defects, int) or self.max_defects < 1:
            raise ValueError(f"max_defects: expected an integer >= 1, got {self.max_defects!r}")
        self.difficulty = check_range("difficulty", self.difficulty, 0, 1)
        self.families = check_weights("families", self.families, FAMILIES)
        self.fills = check_weights("fills", self.fills, tuple(FILLS))
        self.blends = check_weights("blends", self.blends, tuple(BLENDS))
        check_range("warp_probability", (self.warp_probability,) * 2, 0, 1)
        if self.roi not in (None, "auto") and not Path(self.roi).is_file():
            raise ValueError(f"roi: expected 'auto' or a mask image file, got {self.roi!r} (no such file)")
        check_range("min_contrast", (self.min_contrast,) * 2, 0, 255)
        check_range("min_visibility", (self.min_visibility,) * 2, 0, 100)
        if self.families.get("transplant", 0) > 0 and not self.transplant:
            raise ValueError("families.transplant: needs synth.transplant, a folder of real labelled defects")
        if self.transplant is not None and not Path(self.transplant).is_dir():
            raise ValueError(f"transplant: expected a folder of labelled images, got {self.transplant!r} (no such "
                             "folder)")
        if self.transplant_half not in ("all", "fit", "score"):
            raise ValueError(f"transplant_half: expected all, fit or score, got {self.transplant_half!r}")
        if not isinstance(self.transplant_limit, int) or self.transplant_limit < 0:
            raise ValueError(f"transplant_limit: expected an integer >= 0, got {self.transplant_limit!r}")
        if self.sizes not in ("uniform", "log"):
            raise ValueError(f"sizes: expected uniform or log, got {self.sizes!r}")
        known = set(SHAPES) | set(ALL_FILLS) | {"alpha", "elastic", "displacement", "line", "stain", "edge",
                                                "transplant"}
        for k in self.params:
            if k not in known:
                raise ValueError(f"params: unknown transform {k!r} (known: {', '.join(sorted(known))})")

    @classmethod
    def from_dict(cls, d: dict | None) -> "SynthConfig":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        for k in d:
            if k not in names:
                raise ValueError(f"synth.{k}: unknown key (known: {', '.join(sorted(names))})")
        if "difficulty" in d:
            d["difficulty"] = tuple(d["difficulty"])
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["difficulty"] = list(self.difficulty)
        return d


class SourcePool:
    """The OK images a run draws from: scanned once (bad files reported and skipped), decoded lazily, cached.
    `crop` (x0, y0, x1, y1): each image cut to that box when read (x1, y1 clipped to the image; `data.ok_crop`), so
    a region the inspected images never show (a selvage, a fixture) is neither trained on nor calibrated on."""

    def __init__(self, root: str | Path, channels: int = 1, size: int = 128, warn=None, paths=None, crop=None):
        self.root = Path(root)
        self.channels, self.size = channels, size
        self.crop = tuple(int(v) for v in crop) if crop is not None else None
        self.bad: list[str] = []
        if paths is None:
            paths, outside = [], []
            for p in find_images(self.root, warn=self._warner(warn)):
                try:
                    img = read_image(p, channels)
                except InputError as e:
                    self._warner(warn)(str(e))
                    continue
                try:
                    self._cut(img, p)
                    paths.append(p.relative_to(self.root).as_posix() if self.root.is_dir() else p.name)
                except InputError as e:  # one line for all the images a box misses, not one per image
                    outside.append(str(e))
            if outside:
                more = f" (and {len(outside) - 1} more images)" if len(outside) > 1 else ""
                if not paths:
                    raise InputError(outside[0] + more)
                self._warner(warn)(f"{outside[0]}{more}: skipped")
            if not paths:
                raise InputError(f"{self.root}: none of the image files could be read")
        self.paths = list(paths)
        self._cache: dict[int, np.ndarray] = {}

    def _warner(self, warn):
        def w(msg):
            self.bad.append(msg)
            if warn:
                warn(msg)
        return w

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict:  # a worker process gets the file list, not the decoded-image cache
        return {**self.__dict__, "_cache": {}}

    def index(self, rel: str) -> int:
        return self.paths.index(rel)

    def random_crops(self, n: int, seed: int, where: list | None = None) -> list[np.ndarray]:
        """n uint8 crops of the pool's size at random images and positions, drawn from `default_rng(seed)`.
        `where`: a list that receives each crop's origin, (image path, y, x), in the file's own pixels (shifted by
        `crop`'s origin; in the padded image when one is smaller than a crop)."""
        rng = np.random.default_rng(seed)
        s, out = self.size, []
        dx, dy = self.crop[:2] if self.crop else (0, 0)
        for _ in range(n):
            i = int(rng.integers(len(self)))
            img = self.load(i)
            y, x = int(rng.integers(0, img.shape[0] - s + 1)), int(rng.integers(0, img.shape[1] - s + 1))
            out.append(np.ascontiguousarray(img[y:y + s, x:x + s]))
            if where is not None:
                where.append((self.paths[i], y + dy, x + dx))
        return out

    def split(self, holdout: float, seed: int = 0) -> tuple["SourcePool", "SourcePool | None"]:
        """(training pool, held-out pool or None): a share `holdout` of the images (at least one, when there are
        two or more) is kept out of training and serves calibration as real normal images. The split depends only
        on the sorted file names and `seed`, so it is the same on every run and recorded by name in model files."""
        n_hold = min(len(self) - 1, max(1, round(holdout * len(self)))) if holdout > 0 else 0
        if n_hold <= 0:
            return self, None
        names = sorted(self.paths)
        order = stream(SPLIT, seed).permutation(len(names))
        held = {names[i] for i in order[:n_hold]}
        train = [p for p in self.paths if p not in held]
        return (SourcePool(self.root, self.channels, self.size, paths=train, crop=self.crop),
                SourcePool(self.root, self.channels, self.size, paths=sorted(held), crop=self.crop))

    def _cut(self, img: np.ndarray, path: Path) -> np.ndarray:
        """The image inside `crop` (the image itself without one); a box that misses the image is refused."""
        if self.crop is None:
            return img
        x0, y0, x1, y1 = self.crop
        h, w = img.shape[:2]
        if x0 >= w or y0 >= h:
            raise InputError(f"{path}: data.ok_crop {list(self.crop)} lies outside the image ({w} x {h} px)")
        return img[y0:min(y1, h), x0:min(x1, w)]

    def load(self, i: int) -> np.ndarray:
        """Image i, cut to `crop`, reflect-padded to at least `size` on each side (documented: small images are
        padded)."""
        if i not in self._cache:
            path = self.root / self.paths[i]
            img = np.ascontiguousarray(self._cut(read_image(path, self.channels), path))
            h, w = img.shape[:2]
            if h < self.size or w < self.size:
                dh, dw = max(0, self.size - h), max(0, self.size - w)
                img = cv2.copyMakeBorder(img, dh // 2, dh - dh // 2, dw // 2, dw - dw // 2, cv2.BORDER_REFLECT_101)
            self._cache[i] = img
        return self._cache[i]


def auto_roi(crop: np.ndarray) -> np.ndarray:
    """Bright part of the crop (Otsu threshold on the blurred grey image), eroded by 2 px."""
    gray = crop if crop.ndim == 2 else cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    _, m = cv2.threshold(cv2.GaussianBlur(gray, (5, 5), 0), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return cv2.erode(m, np.ones((5, 5), np.uint8))


def part_region(image: np.ndarray) -> np.ndarray:
    """The part in a test image: `auto_roi` with its holes filled, so a dark defect on the part stays inside."""
    roi = auto_roi(image)
    h, w = roi.shape
    outside = np.ones((h + 2, w + 2), np.uint8)  # a frame of background around the image
    outside[1:-1, 1:-1] = 1 - roi
    cv2.floodFill(outside, None, (0, 0), 2)  # the background connected to the frame; what stays 1 is a hole
    return (outside[1:-1, 1:-1] != 2).astype(np.uint8)


def measure_difficulty(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """(difficulty in [0, 1], mean contrast in grey levels, visibility) of a rendered defect.

    Small, faint, soft-edged defects are hard: difficulty = 1 - (0.35 size + 0.5 visibility + 0.15 edge), each
    term in [0, 1]: size on a log scale from 9 px to 10 % of the crop; visibility (`texture.visibility`: the mean
    change inside the mask over the texture's own variation around it) over 5, so the same grey-level change is
    harder on a busy texture than on a flat one; edge sharpness as the mean change on the mask's inner rim over
    the same variation, over 5.
    """
    area = int(mask.sum())
    if area == 0:
        return 1.0, 0.0, 0.0
    contrast, vis = visibility(before, after, mask)
    diff = cv2.absdiff(after, before).astype(np.float32)
    if diff.ndim == 3:
        diff = diff.mean(2)
    m = mask > 0
    rim = m & ~cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
    edge = float(diff[rim].mean()) * vis / contrast if rim.any() and contrast > 0 else vis
    big = 0.1 * mask.size
    size_ease = np.clip((math.log(area) - math.log(9)) / (math.log(big) - math.log(9)), 0, 1)
    ease = 0.35 * size_ease + 0.5 * min(vis / 5, 1) + 0.15 * min(edge / 5, 1)
    return round(float(1 - ease), 4), contrast, vis


class DefectSynthesizer:
    """Draws and renders synthetic defects on OK crops according to a SynthConfig."""

    def __init__(self, config: SynthConfig | None = None):
        self.config = config = config or SynthConfig()
        p = config.params

        def make(name, cls, *args):  # a misspelt range in `params` is one line naming it, not a TypeError
            try:
                return cls(*args, **p.get(name, {}))
            except TypeError as e:
                raise ValueError(f"params.{name}: {e}") from None

        self.shapes = {name: make(name, cls) for name, cls in SHAPES.items()}
        self.fills = {name: make(name, cls) for name, cls in FILLS.items()}
        self.alpha = make("alpha", AlphaBlend)
        self.poisson = PoissonBlend()
        self.warp = make("elastic", ElasticWarp)
        self.displacement = make("displacement", Displacement)
        self.texture = TextureFamilies(p)
        self.edge = make("edge", EdgeDefect)
        self.bank = make("transplant", TransplantBank, config.transplant, config.channels, config.transplant_half,
                         config.transplant_limit) if config.transplant else None
        self._roi_file = read_mask(config.roi) if config.roi not in (None, "auto") else None
        # everything that draws a size (the texture families' own blob and Perlin shape too), as synth.sizes says
        for drawer in (*self.shapes.values(), self.displacement, self.texture, self.texture.blob, self.texture.perlin,
                       self.texture.crack, self.edge):
            drawer.log_sizes = config.sizes == "log"

    # ----------------------------------------------------------------------------------------- drawing
    def _draw_defect(self, rng: np.random.Generator, source_shape, ctx: CropContext) -> dict:
        c, size = self.config, self.config.size
        family = choose(rng, c.families)
        if family == "edge":
            params = self.edge.get_params(rng, size, ctx)
            if params is not None:
                return {"family": family, "displacement": params}
            others = {k: v for k, v in c.families.items() if k != "edge" and v > 0}
            if not others:  # only edge defects asked for and this crop has no edge: nothing to draw
                return {"family": family, "displacement": None}
            family = choose(rng, others)
        if family == "displacement":
            return {"family": family, "displacement": self.displacement.get_params(rng, size)}
        if family == "transplant":
            return {"family": family, "transplant": self.bank.get_params(rng, size)}
        if family in TextureFamilies.NAMES:
            return self.texture.draw(family, rng, size, ctx, self.warp)
        if family == "cut_paste":
            shape = {"kind": "rectangle", **self.shapes["rectangle"].get_params(rng, size)}
            fill = {"kind": "texture", **self.fills["texture"].get_params(rng, size, source_shape)}
            blend = {"kind": "alpha", "softness": round(float(rng.uniform(0, 0.5)), 3)}
            return {"family": family, "shape": shape, "warp": None, "fill": fill, "blend": blend}
        shape = {"kind": family, **self.shapes[family].get_params(rng, size)}
        warp = self.warp.get_params(rng, size) if rng.uniform() < c.warp_probability else None
        fill_kind = choose(rng, c.fills)
        extra = (source_shape,) if fill_kind == "texture" else ()
        fill = {"kind": fill_kind, **self.fills[fill_kind].get_params(rng, size, *extra)}
        blend_kind = choose(rng, c.blends)
        blend = {"kind": blend_kind, **(self.alpha if blend_kind == "alpha" else self.poisson).get_params(rng, size)}
        return {"family": family, "shape": shape, "warp": warp, "fill": fill, "blend": blend}

    def draw(self, rng: np.random.Generator, sources: SourcePool, max_difficulty: float | None = None):
        """Draw one sample: returns (image, mask {0,1}, record). The record replays it through `render`."""
        image, _, mask, record = self.draw_pair(rng, sources, max_difficulty)
        return image, mask, record

    def draw_pair(self, rng: np.random.Generator, sources: SourcePool, max_difficulty: float | None = None):
        """`draw`, with the clean crop the defects were drawn on: (image, clean, mask, record); the same random
        draws, so the same sample."""
        c, size = self.config, self.config.size
        i = int(rng.integers(len(sources)))
        src = sources.load(i)
        h, w = src.shape[:2]
        box = [int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1)), size, size]
        record = {"source": sources.paths[i], "crop": box, "normal": True, "defects": [], "families": [],
                  "difficulty": None, "mask_area": 0}
        crop = self._crop(src, box)
        if rng.uniform() < c.normal_ratio:
            return crop, crop, np.zeros((size, size), np.uint8), record
        lo, hi = c.difficulty
        if max_difficulty is not None:
            hi = max(lo, min(hi, max_difficulty))
        best, ctx = None, CropContext(crop)
        for attempt in range(1, c.max_attempts + 1):
            defects = [self._draw_defect(rng, src.shape, ctx) for _ in range(integer(rng, (1, c.max_defects)))]
            image, mask, visible = self._render_defects(crop, src, box, defects)
            defects = [d for d, v in zip(defects, visible) if v]
            diff = measure_difficulty(crop, image, mask)[0]
            if not defects or mask.sum() < c.min_area:
                continue
            gap = max(lo - diff, diff - hi, 0)
            if best is None or gap < best[0]:
                best = (gap, image, mask, defects, diff, attempt)
            if gap == 0:
                break
        if best is None:  # nothing visible could be placed (e.g. empty region of interest): stays normal
            record["note"] = "no visible defect could be placed"
            return crop, crop, np.zeros((size, size), np.uint8), record
        _, image, mask, defects, diff, attempt = best
        record.update(normal=False, defects=defects, families=sorted({d["family"] for d in defects}),
                      difficulty=diff, mask_area=int(mask.sum()), attempts=attempt)
        return image, crop, mask, record

    # --------------------------------------------------------------------------------------- rendering
    @staticmethod
    def _crop(src: np.ndarray, box) -> np.ndarray:
        x, y, w, h = box
        return src[y:y + h, x:x + w].copy()

    def _roi(self, crop: np.ndarray, src: np.ndarray, box) -> np.ndarray | None:
        if self.config.roi == "auto":
            return auto_roi(crop)
        if self._roi_file is not None:
            full = cv2.resize(self._roi_file, (src.shape[1], src.shape[0]), interpolation=cv2.INTER_NEAREST)
            return self._crop(full, box)
        return None

    def _render_defects(self, crop, src, box, defects):
        """Render defects in order; one whose change does not stand out (mean change inside its mask under
        `min_contrast` grey levels, or under `min_visibility` times the texture's own variation around it) is
        left out: its label would be noise. Returns (image, mask, which were kept)."""
        size = self.config.size
        roi = self._roi(crop, src, box)
        image, total, visible = crop, np.zeros((size, size), np.uint8), []
        for d in defects:
            before = image
            if "displacement" in d:  # displacement and edge defects move content instead of painting over it
                if d["displacement"] is None:
                    visible.append(False)
                    continue
                moved, m = Displacement.render(image, d["displacement"])
                if roi is not None:
                    m = m & roi
                image = np.where((m[..., None] if image.ndim == 3 else m) > 0, moved, image)
            elif "transplant" in d:
                if self.bank is None:
                    raise InputError("this sample transplants a real defect: set synth.transplant to the folder "
                                     "of labelled defects it was drawn from")
                pasted, m = self.bank.render(image, d["transplant"])
                if roi is None or not (m & (1 - roi)).any():  # a paste reaching outside the region is left out
                    image = pasted
                else:
                    m = np.zeros_like(m)
            else:
                m = render_shape(d["shape"], size)
                if d["warp"]:
                    m = ElasticWarp.render(m, d["warp"])
                if roi is not None:
                    m = m & roi
                if m.any():
                    fill = ALL_FILLS[d["fill"]["kind"]].render(image, m, d["fill"], src)
                    image = BLENDS[d["blend"]["kind"]].render(image, fill, m, d["blend"])
            contrast, vis = visibility(before, image, m)
            ok = bool(m.any()) and contrast >= self.config.min_contrast and vis >= self.config.min_visibility
            visible.append(ok)
            if ok:
                total |= m
            else:
                image = before
        return image, total, visible

    def render(self, record: dict, sources: SourcePool) -> tuple[np.ndarray, np.ndarray]:
        """Replay a recorded sample exactly: a pure function of the record (and the source image)."""
        src = sources.load(sources.index(record["source"]))
        crop = self._crop(src, record["crop"])
        if record["normal"]:
            return crop, np.zeros(crop.shape[:2], np.uint8)
        return self._render_defects(crop, src, record["crop"], record["defects"])[:2]


__all__ = ["SynthConfig", "SourcePool", "DefectSynthesizer", "measure_difficulty", "FAMILIES"]
