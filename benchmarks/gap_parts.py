"""The realism gap (`synth gap`) of several synthesis settings on several development parts, in one table.

    python benchmarks/gap_parts.py [--sets magnetic-tile:1,aitex:1,...] [--n 800] [--out runs/gap]

Per part and per variant: `synth generate` of --n samples from the part's OK images (the default 20 % held out,
as training does), then the KID of their defect-centred patches against every real defect of the part's test
crops (`seg.gap.gap_report`). Variants:

- `legacy`: the synthesis of toolkit 0.4.0 (painted families only, a fixed 6-grey-level visibility floor);
- `default`: today's `SynthConfig()` (with the texture-relative families of `synth/texture.py`).

The ratio synthetic / normal compares parts (below 1: closer to the real defects than defect-free patches are).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import DEV_SETS, parse_sets  # noqa: E402
from core.io import atomic_write_bytes, competition_dir  # noqa: E402
from seg.gap import gap_report  # noqa: E402
from synth.engine import SynthConfig  # noqa: E402
from synth.generate import generate  # noqa: E402

LEGACY = {"families": {"bezier_blob": 1.0, "bezier_stroke": 1.0, "gaussian": 0.7, "perlin": 0.5, "cut_paste": 0.3,
                       "displacement": 0.3}, "min_contrast": 6.0, "min_visibility": 0.0}
VARIANTS = {"legacy": LEGACY, "default": {}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=DEV_SETS)
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parent.parent.parent / "shared/data"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/gap")
    a = ap.parse_args(argv)
    out = Path(a.out)
    rows = {}
    for label, data, part in parse_sets(a.sets, None, 1, a.data_root):
        real = competition_dir(data, part, "TC_Images")
        for variant in a.variants.split(","):
            folder = out / label / variant
            cfg = SynthConfig.from_dict(VARIANTS[variant])
            shutil.rmtree(folder, ignore_errors=True)  # scratch: always today's code
            generate(competition_dir(data, part, "OK_Images"), folder, a.n, cfg, workers=a.workers, holdout=0.2)
            r = gap_report(folder, real)
            r.pop("picture")
            rows.setdefault(label, {})[variant] = r
            fams = sorted(r["families"].items(), key=lambda kv: kv[1]["kid"])
            print(f"{label} {variant}: KID {r['kid_synthetic']:.1f} normal {r.get('kid_normal', float('nan')):.1f} "
                  f"ratio {r.get('relative_to_normal', float('nan')):.2f}; closest {fams[0][0]}, "
                  f"farthest {fams[-1][0]}", flush=True)
    lines = [f"Realism gap, {datetime.date.today().isoformat()}, {a.n} samples per part and variant", "",
             "| part | real patches | " + " | ".join(f"{v} KID | {v} / normal" for v in a.variants.split(",")) +
             " | closest family (default) |", "|" + "---|" * (3 + 2 * len(a.variants.split(",")))]
    for label, by in rows.items():
        cells = []
        for v in a.variants.split(","):
            cells += [f"{by[v]['kid_synthetic']:.1f}", f"{by[v].get('relative_to_normal', float('nan')):.2f}"]
        last = by[a.variants.split(",")[-1]]
        fam = min(last["families"].items(), key=lambda kv: kv[1]["kid"]) if last["families"] else ("-", {"kid": 0})
        lines.append(f"| {label} | {last['real_patches']} | " + " | ".join(cells) +
                     f" | {fam[0]} {fam[1]['kid']:.1f} |")
    md = "\n".join(lines) + "\n"
    atomic_write_bytes(out / "gap_parts.md", md.encode())
    atomic_write_bytes(out / "gap_parts.json", json.dumps(rows, indent=1).encode())
    print(md)
    return rows


if __name__ == "__main__":
    main()
