"""SSIM autoencoder (Bergmann et al., 2019): a convolutional autoencoder trained on OK crops with an SSIM
(plus L2) loss; the anomaly map is 1 - the local SSIM between an image and its reconstruction.

It trains in `seg train`'s loop like any model: its loss is its own term (`aux`) on the clean originals of the
synthetic samples, which are OK crops; the synthetic defects themselves it never learns from (its mask output in
training carries no gradient), flipped at random as in the paper (`baseline fit` turns the other augmentations off).
Its logit mapping follows the normal maps it meets in training, as batch norm follows its batches: a running 99.9th
percentile and spread. Loss and maps are computed in float32 even under mixed precision (SSIM subtracts
near-equal terms)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import AnomalyModel, gaussian_blur, map_standardiser


def ssim_map(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM of (B,1,H,W) images in [0,1], Gaussian window, reflect padding."""
    r = window // 2
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=a.dtype, device=a.device) ** 2) / (2 * sigma**2))
    k = (k / k.sum())
    k2 = (k[:, None] * k[None, :]).view(1, 1, window, window)

    def blur(x):
        return F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), k2)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def _block(cin, cout, k, s, p, transpose=False):
    conv = (nn.ConvTranspose2d if transpose else nn.Conv2d)(cin, cout, k, s, p)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


class SSIMAutoencoder(AnomalyModel):
    wants_clean = True  # training passes the OK crops it learns to reconstruct
    pretrained_encoder = False  # every weight learnt here: no pretrained encoder to load

    def __init__(self, in_channels: int = 1, latent: int = 100, width: int = 32, size: int = 128,
                 sigma: float = 1.0, momentum: float = 0.1):
        super().__init__()
        w = width
        self.momentum = momentum
        self.size, self.sigma = size, sigma
        self.encoder = nn.Sequential(
            _block(in_channels, w, 4, 2, 1), _block(w, w, 4, 2, 1), _block(w, w, 3, 1, 1),
            _block(w, 2 * w, 4, 2, 1), _block(2 * w, 2 * w, 3, 1, 1), _block(2 * w, 4 * w, 4, 2, 1),
            _block(4 * w, 2 * w, 3, 1, 1), _block(2 * w, w, 3, 1, 1), nn.Conv2d(w, latent, size // 16))
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent, w, size // 16), nn.LeakyReLU(0.2, inplace=True), _block(w, 2 * w, 3, 1, 1),
            _block(2 * w, 4 * w, 3, 1, 1), _block(4 * w, 2 * w, 4, 2, 1, True), _block(2 * w, 2 * w, 3, 1, 1),
            _block(2 * w, w, 4, 2, 1, True), _block(w, w, 3, 1, 1), _block(w, w, 4, 2, 1, True),
            nn.ConvTranspose2d(w, in_channels, 4, 2, 1), nn.Sigmoid())

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def loss(self, x: torch.Tensor, rec: torch.Tensor, l2_weight: float = 1.0) -> torch.Tensor:
        """SSIM (per channel) + L2 between OK crops and their reconstruction."""
        ssim = torch.stack([ssim_map(x[:, c:c + 1], rec[:, c:c + 1]) for c in range(x.shape[1])])
        return (1 - ssim).mean() + l2_weight * F.mse_loss(rec, x)

    def _map(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        per_channel = [1 - ssim_map(x[:, c:c + 1], rec[:, c:c + 1]) for c in range(x.shape[1])]
        return gaussian_blur(torch.stack(per_channel).mean(0), self.sigma)

    @torch.no_grad()
    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        rec = self.reconstruct(x).float()
        with torch.autocast(x.device.type, enabled=False):
            return self._map(x.float(), rec)

    def forward(self, xn: torch.Tensor, raw: torch.Tensor, clean: torch.Tensor | None = None) -> dict:
        """raw: the image in [0, 1]; in training, `clean`: the OK crops to learn (the image's defects are not)."""
        if not (self.training and clean is not None):
            return super().forward(xn, raw)
        rec = self.reconstruct(clean).float()
        with torch.autocast(raw.device.type, enabled=False):  # SSIM's differences of near-equal terms: float32
            loss = self.loss(clean.float(), rec)
            with torch.no_grad():  # the running logit mapping, from these normal maps
                center, scale = map_standardiser(self._map(clean.float(), rec.detach()))
            if math.isfinite(center) and math.isfinite(scale):  # a batch gone wrong never poisons the mapping
                m = self.momentum
                self.center.mul_(1 - m).add_(m * center)
                self.scale.mul_(1 - m).add_(m * max(scale, 1e-6))
        return {"mask": torch.zeros_like(raw[:, :1]), "image": None, "aux": loss}
