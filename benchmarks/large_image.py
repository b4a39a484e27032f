"""Large images: megapixels/s of one model predicted whole (windows of `--window` px) against tile by tile
(overlapping crops of the model's size), same image, same run, and how far the two maps are apart.

    python benchmarks/large_image.py -m runs/p1/unet/best.pt --size 4000 3000
    python benchmarks/large_image.py              # an untrained default UNet: the speed does not depend on training

The test image is a mosaic of OK images from --source (default: the shipped sample). No TTA (`--tta` to change).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.io import find_images, read_image  # noqa: E402
from core.postprocess import final_mask  # noqa: E402
from ensemble.models import Ensemble, build_ensemble  # noqa: E402


def mosaic(source: Path, h: int, w: int) -> np.ndarray:
    tiles = [read_image(p) for p in find_images(source)]
    out = np.zeros((h, w), np.uint8)
    y, k = 0, 0
    while y < h:
        x, row_h = 0, 0
        while x < w:
            t = tiles[k % len(tiles)]
            k += 1
            th, tw = min(t.shape[0], h - y), min(t.shape[1], w - x)
            out[y:y + th, x:x + tw] = t[:th, :tw]
            x, row_h = x + tw, max(row_h, th)
        y += row_h
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="model file (default: an untrained default UNet)")
    ap.add_argument("--size", nargs=2, type=int, default=(4000, 3000), metavar=("W", "H"))
    ap.add_argument("--source", default=str(ROOT / "data/sample/round_train/part1/OK_Images"))
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--tta", default="none", help="none | flip | d4 (none: the bare network)")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    w, h = a.size
    image = mosaic(Path(a.source), h, w)
    if a.model:  # the file's TTA and calibrated operating point (for the masks compared below)
        def make(window):
            return build_ensemble([a.model], None, a.tta, None, None, None, {"window": window}, "auto")
        name = a.model
    else:
        from seg.config import DEFAULTS
        from seg.models import model_from_config

        torch.manual_seed(0)
        net = model_from_config({**DEFAULTS["model"], "arch": "unet", "weights": "none"})
        fixed = {"threshold": 0.0, "image_threshold": -1e30, "min_area": 0, "opening": 0}

        def make(window):
            return Ensemble([net], 1, 128, "auto", a.tta, window=window), fixed
        name = "untrained default UNet (lite0)"
    rows, maps, masks = {}, {}, {}
    for label, window in (("whole", a.window), ("tiled", 0)):
        ens, params = make(window)
        ens.warmup()
        best = float("inf")
        for _ in range(a.repeats):
            t = time.perf_counter()
            r = ens.predict([image])[0]
            best = min(best, time.perf_counter() - t)
        maps[label] = r["map"]
        masks[label] = final_mask(r["map"], r["image"], params, pixels=r["pixels"]) > 0
        rows[label] = {"seconds": best, "mpix_per_s": h * w / 1e6 / best}
    diff = np.abs(maps["whole"] - maps["tiled"])
    union = (masks["whole"] | masks["tiled"]).sum()
    iou = float((masks["whole"] & masks["tiled"]).sum() / union) if union else 1.0
    out = {"model": name, "size": f"{w}x{h}", "tta": ens.tta_mode, "window": a.window, **rows,
           "speedup": rows["tiled"]["seconds"] / rows["whole"]["seconds"],
           "map_abs_diff_median": float(np.median(diff)), "map_abs_diff_p99": float(np.quantile(diff, 0.99)),
           "mask_iou": iou, "mask_pixels_equal": float((masks["whole"] == masks["tiled"]).mean())}
    print(f"{name}, {w}x{h}, tta {a.tta}: whole (window {a.window}) {rows['whole']['mpix_per_s']:.2f} MP/s "
          f"({rows['whole']['seconds']:.1f} s), tiled {rows['tiled']['mpix_per_s']:.2f} MP/s "
          f"({rows['tiled']['seconds']:.1f} s), x{out['speedup']:.1f}; |whole - tiled| map: median "
          f"{out['map_abs_diff_median']:.3g}, 99th percentile {out['map_abs_diff_p99']:.3g}; masks at the file's "
          f"thresholds: IoU {iou:.3f}, {100 * out['mask_pixels_equal']:.2f} % of pixels equal")
    return out


if __name__ == "__main__":
    main()
