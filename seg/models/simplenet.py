"""SimpleNet (Liu et al., CVPR 2023) with GLASS's image-space anomalies (Chen et al., ECCV 2024), as a segmenter.

Frozen pretrained patch features (the encoder's stride-8 and stride-16 maps, 3x3-averaged and stacked as PatchCore
does), a feature adaptor (a 1x1 convolution, initialised to the identity) and a per-location discriminator (two
1x1 convolutions). It is trained by the same `seg train` loop as the UNets:
- image-space anomalies: our synthetic defects, through the loop's mask loss on the upsampled discriminator map
  (GLASS's "local anomaly synthesis"; the mask says which feature locations are anomalous);
- feature-space anomalies: in training mode the model adds its own term (`aux` in its output, which the loss adds):
  every adapted feature plus Gaussian noise must be judged anomalous (SimpleNet). The noise's scale is relative to
  each channel's spread in the batch (`noise` x std), so it does not depend on the backbone's feature scale; clean
  and noisy features go through the discriminator as one batch (one set of batch-norm statistics).
The image logit is the map's maximum. The features are a frozen network's, never trained on our defects; the
adaptor and discriminator learn from our synthetic defects, and from noise around every normal feature, which
marks off the normal features whatever a defect looks like.

Example:
    >>> m = create_model("simplenet", "tu-tf_efficientnet_lite0", weights="none", in_channels=1)
    >>> m(torch.rand(2, 1, 128, 128))["mask"].shape
    torch.Size([2, 1, 128, 128])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .features import FeatureExtractor, FrozenFeatures, local_patch_features


class SimpleNet(FrozenFeatures):
    wants_raw = True  # the frozen extractor has its own input normalisation

    def __init__(self, backbone: str = "tf_efficientnet_lite0", weights: str = "lite", hidden: int = 256,
                 noise: float = 0.25, image_head: bool = True):
        super().__init__()
        # `lite` weights are loaded by `create_model` into `encoder`, as for every segmenter
        self.extractor = FeatureExtractor(backbone, "none" if weights == "lite" else weights, (2, 3),
                                          keys=("model.encoder", "model.weights"))
        self.encoder = self.extractor
        d = sum(self.extractor.channels)
        self.noise, self.image_head = noise, image_head
        self.adaptor = nn.Conv2d(d, d, 1)
        with torch.no_grad():
            self.adaptor.weight.copy_(torch.eye(d).view(d, d, 1, 1))
            self.adaptor.bias.zero_()
        self.discriminator = nn.Sequential(nn.Conv2d(d, hidden, 1), nn.BatchNorm2d(hidden),
                                           nn.LeakyReLU(0.2), nn.Conv2d(hidden, 1, 1))

    def forward(self, xn: torch.Tensor, raw: torch.Tensor) -> dict:
        """xn: the image normalised for an encoder (unused: the extractor normalises `raw` itself); raw in [0, 1]."""
        with torch.no_grad():
            feats = local_patch_features(self.extractor(raw))
        adapted = self.adaptor(feats)
        noisy = None
        if self.training and self.noise > 0:  # one discriminator pass for both: one set of batch statistics
            spread = adapted.detach().std(dim=(0, 2, 3), keepdim=True)
            both = self.discriminator(torch.cat([adapted, adapted + torch.randn_like(adapted) * spread * self.noise]))
            grid, noisy = both.split(len(adapted))
        else:
            grid = self.discriminator(adapted)
        out = {"mask": F.interpolate(grid, size=raw.shape[-2:], mode="bilinear", align_corners=False),
               "image": grid.flatten(1).amax(1, keepdim=True) if self.image_head else None}
        if noisy is not None:
            out["aux"] = F.binary_cross_entropy_with_logits(noisy, torch.ones_like(noisy))
        return out
