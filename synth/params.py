"""Small schema helpers: ranges validated once at construction, draws from a caller-owned generator."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def check_range(name: str, value: Sequence[float], lo: float, hi: float) -> tuple[float, float]:
    """Validate `(min, max)` with lo <= min <= max <= hi; the error names the parameter."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a pair (min, max), got {value!r}") from None
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name}: expected {lo} <= min <= max <= {hi}, got ({a}, {b})")
    return a, b


def check_weights(name: str, weights: dict[str, float], known: Sequence[str]) -> dict[str, float]:
    """Validate a name -> non-negative weight mapping against the known names; at least one weight > 0."""
    if not isinstance(weights, dict):
        raise ValueError(f"{name}: expected a mapping of name to weight, got {weights!r}")
    for k, v in weights.items():
        if k not in known:
            raise ValueError(f"{name}: unknown entry {k!r} (known: {', '.join(known)})")
        if not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"{name}.{k}: weight must be a number >= 0, got {v!r}")
    if not any(v > 0 for v in weights.values()):
        raise ValueError(f"{name}: at least one weight must be > 0")
    return {k: float(v) for k, v in weights.items()}


def uniform(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(r[0], r[1]))


def extent(rng: np.random.Generator, r: tuple[float, float]) -> float:
    """A size (a radius, a length, a width, a window) drawn log-uniformly from `r`: every scale in the range is as
    likely as any other, so a range that spans hair-lines to bands is not dominated by its large end (one draw of
    `rng.uniform`, as `uniform`). A range that starts at 0 is drawn uniformly."""
    if r[0] <= 0:
        return uniform(rng, r)
    return float(math.exp(rng.uniform(math.log(r[0]), math.log(r[1]))))


class Sized:
    """What draws sizes (a radius, a length, a width, a window) within a range: uniformly, or log-uniformly when
    `log_sizes` is set (the engine sets it from `synth.sizes`)."""

    log_sizes = False

    def size_in(self, rng: np.random.Generator, r: tuple[float, float]) -> float:
        return extent(rng, r) if self.log_sizes else uniform(rng, r)


def integer(rng: np.random.Generator, r: tuple[float, float]) -> int:
    return int(rng.integers(int(r[0]), int(r[1]) + 1))


def choose(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = sorted(k for k, v in weights.items() if v > 0)
    p = np.array([weights[k] for k in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def sub_seed(rng: np.random.Generator) -> int:
    """A recorded integer seed for parameters that are whole noise fields (replayed from the seed alone)."""
    return int(rng.integers(0, 2**31 - 1))


def rounded(x, nd: int = 3):
    """Round floats (also inside lists) so manifests stay small and replay reads back the exact values used."""
    if isinstance(x, (list, tuple)):
        return [rounded(v, nd) for v in x]
    if isinstance(x, np.ndarray):
        return rounded(x.tolist(), nd)
    if isinstance(x, (float, np.floating)):
        return round(float(x), nd)
    return x
