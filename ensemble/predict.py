"""`ensemble predict`: a folder of test images -> submission JSONs and zip, mask PNGs, overlays, probability
PNGs and a CSV of per-image scores, written to a temporary folder and renamed into place (never half a
submission)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from synth.io import InputError, atomic_write_bytes, encode_png, find_images, read_image, read_mask, write_json
from synth.preview import outline

from .models import Ensemble
from .postprocess import final_mask, image_score
from .submission import dump, mask_to_record, write_zip


def publish(tmp: Path, out: Path) -> None:
    """Move a finished temporary folder into place; an older `out` is replaced only after that succeeded."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def run_predict(ens: Ensemble, image_dir: str | Path, out: str | Path, params: dict,
                roi: str | Path | None = None, zip_prefix: str | None = None, overlays: bool = True,
                progress: Callable | None = None, warn: Callable | None = None) -> dict:
    """Predict every image below `image_dir`; `params` has threshold, image_threshold, min_area, opening."""
    image_dir, out = Path(image_dir), Path(out)
    paths = find_images(image_dir, warn=warn)
    roi_mask = read_mask(roi) if roi else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("submission", "masks", "probs") + (("overlays",) if overlays else ()):
        (tmp / sub).mkdir(parents=True)
    rows, n_def, forward_s = [], 0, 0.0
    start = time.perf_counter()
    chunk = max(1, ens.batch_size)
    try:
        for k in range(0, len(paths), chunk):
            batch_paths = paths[k:k + chunk]
            images = []
            for p in batch_paths:
                try:
                    images.append(read_image(p, ens.channels))
                except InputError as e:
                    raise InputError(f"{e} (fix or remove it; nothing was written)") from None
            f0 = time.perf_counter()
            results = ens.predict(images)
            forward_s += time.perf_counter() - f0
            for p, img, r in zip(batch_paths, images, results):
                rmask = None
                if roi_mask is not None:
                    import cv2
                    rmask = cv2.resize(roi_mask, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
                mask = final_mask(r["prob"], r["image_prob"], params, rmask, r["hits"])
                rel = p.relative_to(image_dir).with_suffix("")
                stem = rel.as_posix().replace("/", "__")
                if mask.any():
                    n_def += 1
                    atomic_write_bytes(tmp / "submission" / f"{stem}.json",
                                       dump(mask_to_record(mask, p.name)).encode())
                (tmp / "masks" / f"{stem}.png").write_bytes(encode_png(mask * 255))
                (tmp / "probs" / f"{stem}.png").write_bytes(
                    encode_png(np.round(r["prob"] * 255).astype(np.uint8)))
                if overlays:
                    (tmp / "overlays" / f"{stem}.png").write_bytes(encode_png(outline(img, mask)))
                rows.append({"name": p.name, "stem": stem, "defective": int(mask.any()),
                             "image_score": round(image_score(r["prob"], r["image_prob"]), 6),
                             "peak_prob": round(float(r["prob"].max()), 6), "area": int(mask.sum())})
            if progress:
                progress(len(batch_paths))
        seconds = time.perf_counter() - start
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
        (tmp / "scores.csv").write_text(buf.getvalue())
        write_zip(tmp / "submission", tmp / "submission.zip", zip_prefix or f"data/{image_dir.name}")
        summary = {"images": len(rows), "defective": n_def, "seconds": seconds,
                   "images_per_s": len(rows) / seconds if seconds > 0 else 0.0,
                   "forward_images_per_s": len(rows) / forward_s if forward_s > 0 else 0.0,
                   "checkpoints": ens.paths, "tta": ens.tta_mode, "merge": ens.merge, "params": params,
                   "image_dir": str(image_dir)}
        write_json(tmp / "predict.json", summary)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
