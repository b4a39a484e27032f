"""Every random stream of the toolkit, each with its own tag.

A stream is `np.random.default_rng([TAG, *keys])`. numpy pads a short seed list with zeros, so untagged lists
such as `[seed, i]` and `[seed, epoch, rank, i]` can name the same stream (`synth generate --seed 12345` used to
reproduce the validation set). With a distinct first entry per purpose no two purposes ever share a stream,
whatever seeds the user picks.
"""

from __future__ import annotations

import numpy as np

TRAIN = 0x7A1A  # on-the-fly training samples: [TRAIN, seed, epoch, rank, i]
VALIDATION = 0x7A11D  # the synthetic validation set of `seg train`: [VALIDATION, val_seed, i]
GENERATE = 0x6E4E  # `synth generate` sample i: [GENERATE, seed, i]
SPLIT = 0x5EED0C  # the held-out split of the OK images: [SPLIT, holdout_seed]
NORMAL = 0x0C0C  # OK crops a normal model (evidence UNet) is fitted on: [NORMAL, seed, k]; k = 2: the synthetic
# pairs a model selects its features on (realnet's AFS): [NORMAL, seed, 2, i]
CALIBRATION = 0xCA11B  # calibration's normal crops and synthetic defects: [CALIBRATION, seed, k, ...]
BENCH = 0xBE7C  # synthetic test sets of the benchmarks, on held-out OK images: [BENCH, seed, k]
PROBE = 0x960BE  # `ensemble probe`: its OK crops [PROBE, seed, 0], probe places [PROBE, seed, 1, kind, size]

TAGS = {"train": TRAIN, "validation": VALIDATION, "generate": GENERATE, "split": SPLIT, "normal": NORMAL,
        "calibration": CALIBRATION, "bench": BENCH, "probe": PROBE}
assert len(set(TAGS.values())) == len(TAGS)


def stream(tag: int, *keys: int) -> np.random.Generator:
    """The generator of one tagged stream."""
    return np.random.default_rng([tag, *(int(k) for k in keys)])
