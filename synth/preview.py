"""`synth preview`: one PNG grid of generated samples, each shown bare and with its mask outlined in red."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from core.io import InputError, read_image, read_jsonl, write_png


def outline(image: np.ndarray, mask: np.ndarray, color=(0, 0, 255)) -> np.ndarray:
    """BGR copy of `image` with the outline of `mask` drawn in `color`."""
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(bgr, contours, -1, color, 1)


def caption(tile: np.ndarray, text: str, height: int = 16) -> np.ndarray:
    bar = np.full((height, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (3, height - 4), cv2.FONT_HERSHEY_PLAIN, 0.9, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([tile, bar])


def grid(tiles: list[np.ndarray], cols: int, gap: int = 4) -> np.ndarray:
    h, w = tiles[0].shape[:2]
    rows = (len(tiles) + cols - 1) // cols
    canvas = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        canvas[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = t
    return canvas


def preview(folder: str | Path, output: str | Path, n: int = 24, cols: int = 4, defective_only: bool = False) -> int:
    """Write a grid of the first `n` samples of a generated folder; returns how many were drawn."""
    folder = Path(folder)
    rows = read_jsonl(folder / "manifest.jsonl")
    if not rows:
        raise InputError(f"{folder}: no manifest.jsonl with samples (run `synth generate` first)")
    if defective_only:
        rows = [r for r in rows if not r["normal"]]
    tiles = []
    for r in rows[:n]:
        img = read_image(folder / "images" / f"{r['id']}.png", channels=3)
        mask = read_image(folder / "masks" / f"{r['id']}.png", channels=1)
        pair = np.hstack([img, np.full((img.shape[0], 2, 3), 255, np.uint8), outline(img, mask)])
        label = "normal" if r["normal"] else f"{'+'.join(r['families'])} d={r['difficulty']:.2f}"
        tiles.append(caption(pair, f"{r['id']} {label}"))
    write_png(output, grid(tiles, cols))
    return len(tiles)
