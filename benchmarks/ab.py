"""Config overrides compared over parts and seeds, paired: the decision tool when the seed-to-seed spread is as
large as the change measured (it is, on the five development parts: README, "Three changes against four seeds").

    python benchmarks/ab.py --arm base --arm "big:model.normal_crops=256;model.coreset_ratio=0.05" \\
        --seeds 0,1,2,3 --sets aitex:1,aitex:2,aitex:3 --jobs 12 --out runs/ab

Every (part, seed, arm) is one `benchmarks/run.py --sets PART -s train.seed=SEED -s KEY=VALUE ...` of its own, in
`--out/<part>_<arm>_s<seed>/`, `--jobs` at a time, each process with `--threads` CPU threads (one job per core or
two on a CPU machine; a dozen on a 16-core GPU machine, where one job takes about 6.5 minutes). A run whose
results.json is there is kept: the same command again resumes (an interrupted run continues with `--reuse`).
`--deadline` (seconds) stops the jobs still running at that time, for a machine lent for a fixed time;
`--summary-only` starts nothing and summarises what is there (runs made elsewhere, copied into --out).

Then `ab.md` and `ab.json` in --out: per method, each arm's mean over the (part, seed) pairs that the first arm
has too, the first arm's mean over the same pairs, and on how many pairs the arm is above / below it, for score,
pixel AP, pixel AUROC and calibration loss; and each arm's mean per part.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import DEV_SETS  # noqa: E402
from core.io import InputError, atomic_write_bytes, write_json  # noqa: E402
from seg.config import load_config  # noqa: E402

KEYS = (("score", "score"), ("pixel_ap", "pixel AP"), ("pixel_auroc", "pixel AUROC"),
        ("calibration_loss", "calib. loss"))


def parse_arm(text: str) -> tuple[str, list[str]]:
    """'name' or 'name:key=value;key=value' -> (name, overrides)."""
    name, _, rest = text.partition(":")
    overrides = [o.strip() for o in rest.split(";") if o.strip()]
    if not name.isidentifier():
        raise SystemExit(f"--arm: expected name[:key=value;...] with a plain name, got {text!r}")
    return name, overrides  # the overrides are checked by seg.config.load_config, as every override is


def _stop(p: subprocess.Popen) -> None:
    """Kill a run and every step it started (its own process group)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def job_folder(out: Path, part: str, arm: str, seed: int) -> Path:
    return out / f"{part.replace(':', '-')}_{arm}_s{seed}"


def collect(out: Path, parts: list[str], arms: list[str], seeds: list[int]) -> dict:
    """{arm: {method: {(part, seed): metrics}}} from the finished runs' results.json."""
    table: dict = {arm: {} for arm in arms}
    for arm in arms:
        for part in parts:
            for seed in seeds:
                f = job_folder(out, part, arm, seed) / "results.json"
                if not f.exists():
                    continue
                for res in json.loads(f.read_text())["results"].values():
                    for method, m in res.items():
                        table[arm].setdefault(method, {})[(part, seed)] = m
    return table


def summarise(table: dict, arms: list[str]) -> dict:
    """Per method and arm: means over the pairs the first arm has too, the first arm's over the same, above/below."""
    first = arms[0]
    summary: dict = {}
    for method in dict.fromkeys(m for arm in arms for m in table[arm]):
        ref = table[first].get(method, {})
        for arm in arms:
            runs = table[arm].get(method, {})
            pairs = sorted(k for k in runs if k in ref)
            if not pairs:
                continue
            row = {"pairs": len(pairs)}
            for key, _ in KEYS:
                a = np.array([runs[k].get(key, np.nan) for k in pairs], float)
                b = np.array([ref[k].get(key, np.nan) for k in pairs], float)
                row[key] = float(np.nanmean(a))
                row[f"{key}_first"] = float(np.nanmean(b))
                row[f"{key}_above"], row[f"{key}_below"] = int((a > b).sum()), int((a < b).sum())
            row["per_part"] = {}
            for part in dict.fromkeys(p for p, _ in pairs):
                ks = [k for k in pairs if k[0] == part]
                row["per_part"][part] = {key: float(np.nanmean([runs[k].get(key, np.nan) for k in ks]))
                                         for key, _ in KEYS} | {"seeds": len(ks)}
            summary.setdefault(method, {})[arm] = row
    return summary


