"""UNet 3+: full-scale skip connections, deep supervision and a classification-guided module (CGM).

Works with every smp encoder (it only uses the encoder contract: `out_channels` and a feature list).
Forward returns `(mask_logits, image_logits, deep_logits)`: deep supervision maps (one per decoder stage and the
deepest encoder stage, upsampled to the input size) are returned in training mode only. With `cgm=True` the
classification head guides the mask at decision time: `core.postprocess.decide` drops the mask of an image whose
head score is under the calibrated image threshold (the model itself never blanks its mask, so TTA averages and
calibrated thresholds below 0.5 work).

Example:
    >>> m = UNet3Plus("resnet18", encoder_weights=None, in_channels=1).eval()
    >>> mask, image, deep = m(torch.zeros(2, 1, 128, 128))
    >>> mask.shape, image.shape, deep
    (torch.Size([2, 1, 128, 128]), torch.Size([2, 1]), None)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import ClassificationHead, SegmentationHead
from segmentation_models_pytorch.base import initialization as init
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

from .decoder import UNet3PlusDecoder

class UNet3Plus(nn.Module):
    def __init__(self, encoder_name: str = "resnet34", encoder_weights: str | None = None, in_channels: int = 3,
                 classes: int = 1, cat_channels: int = 32, deep_supervision: bool = True, cgm: bool = True,
                 image_head: bool = True, encoder_depth: int = 5):
        super().__init__()
        self.encoder = get_encoder(encoder_name, in_channels=in_channels, depth=encoder_depth,
                                   weights=encoder_weights)
        self.decoder = UNet3PlusDecoder(self.encoder.out_channels, cat_channels)
        self.segmentation_head = SegmentationHead(self.decoder.up_channels, classes, kernel_size=3)
        self.deep_supervision = deep_supervision
        self.deep_heads = nn.ModuleList(
            nn.Conv2d(c, classes, 3, padding=1) for c in self.decoder.out_channels[1:]) if deep_supervision else None
        self.cgm = cgm
        self.classification_head = ClassificationHead(self.encoder.out_channels[-1], classes=1, pooling="max",
                                                      dropout=0.5) if (cgm or image_head) else None
        init.initialize_decoder(self.decoder)
        init.initialize_head(self.segmentation_head)
        if self.classification_head is not None:
            init.initialize_head(self.classification_head)

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        features = self.encoder(x)
        maps = self.decoder(features)  # d1 .. d(N-1), e_N
        mask = self.segmentation_head(F.interpolate(maps[0], size=size, mode="bilinear", align_corners=False))
        image = self.classification_head(features[-1]) if self.classification_head is not None else None
        deep = None
        if self.training and self.deep_heads is not None:
            deep = [F.interpolate(h(m), size=size, mode="bilinear", align_corners=False)
                    for h, m in zip(self.deep_heads, maps[1:])]
        return mask, image, deep
