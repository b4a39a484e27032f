"""Shared fixtures: small OK-image folders the tests make themselves, with fixed seeds."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data" / "magnetic-tile"
SAMPLE = ROOT / "data" / "sample"


def textured(seed: int, h: int = 180, w: int = 220, channels: int = 1) -> np.ndarray:
    """A tile-like OK image: brightness gradient, vertical streaks, grain and a dark vertical edge."""
    g = np.random.default_rng(seed)
    x = np.linspace(0, 1, w)[None, :]
    base = 90 + 60 * x + 15 * np.sin(np.arange(w) * g.uniform(0.2, 0.6))[None, :]
    img = base + g.normal(0, 4, (h, w))
    img[:, : w // 10] = 25
    img = np.clip(img, 0, 255).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if channels == 3 else img


@pytest.fixture
def ok_dir(tmp_path: Path) -> Path:
    d = tmp_path / "OK_Images"
    d.mkdir()
    for i in range(5):
        cv2.imwrite(str(d / f"ok_{i}.png"), textured(i))
    return d


def write_ok_images(folder: Path, n: int = 5) -> Path:
    """n tile-like OK images (seeds 0..n-1) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"ok_{i}.png"), textured(i))
    return folder


def write_test_crops(folder: Path, n: int, pit_every: int = 2, ext: str = ".bmp") -> Path:
    """n 128x128 test crops in `folder`, every `pit_every`-th one (from the second) with a dark pit."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = textured(30 + i)[:128, :128].copy()
        if i % pit_every == 1:
            cv2.circle(img, (40 + 5 * (i % 8), 60), 6, 12, -1)
        cv2.imwrite(str(folder / f"t{i:02d}{ext}"), img)
    return folder


def tiny_patchcore_args(ok: Path) -> list[str]:
    """`baseline fit` arguments for a PatchCore that fits in seconds."""
    return ["baseline", "fit", "--method", "patchcore", "-s", f"data.ok_dir={ok}", "-s", "baseline.n_train=16",
            "-s", "train.val_n=16", "-s", "calibrate.normal_crops=8", "-s", "calibrate.synth_n=8"]
