"""Never hang, never lose work: worker start method and watchdog, config checks up front, file modes, and SIGKILL
fault injection (marked `faults`; FAULT_ROUNDS kills per command, 1 by default so CI runs the short version)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_patchcore_args, write_ok_images, write_test_crops

from core.io import InputError, read_image, read_json_file, read_jsonl, write_json
from core.modelfile import load_model_file
from core.workers import WorkerError, ordered_map, start_method
from seg.config import load_config
from tests.helpers import work

ROUNDS = int(os.environ.get("FAULT_ROUNDS", "1"))


# ------------------------------------------------------------------------------------------------ workers
def test_workers_never_fork_a_threaded_parent(ok_dir, tmp_path):
    """The hang of issue 14: a parent whose OpenCV thread pool is busy starts the `synth generate` workers again
    and again. With a bare fork the first worker dies or hangs (measured here: dies at once); now every round
    finishes, within a time limit."""
    assert start_method() in ("forkserver", "spawn")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "fork_hazard.py"), str(ok_dir),
                        str(tmp_path / "out"), "4"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.count("done") == 4, r.stderr[-2000:]


def test_a_dead_or_stalled_worker_ends_the_run_with_a_clear_error():
    assert list(ordered_map(work.square, list(range(40)), 2, chunk=4)) == [i * i for i in range(40)]
    got = []
    t = time.perf_counter()
    with pytest.raises(WorkerError, match=r"worker process died .* on 4-7"):
        for v in ordered_map(work.dies_on_five, list(range(40)), 2, chunk=4,
                             describe=lambda c: f"{c[0]}-{c[-1]}"):
            got.append(v)
    assert got == [0, 1, 4, 9] and time.perf_counter() - t < 60  # finished work delivered, no wait forever
    got = []  # the slow first chunk was still running when the worker holding 5 died: it is redone, delivered
    with pytest.raises(WorkerError, match=r"worker process died .* on 4-7"):
        for v in ordered_map(work.slow_first_dies_on_five, list(range(40)), 2, chunk=4,
                             describe=lambda c: f"{c[0]}-{c[-1]}"):
            got.append(v)
    assert got == [0, 1, 4, 9]
    with pytest.raises(WorkerError, match=r"no progress for 3 s on \[4, 5, 6, 7\]"):
        list(ordered_map(work.stalls_on_five, list(range(12)), 2, chunk=4, stall_seconds=3))


def test_a_pool_broken_between_two_chunks_fails_the_next_chunk_instead_of_raising():
    """The race CI met: a worker dies after `ordered_map` took a result and before it submits the next chunk; the
    pool then refuses the submit. `_submit` gives that chunk a failed future, redone with the others in flight."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from core.workers import _stop, _submit, context

    ex = ProcessPoolExecutor(1, mp_context=context())
    try:
        with pytest.raises(BrokenProcessPool):
            ex.submit(work.dies_on_five, [5]).result(timeout=60)
        with pytest.raises(BrokenProcessPool):
            ex.submit(work.square, [1])  # what ordered_map called, and what raised out of it
        assert isinstance(_submit(ex, work.square, [1]).exception(timeout=0), BrokenProcessPool)
    finally:
        _stop(ex)


