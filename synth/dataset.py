"""On-the-fly synthetic training data: the engine of `synth generate` as a torch Dataset (one code path).

Item i of epoch e on rank r is drawn from the tagged stream `[TRAIN, seed, epoch, r, i]` (synth.streams), so an
epoch is the same whatever the DataLoader workers, and a resumed run sees the same data. `max_difficulty` caps the
defects (curriculum).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .engine import DefectSynthesizer, SourcePool
from .streams import TRAIN, stream


def to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (H,W[,C]) image -> float (C,H,W) in [0,1]; {0,1} mask -> float (1,H,W)."""
    img = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255)
    img = img[None] if img.ndim == 2 else img.permute(2, 0, 1)
    return img, torch.from_numpy(np.ascontiguousarray(mask)).float()[None]


def crops_tensor(crops: list[np.ndarray]) -> torch.Tensor:
    """uint8 crops of one size -> float (N, C, H, W) in [0, 1]."""
    return torch.stack([to_tensors(c, np.zeros(c.shape[:2], np.uint8))[0] for c in crops])


class SynthDataset(Dataset):
    """`length` samples per epoch; returns dict(image, mask, label, difficulty), and with `with_clean` the crop
    before its defects were drawn, augmented as the image (`clean`: what a reconstruction model learns to restore).
    """

    def __init__(self, engine: DefectSynthesizer, sources: SourcePool, length: int, seed: int = 0,
                 augment=None, max_difficulty: float | None = None, rank: int = 0, with_clean: bool = False):
        self.engine, self.sources, self.length, self.seed = engine, sources, length, seed
        self.augment, self.max_difficulty, self.rank, self.epoch = augment, max_difficulty, rank, 0
        self.with_clean = with_clean

    def set_epoch(self, epoch: int, max_difficulty: float | None = None) -> None:
        self.epoch, self.max_difficulty = epoch, max_difficulty

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = stream(TRAIN, self.seed, self.epoch, self.rank, i)
        image, clean, mask, record = self.engine.draw_pair(rng, self.sources, self.max_difficulty)
        clean = clean if self.with_clean else None
        if self.augment is not None:  # a callable (image, mask, seed, clean) -> (image, mask, clean or None)
            image, mask, clean = self.augment(image, mask, seed=int(rng.integers(2**31 - 1)), clean=clean)
        img, m = to_tensors(image, mask)
        d = record["difficulty"]
        item = {"image": img, "mask": m, "label": torch.tensor([float(m.any())]),
                "difficulty": torch.tensor(-1.0 if d is None else d)}
        if clean is not None:
            item["clean"] = to_tensors(clean, mask)[0]
        return item
