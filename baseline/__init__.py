"""Unsupervised baselines on the same data and evaluation: PaDiM, PatchCore and an SSIM autoencoder.

Importing this package registers them in the one model registry (`seg.models.ARCHS`) as `padim`, `patchcore` and
`ssim_ae`: each is the network of a `Segmenter`, fitted by `seg train`'s loop (`fit_normal` on OK crops; gradient
steps for the autoencoder alone), saved in the same model file and predicted by the same `Ensemble`. Their maps are
anomaly scores standardised into logits (0 at the normal maps' 99.9th percentile), so TTA, calibration,
post-processing, submission and evaluation serve them unchanged. `baseline fit` is `seg train` with the config's
`baseline` section in place of the segmenter's settings (`baseline.fit.baseline_config`).
"""

from seg.models import ModelArgs, register_arch

from .padim import Padim
from .patchcore import PatchCore
from .ssim_ae import SSIMAutoencoder


def _extractor_weights(a: ModelArgs) -> str:
    return "none" if a.weights == "lite" else a.weights  # `lite`: loaded by create_model into `encoder`


@register_arch("padim")
def _padim(a: ModelArgs) -> Padim:
    return Padim(a.backbone, _extractor_weights(a), a.padim_dims, a.size, a.seed)


@register_arch("patchcore")
def _patchcore(a: ModelArgs) -> PatchCore:
    return PatchCore(a.backbone, _extractor_weights(a), a.coreset_ratio, seed=a.seed, bank_flip=a.bank_flip,
                     zoom=a.zoom)


@register_arch("ssim_ae")
def _ssim_ae(a: ModelArgs) -> SSIMAutoencoder:
    return SSIMAutoencoder(a.in_channels, a.ae_latent, a.ae_width, a.size)


__all__ = ["Padim", "PatchCore", "SSIMAutoencoder"]
