"""The shared layer and what it guarantees: safe model files, calibration carried by them, the held-out split,
atomic publishing, and imports that only point down."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, textured

from baseline.fit import fit_baseline
from core.modelfile import load_model_file, model_paths, save_model_file
from core.progress import progress_to
from ensemble import predict as predict_mod
from ensemble.calibrate import (calibrate_model_file, calibration_pools, calibration_sheet, crowded_band,
                                predict_shown)
from ensemble.models import Ensemble, load_model
from seg.config import load_config
from synth.engine import SourcePool
from core.io import InputError

LAYERS = ["core", "synth", "seg", "baseline", "ensemble", "benchmarks", "cli"]


def test_imports_only_point_down():
    """A module may import its own layer or a lower one (core < synth < seg < baseline < ensemble < bench < cli)."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for layer in LAYERS[:-1]:
        for path in (ROOT / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                for n in names:
                    top = n.split(".")[0]
                    if top in rank and rank[top] > rank[layer]:
                        bad.append(f"{path.relative_to(ROOT)} imports {n}")
    assert not bad, bad


def test_a_crafted_model_file_never_runs_its_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"config": {}, "model": Payload()}, evil)
    with pytest.raises(InputError, match="evil.pt: refused to load.*posix.system|evil.pt: refused to load"):
        load_model_file(evil)
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "ensemble", "predict", "-m", str(evil),
                        "--images", str(tmp_path), "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "refused to load" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="junk.pt: not a readable model file"):
        load_model_file(tmp_path / "junk.pt")
    save_model_file(tmp_path / "plain.pt", {"config": {"a": np.float64(0.5), "model": {"arch": "unet"},
                                                       "synth": {"size": 128, "channels": 1}},
                                            "model": {"w": torch.ones(2)}, "rows": [{"x": np.int64(3)}]})
    back = load_model_file(tmp_path / "plain.pt")  # numpy scalars are written as plain numbers
    assert back["config"]["a"] == 0.5 and type(back["rows"][0]["x"]) is int
    save_model_file(tmp_path / "partial.pt", {"config": {"model": {"arch": "unet"}, "synth": {"size": 128}},
                                              "model": {}})
    with pytest.raises(InputError, match=r"partial.pt: incomplete model file \(no config.model.arch, config.synth.size"
                                         r" or config.synth.channels\)"):
        load_model_file(tmp_path / "partial.pt")


