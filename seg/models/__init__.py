"""The one model registry: `create_model(arch, encoder, ...)`, the same arguments for every architecture, the
segmenters here and the unsupervised baselines (`padim`, `patchcore`, `ssim_ae`), which `baseline` registers with
`register_arch` when it is imported (the house's layers point down: `baseline` sits above `seg`).

Every model is wrapped in `Segmenter`, which takes images in [0, 1], normalises them the way its encoder's
weights expect (so a checkpoint alone fixes its preprocessing) and returns a dict:
`{"mask": (B,1,H,W) logits, "image": (B,1) logits or None, "deep": list of (B,1,H,W) logits or None}`, and in
training mode, for a model with a term of its own (`simplenet`, `realnet`, `ssim_ae`), `"aux"`: a scalar loss the
training loss adds. In training, `forward(x, clean)` also takes the defect-free originals of the synthetic samples,
which a reconstruction model (`realnet`) learns to restore and the SSIM autoencoder (`ssim_ae`) learns to reproduce;
every other model ignores them. A model with a normal model (`evidence_unet`, `realnet`, `padim`, `patchcore`) has
`fit_normal`, which `seg train` calls on OK crops before its gradient steps; a model with nothing left to learn by
gradient (`padim`, `patchcore`) gets none. One loop, `seg.train.Trainer`, fits every model.

Example:
    >>> m = create_model("unet3plus", "tu-tf_efficientnet_lite0", weights="none", in_channels=1)
    >>> m(torch.rand(2, 1, 128, 128))["mask"].shape
    torch.Size([2, 1, 128, 128])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import segmentation_models_pytorch as smp
import torch
from torch import nn

from core.io import InputError

from .encoders import LITE_ENCODERS, load_lite_weights
from .evidence import EvidenceUnet
from .realnet import RealNet
from .simplenet import SimpleNet
from .unet3plus.model import UNet3Plus


class Segmenter(nn.Module):
    """Normalisation + architecture + uniform dict output."""

    def __init__(self, net: nn.Module, arch: str, mean: float, std: float):
        super().__init__()
        self.net, self.arch = net, arch  # the registry name, for messages and inspection; nothing branches on it
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    @property
    def fully_convolutional(self) -> bool:
        """Whether any input size (a multiple of 32) gives the same map as tiles do: large images predicted whole.
        True unless the architecture says otherwise (`realnet` pools over the whole input)."""
        return getattr(self.net, "fully_convolutional", True)

    @property
    def wants_clean(self) -> bool:
        """Whether training passes each synthetic sample's clean original (`realnet`'s reconstruction target)."""
        return getattr(self.net, "wants_clean", False)

    @property
    def needs_normal(self) -> bool:
        """Whether the architecture holds a normal model to fit on OK crops before training (`fit_normal`)."""
        return hasattr(self.net, "fit_normal")

    @property
    def trainable(self) -> bool:
        """Whether training has parameters to learn by gradient (PaDiM and PatchCore have none: `fit_normal` is
        all their training)."""
        return any(p.requires_grad for p in self.parameters())

    @property
    def wants_pairs(self) -> bool:
        """Whether `fit_normal` also wants synthetic defects with their clean originals (`realnet`'s AFS)."""
        return getattr(self.net, "wants_pairs", False)

    def fit_normal(self, normal: torch.Tensor, held: torch.Tensor, pairs=None) -> None:
        """Fit the architecture's normal model: `normal` OK crops for it, `held` other OK crops to standardise it
        ((N, C, H, W) in [0, 1]); `pairs`: (synthetic defective crops, their clean originals, their masks), for an
        architecture that `wants_pairs`. A no-op for architectures without a normal model."""
        if self.needs_normal:
            self.net.fit_normal(normal, held, pairs)

    def forward(self, x: torch.Tensor, clean: torch.Tensor | None = None) -> dict:
        xn = (x - self.mean) / self.std
        extra = {"raw": x} if getattr(self.net, "wants_raw", False) else {}
        if clean is not None and self.wants_clean:
            extra["clean"] = clean
        out = self.net(xn, **extra)
        if isinstance(out, dict):  # a net that names its outputs (simplenet, realnet)
            return {"image": None, "deep": None, **out}
        if isinstance(out, tuple) and len(out) == 3:  # (mask, image, deep supervision maps): unet3plus
            mask, image, deep = out
        elif isinstance(out, tuple):
            (mask, image), deep = out, None
        else:
            mask, image, deep = out, None, None
        return {"mask": mask, "image": image, "deep": deep}


@dataclass(frozen=True)
class ModelArgs:
    """The arguments every architecture's builder receives (`create_model`'s, with the hub weights resolved)."""

    encoder: str
    weights: str  # lite | imagenet | none
    hub: object  # what smp's `encoder_weights` takes: None, "imagenet" or True (timm `tu-` encoders)
    in_channels: int
    decoder_channels: tuple[int, ...]
    image_head: bool
    deep_supervision: bool
    cgm: bool
    coreset_ratio: float
    size: int = 128  # the crop size (synth.size): fixed-input models (padim, ssim_ae) are built for it
    padim_dims: int = 100  # padim: feature channels kept
    ae_latent: int = 100  # ssim_ae: bottleneck width and channel width
    ae_width: int = 16
    seed: int = 0  # random choices inside a model (padim's channels, a coreset's start)
    bank_flip: bool = True  # patchcore, evidence_unet: the normal bank also holds the OK crops' mirror images
    zoom: float = 1.0  # patchcore: each crop resized by this factor before the backbone

    @property
    def backbone(self) -> str:
        """The timm name of the encoder, for the methods on frozen features (`tu-` prefix removed)."""
        return self.encoder[3:] if self.encoder.startswith("tu-") else self.encoder


def _unet(a: ModelArgs) -> nn.Module:
    aux = dict(classes=1, pooling="max", dropout=0.2) if a.image_head else None
    return smp.Unet(a.encoder, encoder_weights=a.hub, in_channels=a.in_channels, classes=1,
                    decoder_channels=a.decoder_channels, aux_params=aux)


def _unet3plus(a: ModelArgs) -> nn.Module:
    return UNet3Plus(a.encoder, encoder_weights=a.hub, in_channels=a.in_channels,
                     cat_channels=max(8, a.decoder_channels[0] // 4), deep_supervision=a.deep_supervision,
                     cgm=a.cgm, image_head=a.image_head)


def _evidence_unet(a: ModelArgs) -> nn.Module:
    return EvidenceUnet(a.encoder, a.hub, a.in_channels, a.decoder_channels, a.image_head, a.weights,
                        a.coreset_ratio, a.bank_flip)


def _simplenet(a: ModelArgs) -> nn.Module:
    return SimpleNet(a.backbone, a.weights, hidden=2 * a.decoder_channels[0], image_head=a.image_head)


def _realnet(a: ModelArgs) -> nn.Module:
    return RealNet(a.backbone, a.weights, hidden=max(16, a.decoder_channels[0] // 2), image_head=a.image_head)


# The registry: one builder per architecture. What a model needs from training (a normal model fitted first,
# clean originals, synthetic pairs, gradient steps at all) it declares on itself (see `Segmenter`), so nothing
# else names an arch.
ARCHS: dict[str, Callable[[ModelArgs], nn.Module]] = {
    "unet": _unet, "unet3plus": _unet3plus, "evidence_unet": _evidence_unet, "simplenet": _simplenet,
    "realnet": _realnet,
}
REGISTERED_ELSEWHERE = {"padim": "baseline", "patchcore": "baseline", "ssim_ae": "baseline"}


def register_arch(name: str):
    """Decorator: add a builder `(ModelArgs) -> nn.Module` to the registry under `name` (timm's register_model).
    The module gets what every architecture gets: `Segmenter`'s normalisation, the training loop, calibration,
    TTA, the ensemble, export and the model file."""

    def add(builder: Callable[[ModelArgs], nn.Module]):
        ARCHS[name] = builder
        return builder

    return add


def create_model(arch: str = "unet", encoder: str = "tu-tf_efficientnet_lite0", weights: str = "none",
                 in_channels: int = 1, decoder_channels: Sequence[int] = (128, 64, 32, 16, 8),
                 image_head: bool = True, deep_supervision: bool = True, cgm: bool = True,
                 coreset_ratio: float = 0.1, size: int = 128, padim_dims: int = 100, ae_latent: int = 100,
                 ae_width: int = 16, seed: int = 0, bank_flip: bool = True, zoom: float = 1.0) -> Segmenter:
    """Build a segmenter.

    arch: `unet` (smp Unet), `unet3plus` (UNet 3+, per-scale width `decoder_channels[0] // 4`; deep supervision
    and `cgm` apply to it alone) or `evidence_unet` (smp Unet on the image plus a normal model's evidence, see
    `seg.models.evidence`; `coreset_ratio`, `bank_flip` for its bank; call `fit_normal` on OK crops before
    training) or `simplenet` (a discriminator on the
    frozen stride-8/16 features of `encoder`, see `seg.models.simplenet`; `decoder_channels[0] * 2` hidden units)
    or `realnet` (feature reconstruction and residual segmentation on the frozen stride-4/8/16 features of `encoder`,
    see `seg.models.realnet`; `decoder_channels[0] // 2` hidden units; `fit_normal` before training), or a baseline
    registered by `baseline`: `padim` (`padim_dims` channels; `size` crops only), `patchcore` (`coreset_ratio`,
    `bank_flip`: the bank holds the OK crops' mirror images too; `zoom`: crops resized by it before the backbone) on
    the frozen features of `encoder`, `ssim_ae` (`ae_latent`, `ae_width`; `size` crops only; trained from scratch,
    `encoder` and `weights` unused).
    weights: `lite` (offline ImageNet weights for `tu-tf_efficientnet_lite0..4`), `imagenet` (smp/timm hub
    weights, needs internet), or `none`.
    """
    if arch not in ARCHS:
        home = REGISTERED_ELSEWHERE.get(arch)
        if home:
            raise InputError(f"model.arch: {arch!r} is registered by `import {home}`, which has not run")
        raise InputError(f"model.arch: unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    if weights not in ("lite", "imagenet", "none"):
        raise InputError(f"model.weights: expected lite, imagenet or none, got {weights!r}")
    if weights == "lite" and encoder not in LITE_ENCODERS:
        raise InputError(f"model.weights: 'lite' weights exist for {', '.join(LITE_ENCODERS)} only, not {encoder!r}")
    if zoom < 1:  # as the config check says it, not as a failed encoder (the Python API skips that check)
        raise InputError(f"model.zoom: expected at least 1, got {zoom!r}")
    hub = None
    if weights == "imagenet":
        hub = True if encoder.startswith("tu-") else "imagenet"
    args = ModelArgs(encoder, weights, hub, in_channels, tuple(decoder_channels), image_head, deep_supervision,
                     cgm, coreset_ratio, size, padim_dims, ae_latent, ae_width, seed, bank_flip, zoom)
    try:
        net = ARCHS[arch](args)
    except (KeyError, ValueError) as e:
        raise InputError(f"model.encoder: cannot build {encoder!r} ({e})") from None
    if weights == "lite" and getattr(net, "pretrained_encoder", True):  # ssim_ae learns every weight itself
        load_lite_weights(net.encoder.model, LITE_ENCODERS[encoder])
    return Segmenter(net, arch, *_norm(encoder, weights))


def _norm(encoder: str, weights: str) -> tuple[float, float]:
    """lite and tf_ weights expect mean = std = 0.5; other ImageNet weights their usual values (grey: the mean)."""
    return (0.5, 0.5) if encoder.startswith("tu-tf_") or weights == "none" else (0.449, 0.226)


def model_from_config(model_cfg: dict, size: int = 128, seed: int = 0) -> Segmenter:
    """The model of a config's `model` section, for crops of `size` px (synth.size); `seed`: train.seed."""
    m = model_cfg
    return create_model(m["arch"], m["encoder"], m["weights"], m["in_channels"], m["decoder_channels"],
                        m["image_head"], m["deep_supervision"], m["cgm"], m.get("coreset_ratio", 0.1), size,
                        m.get("padim_dims", 100), m.get("ae_latent", 100), m.get("ae_width", 16), seed,
                        m.get("bank_flip", False),  # a file older than the key was fitted without
                        m.get("zoom", 1.0))
