"""What the baselines share: OK-crop sampling, score standardisation and anomaly-map smoothing.

Each baseline is the network of one entry of the one registry (`seg.models.ARCHS`, see `baseline/__init__.py`):
`Segmenter` wraps it like any segmenter, `seg train` fits it (`fit_normal` on OK crops, then gradient steps for the
SSIM autoencoder alone), and the model file, calibration, TTA, the ensemble and export are the segmenters'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from synth.dataset import crops_tensor
from synth.engine import SourcePool


def ok_crops(pool: SourcePool, n: int, seed: int) -> torch.Tensor:
    """n random crops of the pool's size from the OK images, (n, C, S, S) in [0, 1]."""
    return crops_tensor(pool.random_crops(n, seed))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps (anomaly-map smoothing, as PaDiM/PatchCore do)."""
    if sigma <= 0:
        return x
    r = int(4 * sigma + 0.5)
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


class AnomalyModel(nn.Module):
    """Base: subclasses implement `anomaly_map(x) -> (B,1,H,W)` on images in [0, 1]; forward standardises it into
    logits (0 at the held-out normal maps' 99.9th percentile, unit = their spread)."""

    wants_raw = True  # `Segmenter` passes the image in [0, 1]: the extractor has its own normalisation
    fully_convolutional = False  # per-position statistics (PaDiM) or a dense bottleneck (SSIM-AE): fixed input

    def __init__(self):
        super().__init__()
        self.register_buffer("center", torch.tensor(0.0))
        self.register_buffer("scale", torch.tensor(1.0))

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def standardise(self, normal: torch.Tensor, batch_size: int = 32) -> None:
        """Fit the logit mapping on held-out OK crops: 0 at their 99.9th pixel percentile, unit = their std."""
        maps = torch.cat([self.anomaly_map(normal[k:k + batch_size]) for k in range(0, len(normal), batch_size)])
        center, scale = map_standardiser(maps)
        self.center.fill_(center)
        self.scale.fill_(scale or 1.0)

    def forward(self, xn: torch.Tensor, raw: torch.Tensor, clean: torch.Tensor | None = None) -> dict:
        """xn: the image normalised for an encoder (unused); raw: the same image in [0, 1]."""
        return {"mask": (self.anomaly_map(raw) - self.center) / self.scale, "image": None}


class MemoryModel(AnomalyModel):
    """A baseline whose whole training is statistics of OK crops (PaDiM, PatchCore): no gradient steps."""

    def fit(self, crops: torch.Tensor) -> None:
        """Fit the normal model on OK crops (N, C, S, S) in [0, 1]."""
        raise NotImplementedError

    def fit_normal(self, normal: torch.Tensor, held: torch.Tensor, pairs=None) -> None:
        """The registry's normal-model step (`Segmenter.fit_normal`): fit on `normal` OK crops, then standardise
        on `held`, other OK crops."""
        self.fit(normal)
        self.standardise(held)


def map_standardiser(maps: torch.Tensor, cap: int = 1_000_000) -> tuple[float, float]:
    """(99.9th percentile, standard deviation) of normal anomaly maps, over a fixed-seed sample of at most `cap`
    values: the baselines' logit mapping."""
    flat = maps.flatten().float()
    flat = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:cap].to(flat.device)]
    return float(torch.quantile(flat, 0.999)), float(flat.std())

