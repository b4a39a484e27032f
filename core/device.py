"""Where a model runs, and in which memory layout.

Every model goes onto its device through `place`, in training (`seg train`) and in prediction (`Ensemble`, which
`ensemble calibrate`, `predict` and `bench` use): its 4-D weights in the channels-last layout, which oneDNN's CPU
convolutions run faster than the default one (on CUDA, PyTorch's documentation recommends it under AMP; not
measured here). Measured on the dev machine's 2 cores
(2026-11-22, 32 crops of 128 px): the evidence UNet's forward pass 845 -> 565 ms, a training step of 16 crops
680 -> 495 ms; the maps move by about 1e-5 (other kernels, other rounding). The layout is not stored: a model file
holds plain tensors, and `place` sets it again on loading.

For prediction, a loaded model's BatchNorms are also folded into the convolutions before them (`fold_batchnorm`,
which `ensemble.models.Ensemble.from_checkpoints` applies to every file it loads): the layers then skip a pass over
each feature map. Measured on the dev machine (2026-12-08, magnetic-tile's 392 crops, `ensemble predict`): the
evidence UNet alone without TTA 46.9 - 47.7 -> 56.4 - 64.2 crops/s; the maps move by about 1e-5. Training and the
model files keep their BatchNorms.
"""

from __future__ import annotations

import copy

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


def _without_norm(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What replaces a BatchNorm folded into its convolution: nothing (`nn.Identity`), or the activation a
    norm-act layer applies after it (timm's `BatchNormAct2d`: drop, then act); None for a kind not known here."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "drop") and hasattr(bn, "act"):
        return nn.Sequential(bn.drop, bn.act)
    return None


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor, rtol: float = 1e-3) -> tuple[nn.Module, int]:
    """For inference: each eval-mode BatchNorm that reads a convolution's output straight away folded into that
    convolution's weights and bias, so the network skips a pass over every feature map (the EfficientNet encoders
    and the UNet decoder have one after nearly every convolution). Found by one forward pass on `example`
    (B,C,T,T), which the model takes as `model(example)`: a BatchNorm whose input is the output of a convolution
    called once. Folded on a copy, then checked on `example`: the copy (and the number of BatchNorms folded) when
    every output is within `rtol` x (1 + its largest magnitude) of the model's, else the model itself, unchanged
    (e.g. a convolution whose output also feeds something else, or one that standardises its own weights). The
    maps move by float rounding only."""
    calls: dict[int, int] = {}
    order = []  # (module, its input, its output): held, so no tensor's memory is reused during the pass

    def hook(mod, inp, out):
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        order.append((mod, inp[0], out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    try:
        before = model(example)
    finally:
        for h in handles:
            h.remove()
    made_by = {}  # id of a convolution's output -> the convolution
    pairs = []
    for mod, src, dst in order:
        if isinstance(mod, nn.Conv2d) and calls[id(mod)] == 1:
            made_by[id(dst)] = mod
        elif (isinstance(mod, nn.BatchNorm2d) and id(src) in made_by and calls[id(mod)] == 1 and not mod.training
              and mod.running_mean is not None and _without_norm(mod) is not None):
            pairs.append((made_by[id(src)], mod))
    order.clear()
    if not pairs:
        return model, 0
    names = {id(m): n for n, m in model.named_modules()}
    twin = copy.deepcopy(model)
    for conv, bn in pairs:
        conv_t, bn_name = twin.get_submodule(names[id(conv)]), names[id(bn)]
        bn_t = twin.get_submodule(bn_name)
        scale = (bn_t.weight if bn_t.affine else 1.0) / torch.sqrt(bn_t.running_var + bn_t.eps)
        shift = (bn_t.bias if bn_t.affine else 0.0) - bn_t.running_mean * scale
        bias = conv_t.bias if conv_t.bias is not None else torch.zeros_like(shift)
        conv_t.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv_t.weight.dtype))
        conv_t.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
        parent, _, leaf = bn_name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, leaf, _without_norm(bn_t))
    after = twin(example)
    for a, b in zip(_tensors(before), _tensors(after)):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=0, atol=rtol * (1 + float(a.abs().max()))):
            return model, 0
    return twin, len(pairs)


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or a dict / tuple of them, None entries skipped), in order."""
    if torch.is_tensor(out):
        return [out.float()]
    items = out.values() if isinstance(out, dict) else out
    return [t.float() for t in items if torch.is_tensor(t)]