def test_calls_side_by_side_relay_their_progress_and_end_at_the_first_failure():
    """`run_each` (seeds trained side by side): results in call order, each handed to `done` as it finishes, each
    child limited to its threads, every report relayed; a bad input in one child is that one line here, and a
    child that dies is named; either way the other child, still sleeping, is not waited for."""
    from core.workers import run_each

    seen: list[int] = []
    finished: dict = {}
    assert run_each(work.reports_then_squares, [(3,), (1,), (2,)], 2, 1, progress=seen.append,
                    done=finished.__setitem__) == [(9, 1), (1, 1), (4, 1)]
    assert sum(seen) == 6 and finished == {0: (9, 1), 1: (1, 1), 2: (4, 1)}
    t = time.perf_counter()
    with pytest.raises(InputError, match=r"^seed 1: bad input$"):
        run_each(work.fails_or_sleeps, [(120,), ("seed 1: bad input",)], 2, 1)
    with pytest.raises(WorkerError, match=r"^the process of call \(None,\) died"):
        run_each(work.dies_or_sleeps, [(120,), (None,)], 2, 1, describe=lambda c: f"call {c}")
    assert time.perf_counter() - t < 60


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override, message", [
    ("train.batch_size=-3", "train.batch_size must be positive"),
    ("train.epochs=0", "train.epochs must be positive"),
    ("train.lr=0", "train.lr must be positive"),
    ("train.workers=-1", "train.workers must be 0 or more"),
    ("predict.min_area=-5", "predict.min_area must be 0 or more"),
    ("data.holdout=1.5", "data.holdout must be between 0 and 1"),
    ("data.holdout=1", "data.holdout must be below 1"),
    ("calibrate.target_overkill=2", "calibrate.target_overkill must be between 0 and 1"),
    ("calibrate.target_overkill=1", "calibrate.target_overkill must be below 1"),
    ("train.augment.flip=1.2", "train.augment.flip must be between 0 and 1"),
    ("train.curriculum.end=0.2", "train.curriculum.start (0.4) must not exceed end (0.2)"),
    ("model.coreset_ratio=0", "coreset_ratio must be above 0"),
    ("predict.vote_k=0", "predict.vote_k must be a positive integer"),
    ("data.ok_dir=/no/such/folder", "data.ok_dir: /no/such/folder does not exist"),
])
def test_config_values_are_checked_up_front_with_the_key_named(override, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_bad_value_fails_before_any_work_through_the_cli(ok_dir, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "seg", "train", "-s", f"data.ok_dir={ok_dir}",
                        "-s", "train.batch_size=-3", "-o", str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2 and "train.batch_size must be positive, got -3" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "epoch" not in r.stdout and not (tmp_path / "run").exists()


def test_outputs_get_the_users_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        os.umask(0o027)
        write_json(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------------ faults
def cli(*args) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *map(str, args)]


def run_ok(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return time.perf_counter() - t


def run_killed(cmd: list[str], delay: float, tries: int = 3) -> bool:
    """Start `cmd`, SIGKILL it and its workers after `delay` seconds; True if it was still running. A run that
    finished first (the machine got faster than when the delay was measured) is tried again with half the delay,
    up to `tries` times, so a kill does happen."""
    for _ in range(tries):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return True
        delay /= 2
    return False


def delays(duration: float, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(rng.uniform(0.15, 0.95)) * duration for _ in range(ROUNDS)]


def visible_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]


@pytest.mark.faults
def test_generate_killed_at_random_moments_resumes_to_the_same_bytes(ok_dir, tmp_path):
    args = ["synth", "generate", "--source", ok_dir, "-n", 60, "--seed", 5, "-w", 2, "-s", "synth.size=64"]
    full = tmp_path / "full"
    duration = run_ok(cli(*args, "-o", full))
    part = tmp_path / "part"
    killed = []
    for delay in delays(duration, 1):
        killed.append(run_killed(cli(*args, "-o", part), delay))
        for row in read_jsonl(part / "manifest.jsonl"):  # no manifest line without its files
            assert read_image(part / "images" / f"{row['id']}.png").shape == (64, 64)
            assert read_image(part / "masks" / f"{row['id']}.png").shape == (64, 64)
        for p in visible_files(part / "images") if (part / "images").exists() else []:  # never half a file
            assert p.suffix == ".png" and cv2.imread(str(p), cv2.IMREAD_UNCHANGED) is not None, p
    assert any(killed)  # at least one kill landed while it ran
    run_ok(cli(*args, "-o", part))
    for p in visible_files(full):
        if p.name != "run.json":
            assert (part / p.relative_to(full)).read_bytes() == p.read_bytes(), p
    assert not [p for p in part.rglob(".*") if p.is_file()]  # the rerun swept what the kills left


TRAIN = ["-s", "synth.size=64", "-s", "model.arch=unet", "-s", "model.weights=none",
         "-s", "model.decoder_channels=[16,16,8,8,8]", "-s", "train.steps_per_epoch=3", "-s", "train.batch_size=4",
         "-s", "train.val_n=8", "-s", "train.epochs=3", "-s", "calibrate.normal_crops=16",
         "-s", "calibrate.synth_n=16", "-s", "train.partner=none"]


@pytest.mark.faults
def test_training_killed_at_random_moments_resumes_to_the_same_weights(ok_dir, tmp_path):
    args = ["seg", "train", "-s", f"data.ok_dir={ok_dir}", *TRAIN]
    duration = run_ok(cli(*args, "-o", tmp_path / "full"))
    killed = []
    for delay in delays(duration, 2):
        killed.append(run_killed(cli(*args, "-o", tmp_path / "part", "--resume"), delay))
        if (tmp_path / "part" / "last.pt").exists():  # a checkpoint on disk is always a whole one
            load_model_file(tmp_path / "part" / "last.pt")
    assert any(killed)
    run_ok(cli(*args, "-o", tmp_path / "part", "--resume"))
    a, b = (load_model_file(tmp_path / d / "last.pt") for d in ("full", "part"))
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ca, cb = (load_model_file(tmp_path / d / "best.pt")["calibration"] for d in ("full", "part"))
    assert ca["params"] == cb["params"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A small PatchCore file and a folder of test crops (some with a dark pit)."""
    root = tmp_path_factory.mktemp("faults")
    ok = write_ok_images(root / "OK_Images")
    tc = write_test_crops(root / "TC_Images", 12, pit_every=5)
    args = tiny_patchcore_args(ok)
    duration = run_ok(cli(*args, "-o", root / "full.pt"))
    return {"ok": ok, "tc": tc, "args": args, "model": root / "full.pt", "duration": duration}


@pytest.mark.faults
def test_baseline_fit_killed_at_random_moments_leaves_a_whole_file_or_none(fitted, tmp_path):
    part = tmp_path / "part.pt"
    killed = []
    for delay in delays(fitted["duration"], 3):
        killed.append(run_killed(cli(*fitted["args"], "-o", part), delay))
        if part.exists():
            load_model_file(part)
    assert any(killed)
    run_ok(cli(*fitted["args"], "-o", part))
    a, b = load_model_file(fitted["model"]), load_model_file(part)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["calibration"]["params"] == b["calibration"]["params"]


@pytest.mark.faults
def test_predict_killed_at_random_moments_gives_the_same_submission(fitted, tmp_path):
    args = ["ensemble", "predict", "-m", fitted["model"], "--images", fitted["tc"]]
    duration = run_ok(cli(*args, "-o", tmp_path / "full"))
    before = {p.relative_to(tmp_path / "full"): p.read_bytes() for p in visible_files(tmp_path / "full")
              if p.parent.name in ("submission", "masks")}
    assert any(p.parent.name == "submission" for p in before)
    part = tmp_path / "part"
    killed = []
    for delay in delays(duration, 4):
        killed.append(run_killed(cli(*args, "-o", part), delay))
        if part.exists():  # the output folder is always a whole, published one
            assert (part / "predict.json").exists() and (part / "submission.zip").exists()
    assert any(killed)
    run_ok(cli(*args, "-o", part))
    after = {p.relative_to(part): p.read_bytes() for p in visible_files(part) if p.parent.name in ("submission",
                                                                                                      "masks")}
    assert after == before
    assert not list(tmp_path.glob(".part.*"))  # no partial or old folder left beside it


def test_data_workers_start_clean_and_give_the_same_training(ok_dir, tmp_path):
    """`train.workers > 0`: DataLoader workers start from a fresh interpreter (no fork of the threaded trainer) and
    see the same samples, so the weights equal a run without workers."""
    from seg.train import Trainer, train

    cfg = load_config(None, [f"data.ok_dir={ok_dir}", *TRAIN[1::2], "train.epochs=1", "train.steps_per_epoch=2"])
    runs = {}
    for workers in (0, 2):
        c = {**cfg, "train": {**cfg["train"], "workers": workers, "out": str(tmp_path / f"w{workers}")}}
        if workers:
            loader = Trainer(c, log=lambda m: None).loader(0)
            assert loader.multiprocessing_context.get_start_method() == start_method() != "fork"
        train(c, log=lambda m: None)
        runs[workers] = load_model_file(tmp_path / f"w{workers}" / "last.pt")["model"]
    assert all(torch.equal(v, runs[2][k]) for k, v in runs[0].items())


def test_resume_follows_the_run_in_out_not_the_seed_count_of_todays_config(ok_dir, tmp_path):
    """A run of one model resumed under a two-seed config (or the reverse) continues that run, not a fresh one in
    other folders: here each run's last.pt is unreadable, so the error names the file that resume went for (of
    two seeds side by side, the one whose process failed first)."""
    cases = ((["last.pt"], None, "2", ["last.pt"]),
             (["seed5/last.pt", "seed6/last.pt"], [5, 6], "1", ["seed5/last.pt", "seed6/last.pt"]))
    for k, (files, listed, seeds, went_for) in enumerate(cases):
        out = tmp_path / f"run{k}"
        for f in files:
            (out / f).parent.mkdir(parents=True, exist_ok=True)
            (out / f).write_bytes(b"kept")
        if listed:
            write_json(out / "seeds.json", {"seeds": listed})
        r = subprocess.run(cli("seg", "train", "-s", f"data.ok_dir={ok_dir}", *TRAIN, "--resume", "--seeds", seeds,
                               "-o", out), capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and any(f"{out / f}: not a readable model file" in r.stderr for f in went_for), \
            r.stderr[-2000:]
        assert "Traceback" not in r.stderr and sorted(p.relative_to(out).as_posix() for p in out.rglob("*.pt")) \
            == sorted(files) and all((out / f).read_bytes() == b"kept" for f in files)


def test_seeds_go_side_by_side_on_a_cpu_with_the_threads_shared(monkeypatch):
    """`train.jobs` 0 (auto): on a CPU as many seeds at a time as there are threads, each with its share; one at a
    time on CUDA, under torchrun, for one seed, or when asked (`train.jobs=1`)."""
    from seg.train import seed_plan

    cfg = load_config(None, [])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert seed_plan(cfg, 2) == (2, 2) and seed_plan(cfg, 3) == (3, 1) and seed_plan(cfg, 8) == (4, 1)
        assert seed_plan(cfg, 1) == (1, 4)
        assert seed_plan(load_config(None, ["train.jobs=1"]), 2) == (1, 4)
        assert seed_plan(load_config(None, ["train.jobs=2"]), 3) == (2, 2)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert seed_plan(cfg, 2) == (1, 4)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        torch.set_num_threads(1)
        assert seed_plan(cfg, 2) == (1, 1) and seed_plan(load_config(None, ["train.jobs=2"]), 2) == (2, 1)
        monkeypatch.setenv("RANK", "0")
        assert seed_plan(load_config(None, ["train.jobs=2"]), 2) == (1, 1)
    finally:
        torch.set_num_threads(before)


def test_seeds_trained_side_by_side_equal_seeds_trained_one_after_the_other(ok_dir, tmp_path):
    """`train.jobs=2`: each seed in a process of its own, with its share of the threads (here 1 each, as
    one after the other under OMP_NUM_THREADS=1): the same weights, bit for bit, only sooner; each seed's log in
    its folder, the summary lines in the parent's output."""
    args = ["seg", "train", "-s", f"data.ok_dir={ok_dir}", *TRAIN, "-s", "train.epochs=2", "-s", "train.seeds=2",
            "--no-calibrate"]
    for jobs in (1, 2):
        r = subprocess.run(cli(*args, "-s", f"train.jobs={jobs}", "-o", tmp_path / f"j{jobs}"), capture_output=True,
                           text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("2 seeds, 2 at a time with 1 CPU thread each" in r.stderr) == (jobs == 2)
    assert "seed 1: best score" in r.stderr and "best score" in (tmp_path / "j2" / "seed1" / "train.log").read_text()
    for s in (0, 1):
        a, b = (load_model_file(tmp_path / f"j{j}" / f"seed{s}" / "last.pt")["model"] for j in (1, 2))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_model_file(tmp_path / "j2" / f"seed{s}" / "last.pt")["model"] for s in (0, 1))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two seeds, two models


def test_seeds_trains_one_calibrated_model_per_seed_in_folders_of_their_own(ok_dir, tmp_path):
    """By the config key (train.seeds, which configs/*.yaml set and --seeds overrides); the run folder then
    stands for its seeds' files (`-m FOLDER`): calibrated as one ensemble, never predicted uncalibrated."""
    from core.modelfile import model_paths, spec_checkpoints

    args = ["seg", "train", "-s", f"data.ok_dir={ok_dir}", *TRAIN, "-s", "train.epochs=1", "-s", "train.seed=3",
            "-s", "train.seeds=2", "-o", tmp_path / "run"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ensemble.json").write_text("{}")  # an earlier run's: a run afresh removes it
    run_ok(cli(*args))
    assert not (tmp_path / "run" / "ensemble.json").exists()  # train.partner none (TRAIN): no hybrid
    files = [load_model_file(tmp_path / "run" / f"seed{s}" / "best.pt") for s in (3, 4)]
    assert [f["config"]["train"]["seed"] for f in files] == [3, 4]
    assert [f["config"]["train"]["seeds"] for f in files] == [1, 1]  # each file: one model of one seed
    assert model_paths([tmp_path / "run"]) == [str(tmp_path / "run" / f"seed{s}" / "best.pt") for s in (3, 4)]
    assert all(f["calibration"] is not None for f in files)
    assert not (tmp_path / "run" / "best.pt").exists()
    a, b = (f["model"] for f in files)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # other seeds, other weights
    run = tmp_path / "run"
    r = subprocess.run(cli("ensemble", "predict", "-m", run, "--images", ok_dir, "-o", tmp_path / "pred"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"{run}: a run of several seeds, one ensemble: calibrate it" in r.stderr
    assert not (tmp_path / "pred").exists()
    run_ok(cli("ensemble", "calibrate", "-m", run, "-o", tmp_path / "ens.json"))
    spec = read_json_file(tmp_path / "ens.json")
    assert spec_checkpoints(spec, tmp_path / "ens.json") == model_paths([run])
    assert len(spec["params"]["shape"]) == 2  # each seed's own threshold: masks trimmed to where both agree
    assert spec["calibration"]["spend_budget"] is True  # the models' config (calibrate.spend_budget, on)
    run_ok(cli("ensemble", "calibrate", "-m", run, "--no-spend-budget", "-o", tmp_path / "plain.json"))
    plain = read_json_file(tmp_path / "plain.json")
    assert plain["calibration"]["spend_budget"] is False and spec["params"]["median_base"] is True
    from ensemble.models import build_ensemble

    one = run / "seed3" / "best.pt"  # a TTA per -m: a run folder of seeds gives its mode to each of its models
    ens, _ = build_ensemble([run, one], None, "d4,flip", None, None, None, {}, "cpu", calibrating=True)
    assert ens.tta_mode == "d4,d4,flip" and len(ens.models) == 3


def test_seg_train_makes_the_default_hybrid_and_its_run_folder_predicts_with_it(ok_dir, tmp_path):
    """`train.partner` (PatchCore by default): `seg train` alone fits the partner as `baseline fit` would (the same
    bank) and calibrates the two as one, the run folder's ensemble.json with its files relative to it; `-m FOLDER`
    then predicts with that hybrid, exactly as `-e ensemble.json` does, also from a copy of the folder elsewhere;
    the run's best.pt alone stays the segmenter alone, with a note naming the ensemble."""
    import shutil

    small = ["-s", "baseline.n_train=16", "-s", "baseline.weights=none"]
    run = tmp_path / "run"
    r = subprocess.run(cli("seg", "train", "-s", f"data.ok_dir={ok_dir}", *TRAIN, "-s", "train.partner=patchcore",
                           *small, "-o", run), capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"predict with it: ensemble predict -m {run}" in " ".join((r.stdout + r.stderr).split())
    spec = read_json_file(run / "ensemble.json")
    assert spec["checkpoints"] == ["best.pt", "patchcore.pt"] and spec["relative"] is True
    assert len(spec["norms"]) == 2 and len(spec["params"]["shape"]) == 2 and spec["tta"] == "flip"
    partner = load_model_file(run / "patchcore.pt")
    assert partner["config"]["model"]["arch"] == "patchcore" and partner["calibration"] is not None
    before = (run / "patchcore.pt").read_bytes()
    (run / "ensemble.json").unlink()
    run_ok(cli("seg", "train", "-s", f"data.ok_dir={ok_dir}", *TRAIN, "-s", "train.partner=patchcore", *small,
               "--resume", "-o", run))  # a finished run resumed: the partner kept, the ensemble made again
    assert (run / "patchcore.pt").read_bytes() == before and read_json_file(run / "ensemble.json") == spec
    run_ok(cli("baseline", "fit", "--method", "patchcore", "-s", f"data.ok_dir={ok_dir}", *TRAIN, *small,
               "-o", tmp_path / "pc.pt"))
    bank = load_model_file(tmp_path / "pc.pt")["model"]
    assert partner["model"].keys() == bank.keys() and all(torch.equal(partner["model"][k], bank[k]) for k in bank)

    tc = write_test_crops(tmp_path / "TC", 6)
    for name, how in (("folder", ["-m", run]), ("spec", ["-e", run / "ensemble.json"])):
        run_ok(cli("ensemble", "predict", *how, "--images", tc, "-o", tmp_path / name))
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, moved)
    shutil.rmtree(run)
    run_ok(cli("ensemble", "predict", "-m", moved, "--images", tc, "-o", tmp_path / "moved"))
    masks = {n: {f.name: cv2.imread(str(f), 0) for f in sorted((tmp_path / n / "masks").iterdir())}
             for n in ("folder", "spec", "moved")}
    assert len(masks["folder"]) == 6 and all(np.array_equal(masks["folder"][k], masks[n][k])
                                             for n in ("spec", "moved") for k in masks["folder"])
    assert read_json_file(tmp_path / "moved" / "predict.json")["checkpoints"] == [
        str(moved / "best.pt"), str(moved / "patchcore.pt")]
    r = subprocess.run(cli("ensemble", "predict", "-m", moved / "best.pt", "--images", tc, "-o", tmp_path / "alone"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"its run's default is {moved / 'ensemble.json'}" in " ".join(r.stderr.split())
    assert read_json_file(tmp_path / "alone" / "predict.json")["checkpoints"] == [str(moved / "best.pt")]


def test_a_partner_that_fails_only_warns_and_leaves_the_segmenter(ok_dir, tmp_path):
    """A partner that cannot be built (here an unknown backbone) costs the hybrid, in one line, not the trained
    segmenter: exit 0, best.pt calibrated, no ensemble.json, no traceback."""
    run = tmp_path / "run"
    r = subprocess.run(cli("seg", "train", "-s", f"data.ok_dir={ok_dir}", *TRAIN, "-s", "train.partner=patchcore",
                           "-s", "baseline.backbone=no_such_backbone", "-s", "baseline.weights=none", "-o", run),
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    said = " ".join(r.stderr.split())
    assert f"{run}: no hybrid with patchcore" in said and "baseline.backbone" in said and f"-m {run}" in said
    assert "Traceback" not in r.stderr + r.stdout
    assert load_model_file(run / "best.pt")["calibration"] is not None and not (run / "ensemble.json").exists()
