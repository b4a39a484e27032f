"""Run by tests/test_robust.py: a parent whose OpenCV thread pool is busy in another thread starts the
`synth generate` workers many times. With a bare fork this can leave a child waiting forever on a lock held at
the fork; the test runs it under a time limit. `--fork` forces the old start method (to show the hazard)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import core.workers  # noqa: E402
from synth.engine import SynthConfig  # noqa: E402
from synth.generate import generate  # noqa: E402


def busy(stop: threading.Event) -> None:
    big = np.random.default_rng(0).integers(0, 255, (1500, 1500), dtype=np.uint8)
    while not stop.is_set():
        cv2.GaussianBlur(big, (31, 31), 5)
        cv2.resize(big, (3000, 3000))


def main(ok_dir: str, out: str, rounds: int, fork: bool) -> None:
    if fork:
        core.workers.start_method = lambda: "fork"
    cv2.setNumThreads(4)
    stop = threading.Event()
    threads = [threading.Thread(target=busy, args=(stop,)) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for r in range(rounds):
            generate(ok_dir, Path(out) / f"r{r}", 8, SynthConfig(size=64), seed=r, workers=2)
            print(f"round {r} done", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), "--fork" in sys.argv)