def test_a_run_folder_stands_for_its_best_pt_or_every_seeds_its_seeds_file_lists(tmp_path):
    from core.io import write_json

    single, seeds, replaced, empty, unfinished, bad = (tmp_path / n for n in
                                                       ("single", "seeds", "replaced", "empty", "unfinished", "bad"))
    for f in (single / "best.pt", *(seeds / f"seed{s}" / "best.pt" for s in (10, 2, 7)), replaced / "best.pt",
              replaced / "seed0" / "best.pt", unfinished / "seed0" / "best.pt"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    write_json(seeds / "seeds.json", {"seeds": [10, 2]})  # seed7: left from another run, not this one's
    write_json(unfinished / "seeds.json", {"seeds": [0, 1]})
    write_json(bad / "seeds.json", {"seeds": "0,1"})
    empty.mkdir()
    other = tmp_path / "patchcore.pt"
    assert model_paths([single, other]) == [str(single / "best.pt"), str(other)]  # a file stays itself
    assert model_paths([seeds]) == [str(seeds / "seed10" / "best.pt"), str(seeds / "seed2" / "best.pt")]
    assert model_paths([replaced]) == [str(replaced / "best.pt")]  # no seeds.json: the run of one model
    for folder, said in ((empty, f"{empty}: a folder with no best.pt"),
                         (unfinished, f"{unfinished / 'seed1' / 'best.pt'}: not there yet"),
                         (bad, f"{bad / 'seeds.json'}: not a seeds file")):
        with pytest.raises(InputError, match=re.escape(said)):
            model_paths([folder])


def test_held_out_split_is_disjoint_reproducible_and_never_trained_on(ok_dir):
    pool = SourcePool(ok_dir)
    train, held = pool.split(0.4, seed=0)
    assert len(held) == 2 and len(train) == 3 and not set(train.paths) & set(held.paths)
    assert sorted(train.paths + held.paths) == sorted(pool.paths)
    assert pool.split(0.4, seed=0)[1].paths == held.paths  # the same split on every run
    assert SourcePool(ok_dir).split(0.0)[1] is None and SourcePool(ok_dir, paths=["ok_0.png"]).split(0.5)[1] is None
    cfg = load_config(None, [f"data.ok_dir={ok_dir}", "data.holdout=0.4", "model.arch=unet"])
    from seg.train import Trainer

    trainer = Trainer({**cfg, "train": {**cfg["train"], "val_n": 2}}, log=lambda m: None)
    assert set(trainer.pool.paths) == set(train.paths) and trainer.held_out.paths == held.paths
    assert calibration_pools(cfg)[0].paths == held.paths


def test_model_file_carries_its_thresholds_and_predict_uses_them(ok_dir, tmp_path):
    cfg = load_config(None, [f"data.ok_dir={ok_dir}", "baseline.n_train=16", "train.val_n=16",
                             "calibrate.normal_crops=32", "calibrate.synth_n=24"])
    fit_baseline(cfg, "padim", tmp_path / "m.pt", log=lambda m: None)
    assert "calibration" not in load_model_file(tmp_path / "m.pt")
    out = calibrate_model_file(tmp_path / "m.pt", "cpu")
    cal = load_model_file(tmp_path / "m.pt")["calibration"]
    assert cal["params"] == out["params"] and cal["tta"] == "none"
    bars = []  # again on progress bars (as the command line shows it): the same operating point

    @contextmanager
    def bar(description, total):
        bars.append([description, total, 0])
        yield lambda k=1, **f: bars[-1].__setitem__(2, bars[-1][2] + k)

    with progress_to(bar):
        assert calibrate_model_file(tmp_path / "m.pt", "cpu")["params"] == out["params"]
    assert bars == [["calibrate: held-out normal crops", 32, 32],  # once: the normalisers, then the operating point
                    ["calibrate: synthetic defects", 24, 24]]
    ens = Ensemble([load_model(tmp_path / "m.pt", torch.device("cpu"))[0]], 1, 128, "cpu", "none", batch_size=3)
    crops = [textured(30 + i)[:128, 40:168] for i in range(14)]  # chunks of 12 crops, the last one short
    for a, b in zip(predict_shown(ens, crops, "x"), ens.predict(crops), strict=True):
        assert np.array_equal(a["map"], b["map"]) and a["image"] == b["image"]
    assert cal["held_out_images"] == SourcePool(ok_dir).split(0.2, 0)[1].paths
    images = tmp_path / "TC_Images"
    images.mkdir()
    for i in range(3):
        img = textured(20 + i)[:128, 40:168].copy()
        if i:
            cv2.circle(img, (70, 60), 8, 15, -1)
        cv2.imwrite(str(images / f"t{i}.bmp"), img)
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "ensemble", "predict", "-m", str(tmp_path / "m.pt"),
                        "--images", str(images), "-o", str(tmp_path / "pred")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    used = json.loads((tmp_path / "pred" / "predict.json").read_text())["params"]
    assert {k: used[k] for k in cal["params"]} == cal["params"]
    assert used["threshold"] != cfg["predict"]["threshold"]  # not the uncalibrated default


def test_calibration_shows_the_normal_crops_that_set_the_threshold(tmp_path):
    """A region of one held-out OK image unlike the rest (a selvage, a fixture) scores high on its normal crops and
    makes the image threshold strict: the report names those crops first, with their origin, and the sheet shows
    them. Crop origins reproduce the crops exactly."""
    ok = tmp_path / "OK_Images"
    ok.mkdir()
    for i in range(10):
        cv2.imwrite(str(ok / f"ok_{i}.png"), textured(i))
    held = SourcePool(ok).split(0.2, 0)[1]
    assert len(held) == 2
    odd = textured(9)
    odd[:, 180:] = np.where(np.indices(odd[:, 180:].shape).sum(0) % 6 < 3, 230, 20)  # a striped margin
    cv2.imwrite(str(ok / held.paths[0]), odd)
    where = []
    crops = held.random_crops(6, 3, where)
    assert all(np.array_equal(c, held.load(held.paths.index(p))[y:y + 128, x:x + 128]) for c, (p, y, x) in
               zip(crops, where))
    cfg = load_config(None, [f"data.ok_dir={ok}", "baseline.n_train=32", "train.val_n=16",
                             "calibrate.normal_crops=32", "calibrate.synth_n=16"])
    fit_baseline(cfg, "padim", tmp_path / "m.pt", log=lambda m: None)
    loudest = calibrate_model_file(tmp_path / "m.pt", "cpu")["report"]["loudest_normals"]
    assert len(loudest) == 8
    # without the margin the other held-out image and crops left of column 180 are among them (checked by hand)
    assert all(e["image"] == held.paths[0] and e["x"] + 128 > 180 for e in loudest)  # all reach into the margin
    evidence = [e["evidence"] if e["evidence"] is not None else -np.inf for e in loudest]
    assert evidence == sorted(evidence, reverse=True)
    assert load_model_file(tmp_path / "m.pt")["calibration"]["report"]["loudest_normals"] == loudest
    sheet = cv2.imread(str(tmp_path / "m_calibration.png"))
    assert sheet.shape[:2] == (2 * (128 + 3 * 16 + 4) + 4, 8 * (128 + 4) + 4)  # 8 normal crops over 8 synthetic
    # a sheet that cannot be written is a warning, never a lost calibration
    (tmp_path / "a_file").write_text("")
    maps = [{"map": c.astype(np.float32) / 255, "image": None} for c in crops]
    warned = []
    shown = calibration_sheet(tmp_path / "a_file" / "s.png", lambda r, t: (r["map"] >= t).astype(np.uint8),
                              {"threshold": 0.5, "min_area": 0, "opening": 0, "image_threshold": 0.0},
                              (crops, maps, None, where), (crops, maps, None, [c > 128 for c in crops]), 4,
                              warn=warned.append)
    assert len(shown) == 4 and len(warned) == 1 and "calibration sheet not written" in warned[0]


def test_a_threshold_set_by_one_region_of_the_ok_images_is_named(tmp_path, monkeypatch):
    """When the held-out normal crops that set the image threshold (those with a mask, loudest first) all lie in
    one narrow band of their images (a background or a selvage that the test images may never show), calibration
    says so in one line naming the band, the images and the sheet; crops spread over the images, too few of them,
    crops without a mask, or a band that is most of a barely larger image raise nothing."""
    import ensemble.calibrate as calibrate_module

    ok = tmp_path / "OK_Images"
    ok.mkdir()
    for i in range(10):
        cv2.imwrite(str(ok / f"ok_{i}.png"), textured(i, h=512, w=1024))
    pool = SourcePool(ok)
    name, other = pool.paths[0], pool.paths[1]
    crops = [{"image": name, "x": x, "y": 48 * i, "masked": True} for i, x in enumerate(range(0, 48, 6))]
    assert crowded_band(crops, pool) == ("x", 0, 42 + 128, 8, [name])  # 43 of 897 positions
    assert crowded_band(crops[:5], pool)[3] == 5 and crowded_band(crops[:4], pool) is None
    spread = [{"image": name, "x": 112 * i, "y": 48 * i, "masked": True} for i in range(8)]
    assert crowded_band(spread, pool) is None  # columns 0 - 784 of 896, rows 0 - 336 of 384
    rows = [{**c, "y": 1 + i % 2, "image": (name, other)[i % 2]} for i, c in enumerate(spread)]
    assert crowded_band(rows, pool) == ("y", 1, 2 + 128, 8, [name, other])
    assert crowded_band([{**c, "masked": False} for c in crops], pool) is None
    assert crowded_band([{**c, "image": "elsewhere.png"} for c in crops], pool) is None
    narrow = tmp_path / "narrow"  # 131 px wide: 4 positions per row; one shared by chance is no band
    narrow.mkdir()
    for i in range(3):
        cv2.imwrite(str(narrow / f"n_{i}.png"), textured(i, h=512, w=131))
    small = SourcePool(narrow)
    same = [{"image": small.paths[i % 3], "x": 1, "y": 70 * i, "masked": True} for i in range(6)]
    assert crowded_band(same, small) is None
    # wired into calibration: the crops it is given are the report's, by their pool paths; a band found becomes one
    # warning naming it, its images and the sheet
    cfg = load_config(None, [f"data.ok_dir={ok}", "baseline.n_train=16", "train.val_n=16",
                             "calibrate.normal_crops=16", "calibrate.synth_n=8"])
    fit_baseline(cfg, "padim", tmp_path / "m.pt", log=lambda m: None)
    held = set(SourcePool(ok).split(0.2, 0)[1].paths)
    for found, expect in ((["ok_4.png", "ok_7.png"], "of 2 held-out images (the 8 loudest with a mask"),
                          (["ok_4.png"], "of ok_4.png (the 8 loudest with a mask")):
        seen, warned = [], []
        monkeypatch.setattr(calibrate_module, "crowded_band",
                            lambda loudest, p, f=found: seen.append(loudest) or ("x", 0, 170, 8, f))
        calibrate_model_file(tmp_path / "m.pt", "cpu", warn=warned.append)
        assert len(seen) == 1 and len(seen[0]) == 8 and {c["image"] for c in seen[0]} <= held
        flags = [c["masked"] for c in seen[0]]
        assert flags == sorted(flags, reverse=True)  # crops with a mask first: only they can be flagged
        band = [w for w in warned if "all lie in x 0 - 170 " + expect in w]
        assert len(band) == 1 and "m_calibration.png" in band[0]
        assert ("crop the OK images to the part" in band[0]) == (len(found) > 1)
        # a band at the images' left edge: the warning gives the box that leaves it out, in the files' pixels
        assert ("-s 'data.ok_crop=[170,0,1024,512]'" in band[0]) == (len(found) > 1)


def test_ok_crop_cuts_every_ok_image_wherever_it_is_read(tmp_path):
    """`data.ok_crop` [x0, y0, x1, y1] cuts each OK image to its box (x1, y1 clipped to the image) for training,
    the held-out split and everything drawn from it, and for `synth generate`, whose folder records it (a folder
    written with another box is not resumed; training from it uses its box). A box that is no box, or that misses an
    image, is one line naming the key or the file. `crop_outside` turns a crowded band at an edge into the box that
    leaves it out."""
    from ensemble.calibrate import crop_outside
    from seg.config import ok_pools
    from seg.data import adopt_synth_folder
    from synth.engine import SynthConfig
    from synth.generate import generate

    ok = tmp_path / "OK_Images"
    ok.mkdir()
    for i in range(5):
        cv2.imwrite(str(ok / f"ok_{i}.png"), textured(i))  # 220 x 180 px
    train, held = ok_pools(load_config(None, [f"data.ok_dir={ok}", "data.ok_crop=[30, 5, 190, 999]"]))
    assert train.crop == held.crop == (30, 5, 190, 999) and len(train) == 4 and len(held) == 1
    for pool in (train, held):
        for i, name in enumerate(pool.paths):
            assert np.array_equal(pool.load(i), cv2.imread(str(ok / name), 0)[5:, 30:190])
    where = []
    crops = held.random_crops(40, 1, where)
    full = cv2.imread(str(ok / held.paths[0]), 0)
    # origins in the file's own pixels, inside the box
    assert all(np.array_equal(c, full[y:y + 128, x:x + 128]) and 30 <= x <= 190 - 128 and 5 <= y <= 180 - 128
               for c, (_, y, x) in zip(crops, where))
    assert max(x for _, _, x in where) > 50  # uncut, x would reach column 190 and beyond
    # calibration reports the crops that set its threshold in the files' own pixels, inside the box
    cfg = load_config(None, [f"data.ok_dir={ok}", "data.ok_crop=[30, 5, 190, 999]", "baseline.n_train=16",
                             "train.val_n=16", "calibrate.normal_crops=16", "calibrate.synth_n=8"])
    fit_baseline(cfg, "padim", tmp_path / "m.pt", log=lambda m: None)
    loudest = calibrate_model_file(tmp_path / "m.pt", "cpu")["report"]["loudest_normals"]
    assert len(loudest) == 8 and all(30 <= e["x"] <= 190 - 128 and 5 <= e["y"] <= 180 - 128 for e in loudest)
    # (unshifted, x would lie in 0 - 32: the 8 would all have to be drawn at 30 - 32)
    for bad in ("[0, 0, 100]", "[50, 0, 50, 100]", "[-1, 0, 100, 100]", "[0, 0, 1.5, 100]", "left"):
        with pytest.raises(InputError, match=r"data\.ok_crop must be a box x0, y0, x1, y1: a list of 4 whole"):
            load_config(None, [f"data.ok_dir={ok}", f"data.ok_crop={bad}"])
    with pytest.raises(InputError, match=r"ok_\d\.png: data\.ok_crop \[300, 0, 400, 100\] lies outside the image "
                                         r"\(220 x 180 px\) \(and 4 more images\)$"):
        ok_pools(load_config(None, [f"data.ok_dir={ok}", "data.ok_crop=[300, 0, 400, 100]"]))
    cv2.imwrite(str(ok / "ok_9.png"), textured(9, h=180, w=420))  # the one image the box does not miss
    warned = []
    assert SourcePool(ok, warn=warned.append, crop=(300, 0, 400, 100)).paths == ["ok_9.png"]
    assert len(warned) == 1 and warned[0].endswith("(and 4 more images): skipped")
    (ok / "ok_9.png").unlink()
    out = tmp_path / "synth"
    generate(ok, out, 4, SynthConfig(), seed=0, holdout=0.2, crop=[30, 5, 190, 999])
    assert json.loads((out / "run.json").read_text())["ok_crop"] == [30, 5, 190, 999]
    adopted, _ = adopt_synth_folder(load_config(None, []), out)
    assert adopted["data"]["ok_crop"] == [30, 5, 190, 999]
    with pytest.raises(InputError, match="other settings"):
        generate(ok, out, 8, SynthConfig(), seed=0, holdout=0.2)
    big = tmp_path / "big"
    big.mkdir()
    cv2.imwrite(str(big / "b.png"), textured(0, h=200, w=1000))
    pool = SourcePool(big)  # crops of 128 px
    assert crop_outside(("x", 0, 300, 8, ["b.png"]), pool) == [300, 0, 1000, 200]  # at the left edge
    assert crop_outside(("x", 700, 1000, 8, ["b.png"]), pool) == [0, 0, 700, 200]  # at the right edge
    assert crop_outside(("x", 300, 600, 8, ["b.png"]), pool) is None  # in the middle
    assert crop_outside(("y", 0, 150, 8, ["b.png"]), pool) is None  # 50 px left: less than a crop
    assert crop_outside(("x", 0, 300, 8, ["b.png"]), SourcePool(big, crop=(0, 0, 1000, 200))) is None


def test_publish_restores_the_previous_output_when_the_swap_fails(tmp_path, monkeypatch):
    out, tmp = tmp_path / "pred", tmp_path / ".pred.partial"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    real = os.replace
    calls = []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("disk full")
        return real(a, b)

    monkeypatch.setattr(predict_mod.os, "replace", flaky)
    with pytest.raises(OSError):
        predict_mod.publish(tmp, out)
    assert (out / "old.txt").read_text() == "previous"


def test_read_jsonl_drops_only_a_torn_last_line_and_never_cuts_when_reading(tmp_path):
    from core.io import read_jsonl

    p = tmp_path / "m.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": 3')
    before = p.read_bytes()
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}] and p.read_bytes() == before  # reading changes nothing
    assert read_jsonl(p, repair=True) == [{"a": 1}, {"a": 2}] and p.read_text() == '{"a": 1}\n{"a": 2}\n'
    p.write_text('{"a": 1}\n{oops\n{"a": 3}\n')
    before = p.read_bytes()
    with pytest.raises(InputError, match=r"m.jsonl: line 2 is not valid JSON"):
        read_jsonl(p, repair=True)
    assert p.read_bytes() == before  # one bad line never deletes the rows after it


