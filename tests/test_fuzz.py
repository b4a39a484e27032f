"""Input fuzzing: every odd file a user can hand the toolkit gives one clear line naming the file (exit code 2), or
a warning and a skip where the run can go on, or just works; never a traceback, never a hang.

Each case runs the real CLI in-process (typer's runner) under an alarm, so a hang fails the test instead of CI.
"""

from __future__ import annotations

import json
import os
import signal
import traceback
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, textured, tiny_patchcore_args, write_ok_images
from PIL import Image
from typer.testing import CliRunner

import cli

GOOD = 3  # good images beside the odd one


def png_bytes(img: np.ndarray, ext: str = ".png") -> bytes:
    return cv2.imencode(ext, img)[1].tobytes()


def make_odd(folder: Path, kind: str) -> Path | None:
    """Write one odd input of `kind` into `folder`; returns its path (None where it is not a plain path)."""
    base = textured(7)
    p = folder / f"odd_{kind}.png"
    if kind == "truncated_png":
        p.write_bytes(png_bytes(base)[: len(png_bytes(base)) // 2])
    elif kind == "truncated_jpeg":
        p = folder / "odd_truncated.jpg"
        data = png_bytes(base, ".jpg")
        p.write_bytes(data[: len(data) // 3])
    elif kind in ("truncated_bmp", "truncated_tiff"):
        ext = ".bmp" if kind == "truncated_bmp" else ".tif"
        p = folder / f"odd_{kind}{ext}"
        data = png_bytes(base, ext)
        p.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "one_pixel":
        cv2.imwrite(str(p), np.full((1, 1), 128, np.uint8))
    elif kind == "very_long":
        cv2.imwrite(str(p), np.tile(base[:8, :100], (1, 1000)))  # 100000 x 8
    elif kind == "sixteen_bit":
        cv2.imwrite(str(p), base.astype(np.uint16) * 257)
    elif kind == "float_tiff":
        p = folder / "odd_float.tif"
        cv2.imwrite(str(p), base.astype(np.float32) / 255)
    elif kind == "rgba":
        cv2.imwrite(str(p), cv2.cvtColor(base, cv2.COLOR_GRAY2BGRA))
    elif kind == "palette":
        Image.fromarray(base).convert("P").save(p)
    elif kind == "non_utf8_name":
        name = os.fsencode(str(folder)) + b"/odd_\xff\xfe.png"
        with open(name, "wb") as f:
            f.write(png_bytes(base))
        return None
    elif kind == "space_name":
        p = folder / "odd with spaces.png"
        p.write_bytes(png_bytes(base))
    elif kind == "symlink_loop":
        os.symlink(folder / "odd_loop.png", folder / "odd_loop.png")
        os.symlink(folder, folder / "odd_dir_loop")
        return folder / "odd_loop.png"
    elif kind == "directory_named_like_an_image":
        p.mkdir()
    elif kind == "unreadable":
        p.write_bytes(png_bytes(base))
        p.chmod(0)
    else:
        raise ValueError(kind)
    return p


KINDS = ["truncated_png", "truncated_jpeg", "truncated_bmp", "truncated_tiff", "corrupt", "empty", "one_pixel",
         "very_long", "sixteen_bit", "float_tiff", "rgba", "palette", "non_utf8_name", "space_name", "symlink_loop",
         "directory_named_like_an_image", "unreadable"]
FINE = {"one_pixel", "very_long", "sixteen_bit", "rgba", "palette", "non_utf8_name", "space_name",
        "directory_named_like_an_image"}  # used (or, for a folder, ignored) without a word


class Hang(Exception):
    pass


def invoke(*args, seconds: int = 120):
    """Run the CLI in-process; fails on a traceback (any exception other than a clean exit) or a hang."""
    def alarm(*_):
        raise Hang(f"no answer within {seconds} s: {args}")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        r = CliRunner().invoke(cli.app, [str(a) for a in args])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError("traceback:\n" + "".join(traceback.format_exception(r.exception)))
    return r.exit_code, r.stdout + r.stderr


def one_line_error(out: str, *names: str) -> bool:
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    return len(lines) == 1 and all(n in lines[0] for n in names)


def skip_unreadable_as_root(kind: str) -> None:
    if kind == "unreadable" and os.geteuid() == 0:
        pytest.skip("running as root: permissions do not stop reading (see the simulated case)")


@pytest.fixture
def deny_odd_reads(monkeypatch):
    """What a file without read permission gives a non-root user, simulated (the tests may run as root)."""
    import core.io

    real = core.io.np.fromfile

    def fromfile(path, *a, **k):
        if "odd_denied" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(core.io.np, "fromfile", fromfile)


def test_a_file_without_read_permission_is_named_simulated(tmp_path, deny_odd_reads, model):
    ok = tmp_path / "ok"
    ok.mkdir()
    for i in range(GOOD):
        cv2.imwrite(str(ok / f"good_{i}.png"), textured(i))
    cv2.imwrite(str(ok / "odd_denied.png"), textured(9))
    code, out = invoke("synth", "generate", "--source", ok, "-o", tmp_path / "gen", "-n", 4, "-s", "synth.size=64")
    assert code == 0 and "warning" in out and "odd_denied.png: cannot be read (Permission denied)" in out, out
    tc = tmp_path / "TC_Images"
    tc.mkdir()
    cv2.imwrite(str(tc / "t0.bmp"), textured(0)[:128, :128])
    cv2.imwrite(str(tc / "odd_denied.bmp"), textured(1)[:128, :128])
    code, out = invoke("ensemble", "predict", "-m", model, "--images", tc, "-o", tmp_path / "pred", "--tta", "none")
    assert code == 2 and one_line_error(out, "odd_denied.bmp", "Permission denied"), out


@pytest.mark.parametrize("kind", KINDS)
def test_odd_ok_images_are_skipped_with_a_warning_or_used(kind, tmp_path):
    skip_unreadable_as_root(kind)
    ok = tmp_path / "ok"
    ok.mkdir()
    for i in range(GOOD):
        cv2.imwrite(str(ok / f"good_{i}.png"), textured(i))
    odd = make_odd(ok, kind)
    code, out = invoke("synth", "generate", "--source", ok, "-o", tmp_path / "gen", "-n", 6, "-s", "synth.size=64",
                       "-s", "data.holdout=0")
    assert code == 0, out
    if kind not in FINE:
        assert "warning" in out and odd.name in out, out
    assert len(list((tmp_path / "gen" / "images").glob("*.png"))) == 6


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in FINE and k != "symlink_loop"])
def test_a_folder_of_only_unreadable_images_is_one_clear_error(kind, tmp_path):
    skip_unreadable_as_root(kind)
    ok = tmp_path / "ok"
    ok.mkdir()
    make_odd(ok, kind)
    code, out = invoke("synth", "generate", "--source", ok, "-o", tmp_path / "gen", "-n", 4)
    assert code == 2 and one_line_error(out, str(ok)), out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzmodel")
    path = root / "pc.pt"
    code, out = invoke(*tiny_patchcore_args(write_ok_images(root / "ok", 4)), "-o", path)
    assert code == 0, out
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_odd_test_images_give_one_clear_line_or_a_prediction(kind, tmp_path, model):
    skip_unreadable_as_root(kind)
    tc = tmp_path / "TC_Images"
    tc.mkdir()
    for i in range(GOOD):
        cv2.imwrite(str(tc / f"t{i}.bmp"), textured(i)[:128, :128])
    odd = make_odd(tc, kind)
    code, out = invoke("ensemble", "predict", "-m", model, "--images", tc, "-o", tmp_path / "pred", "--tta", "none")
    if kind == "symlink_loop":  # nothing to read there: skipped with a warning naming it
        assert code == 0 and "warning" in out and "odd_loop.png" in out, out
    elif kind in FINE:
        assert code == 0, out
        assert len(list((tmp_path / "pred" / "masks").glob("*.png"))) == GOOD + (kind != "directory_named_"
                                                                                  "like_an_image")
    else:  # a test crop that cannot be read stops the submission (no file would mean "normal"): one line
        assert code == 2 and one_line_error(out, odd.name), out
        assert not (tmp_path / "pred").exists()


def test_labelled_folders_with_odd_masks(tmp_path, model):
    tc = tmp_path / "TC_Images"
    masks = tmp_path / "TC_Masks"
    tc.mkdir()
    masks.mkdir()
    for i in range(4):
        cv2.imwrite(str(tc / f"t{i}.bmp"), textured(i)[:128, :128])
    m = np.zeros((128, 128), np.uint8)
    for i in range(4):
        cv2.imwrite(str(masks / f"t{i}.png"), m)
    m[40:60, 40:60] = 255
    cv2.imwrite(str(masks / "t1.png"), m)
    cv2.imwrite(str(masks / "t2.png"), m[:64])  # a mask whose size differs from its image
    calibrate = ("ensemble", "calibrate", "-m", model, "--val-dir", tc, "-o", tmp_path / "e.json", "--tta", "none")
    code, out = invoke(*calibrate)
    assert code == 2 and one_line_error(out, "t2.png", "64", "128"), out
    cv2.imwrite(str(masks / "t2.png"), m)
    (masks / "t3.png").unlink()  # a mask folder with a file missing
    code, out = invoke(*calibrate)
    assert code == 2 and one_line_error(out, "t3.png", "missing"), out
    code, out = invoke("ensemble", "predict", "-m", model, "--images", tc, "-o", tmp_path / "pred", "--tta", "none")
    assert code == 0, out
    code, out = invoke("ensemble", "evaluate", "--pred", tmp_path / "pred", "--images", tc)
    assert code == 2 and one_line_error(out, "t3.png", "missing"), out


def test_odd_model_and_ensemble_files(tmp_path, model):
    import torch

    tc = tmp_path / "TC_Images"
    tc.mkdir()
    cv2.imwrite(str(tc / "t0.bmp"), textured(0)[:128, :128])
    cases = {}
    other = tmp_path / "other_arch.pt"  # another architecture's weights under this file's config
    state = torch.load(model, weights_only=True)
    state["config"]["model"]["arch"] = "unet"
    torch.save(state, other)
    cases[other] = "other_arch.pt"
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    cases[empty] = "empty.pt"
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    cases[text] = "notes.pt"
    missing_keys = tmp_path / "partial.pt"
    torch.save({"config": state["config"]}, missing_keys)
    cases[missing_keys] = "partial.pt"
    for path, name in cases.items():
        code, out = invoke("ensemble", "predict", "-m", path, "--images", tc, "-o", tmp_path / "pred")
        assert code == 2 and one_line_error(out, name), (name, out)
    ens = tmp_path / "ensemble.json"
    ens.write_text(json.dumps({"checkpoints": [str(tmp_path / "gone.pt")], "tta": "none", "merge": "mean",
                               "weights": [1.0], "norms": [{"pixel": [0, 1], "image": None}],
                               "params": {"threshold": 0, "image_threshold": 0, "min_area": 0, "opening": 0}}))
    code, out = invoke("ensemble", "predict", "-e", ens, "--images", tc, "-o", tmp_path / "pred")
    assert code == 2 and one_line_error(out, "gone.pt"), out
    ens.write_text("{not json")
    code, out = invoke("ensemble", "predict", "-e", ens, "--images", tc, "-o", tmp_path / "pred")
    assert code == 2 and one_line_error(out, "ensemble.json"), out
    assert ROOT.exists()
