"""Synthesis throughput: samples per second written by `synth generate` at 128 px, with 1 and 2 workers.

    python benchmarks/synth_speed.py [--data ../shared/data/magnetic-tile] [--n 3000]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synth.engine import SynthConfig  # noqa: E402
from synth.generate import generate  # noqa: E402
from core.io import competition_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="data/sample")
    ap.add_argument("--part", type=int, default=1)
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    src = competition_dir(args.data, args.part, "OK_Images")
    print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores; "
          f"source: {src}")
    print("| workers | samples | seconds | samples/s |\n|---|---|---|---|")
    for workers in (1, 2):
        out = Path(tempfile.mkdtemp())
        try:
            s = generate(src, out / "g", args.n, SynthConfig(), seed=0, workers=workers)
        finally:
            shutil.rmtree(out)
        print(f"| {workers} | {s['written']} | {s['seconds']:.2f} | {s['rate']:.0f} |")


if __name__ == "__main__":
    main()
