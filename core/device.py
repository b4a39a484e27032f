"""Where a model runs, and in which memory layout.

Every model goes onto its device through `place`, in training (`seg train`) and in prediction (`Ensemble`, which
`ensemble calibrate`, `predict` and `bench` use): its 4-D weights in the channels-last layout, which oneDNN's CPU
convolutions run faster than the default one (on CUDA, PyTorch's documentation recommends it under AMP; not
measured here). Measured on the dev machine's 2 cores
(2026-11-22, 32 crops of 128 px): the evidence UNet's forward pass 845 -> 565 ms, a training step of 16 crops
680 -> 495 ms; the maps move by about 1e-5 (other kernels, other rounding). The layout is not stored: a model file
holds plain tensors, and `place` sets it again on loading.
"""

from __future__ import annotations

import torch
from torch import nn

from .io import InputError


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when available, else CPU) or a torch device name; a CUDA name without CUDA fails clearly."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"train.device: {name!r} asked for, but no CUDA device is available")
    return torch.device(name)


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device` with its convolution weights channels-last (in place, as `Module.to`; returned)."""
    return model.to(device, memory_format=torch.channels_last)
