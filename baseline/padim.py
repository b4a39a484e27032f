"""PaDiM (Defard et al., 2020): one Gaussian per feature-map position over multi-layer features, a random
subset of channels, and the Mahalanobis distance to it as the anomaly score."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import MemoryModel, gaussian_blur
from seg.models.features import FeatureExtractor, FrozenFeatures


class Padim(FrozenFeatures, MemoryModel):
    def __init__(self, backbone: str = "tf_efficientnet_lite0", weights: str = "lite", dims: int = 100,
                 size: int = 128, seed: int = 0, sigma: float = 4.0):
        """weights: the extractor's (built by the registry, `lite` weights are loaded by `create_model` into
        `encoder`, and this is `none`)."""
        super().__init__()
        self.extractor = FeatureExtractor(backbone, weights, (1, 2, 3), keys=("model.encoder", "model.weights"))
        self.encoder = self.extractor
        total = sum(self.extractor.channels)
        dims = min(dims, total)
        self.size, self.sigma = size, sigma
        self.grid = size // self.extractor.strides[0]
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:dims].sort().values
        self.register_buffer("idx", idx)
        p = self.grid * self.grid
        self.register_buffer("mu", torch.zeros(p, dims))
        self.register_buffer("cov_inv", torch.zeros(p, dims, dims))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, P, dims): layers upsampled to the finest one, concatenated, channels picked."""
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            raise ValueError(f"PaDiM was fitted on {self.size}x{self.size} crops, got {tuple(x.shape[-2:])}")
        feats = self.extractor(x)
        size = feats[0].shape[-2:]
        emb = torch.cat([feats[0]] + [F.interpolate(f, size=size, mode="nearest") for f in feats[1:]], 1)
        emb = emb[:, self.idx]
        return emb.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def fit(self, crops: torch.Tensor, batch_size: int = 32, eps: float = 0.01) -> None:
        emb = torch.cat([self.embed(crops[k:k + batch_size]) for k in range(0, len(crops), batch_size)])
        n = emb.shape[0]
        mu = emb.mean(0)
        centered = emb - mu
        cov = torch.einsum("npi,npj->pij", centered, centered) / max(n - 1, 1)
        cov += eps * torch.eye(cov.shape[-1])
        self.mu.copy_(mu)
        self.cov_inv.copy_(torch.linalg.inv(cov))

    @torch.no_grad()
    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.embed(x) - self.mu
        dist = torch.einsum("bpi,pij,bpj->bp", delta, self.cov_inv, delta).clamp_min(0).sqrt()
        m = dist.view(-1, 1, self.grid, self.grid)
        return gaussian_blur(F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False), self.sigma)
