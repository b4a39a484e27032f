"""RealNet (Zhang et al., CVPR 2024) as a segmenter: reconstruct the normal features, segment the residual.

- Frozen pretrained multi-scale features (the encoder's stride-4, 8 and 16 maps), each channel standardised on
  OK crops (`fit_normal`).
- Anomaly-aware feature selection (AFS, `select_channels`), once before training: on synthetic defects and their
  clean originals (our engine has both), the channels whose residual |F(defective) - F(clean)| best matches the
  defect mask (mean per-sample correlation) are kept, `keep` of each level's channels.
- One reconstruction network per level, trained (the model's own term, `aux`) to map the selected features of a
  synthetic defective crop back to those of its clean original.
- Reconstruction residual selection (RRS): of the squared residuals of every kept channel, on the stride-4 grid,
  each channel standardised (batch norm without affine parameters, as the reference code), the `rrs` largest by
  global max pooling and the `rrs` largest by global average pooling go, per crop, into a small discriminator
  whose output, upsampled, is the mask; the image logit is the map's maximum. The pooling is global, so a crop's
  map depends on the whole crop: large images are predicted by tiles of the training size, not whole.
RealNet's diffusion anomaly synthesis (SDAS) needs a GPU-sized budget: here the defects are the synthesis
engine's. The features are a frozen network's, never trained on our defects; the reconstruction networks learn
what normal features look like around every pixel (and, through the mask loss, also what our synthetic defects
look like: as in the reference code, gradients are not stopped), so a defect of a kind never drawn still leaves
a residual.

Training needs each sample's clean original: `seg train` draws it on the fly (a `train.synth_dir` folder does not
keep it).

Example:
    >>> m = create_model("realnet", "tu-tf_efficientnet_lite0", weights="none", in_channels=1).eval()
    >>> m(torch.rand(2, 1, 128, 128))["mask"].shape
    torch.Size([2, 1, 128, 128])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.io import InputError

from .features import FeatureExtractor, FrozenFeatures


def select_channels(residual: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """AFS: indices (sorted) of the `k` channels whose residual maps best match the mask.

    residual (N, C, h, w) >= 0, mask (N, 1, h, w) in [0, 1], on the same grid; a channel's match is its residual's
    Pearson correlation with the mask, averaged over the samples that hold a defect."""
    keep = mask.flatten(1).amax(1) > 0
    r, m = residual[keep].flatten(2), mask[keep].flatten(2)
    if len(r) == 0:
        return torch.arange(min(k, residual.shape[1]))
    r = r - r.mean(-1, keepdim=True)
    m = m - m.mean(-1, keepdim=True)
    corr = (r * m).sum(-1) / (r.norm(dim=-1) * m.norm(dim=-1) + 1e-8)
    return corr.mean(0).topk(min(k, residual.shape[1])).indices.sort().values


class Reconstructor(nn.Module):
    """Selected features of one level -> the clean features: a two-scale convolutional network."""

    def __init__(self, c: int, hidden: int):
        super().__init__()

        def block(i, o, stride=1):
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.inp, self.down, self.mid = block(c, hidden), block(hidden, hidden, 2), block(hidden, hidden)
        self.out = nn.Sequential(block(2 * hidden, hidden), nn.Conv2d(hidden, c, 1))

    def forward(self, x):
        a = self.inp(x)
        b = F.interpolate(self.mid(self.down(a)), size=a.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(torch.cat([a, b], 1))


class RealNet(FrozenFeatures):
    wants_raw = True  # the frozen extractor has its own input normalisation
    wants_clean = True  # training: each sample's clean original (the reconstruction target)
    wants_pairs = True  # fit_normal: synthetic defects with their clean originals (AFS)
    fully_convolutional = False  # RRS pools over the whole input: predicted by tiles of the training size

    def __init__(self, backbone: str = "tf_efficientnet_lite0", weights: str = "lite", keep: float = 0.5,
                 rrs: int = 16, hidden: int = 64, image_head: bool = True):
        super().__init__()
        # `lite` weights are loaded by `create_model` into `encoder`, as for every segmenter
        self.extractor = FeatureExtractor(backbone, "none" if weights == "lite" else weights, (1, 2, 3),
                                          keys=("model.encoder", "model.weights"))
        self.encoder = self.extractor
        chans = self.extractor.channels
        self.kept = [max(1, round(c * keep)) for c in chans]
        for level, (c, k) in enumerate(zip(chans, self.kept)):
            self.register_buffer(f"mean{level}", torch.zeros(1, c, 1, 1))
            self.register_buffer(f"std{level}", torch.ones(1, c, 1, 1))
            self.register_buffer(f"select{level}", torch.arange(k))
        self.recon = nn.ModuleList(Reconstructor(k, max(hidden, k)) for k in self.kept)
        self.rrs, self.image_head = min(rrs, sum(self.kept)), image_head
        self.rank_norm = nn.BatchNorm2d(sum(self.kept), affine=False)  # RRS ranks standardised residuals
        self.discriminator = nn.Sequential(
            nn.Conv2d(2 * self.rrs, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden // 2), nn.ReLU(inplace=True),
            nn.Conv2d(hidden // 2, 1, 1))

    @torch.no_grad()
    def standardised(self, raw: torch.Tensor, select: bool = True) -> list[torch.Tensor]:
        """Each level's features, standardised per channel on normal crops; only the AFS channels if `select`."""
        out = []
        for level, f in enumerate(self.extractor(raw)):
            f = (f - getattr(self, f"mean{level}")) / getattr(self, f"std{level}")
            out.append(f.index_select(1, getattr(self, f"select{level}")) if select else f)
        return out

    @torch.no_grad()
    def fit_normal(self, normal: torch.Tensor, held: torch.Tensor, pairs=None, batch_size: int = 32) -> None:
        """Per-channel statistics of the features of `normal` OK crops; then AFS on `pairs` (synthetic defective
        crops, their clean originals, their masks; (N, C, H, W) each), when given. `held` is not used."""
        feats = [self.extractor(normal[k:k + batch_size]) for k in range(0, len(normal), batch_size)]
        for level in range(len(self.kept)):
            f = torch.cat([b[level] for b in feats])
            getattr(self, f"mean{level}").copy_(f.mean((0, 2, 3), keepdim=True))
            std = f.std((0, 2, 3), keepdim=True)
            # a channel (nearly) constant on OK crops must not be blown up into a huge standardised value
            getattr(self, f"std{level}").copy_(std.clamp_min(max(1e-2 * float(std.median()), 1e-6)))
        if pairs is None:
            return
        defective, clean, masks = pairs
        res = [[] for _ in self.kept]
        for k in range(0, len(defective), batch_size):
            a = self.standardised(defective[k:k + batch_size], select=False)
            b = self.standardised(clean[k:k + batch_size], select=False)
            for level, (fa, fb) in enumerate(zip(a, b)):
                res[level].append((fa - fb).abs())
        for level, k in enumerate(self.kept):
            r = torch.cat(res[level])
            m = F.adaptive_avg_pool2d(masks.float(), r.shape[-2:])
            getattr(self, f"select{level}").copy_(select_channels(r, m, k))

    def residuals(self, raw: torch.Tensor, clean: torch.Tensor | None = None):
        """(squared residuals of every kept channel on the stride-4 grid, reconstruction loss or None)."""
        feats = self.standardised(raw)
        targets = self.standardised(clean) if clean is not None else None
        size = feats[0].shape[-2:]
        maps, loss = [], []
        for level, (f, net) in enumerate(zip(feats, self.recon)):
            r = net(f)
            if targets is not None:
                loss.append(F.mse_loss(r, targets[level]))
            maps.append(F.interpolate((r - f) ** 2, size=size, mode="bilinear", align_corners=False))
        return torch.cat(maps, 1), (torch.stack(loss).mean() if loss else None)

    def forward(self, xn: torch.Tensor, raw: torch.Tensor, clean: torch.Tensor | None = None) -> dict:
        """xn: the image normalised for an encoder (unused); raw in [0, 1]; clean: the defect-free originals."""
        if self.training and clean is None:
            raise InputError("model.arch: realnet learns to restore each synthetic defect's clean original, which "
                             "a train.synth_dir folder does not keep: train it on the fly (no train.synth_dir)")
        res, loss = self.residuals(raw, clean if self.training else None)
        # RRS: per crop, the residual maps strongest by global max and by global average, each channel standardised
        n = self.rank_norm
        if self.training:  # batch statistics, and the running ones move
            ranked = n(res)
        else:  # what batch norm computes in eval mode, written out: it exports to ONNX whatever the channel count
            ranked = (res - n.running_mean.view(1, -1, 1, 1)) * torch.rsqrt(n.running_var.view(1, -1, 1, 1) + n.eps)
        top_max = ranked.amax((2, 3)).topk(self.rrs, dim=1).indices
        top_avg = ranked.mean((2, 3)).topk(self.rrs, dim=1).indices
        idx = torch.cat([top_max, top_avg], 1)[:, :, None, None].expand(-1, -1, *res.shape[-2:])
        grid = self.discriminator(torch.log1p(res.gather(1, idx)))
        out = {"mask": F.interpolate(grid, size=raw.shape[-2:], mode="bilinear", align_corners=False),
               "image": grid.flatten(1).amax(1, keepdim=True) if self.image_head else None}
        if loss is not None:
            out["aux"] = loss
        return out