def test_calibration_defects_always_have_masks_and_old_ensemble_files_are_refused(ok_dir, tmp_path):
    from ensemble.calibrate import synthetic_defects

    cfg = load_config(None, [f"data.ok_dir={ok_dir}", "synth.roi=auto"])
    images, masks = synthetic_defects(cfg, SourcePool(ok_dir), 12, 0)
    assert len(images) == 12 and all(m.any() for m in masks)  # a draw that placed nothing is not a "defect"
    old = tmp_path / "ensemble.json"
    old.write_text(json.dumps({"checkpoints": ["a.pt"], "tta": "flip", "params": {"threshold": 0.5}}))
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "ensemble", "predict", "-e", str(old),
                        "--images", str(tmp_path), "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "older version" in r.stderr and "Traceback" not in r.stderr


def test_pip_install_gives_the_defect_synth_command(tmp_path):
    """`pip install .` installs the packages, the configs and a `defect-synth` command (the same Typer app)."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "runs", ".git", "data", "tests", "docs",
                                                             "__pycache__", ".*_cache", "*.egg-info", "build"))
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, str(site / "bin" / "defect-synth"), "--help"], capture_output=True,
                       text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and all(c in r.stdout for c in ("synth", "seg", "ensemble", "baseline")), r.stderr
    r = subprocess.run([sys.executable, "-c", "import seg.config as c; print(c.__file__); "
                        "print(c.load_config(c.config_for_part(2))['predict']['roi'])"],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.split() == [str(site / "seg" / "config.py"), "auto"], r.stderr


def test_the_lofo_groups_cover_every_default_family_once_and_its_table_subtracts_the_right_way():
    """A family added to the default mix must be withheld by some group, or the check silently skips it; the drop
    is what the model that saw the group scores minus the model that did not."""
    from benchmarks.lofo import GROUPS, lofo_markdown, withheld
    from synth.engine import SynthConfig

    grouped = [f for fs in GROUPS.values() for f in fs]
    assert sorted(grouped) == sorted(f for f, w in SynthConfig().families.items() if w > 0)
    assert withheld("strokes") == ["synth.families.bezier_stroke=0.0", "synth.families.line=0.0"]

    def metrics(ap, score):
        return {"pixel_ap": ap, "score": score}

    per = {"all": {"real": metrics(0.5, 0.8), "synthetic": {g: metrics(0.6, 0.7) for g in GROUPS}}}
    per.update({g: {"real": metrics(0.4, 0.7), "synthetic": {g: metrics(0.2, 0.5)}} for g in GROUPS})
    results = {"p1": {"UNet": per, "Evidence UNet": per}}
    md = lofo_markdown({"mode": "quick", "date": "d", "machine": "m", "minutes": 1}, results)
    assert "| UNet | blobs | 0.600 | 0.200 | +0.400 | 0.700 | 0.500 | 0.800 / 0.700 | 0.500 / 0.400 |" in md
    assert "synthetic pixel AP of that group +0.400; real score +0.100" in md


def test_ab_pairs_each_arm_with_the_first_on_the_same_part_and_seed(tmp_path):
    """`benchmarks/ab.py` compares an arm with the first arm only on the (part, seed) pairs both have, counts the
    pairs above and below, and refuses a bad arm with one line before any run."""
    import json

    from benchmarks.ab import job_folder, main

    def put(part, arm, seed, score, ap):
        f = job_folder(tmp_path, part, arm, seed) / "results.json"
        f.parent.mkdir(parents=True)
        m = {"score": score, "pixel_ap": ap, "pixel_auroc": 0.9, "calibration_loss": 0.01}
        f.write_text(json.dumps({"results": {part: {"Hybrid": m}}}))

    put("a:1", "base", 0, 0.80, 0.40)
    put("a:1", "base", 1, 0.70, 0.30)
    put("a:2", "base", 0, 0.60, 0.20)
    put("a:1", "new", 0, 0.90, 0.35)
    put("a:1", "new", 1, 0.60, 0.30)
    put("a:2", "new", 1, 0.99, 0.99)  # no base run of that pair: not compared
    s = main(["--arm", "base", "--arm", "new:synth.sizes=log", "--seeds", "0,1", "--sets", "a:1,a:2",
              "--out", str(tmp_path), "--summary-only"])["Hybrid"]
    assert s["new"]["pairs"] == 2 and s["new"]["score"] == pytest.approx(0.75)
    assert s["new"]["score_first"] == pytest.approx(0.75) and s["base"]["score"] == pytest.approx(0.7)
    assert (s["new"]["score_above"], s["new"]["score_below"]) == (1, 1)
    assert (s["new"]["pixel_ap_above"], s["new"]["pixel_ap_below"]) == (0, 1)
    assert "| new | 2 | 0.750 / 0.750 (1 / 1) | 0.325 / 0.350 (0 / 1) |" in (tmp_path / "ab.md").read_text()
    for arm, msg in (("new:synth.sizes=big", "--arm new: .*synth.sizes must be one of"),
                     ("new:synth.sizes", "expected key=value"), ("base", "names must differ")):
        with pytest.raises(SystemExit, match=msg):
            main(["--arm", "base", "--arm", arm, "--out", str(tmp_path / "o2")])
    assert not (tmp_path / "o2").exists()


def test_recalibrate_copies_the_models_only_and_never_touches_the_run_it_reads(tmp_path):
    """`benchmarks/recalibrate.py` copies model files (not last.pt, not predictions) before it writes into them,
    and refuses what it cannot do with one line: a bad override, a folder that is no benchmark run, --out = --bench."""
    from benchmarks.recalibrate import copy_models, main

    part = tmp_path / "bench" / "aitex-p4"
    for rel in ("evidence_s0/best.pt", "evidence_s0/last.pt", "patchcore.pt", "pred/patchcore/maps/a.pt",
                "steps.json", "hybrid_evidence.json"):
        (part / rel).parent.mkdir(parents=True, exist_ok=True)
        (part / rel).write_text(rel)
    models = copy_models(part, tmp_path / "out" / "aitex-p4")
    got = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert got == ["aitex-p4/evidence_s0/best.pt", "aitex-p4/patchcore.pt", "aitex-p4/steps.json"]
    assert sorted(p.name for p in models) == ["best.pt", "patchcore.pt"]
    assert (part / "patchcore.pt").read_text() == "patchcore.pt"  # the source stays as it was
    with pytest.raises(SystemExit, match="synth.sizes must be one of uniform, log"):
        main(["--bench", str(tmp_path / "bench"), "--out", str(tmp_path / "o2"), "-s", "synth.sizes=big"])
    with pytest.raises(SystemExit, match="no part folders"):
        main(["--bench", str(tmp_path), "--out", str(tmp_path / "o2")])
    with pytest.raises(SystemExit, match="must not be --bench"):
        main(["--bench", str(tmp_path / "bench"), "--out", str(tmp_path / "bench")])
    (part / "steps.json").write_text(json.dumps({"fit_patchcore": {"seconds": 1.0, "args": []},
                                                 "train_evidence": {"started": True, "args": []}}))
    with pytest.raises(SystemExit, match="aitex-p4: train_evidence left half done by an interrupted run"):
        main(["--bench", str(tmp_path / "bench"), "--out", str(tmp_path / "o2")])
    assert not (tmp_path / "o2").exists()
    from benchmarks.run import methods_run  # recalibrate's default: the rows the run has, no model trained anew
    (tmp_path / "bench" / "results.json").write_text(json.dumps({"results": {"aitex-p4": {
        "Hybrid Evidence UNet + PatchCore": {}, "PatchCore": {}}}}))
    assert methods_run(tmp_path / "bench") == ("patchcore", "hybrid_evidence") and methods_run(tmp_path) is None


def test_a_bench_step_logs_when_it_started_and_how_long_it_took():
    import re

    from benchmarks.run import run

    logs = []
    r = run(["ensemble", "--help"], logs.append)
    assert re.fullmatch(r"\d\d:\d\d:\d\d \$ ensemble --help", logs[0]) and "calibrate" in r["output"]
    assert re.fullmatch(r"\d\d:\d\d:\d\d   ensemble --help: \d+ s, peak \d+ MiB", logs[1]) and len(logs) == 2
    with pytest.raises(SystemExit, match="step failed"):
        run(["ensemble", "nonsense"], logs.append)


class StopBench(Exception):
    """Raised where `benchmarks.run.run_set` would read the test crops: the steps before it are what is tested."""


@pytest.fixture
def bench_steps(tmp_path, monkeypatch):
    """`benchmarks.run` with its steps recorded, not run (each touches the file it would make), and stopped before
    the evaluation: (the module, the list of step commands)."""
    import benchmarks.run as bench

    calls = []

    def fake_run(cmd, log):
        calls.append(cmd)
        Path(cmd[cmd.index("-o") + 1]).touch()
        return {"seconds": 1.0, "peak_mb": 1.0}

    def stop(*a, **k):
        raise StopBench

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "load_ground_truth", stop)
    monkeypatch.setattr(bench, "competition_dir", lambda *a: tmp_path)
    return bench, calls


def test_bench_overrides_reach_every_model_after_its_own_settings(tmp_path, bench_steps):
    """`benchmarks/run.py -s KEY=VALUE` goes to the segmenters' training and to the baselines' fit alike, last (so it
    wins over the budget's settings): a data.holdout override gives the hybrid's models one held-out split."""
    bench, calls = bench_steps
    with pytest.raises(StopBench):
        bench.run_set("x-p1", str(tmp_path), 1, tmp_path / "out", dict(bench.FULL), ("evidence", "patchcore"),
                      False, print, overrides=("data.holdout=0.3", "baseline.n_train=900"))
    assert [c[:2] for c in calls] == [["seg", "train"], ["baseline", "fit"]]
    for cmd in calls:
        sets = [cmd[i + 1] for i, x in enumerate(cmd) if x == "-s"]
        assert sets[-2:] == ["data.holdout=0.3", "baseline.n_train=900"]
    fit = [calls[1][i + 1] for i, x in enumerate(calls[1]) if x == "-s"]
    assert fit.index("baseline.n_train=300") < fit.index("baseline.n_train=900")


def test_bench_fits_patchcore_zoomed_as_its_own_file_and_only_on_request(tmp_path, bench_steps):
    """`--methods patchcore_zoom`: `baseline fit --method patchcore` with zoom 2 and a quarter of the coreset
    ratio, into a file of its own beside PatchCore's (which keeps its settings); not in the default rows."""
    bench, calls = bench_steps
    assert "patchcore_zoom" in bench.METHODS and "patchcore_zoom" not in bench.DEFAULT_METHODS
    with pytest.raises(StopBench):
        bench.run_set("x-p1", str(tmp_path), 1, tmp_path / "out", dict(bench.FULL), ("patchcore", "patchcore_zoom"),
                      False, print, overrides=("baseline.seed=1",))
    sets = [[c[i + 1] for i, x in enumerate(c) if x == "-s"] for c in calls]
    outs = [Path(c[c.index("-o") + 1]).name for c in calls]
    assert [c[:4] for c in calls] == [["baseline", "fit", "--method", "patchcore"]] * 2
    assert outs == ["patchcore.pt", "patchcore_zoom.pt"]
    assert not any("zoom" in s for s in sets[0])
    assert sets[1][-3:] == ["baseline.zoom=2", "baseline.coreset_ratio=0.0125", "baseline.seed=1"]
    steps = json.loads((tmp_path / "out" / "steps.json").read_text())
    assert set(steps) == {"fit_patchcore", "fit_patchcore_zoom"}  # each its own step: timed, reused, resumed apart


def test_bench_trains_unet3plus_as_its_own_row_only_on_request(tmp_path, bench_steps):
    """`--methods unet3plus`: one `seg train` with model.arch=unet3plus into its own run folder, no partner; the
    default rows leave it out (its training takes several times the UNet's on a CPU)."""
    bench, calls = bench_steps
    assert "unet3plus" in bench.METHODS and "unet3plus" not in bench.DEFAULT_METHODS
    with pytest.raises(StopBench):
        bench.run_set("x-p1", str(tmp_path), 1, tmp_path / "out", dict(bench.FULL), ("unet3plus",), False, print)
    assert len(calls) == 1 and calls[0][:2] == ["seg", "train"]
    sets = [calls[0][i + 1] for i, x in enumerate(calls[0]) if x == "-s"]
    assert "model.arch=unet3plus" in sets and bench.NO_PARTNER in sets
    assert Path(calls[0][calls[0].index("-o") + 1]).name == "unet3plus_s0"


def test_bench_never_resumes_what_another_run_left_and_restarts_what_cannot_resume(tmp_path, bench_steps,
                                                                                     monkeypatch):
    """A step run afresh starts from nothing (a stale last.pt of another run would be resumed later); a step that
    cannot resume (its config or code changed) is run afresh instead of failing every `--reuse`."""
    bench, calls = bench_steps
    fake_run = bench.run
    out = tmp_path / "out"
    (out / "evidence_s0").mkdir(parents=True)
    (out / "evidence_s0" / "last.pt").write_bytes(b"another run's")

    def once(reuse):
        calls.clear()
        with pytest.raises(StopBench):
            bench.run_set("x-p1", str(tmp_path), 1, out, dict(bench.QUICK), ("evidence",), reuse, print)

    def killed(cmd, log):
        assert not (out / "evidence_s0" / "last.pt").exists()  # gone before the step starts
        calls.append(cmd)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        once(True)

    def no_resume(cmd, log):
        if "--resume" in cmd:
            calls.append(cmd)
            raise SystemExit("step failed (1): ...\nerror: last.pt: another model than this command's")
        return fake_run(cmd, log)

    monkeypatch.setattr(bench, "run", no_resume)
    once(True)
    assert [c[-1] == "--resume" for c in calls] == [True, False]
    assert json.loads((out / "steps.json").read_text())["train_evidence"]["resumed"] is False


def test_bench_checks_every_sets_folders_before_it_trains_anything(tmp_path, bench_steps, monkeypatch):
    bench, calls = bench_steps

    def layout(root, part, kind):
        if part == 9:
            raise InputError(f"{root}: no part{part}/{kind} folder")
        return tmp_path

    monkeypatch.setattr(bench, "competition_dir", layout)
    with pytest.raises(InputError, match="no part9/OK_Images"):
        bench.main(["--quick", "--sets", "a:1,b:9", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert calls == [] and not (tmp_path / "o").exists()


def test_bench_quick_makes_the_default_methods_models_only(tmp_path, bench_steps):
    """`bench --quick` trains the default method's two models (at the quick budget), nothing else, unless asked."""
    bench, calls = bench_steps

    def made(*args):
        calls.clear()
        with pytest.raises(StopBench):
            bench.main([*args, "--data", str(tmp_path), "--out", str(tmp_path / "out")])
        return [next(x for x in c if x.startswith("model.arch=")).split("=")[1] if c[0] == "seg" else
                c[c.index("--method") + 1] for c in calls], calls

    models, calls = made("--quick")
    assert models == ["evidence_unet", "patchcore"]
    assert calls[0][calls[0].index("--epochs") + 1] == "4"
    assert len(made()[0]) == 7  # the full run: every default row's models
    assert made("--quick", "--methods", "padim")[0] == ["padim"]


def test_bench_reuse_keeps_a_model_only_when_made_with_the_same_settings(tmp_path, bench_steps, monkeypatch):
    """`benchmarks/run.py --reuse` keeps a model made by the same command (in a copied folder too), and makes it
    again when the overrides differ: a reused model never stands for another setting."""
    bench, calls = bench_steps
    fake_run = bench.run

    def once(out, overrides, reuse=True):
        calls.clear()
        with pytest.raises(StopBench):
            bench.run_set("x-p1", str(tmp_path), 1, out, dict(bench.FULL), ("padim",), reuse, print,
                          overrides=overrides)
        return len(calls)

    assert once(tmp_path / "a", ("baseline.seed=0",)) == 1
    assert once(tmp_path / "a", ("baseline.seed=0",)) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert once(tmp_path / "b", ("baseline.seed=0",)) == 0  # the folder's own path is not a setting
    assert once(tmp_path / "b", ("baseline.seed=1",)) == 1
    assert once(tmp_path / "b", ("baseline.seed=1",)) == 0
    assert once(tmp_path / "b", ("baseline.seed=3",), reuse="any") == 0  # recalibrate.py: whatever made it

    def crash(cmd, log):  # re-made for seed 2, dead half-way: the half-written file stands for no setting
        Path(cmd[cmd.index("-o") + 1]).touch()
        raise RuntimeError("killed")

    monkeypatch.setattr(bench, "run", crash)
    with pytest.raises(RuntimeError):
        once(tmp_path / "b", ("baseline.seed=2",))
    monkeypatch.setattr(bench, "run", fake_run)
    assert once(tmp_path / "b", ("baseline.seed=1",)) == 1 and "--resume" not in calls[0]  # another setting
    monkeypatch.setattr(bench, "run", crash)
    with pytest.raises(RuntimeError):
        once(tmp_path / "b", ("baseline.seed=2",))
    monkeypatch.setattr(bench, "run", fake_run)
    assert once(tmp_path / "b", ("baseline.seed=2",)) == 1 and calls[0][-1] == "--resume"  # the same: resumed
    assert once(tmp_path / "b", ("baseline.seed=2",)) == 0
    assert json.loads((tmp_path / "b" / "steps.json").read_text())["fit_padim"]["resumed"] is True


def test_batchnorm_folding_keeps_the_maps_and_leaves_a_shared_convolution_alone():
    """Prediction folds each BatchNorm into the convolution before it (`fold_batchnorm`): every one of a UNet's
    with an EfficientNet encoder, the same logits to float rounding, the loaded model itself untouched; a
    convolution whose output also feeds something else is not folded."""
    import segmentation_models_pytorch as smp

    from core.device import fold_batchnorm

    torch.manual_seed(0)
    net = smp.Unet("tu-tf_efficientnet_lite0", encoder_weights=None, in_channels=1, classes=1,
                   decoder_channels=(32, 16, 16, 8, 8))
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:  # statistics far from the identity, so a wrong fold shows
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.data.normal_(1, 0.3)
        bn.bias.data.normal_(0, 0.3)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded, n = fold_batchnorm(net, torch.rand(2, 1, 64, 64))
    assert n == len(norms) > 20
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the loaded model as it was
    x = torch.rand(3, 1, 96, 128)
    with torch.no_grad():
        a, b = net(x), folded(x)
    assert torch.allclose(a, b, rtol=0, atol=1e-4 * float(a.abs().max())) and not torch.equal(a, b)

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the convolution's output is used twice: folding it would change the sum

    shared = Shared()
    shared.bn.running_var.fill_(4.0)
    shared.eval()
    same, n = fold_batchnorm(shared, torch.rand(2, 1, 16, 16))
    assert same is shared and n == 0
