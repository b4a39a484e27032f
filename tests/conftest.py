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
