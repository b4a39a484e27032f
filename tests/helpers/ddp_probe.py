"""Run under torchrun by tests/test_seg.py: train a tiny model with DDP and record, per rank, what it drew and
what it ended with (rank{R}.json in the output folder)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from seg.config import load_config  # noqa: E402
from seg.train import Trainer  # noqa: E402


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def main(out: str, overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    cfg["train"]["out"] = out
    trainer = Trainer(cfg, log=lambda m: None)
    drawn = []
    for epoch in range(cfg["train"]["epochs"]):
        trainer.dataset.set_epoch(epoch, trainer.curriculum.ceiling(epoch))
        drawn.append([])
        for step, batch in enumerate(trainer.loader(epoch)):
            if step >= cfg["train"]["steps_per_epoch"]:
                break
            drawn[-1] += [digest(x) for x in batch["image"]]
    trainer.fit()
    # parameters (BatchNorm running statistics are each rank's own between DDP's buffer broadcasts)
    weights = hashlib.sha1(b"".join(v.detach().cpu().contiguous().numpy().tobytes()
                                    for v in trainer.model.parameters())).hexdigest()
    (Path(out) / f"rank{trainer.rank}.json").write_text(json.dumps({"drawn": drawn, "weights": weights}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
