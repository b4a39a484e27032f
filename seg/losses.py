"""Training loss: dice + BCE (or focal) on the mask, BCE on the image-level head, deep-supervision terms, and the
model's own term when it gives one (`aux`).

smp's binary DiceLoss gives 0 on a batch without defect pixels, so false positives on normal crops are
penalised by the pixel BCE/focal term and by the image-level term.
"""

from __future__ import annotations

import torch
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss
from torch import nn


class SegmentationLoss(nn.Module):
    def __init__(self, mask_loss: str = "dice_bce", image_weight: float = 0.3, deep_weight: float = 0.3,
                 aux_weight: float = 1.0):
        super().__init__()
        self.dice = DiceLoss("binary", from_logits=True)
        self.pixel = FocalLoss("binary") if mask_loss == "dice_focal" else nn.BCEWithLogitsLoss()
        self.image_loss = nn.BCEWithLogitsLoss()
        self.image_weight, self.deep_weight, self.aux_weight = image_weight, deep_weight, aux_weight

    def mask_term(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + self.pixel(logits, target)

    def forward(self, out: dict, mask: torch.Tensor, label: torch.Tensor) -> dict:
        parts = {"mask": self.mask_term(out["mask"].float(), mask)}
        if out.get("image") is not None and self.image_weight > 0:
            parts["image"] = self.image_weight * self.image_loss(out["image"].float(), label)
        if out.get("deep") and self.deep_weight > 0:
            deep = torch.stack([self.mask_term(d.float(), mask) for d in out["deep"]]).mean()
            parts["deep"] = self.deep_weight * deep
        # a model's own term (simplenet's noise, realnet's reconstruction)
        if out.get("aux") is not None and self.aux_weight > 0:
            parts["aux"] = self.aux_weight * out["aux"]
        parts["total"] = sum(parts.values())
        return parts
