"""The competition's submission format: one JSON per crop judged defective, every defect pixel as "row, col",
one region per 8-connected component; no file means normal. Writer, reader and the zip layout."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import cv2
import numpy as np

from core.io import InputError, read_json_file


def mask_to_record(mask: np.ndarray, name: str) -> dict:
    """{"Height", "Width", "name", "regions": [{"points": ["r, c", ...]}]}, points in row-major order."""
    h, w = mask.shape[:2]
    n, labels = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
    regions = []
    for k in range(1, n):
        rows, cols = np.nonzero(labels == k)
        regions.append({"points": [f"{r}, {c}" for r, c in zip(rows.tolist(), cols.tolist())]})
    return {"Height": int(h), "Width": int(w), "name": text_name(name), "regions": regions}


def record_to_mask(record: dict, path: str | Path = "") -> np.ndarray:
    """The uint8 {0,1} mask a submission record describes; a malformed record is an InputError naming the file."""
    try:
        h, w = int(record["Height"]), int(record["Width"])
        mask = np.zeros((h, w), np.uint8)
        for region in record.get("regions", []):
            for p in region["points"]:
                r, c = (int(v) for v in str(p).split(","))
                mask[r, c] = 1
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise InputError(f"{path}: not a valid submission record ({type(e).__name__}: {e})") from None
    return mask


def read_submission(folder: str | Path, stems: list[str], shape=(128, 128)) -> list[np.ndarray]:
    """Masks for `stems` from a folder of submission JSONs; a stem with no file is an empty (normal) mask."""
    folder = Path(folder)
    out = []
    for s in stems:
        p = folder / f"{s}.json"
        out.append(record_to_mask(read_json_file(p), p) if p.exists() else np.zeros(shape, np.uint8))
    return out


def write_zip(json_dir: Path, zip_path: Path, prefix: str) -> None:
    """Zip the JSONs under `prefix/` (the folder layout the competition's upload expects)."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(json_dir.glob("*.json")):
            z.write(p, f"{prefix.strip('/')}/{text_name(p.name)}")


def text_name(name: str) -> str:
    """A file name as text for JSON and CSV: bytes that are not UTF-8 (kept by the OS as surrogates) are shown
    as \\xNN escapes instead of failing the write."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def dump(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)
