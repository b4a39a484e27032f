"""PatchCore (Roth et al., 2022): locally aware patch features (3x3 neighbourhood averaging of mid-level
layers), a greedy coreset of the memory bank, nearest-neighbour distance as the anomaly score and the paper's
re-weighting for the image score. Nearest neighbours are found with batched `torch.cdist` (memory-bounded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import MemoryModel, gaussian_blur
from seg.models.features import FeatureExtractor, FrozenFeatures, greedy_coreset, local_patch_features, nearest


class PatchCore(FrozenFeatures, MemoryModel):
    sized_buffers = ("bank",)  # its size: what fitting chose

    def __init__(self, backbone: str = "tf_efficientnet_lite0", weights: str = "lite", coreset_ratio: float = 0.05,
                 bank_size: int = 1, neighbours: int = 3, seed: int = 0, sigma: float = 4.0, bank_flip: bool = True,
                 zoom: float = 1.0):
        """weights: the extractor's (built by the registry, `lite` weights are loaded by `create_model` into
        `encoder`, as for every registered model, and this is `none`). bank_flip: fit the bank on the OK crops and
        their mirror images (left-right), the view that flip TTA shows it. zoom: each crop resized (bilinear) by
        this factor before the backbone, so a patch spans 1/zoom of the crop's pixels it spans at 1 (a 128 px crop at 2
        is 256 px, the input size of the paper's backbones): finer maps for thin and small defects, about
        zoom**2 the features to fit and search (pair it with coreset_ratio / zoom**2 for a bank of the same size).
        The map is smoothed by sigma / zoom at the crop's size and always comes back at the crop's size."""
        super().__init__()
        self.extractor = FeatureExtractor(backbone, weights, (2, 3), keys=("model.encoder", "model.weights"))
        self.encoder = self.extractor
        dim = sum(self.extractor.channels)
        self.coreset_ratio, self.neighbours, self.seed, self.sigma = coreset_ratio, neighbours, seed, sigma
        self.bank_flip, self.zoom = bank_flip, float(zoom)
        if not self.zoom >= 1:
            raise ValueError(f"zoom must be at least 1, got {zoom!r}")
        self.register_buffer("bank", torch.zeros(bank_size, dim))
        self.register_buffer("image_center", torch.tensor(0.0))
        self.register_buffer("image_scale", torch.tensor(1.0))
        self.radius = float("nan")  # the coreset's covering radius, after `fit`

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D, h, w) locally aware patch features at the stride of the first layer (of the crop
        resized by `zoom`)."""
        if self.zoom != 1:
            x = F.interpolate(x, scale_factor=self.zoom, mode="bilinear", align_corners=False)
        return local_patch_features(self.extractor(x))

    @torch.no_grad()
    def fit(self, crops: torch.Tensor, batch_size: int = 32) -> None:
        if self.bank_flip:
            crops = torch.cat([crops, crops.flip(-1)])
        emb = torch.cat([self.embed(crops[k:k + batch_size]) for k in range(0, len(crops), batch_size)])
        bank = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        idx, self.radius = greedy_coreset(bank, int(len(bank) * self.coreset_ratio), self.seed)
        self.bank = bank[idx].clone()

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch-score maps (B,1,H,W) at input size, re-weighted image scores (B,))."""
        emb = self.embed(x)
        b, d, h, w = emb.shape
        q = emb.permute(0, 2, 3, 1).reshape(-1, d)
        dist, ix = nearest(q, self.bank, 1)
        patch = dist[:, 0].view(b, h * w)
        worst = patch.argmax(1)
        s_star = patch.gather(1, worst[:, None])[:, 0]
        m_test = q.view(b, h * w, d)[torch.arange(b), worst]
        m_star = ix[:, 0].view(b, h * w)[torch.arange(b), worst]
        _, nb = nearest(self.bank[m_star], self.bank, min(self.neighbours + 1, len(self.bank)))
        d_nb = torch.linalg.norm(self.bank[nb] - m_test[:, None], dim=-1)  # m* itself is its own nearest
        weight = 1 - torch.softmax(d_nb, 1)[:, 0]
        maps = F.interpolate(patch.view(b, 1, h, w), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return gaussian_blur(maps, self.sigma / self.zoom), weight * s_star

    fully_convolutional = True  # nearest-patch distances: any input size

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(x)[0]

    @torch.no_grad()
    def standardise(self, normal: torch.Tensor, batch_size: int = 32) -> None:
        super().standardise(normal, batch_size)
        img = torch.cat([self.scores(normal[k:k + batch_size])[1] for k in range(0, len(normal), batch_size)])
        self.image_center.fill_(float(torch.quantile(img, 0.99)))
        self.image_scale.fill_(float(img.std()) or 1.0)

    def forward(self, xn: torch.Tensor, raw: torch.Tensor, clean: torch.Tensor | None = None) -> dict:
        maps, image = self.scores(raw)
        return {"mask": (maps - self.center) / self.scale,
                "image": ((image - self.image_center) / self.image_scale)[:, None]}
