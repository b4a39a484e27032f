"""Predict speed of PyTorch against onnxruntime on the same crops, in the same run, for a model file or a calibrated
ensemble (exported with its TTA by `seg export`'s code), and whether the two give the same masks.

    python benchmarks/backends.py -m runs/p1/seg/best.pt --tta none --images path/to/TC_Images
    python benchmarks/backends.py -e runs/p1/hybrid.json --images path/to/TC_Images
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.io import find_images, read_image  # noqa: E402
from core.postprocess import agreement, final_mask  # noqa: E402
from ensemble.export import OnnxEnsemble, export_onnx  # noqa: E402
from ensemble.models import build_ensemble  # noqa: E402


def timed(ens, images, repeats: int) -> tuple[float, list]:
    ens.warmup()
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = ens.predict(images)
        best = min(best, time.perf_counter() - t)
    return len(images) / best, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", action="append", default=None)
    ap.add_argument("-e", "--ensemble", default=None)
    ap.add_argument("--tta", default=None)
    ap.add_argument("--images", required=True)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    ens, p = build_ensemble(a.model, a.ensemble, a.tta, None, None, None, {}, "cpu")
    images = [read_image(x, ens.channels) for x in find_images(a.images)]
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        export_onnx(ens, p, Path(d) / "m.onnx")
        export_s = time.perf_counter() - t
        onnx = OnnxEnsemble(Path(d) / "m.onnx", batch_size=ens.batch_size)
        torch_rate, r_t = timed(ens, images, a.repeats)
        onnx_rate, r_o = timed(onnx, images, a.repeats)
    shape = p.get("shape")  # a hybrid trims its masks as `ensemble predict` does
    same = sum(np.array_equal(final_mask(x["map"], x["image"], p, None, x["hits"], agreement(x["per_model"], shape),
                                         x["pixels"]),
                              final_mask(y["map"], y["image"], p, None, y["hits"], agreement(y["per_model"], shape),
                                         y["pixels"]))
               for x, y in zip(r_t, r_o))
    diff = max(float(np.abs(x["map"] - y["map"]).max()) for x, y in zip(r_t, r_o))
    out = {"models": len(ens.models), "tta": ens.tta_mode, "images": len(images), "torch_images_per_s": torch_rate,
           "onnx_images_per_s": onnx_rate, "export_s": export_s, "same_masks": same, "max_map_diff": diff}
    print(f"{len(ens.models)} model(s) x tta {ens.tta_mode}, {len(images)} crops: PyTorch {torch_rate:.1f} img/s, "
          f"onnxruntime {onnx_rate:.1f} img/s (export {export_s:.1f} s); identical masks {same}/{len(images)}, "
          f"max |map difference| {diff:.2g}")
    return out


if __name__ == "__main__":
    main()
