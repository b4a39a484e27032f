"""`ensemble predict`: a folder of test images -> submission JSONs and zip, mask PNGs, overlays, anomaly maps
(float32 .npy, exact: evaluation ranks them without ties from rounding) and a CSV of per-image scores, written to a
temporary folder and renamed into place (never half a submission)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from core.io import InputError, encode_png, find_images, read_image, read_mask, stem_of, write_json
from synth.preview import outline

from .models import Ensemble
from core.postprocess import image_score, map_median
from synth.engine import part_region
from .submission import dump, mask_to_record, text_name, write_zip


def publish(tmp: Path, out: Path) -> None:
    """Move a finished temporary folder into place; an older `out` is replaced only after that succeeded."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)  # put the previous output back: the user never ends up with neither
        raise
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def recover(out: Path) -> None:
    """Clean up after a run killed mid-way: put back a previous output caught between the two renames of
    `publish`, and remove what killed runs were writing. Folders of a run still alive (another `ensemble predict`
    aimed at the same output) are left alone."""
    def leftovers(kind: str) -> list[Path]:
        found = []
        for p in out.parent.iterdir():
            head, _, pid = p.name.rpartition("-")
            if head == f".{out.name}.{kind}" and pid.isdigit() and not _alive(int(pid)):
                found.append(p)
        return sorted(found, key=lambda p: p.stat().st_mtime)

    olds = leftovers("old")
    if olds and not out.exists():
        os.replace(olds.pop(), out)
    for stale in olds + leftovers("partial"):
        shutil.rmtree(stale, ignore_errors=True)


DRIFT_SHARE = 0.1  # above this share of images with most of their map above the pixel threshold, a warning


def run_predict(ens: Ensemble, image_dir: str | Path, out: str | Path, params: dict,
                roi: str | Path | None = None, zip_prefix: str | None = None, overlays: str = "defective",
                progress: Callable | None = None, warn: Callable | None = None) -> dict:
    """Predict every image below `image_dir`; `params` has threshold, image_threshold, min_area, opening.
    `roi`: a mask image applied to every image (resized to it), or "auto" (each image's bright part, holes
    filled: `synth.engine.part_region`)."""
    image_dir, out = Path(image_dir), Path(out)
    paths = find_images(image_dir, warn=warn)
    auto = str(roi) == "auto"  # per image, as synthesis does: the bright part of the image (Otsu)
    roi_mask = read_mask(roi) if roi and not auto else None
    roi_by_shape: dict[tuple[int, int], np.ndarray] = {}  # the ROI resized once per image size
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if overlays not in ("all", "defective", "none"):
        raise InputError(f"overlays: expected all, defective or none, got {overlays!r}")
    subs = ("submission", "masks", "maps") + (("gates",) if params.get("shape") is not None else ())
    for sub in subs + (("overlays",) if overlays != "none" else ()):
        (tmp / sub).mkdir(parents=True)
    rows, n_def, drifted = [], 0, 0
    ens.warmup()
    start = time.perf_counter()
    chunk = max(1, ens.batch_size)
    # encoding and writing run in a thread (OpenCV releases the GIL) while the networks run on the next batch
    writer, pending = ThreadPoolExecutor(max_workers=1), []
    try:
        for k in range(0, len(paths), chunk):
            batch_paths = paths[k:k + chunk]
            images = []
            for p in batch_paths:
                try:
                    images.append(read_image(p, ens.channels))
                except InputError as e:
                    raise InputError(f"{e} (fix or remove it; nothing was written)") from None
            results = ens.predict(images)
            for f in pending:
                f.result()  # surface any write error of the previous batch
            pending = []
            for p, img, r in zip(batch_paths, images, results):
                rmask = part_region(img) if auto else None
                if roi_mask is not None:
                    h, w = img.shape[:2]
                    if (h, w) not in roi_by_shape:
                        roi_by_shape[h, w] = cv2.resize(roi_mask, (w, h), interpolation=cv2.INTER_NEAREST)
                    rmask = roi_by_shape[h, w]
                mask, gate = ens.judge(r, params, rmask)
                stem = stem_of(p, image_dir)
                n_def += int(mask.any())
                median = map_median(r["map"])
                drifted += int(median is not None and median > params["threshold"])
                pending.append(writer.submit(write_outputs, tmp, stem, p.name, img, mask, r["map"], overlays, gate))
                rows.append({"name": text_name(p.name), "stem": text_name(stem), "defective": int(mask.any()),
                             "image_score": float(image_score(r["map"], r["image"])),
                             "image_head": "" if r["image"] is None else float(r["image"]),
                             "peak": float(r["map"].max()), "median": "" if median is None else median,
                             "area": int(mask.sum())})
            if progress:
                progress(len(batch_paths))
        for f in pending:
            f.result()
        seconds = time.perf_counter() - start
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
        (tmp / "scores.csv").write_text(buf.getvalue())
        write_zip(tmp / "submission", tmp / "submission.zip", zip_prefix or f"data/{image_dir.name}")
        summary = {"images": len(rows), "defective": n_def, "median_above_threshold": drifted, "seconds": seconds,
                   "images_per_s": len(rows) / seconds if seconds > 0 else 0.0,
                   "checkpoints": ens.paths, "channels": ens.channels, "tta": ens.tta_mode, "merge": ens.merge,
                   "params": params, "image_dir": str(image_dir)}
        write_json(tmp / "predict.json", summary)
        publish(tmp, out)
        if warn and drifted > DRIFT_SHARE * len(rows):
            warn(f"{drifted} of {len(rows)} images have half of their map or more above the pixel threshold: they "
                 "look unlike the held-out OK images the thresholds were calibrated on (a lighting, a texture, a "
                 "region those never show); "
                 + ("their outlines are measured from each image's median (predict.median_base); "
                    if params.get("median_base") else "") + "OK images like them, then calibrating again, fit better")
    except BaseException:
        writer.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    writer.shutdown()
    return summary


def write_outputs(tmp: Path, stem: str, name: str, img: np.ndarray, mask: np.ndarray, amap: np.ndarray,
                  overlays: str, gate: np.ndarray | None = None) -> None:
    """One image's files inside the temporary output folder (published whole at the end). Maps are stored as
    float32 .npy, unrounded: they feed `ensemble evaluate`'s AUROC and AP; an ensemble's agreement mask (`gate`)
    as a PNG in gates/, so the oracle of `evaluate` shapes masks as prediction did."""
    defective = bool(mask.any())
    if defective:
        (tmp / "submission" / f"{stem}.json").write_text(dump(mask_to_record(mask, name)))
    (tmp / "masks" / f"{stem}.png").write_bytes(encode_png(mask * 255))
    np.save(tmp / "maps" / f"{stem}.npy", np.asarray(amap, np.float32), allow_pickle=False)
    if gate is not None:
        (tmp / "gates" / f"{stem}.png").write_bytes(encode_png(gate * 255))
    if overlays == "all" or (overlays == "defective" and defective):
        (tmp / "overlays" / f"{stem}.png").write_bytes(encode_png(outline(img, mask), 0))