def markdown(summary: dict, arms: list[str]) -> str:
    lines = [f"Arms against `{arms[0]}`, paired by (part, seed). Each cell: the arm's mean / `{arms[0]}`'s mean on "
             "the same pairs (pairs above / below it).", ""]
    for method, rows in summary.items():
        lines += [f"**{method}**", "", "| arm | pairs | " + " | ".join(c for _, c in KEYS) + " |",
                  "|" + "---|" * (len(KEYS) + 2)]
        for arm, row in rows.items():
            cells = [f"{row[k]:.3f} / {row[k + '_first']:.3f} ({row[k + '_above']} / {row[k + '_below']})"
                     for k, _ in KEYS]
            lines.append(f"| {arm} | {row['pairs']} | " + " | ".join(cells) + " |")
        parts = list(dict.fromkeys(p for row in rows.values() for p in row["per_part"]))
        lines += ["", "| part | " + " | ".join(f"{arm}: score / pixel AP / pixel AUROC" for arm in rows) + " |",
                  "|" + "---|" * (len(rows) + 1)]
        for part in parts:
            cells = []
            for row in rows.values():
                pp = row["per_part"].get(part)
                cells.append("-" if pp is None else f"{pp['score']:.3f} / {pp['pixel_ap']:.3f} / "
                             f"{pp['pixel_auroc']:.3f} ({pp['seeds']} seeds)")
            lines.append(f"| {part} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", action="append", required=True,
                    help="name[:key=value;key=value] (repeatable; the first is the reference)")
    ap.add_argument("--seeds", default="0,1", help="train.seed values, comma-separated")
    ap.add_argument("--sets", default=DEV_SETS, help="as benchmarks/run.py")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/data"))
    ap.add_argument("--methods", default="evidence,patchcore,hybrid_evidence", help="as benchmarks/run.py")
    ap.add_argument("--hybrid-tta", default="flip", help="as benchmarks/run.py (every arm alike)")
    ap.add_argument("--out", default="runs/ab")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    ap.add_argument("--deadline", type=float, default=None, help="seconds after which running jobs are stopped")
    ap.add_argument("--summary-only", action="store_true", help="start no run: summarise the finished ones")
    a = ap.parse_args(argv)
    arms = [parse_arm(t) for t in a.arm]
    names = [n for n, _ in arms]
    if len(set(names)) != len(names):
        raise SystemExit(f"--arm: names must differ, got {', '.join(names)}")
    for name, ov in arms:
        try:
            load_config(None, ov)  # a misspelt key or a bad value: one line naming it, before any run
        except InputError as e:
            raise SystemExit(f"error: --arm {name}: {e}") from None
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds: expected comma-separated integers, got {a.seeds!r}") from None
    parts = [p.strip() for p in a.sets.split(",")]
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), PYTHONUNBUFFERED="1")
    jobs = [(part, name, ov, seed) for seed in seeds for part in parts for name, ov in arms
            if not a.summary_only and not (job_folder(out, part, name, seed) / "results.json").exists()]

    running: set[subprocess.Popen] = set()

    def run(job) -> str:
        part, name, ov, seed = job
        folder = job_folder(out, part, name, seed)
        left = None if a.deadline is None else a.deadline - (time.monotonic() - start)
        if left is not None and left <= 0:
            return f"{folder.name}: not started (deadline)"
        cmd = [sys.executable, str(ROOT / "benchmarks/run.py"), "--sets", part, "--data-root", a.data_root,
               "--methods", a.methods, "--hybrid-tta", a.hybrid_tta, "--out", str(folder), "-s", f"train.seed={seed}"]
        cmd += [x for o in ov for x in ("-s", o)] + (["--reuse"] if folder.exists() else [])
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "ab.log", "w") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                 start_new_session=True)  # its own group: the steps it starts stop with it
            running.add(p)
            try:
                rc = p.wait(timeout=left)
            except subprocess.TimeoutExpired:
                _stop(p)
                p.wait()
                return f"{folder.name}: stopped at the deadline (run again to resume)"
            finally:
                running.discard(p)
        state = "done" if rc == 0 else f"failed (exit {rc}, see {folder / 'ab.log'})"
        return f"{folder.name}: {state} at {time.monotonic() - start:.0f} s"

    print(f"{len(jobs)} runs to do, {max(1, a.jobs)} at a time", flush=True)
    pool = ThreadPoolExecutor(max(1, a.jobs))
    try:
        for done in as_completed([pool.submit(run, job) for job in jobs]):
            print(done.result(), flush=True)
    except KeyboardInterrupt:  # the runs are in groups of their own: stop them too, none left running
        pool.shutdown(wait=False, cancel_futures=True)
        for p in list(running):
            _stop(p)
        raise SystemExit("interrupted: the runs in progress were stopped (run again to resume)") from None
    pool.shutdown()
    summary = summarise(collect(out, parts, names, seeds), names)
    write_json(out / "ab.json", {"arms": dict(arms), "seeds": seeds, "sets": parts, "summary": summary})
    md = markdown(summary, names)
    atomic_write_bytes(out / "ab.md", md.encode())
    print(md)
    return summary


if __name__ == "__main__":
    main()
