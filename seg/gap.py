"""`synth gap`: how far synthetic defects are from real ones, in a pretrained feature space.

Defect-centred patches (one per connected defect region, `patch` px around its centre, reflect-padded at the crop
border) are cut from a `synth generate` folder and from real labelled crops (images + masks beside them). Each
patch becomes the global average of the frozen Lite0 features at strides 8 and 16. The distance is the kernel
inception distance (KID: unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets).
Lower is more realistic. Reported overall, per synthetic family (samples holding that family), against two
references: the real-vs-real floor (two random halves of the real patches) and real defects against patches of
normal crops (the scale of "not a defect at all"); KID's scale depends on the features' magnitudes, so parts are
compared by the ratio synthetic / normal. A picture puts real patches beside their nearest synthetic ones.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from core.io import (InputError, atomic_write_bytes, half_of, labelled_defects, read_image, read_jsonl, read_mask,
                     write_json)

from .models.features import FeatureExtractor


def defect_patches(image: np.ndarray, mask: np.ndarray, size: int, max_regions: int = 4) -> list[np.ndarray]:
    """`size` x `size` uint8 patches centred on the largest connected regions of `mask` (reflect-padded)."""
    n, labels, stats, centroids = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    order = sorted(range(1, n), key=lambda k: -stats[k, cv2.CC_STAT_AREA])[:max_regions]
    h = size // 2
    padded = cv2.copyMakeBorder(image, h, h, h, h, cv2.BORDER_REFLECT_101)
    out = []
    for k in order:
        cx, cy = (int(round(v)) for v in centroids[k])
        out.append(padded[cy:cy + size, cx:cx + size].copy())
    return out


def centre_patch(image: np.ndarray, size: int) -> np.ndarray:
    y, x = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[max(0, y):max(0, y) + size, max(0, x):max(0, x) + size].copy()


def real_patches(image_dir: str | Path, size: int, half: str = "all") -> list[np.ndarray]:
    """Defect-centred patches of real labelled crops (`labelled_defects`), of one `half_of` them."""
    out = []
    for p, m in half_of(labelled_defects(image_dir), half):
        img = read_image(p)
        out += defect_patches(img, read_mask(m, img.shape[:2]), size)
    if len(out) < 4:
        raise InputError(f"{image_dir}: fewer than 4 labelled defects found")
    return out


def synthetic_patches(folder: str | Path, size: int, limit: int = 2000) -> tuple[list, list[list[str]], list]:
    """(defect patches, the families of each patch's sample, centre patches of normal samples) of a generated
    folder."""
    folder = Path(folder)
    rows = read_jsonl(folder / "manifest.jsonl")
    if not rows:
        raise InputError(f"{folder}: no manifest.jsonl with samples (run `synth generate` first)")
    patches, families, normals = [], [], []
    for r in rows[:limit]:
        img = read_image(folder / "images" / f"{r['id']}.png")
        if r["normal"]:
            normals.append(centre_patch(img, size))
            continue
        for p in defect_patches(img, read_mask(folder / "masks" / f"{r['id']}.png", img.shape[:2]), size, 1):
            patches.append(p)
            families.append(list(r.get("families", [])))
    if len(patches) < 4:
        raise InputError(f"{folder}: fewer than 4 defective samples")
    return patches, families, normals


@torch.no_grad()
def embed(patches: list[np.ndarray], extractor: FeatureExtractor, batch: int = 64) -> np.ndarray:
    """Global-average Lite0 features (strides 8 and 16) of uint8 patches, upsampled to 128 px: (N, D) float64."""
    out = []
    for k in range(0, len(patches), batch):
        x = torch.from_numpy(np.stack(patches[k:k + batch])).float().div_(255)[:, None]
        x = F.interpolate(x, size=128, mode="bilinear", align_corners=False)
        out.append(torch.cat([f.mean((2, 3)) for f in extractor(x)], 1).double())
    return torch.cat(out).numpy()


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 100, seed: int = 0) -> float:
    """Kernel inception distance: unbiased MMD^2, kernel (x.y / d + 1)^3, mean over random subsets (unbiased, so
    it can dip below 0 for two samples of one distribution)."""
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    return float(np.mean(vals))


def _extractor() -> FeatureExtractor:
    return FeatureExtractor("tf_efficientnet_lite0", "lite", (2, 3))


def gap_report(synth_dir: str | Path, real_dir: str | Path, patch: int = 48, seed: int = 0,
               half: str = "all") -> dict:
    """The realism gap of a generated folder against real labelled crops (see the module doc)."""
    extractor = _extractor()
    real = real_patches(real_dir, patch, half)
    syn, fams, normals = synthetic_patches(synth_dir, patch)
    fr, fs = embed(real, extractor), embed(syn, extractor)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(fr))
    floor = kid(fr[perm[: len(fr) // 2]], fr[perm[len(fr) // 2:]], seed=seed)
    report = {"real_patches": len(real), "synthetic_patches": len(syn), "patch": patch,
              "kid_synthetic": kid(fs, fr, seed=seed), "kid_real_halves": floor}
    if len(normals) >= 4:  # KID's scale depends on the features' magnitudes: the ratio compares parts
        report["kid_normal"] = kid(embed(normals, extractor), fr, seed=seed)
        report["relative_to_normal"] = report["kid_synthetic"] / report["kid_normal"]
    report["families"] = {}
    for fam in sorted({f for fl in fams for f in fl}):
        idx = [i for i, fl in enumerate(fams) if fam in fl]
        if len(idx) >= 8:
            report["families"][fam] = {"patches": len(idx), "kid": kid(fs[idx], fr, seed=seed)}
    report["picture"] = nearest_grid(real, syn, fr, fs, seed)
    return report


def _kernel(a: np.ndarray, b: np.ndarray, same: bool = False) -> float:
    """Mean of KID's cubic kernel between two feature sets (without the diagonal when they are one set)."""
    k = (a @ b.T / a.shape[1] + 1) ** 3
    if same:
        n = len(a)
        return float((k.sum() - np.trace(k)) / max(n * (n - 1), 1))
    return float(k.mean())


def simplex_qp(a: np.ndarray, b: np.ndarray, steps: int = 5000) -> np.ndarray:
    """argmin over the probability simplex of w'Aw - 2 w'b (A symmetric positive semi-definite): projected
    gradient descent with the exact simplex projection (Duchi et al. 2008)."""
    n = len(b)
    w = np.full(n, 1 / n)
    lr = 0.5 / max(np.linalg.eigvalsh(a).max(), 1e-12)
    for _ in range(steps):
        v = w - lr * 2 * (a @ w - b)
        u = np.sort(v)[::-1]
        css = np.cumsum(u) - 1
        r = np.nonzero(u - css / np.arange(1, n + 1) > 0)[0][-1]
        w = np.maximum(v - css[r] / (r + 1), 0)
    return w


def fit_family_weights(synth_dir: str | Path, real_dir: str | Path, defaults: dict, patch: int = 48,
                       half: str = "all", keep: float = 0.3) -> dict:
    """The family mix whose synthetic defects are closest to the real ones (`synth fit-weights`).

    The generated folder should hold samples of every family (e.g. generated with equal weights). Each family's
    single-family samples give a feature set S_f; for a mix w the squared MMD to the real patches R (KID's cubic
    kernel k) is w'Aw - 2 w'b + const with A_fg = mean k(S_f, S_g) and b_f = mean k(S_f, R), minimised over the
    simplex. Only the families `defaults` weighs above 0 take part; one with fewer than 8 single-family samples
    in the folder (e.g. `edge` where no crop has an edge) cannot be measured and keeps its default share. A few
    real defects cannot say what the unseen kinds look like, so a share `keep` of the default mix stays in: no
    family drops out. Returns the weights (every family of `defaults`), the estimated MMD^2 of the default and the
    fitted mix over the measured families (on the same real patches the weights were fitted to), and counts."""
    syn, fams, _ = synthetic_patches(synth_dir, patch)
    real = real_patches(real_dir, patch, half)
    extractor = _extractor()
    fs, fr = embed(syn, extractor), embed(real, extractor)
    used = {f: v / sum(v for v in defaults.values() if v > 0) for f, v in defaults.items() if v > 0}
    names = [f for f in sorted(used) if sum(fl == [f] for fl in fams) >= 8]
    if not names:
        raise InputError(f"{synth_dir}: no family has 8 single-family samples (generate with equal weights)")
    sets = {f: fs[[i for i, fl in enumerate(fams) if fl == [f]]] for f in names}
    a = np.array([[_kernel(sets[f], sets[g], f == g) for g in names] for f in names])
    b = np.array([_kernel(sets[f], fr) for f in names])
    scale = float(np.abs(np.diag(a)).mean())
    w = simplex_qp(a / scale, b / scale)
    d = np.array([used[f] for f in names])
    d = d / d.sum()
    mixed = (1 - keep) * w + keep * d
    c = _kernel(fr, fr, True)

    def mmd(v):
        return float(v @ a @ v - 2 * v @ b + c)

    unmeasured = [f for f in used if f not in names]
    share = 1 - sum(used[f] for f in unmeasured)  # what the measured families weigh together, as by default
    weights = {f: 0.0 for f in defaults}
    weights.update({f: round(used[f], 4) for f in unmeasured})
    weights.update({f: round(float(v) * share, 4) for f, v in zip(names, mixed)})
    return {"weights": weights, "fitted_only": {f: round(float(v), 4) for f, v in zip(names, w)},
            "unmeasured": unmeasured, "mmd_default": mmd(d), "mmd_fitted": mmd(mixed), "real_patches": len(real),
            "patches": {f: len(sets[f]) for f in names}, "keep": keep, "half": half}


def families_override(weights: dict) -> str:
    """The config override that trains with `weights`: every family, zeros too (an override merges into the
    defaults, so a family left out would keep its default weight)."""
    return "synth.families={" + ", ".join(f"{k}: {v}" for k, v in sorted(weights.items())) + "}"


def nearest_grid(real, syn, fr, fs, seed: int, n: int = 12) -> bytes:
    """PNG: rows of (real patch, its nearest synthetic patch in feature space), n random real patches."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(real), min(n, len(real)), replace=False)
    d = ((fr[pick, None] - fs[None]) ** 2).sum(-1)
    tiles = []
    for row, i in enumerate(pick):
        j = int(d[row].argmin())
        a, b = (cv2.resize(p, (96, 96), interpolation=cv2.INTER_NEAREST) for p in (real[i], syn[j]))
        tiles.append(np.hstack([a, np.full((96, 4), 255, np.uint8), b]))
    cols = 3
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(sum(([t, np.full((96, 12), 255, np.uint8)] for t in tiles[k:k + cols]), []))
            for k in range(0, len(tiles), cols)]
    grid = np.vstack(sum(([r, np.full((8, r.shape[1]), 255, np.uint8)] for r in rows), []))
    return cv2.imencode(".png", grid)[1].tobytes()


def write_report(report: dict, out: str | Path) -> Path:
    out = Path(out)
    atomic_write_bytes(out / "gap.png", report["picture"])
    data = {k: v for k, v in report.items() if k != "picture"}
    write_json(out / "gap.json", data)
    lines = ["| set | patches | KID |", "|---|---|---|",
             f"| synthetic (all) | {data['synthetic_patches']} | {data['kid_synthetic']:.2f} |"]
    lines += [f"| synthetic: {k} | {v['patches']} | {v['kid']:.2f} |" for k, v in data["families"].items()]
    lines.append(f"| real vs real (two halves: the floor) | {data['real_patches']} | {data['kid_real_halves']:.2f} |")
    if "kid_normal" in data:
        lines.append(f"| normal crops (no defect: the ceiling) | - | {data['kid_normal']:.2f} |")
        lines.append(f"\nsynthetic / normal: {data['relative_to_normal']:.2f} (below 1: the synthetic defects are "
                     "closer to the real ones than defect-free patches are)")
    md = "\n".join(lines) + "\n"
    atomic_write_bytes(out / "gap.md", md.encode())
    return out / "gap.md"


__all__ = ["gap_report", "write_report", "kid", "defect_patches", "fit_family_weights", "families_override"]
