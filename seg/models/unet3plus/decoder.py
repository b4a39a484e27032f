"""UNet 3+ decoder (Huang et al., ICASSP 2020) on smp's encoder contract.

Input: the encoder's feature list `[x, e1, ..., eN]` (strides 1, 2, ..., 2**N; channels `encoder_channels`).
Decoder stage d_i (i = N-1 .. 1, at the stride of e_i) fuses *all* scales: shallower encoder features
max-pooled down, e_i itself, and deeper decoder stages (e_N for the deepest) upsampled, each through a 3x3 conv
to `cat_channels`, concatenated and fused by a 3x3 conv to `N * cat_channels`.

Example:
    >>> dec = UNet3PlusDecoder((1, 16, 24, 40, 112, 320), cat_channels=32)
    >>> feats = [torch.zeros(1, c, 128 // 2**i, 128 // 2**i) for i, c in enumerate((1, 16, 24, 40, 112, 320))]
    >>> [t.shape[1] for t in dec(feats)]   # d1 .. d4, e5
    [160, 160, 160, 160, 320]
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base.modules import Conv2dReLU
from torch import nn


class ScaleBranch(nn.Module):
    """Bring one feature map to the target stage's resolution (max-pool down or bilinear up), then 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, factor: float):
        super().__init__()
        self.factor = factor
        self.pool = nn.MaxPool2d(int(factor), int(factor), ceil_mode=True) if factor > 1 else nn.Identity()
        self.conv = Conv2dReLU(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        x = self.pool(x)
        if x.shape[-2:] != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.conv(x)


class UNet3PlusDecoder(nn.Module):
    def __init__(self, encoder_channels: Sequence[int], cat_channels: int = 32):
        super().__init__()
        enc = list(encoder_channels[1:])  # e1 .. eN
        n = len(enc)
        self.n = n
        self.up_channels = cat_channels * n
        self.deepest_channels = enc[-1]
        self.stages = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for i in range(n - 1, 0, -1):  # decoder stage for e_i (1-based), deepest first
            branches = nn.ModuleList()
            for j in range(1, n + 1):
                if j <= i:
                    in_ch = enc[j - 1]
                elif j == n:
                    in_ch = enc[n - 1]
                else:
                    in_ch = self.up_channels
                branches.append(ScaleBranch(in_ch, cat_channels, 2 ** (i - j) if j < i else 1))
            self.stages.append(branches)
            self.fuse.append(Conv2dReLU(self.up_channels, self.up_channels, 3, padding=1))

    @property
    def out_channels(self) -> List[int]:
        """Channels of the returned maps: d1 .. d(N-1), then e_N."""
        return [self.up_channels] * (self.n - 1) + [self.deepest_channels]

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        enc = features[1:]
        n = self.n
        dec = {n: enc[n - 1]}  # d_N is e_N
        for k, i in enumerate(range(n - 1, 0, -1)):
            size = enc[i - 1].shape[-2:]
            parts = []
            for j, branch in zip(range(1, n + 1), self.stages[k]):
                src = enc[j - 1] if j <= i else dec[j]
                parts.append(branch(src, size))
            dec[i] = self.fuse[k](torch.cat(parts, 1))
        return [dec[i] for i in range(1, n + 1)]
