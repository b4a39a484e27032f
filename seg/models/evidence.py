"""The evidence-conditioned segmenter: a UNet that sees, beside the image, how far each patch is from normal.

`NormalEvidence` is a PatchCore-style normal model fitted on OK crops before training (`fit_normal`): locally aware
features of a frozen pretrained backbone (3x3-averaged stride-8/16 maps), a greedy coreset of the normal patches,
and per pixel the distance to the nearest one, box-smoothed and standardised on other OK crops (0 at their 99.9th
percentile).
`EvidenceUnet` feeds that map as an extra input channel to smp's Unet, which learns on synthetic defects to turn
the evidence into sharp masks and to ignore normal variation. The evidence does not depend on what the synthetic
defects look like, so a real defect of a kind the synthesis never drew still lights it up.

Example:
    >>> m = create_model("evidence_unet", "tu-tf_efficientnet_lite0", weights="none", in_channels=1)
    >>> m.fit_normal(torch.rand(8, 1, 128, 128))
    >>> m(torch.rand(2, 1, 128, 128))["mask"].shape
    torch.Size([2, 1, 128, 128])
"""

from __future__ import annotations

from typing import Sequence

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from .features import FeatureExtractor, FrozenFeatures, greedy_coreset, local_patch_features, nearest, \
    tail_standardiser


class NormalEvidence(FrozenFeatures):
    """Per-pixel distance of a crop's patches to a memory bank of normal patches, standardised."""

    sized_buffers = ("bank",)  # its size: what fitting chose

    def __init__(self, weights: str = "lite", coreset_ratio: float = 0.1, sigma: float = 2.0, seed: int = 0,
                 bank_flip: bool = True):
        """bank_flip: the bank also holds the patches of the OK crops' left-right mirror images, so a mirrored
        normal crop (training's `flip` augmentation, flip TTA) is as normal to it as the crop itself."""
        super().__init__()
        # the offline Lite weights for any pretrained choice (they ship with the requirements); random only for tests
        backbone_weights = "none" if weights == "none" else "lite"
        self.extractor = FeatureExtractor("tf_efficientnet_lite0", backbone_weights, (2, 3))
        self.coreset_ratio, self.sigma, self.seed, self.bank_flip = coreset_ratio, sigma, seed, bank_flip
        self.register_buffer("bank", torch.zeros(1, sum(self.extractor.channels)))
        self.register_buffer("center", torch.tensor(0.0))
        self.register_buffer("scale", torch.tensor(1.0))

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return local_patch_features(self.extractor(x))

    @torch.no_grad()
    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, 1, H, W) nearest-normal-patch distances."""
        emb = self.embed(x)
        b, d, h, w = emb.shape
        dist, _ = nearest(emb.permute(0, 2, 3, 1).reshape(-1, d), self.bank, 1)
        maps = F.interpolate(dist.view(b, 1, h, w), size=x.shape[-2:], mode="bilinear", align_corners=False)
        k = int(4 * self.sigma + 0.5) if self.sigma > 0 else 0
        if k:
            # a (2k+1)^2 box mean as two 1-D passes: the same values to float rounding, a sixth of the time on a CPU
            maps = F.pad(maps, (k, k, k, k), mode="reflect")
            maps = F.avg_pool2d(F.avg_pool2d(maps, (2 * k + 1, 1), 1), (1, 2 * k + 1), 1)
        return maps

    @torch.no_grad()
    def fit(self, normal: torch.Tensor, held: torch.Tensor, batch_size: int = 32) -> None:
        """Memory bank from `normal` crops (greedy coreset), standardisation on other normal crops `held`."""
        if self.bank_flip:
            normal = torch.cat([normal, normal.flip(-1)])
        emb = torch.cat([self.embed(normal[k:k + batch_size]) for k in range(0, len(normal), batch_size)])
        bank = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        idx, _ = greedy_coreset(bank, int(len(bank) * self.coreset_ratio), self.seed, project=64)
        self.bank = bank[idx].clone()
        maps = torch.cat([self.raw(held[k:k + batch_size]) for k in range(0, len(held), batch_size)])
        center, scale = tail_standardiser(maps, 0.999, cap=1_000_000)
        self.center.fill_(center)
        self.scale.fill_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.raw(x) - self.center) / self.scale


class EvidenceUnet(nn.Module):
    """smp Unet on [image, normal evidence]; returns (mask logits, image logits or None) like smp with aux."""

    wants_raw = True  # `Segmenter` passes the un-normalised image too: the evidence has its own preprocessing

    def __init__(self, encoder: str, encoder_weights, in_channels: int, decoder_channels: Sequence[int],
                 image_head: bool, evidence_weights: str, coreset_ratio: float = 0.1, bank_flip: bool = True):
        super().__init__()
        self.evidence = NormalEvidence(evidence_weights, coreset_ratio, bank_flip=bank_flip)
        aux = dict(classes=1, pooling="max", dropout=0.2) if image_head else None
        self.unet = smp.Unet(encoder, encoder_weights=encoder_weights, in_channels=in_channels + 1, classes=1,
                             decoder_channels=tuple(decoder_channels), aux_params=aux)
        self.encoder = self.unet.encoder

    def fit_normal(self, normal: torch.Tensor, held: torch.Tensor, pairs=None) -> None:
        self.evidence.fit(normal, held)  # `pairs` (synthetic defects): not used

    def forward(self, xn: torch.Tensor, raw: torch.Tensor):
        """xn: the image normalised for the encoder; raw: the same image in [0, 1]."""
        ev = self.evidence(raw)
        return self.unet(torch.cat([xn, ev.clamp(-4, 12) / 4], 1))
