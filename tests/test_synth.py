"""The synthesis engine: labels match pixels, replay and seeds reproduce bytes, bad input is reported."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import ROOT, textured

from synth.appearance import AlphaBlend, PoissonBlend, Shade, edge_radius
from synth.engine import DefectSynthesizer, SourcePool, SynthConfig
from synth.generate import generate
from core.io import InputError, read_image, read_jsonl
from synth.shapes import SHAPES, BezierStroke, ElasticWarp
from synth.structural import Displacement


def engine_for(ok_dir, **cfg):
    return DefectSynthesizer(SynthConfig(**cfg))


def draws(ok_dir, n=120, seed=0, **cfg):
    engine = DefectSynthesizer(SynthConfig(**cfg))
    pool = SourcePool(ok_dir, engine.config.channels, engine.config.size)
    out = []
    for i in range(n):
        image, mask, rec = engine.draw(np.random.default_rng([seed, i]), pool)
        crop = engine._crop(pool.load(pool.index(rec["source"])), rec["crop"])
        out.append((image, mask, rec, crop))
    return out


def test_defective_samples_have_masks_and_normals_stay_untouched(ok_dir):
    samples = draws(ok_dir, normal_ratio=0.3)
    normal = [s for s in samples if s[2]["normal"]]
    assert 0.15 < len(normal) / len(samples) < 0.45
    for image, mask, rec, crop in samples:
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        if rec["normal"]:
            assert not mask.any() and np.array_equal(image, crop)
        else:
            assert 0 <= rec["difficulty"] <= 1
            replayed = engine_for(ok_dir, normal_ratio=0.3).render(rec, SourcePool(ok_dir))
            assert np.array_equal(replayed[1], mask) and rec["mask_area"] == int(replayed[1].sum()) > 0
            if len(rec["defects"]) == 1:  # a labelled defect is visible: its mean change reaches min_contrast
                assert np.abs(image.astype(int) - crop)[mask > 0].mean() >= SynthConfig().min_contrast


def test_image_unchanged_outside_slightly_dilated_mask(ok_dir):
    """Alpha (soft edges up to sigma 1.5 px -> 3 px reach), Poisson and displacement leave the rest exact."""
    r = edge_radius(1.5)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    for image, mask, rec, crop in draws(ok_dir, normal_ratio=0.0):
        outside = cv2.dilate(mask, kernel) == 0
        assert np.array_equal(image[outside], crop[outside]), rec["families"]


@pytest.mark.parametrize("blend", ["alpha", "poisson"])
def test_blends_only_touch_the_mask(blend):
    crop = textured(3)[:128, :128]
    mask = np.zeros((128, 128), np.uint8)
    cv2.circle(mask, (0, 64), 20, 1, -1)  # touching the border: Poisson must cope
    if blend == "alpha":
        fill = Shade.render(crop, mask, {"sign": -1, "strength": 60, "edge_level": 0.5, "gamma": 1}, crop)
        out = AlphaBlend.render(crop, fill, mask, {"softness": 1.0})
        reach = edge_radius(1.0)
        assert (crop.astype(int) - out)[mask > 0].mean() > 10  # darker inside
    else:  # Poisson carries the fill's gradients (a constant offset vanishes), so paste a turned texture
        fill = np.rot90(textured(5)[:128, :128]).astype(np.float32)
        out = PoissonBlend.render(crop, fill, mask, {})
        reach = 0
        assert np.abs(crop.astype(int) - out)[mask > 0].mean() > 3
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    outside = cv2.dilate(mask, kernel) == 0
    assert np.array_equal(out[outside], crop[outside])


def test_poisson_falls_back_on_masks_without_interior():
    crop = textured(2)[:128, :128]
    line = np.zeros((128, 128), np.uint8)
    line[85:115, 100] = 1  # a 1-px line of 30 px: cv2.seamlessClone raises on it
    fill = crop.astype(np.float32) - 60
    out = PoissonBlend.render(crop, fill, line, {})
    assert np.array_equal(out, AlphaBlend.render(crop, fill, line, {"softness": 0.0}))
    assert np.array_equal(out[line == 0], crop[line == 0]) and (out[line > 0] < crop[line > 0]).all()


def test_each_family_runs_and_gives_its_kind_of_mask():
    rng = np.random.default_rng(0)
    for name, cls in SHAPES.items():
        shape = cls()
        for _ in range(20):
            p = shape.get_params(rng, 128)
            m = cls.render(p, 128)
            assert m.shape == (128, 128) and m.dtype == np.uint8
            if name == "bezier_blob":  # one solid region
                n, _ = cv2.connectedComponents(m)
                hull = cv2.convexHull(cv2.findNonZero(m))
                assert n - 1 == 1 and m.sum() / max(cv2.contourArea(hull), 1) > 0.6
            if name == "bezier_stroke":  # thin: nowhere thicker than its width
                thick = cv2.distanceTransform(np.pad(m, 1), cv2.DIST_L2, 5).max()
                assert m.sum() > 0 and thick <= round(p["width"]) / 2 + 2
            assert m.any(), name  # every family draws something (none of the 5 x 200 seeded draws is empty)
            if name == "gaussian":  # centred on its mean
                ys, xs = np.nonzero(m)
                assert math.dist((xs.mean(), ys.mean()), p["mean"]) < 3 * max(p["sigma"]) + p["grow"]
            if name == "perlin":  # inside its window
                ys, xs = np.nonzero(m)
                d = np.hypot(xs - p["center"][0], ys - p["center"][1])
                assert d.max() < 4 * p["window"]
            if name == "rectangle":
                w, h = p["size"]
                cx, cy = p["center"]
                if w / 2 + h / 2 < min(cx, cy, 128 - cx, 128 - cy):  # fully inside
                    assert abs(m.sum() - w * h) <= 0.1 * w * h + 2 * (w + h)


def test_elastic_warp_moves_the_mask_but_keeps_its_size():
    m = SHAPES["bezier_blob"].render({"points": [[40, 40], [90, 40], [90, 90], [40, 90]]}, 128)
    p = ElasticWarp(sigma_range=(0.04, 0.04)).get_params(np.random.default_rng(1), 128)
    w = ElasticWarp.render(m, p)
    assert not np.array_equal(w, m) and 0.6 < w.sum() / m.sum() < 1.4


def test_displacement_moves_an_edge_inside_its_bump():
    crop = textured(0)[:128, :128]  # dark band on the left: moving it is visible
    p = {"center": [12, 64], "radius": 15, "magnitude": 10, "angle": 0.0, "threshold": 12}
    out, m = Displacement.render(crop, p)
    ys, xs = np.nonzero(m)
    assert m.sum() > 20 and np.hypot(xs - 12, ys - 64).max() < 3 * 15
    assert np.array_equal(out[m == 0], crop[m == 0])


def test_stroke_width_range_is_validated():
    with pytest.raises(ValueError, match="bezier_stroke.width_range"):
        BezierStroke(width_range=(0.3, 0.1))
    with pytest.raises(ValueError, match="families: unknown entry 'blobz'"):
        SynthConfig(families={"blobz": 1.0})


def test_difficulty_bounds_select_easy_or_hard(ok_dir):
    easy = [s[2]["difficulty"] for s in draws(ok_dir, 60, normal_ratio=0, difficulty=(0.0, 0.3))]
    hard = [s[2]["difficulty"] for s in draws(ok_dir, 60, normal_ratio=0, difficulty=(0.6, 1.0))]
    assert np.mean([d <= 0.3 for d in easy]) > 0.9 and np.mean([d >= 0.6 for d in hard]) > 0.9


def test_roi_confines_defects(ok_dir, tmp_path):
    roi = np.zeros((180, 220), np.uint8)
    roi[:, 110:] = 255
    cv2.imwrite(str(tmp_path / "roi.png"), roi)
    for image, mask, rec, crop in draws(ok_dir, 40, normal_ratio=0, roi=str(tmp_path / "roi.png")):
        x = rec["crop"][0]
        assert not mask[:, : max(0, 110 - x)].any()


def test_colour_and_16_bit_inputs(tmp_path):
    d = tmp_path / "ok"
    d.mkdir()
    cv2.imwrite(str(d / "a.png"), textured(1, channels=3))
    cv2.imwrite(str(d / "b.tif"), textured(2).astype(np.uint16) * 257)
    assert read_image(d / "b.tif").dtype == np.uint8
    assert np.array_equal(read_image(d / "b.tif"), textured(2))
    for image, mask, rec, crop in draws(d, 10, channels=3):
        assert image.shape == (128, 128, 3) and mask.shape == (128, 128)


def test_generate_is_byte_identical_across_workers_and_replays(ok_dir, tmp_path):
    cfg = SynthConfig()
    a, b = tmp_path / "a", tmp_path / "b"
    generate(ok_dir, a, 40, cfg, seed=7, workers=1)
    generate(ok_dir, b, 40, cfg, seed=7, workers=2)
    for sub in ("images", "masks"):
        names = sorted(p.name for p in (a / sub).iterdir())
        assert len(names) == 40
        assert all((a / sub / n).read_bytes() == (b / sub / n).read_bytes() for n in names)
    assert (a / "manifest.jsonl").read_bytes() == (b / "manifest.jsonl").read_bytes()
    # replay every manifest line from its recorded parameters alone
    engine, pool = DefectSynthesizer(cfg), SourcePool(ok_dir)
    for row in read_jsonl(a / "manifest.jsonl"):
        image, mask = engine.render(row, pool)
        assert np.array_equal(image, read_image(a / "images" / f"{row['id']}.png"))
        assert np.array_equal(mask * 255, read_image(a / "masks" / f"{row['id']}.png"))
    c = tmp_path / "c"
    generate(ok_dir, c, 40, cfg, seed=8, workers=1)
    assert (a / "manifest.jsonl").read_bytes() != (c / "manifest.jsonl").read_bytes()


def test_interrupted_generate_resumes_to_the_same_bytes(ok_dir, tmp_path):
    cfg = SynthConfig()
    full, part = tmp_path / "full", tmp_path / "part"
    generate(ok_dir, full, 30, cfg, seed=3)
    generate(ok_dir, part, 30, cfg, seed=3)
    lines = (part / "manifest.jsonl").read_bytes().split(b"\n")
    (part / "manifest.jsonl").write_bytes(b"\n".join(lines[:12]) + b"\n" + lines[12][:20])  # torn last line
    (part / "images" / "000020.png").write_bytes(b"half")  # an orphan, half-written image
    summary = generate(ok_dir, part, 30, cfg, seed=3)
    assert summary["skipped"] == 12 and summary["written"] == 18
    assert (part / "manifest.jsonl").read_bytes() == (full / "manifest.jsonl").read_bytes()
    assert (part / "images" / "000020.png").read_bytes() == (full / "images" / "000020.png").read_bytes()
    with pytest.raises(InputError, match="other settings"):
        generate(ok_dir, part, 30, cfg, seed=4)


def test_bad_inputs_give_clear_errors(tmp_path, ok_dir):
    with pytest.raises(InputError, match="does not exist"):
        SourcePool(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        SourcePool(tmp_path / "empty")
    (ok_dir / "broken.png").write_bytes(b"not a png")
    (ok_dir / "notes.txt").write_text("hello")
    warnings = []
    pool = SourcePool(ok_dir, warn=warnings.append)
    assert len(pool) == 5 and len(warnings) == 2
    assert any("broken.png" in w and "cannot be decoded" in w for w in warnings)


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=cwd)


def test_cli_generate_preview_and_errors(ok_dir, tmp_path):
    out = tmp_path / "gen"
    r = run_cli("synth", "generate", "--source", str(ok_dir), "--out", str(out), "--n", "12", "--seed", "1")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(12))
    r = run_cli("synth", "preview", str(out), "--output", str(tmp_path / "p.png"))
    assert r.returncode == 0 and read_image(tmp_path / "p.png", 3).shape[0] > 128
    r = run_cli("synth", "generate", "--source", str(tmp_path / "missing"), "--out", str(out))
    assert r.returncode == 2 and "missing: folder does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("synth", "generate", "--source", str(ok_dir), "--out", str(out), "-s", "synth.familes={}")
    assert r.returncode == 2 and "unknown key 'synth.familes'" in r.stderr and "did you mean 'families'" in r.stderr


def test_seed_streams_of_generate_validation_and_training_never_coincide(ok_dir):
    """numpy pads seed lists with zeros: untagged, `synth generate --seed 12345` reproduced the validation set."""
    from seg.train import synthetic_val_set
    from synth.dataset import SynthDataset
    from synth.streams import GENERATE, TAGS, TRAIN, VALIDATION, stream

    engine, pool = DefectSynthesizer(SynthConfig(size=64)), SourcePool(ok_dir, 1, 64)
    val_images, _ = synthetic_val_set(engine, pool, 4, 12345)
    generated = [engine.draw(stream(GENERATE, 12345, i), pool)[0] for i in range(4)]
    trained = SynthDataset(engine, pool, 4, seed=12345)  # seed == val_seed, epoch 0, rank 0
    for i in range(4):
        v = (val_images[i, 0].numpy() * 255).round().astype(np.uint8)
        assert not np.array_equal(v, generated[i])
        assert not np.array_equal(val_images[i], trained[i]["image"])
    firsts = {tag: stream(tag, 12345, 0, 0, 0).random() for tag in TAGS.values()}
    assert len(set(firsts.values())) == len(TAGS)
    assert stream(TRAIN, 1, 2).random() != stream(VALIDATION, 1, 2).random()


def test_generate_keeps_the_held_out_images_out(ok_dir, tmp_path):
    out = tmp_path / "gen"
    summary = generate(ok_dir, out, 40, SynthConfig(size=64), seed=0, holdout=0.4, holdout_seed=3)
    run = json.loads((out / "run.json").read_text())
    _, held = SourcePool(ok_dir).split(0.4, 3)
    assert run["held_out"] == held.paths and len(held.paths) == 2 == summary["held_out"]
    sources = {row["source"] for row in read_jsonl(out / "manifest.jsonl")}
    assert sources and not sources & set(held.paths) and len(sources) == 3
    run["format"] = 1  # a folder from the version with untagged streams cannot be resumed into
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(InputError, match="older version"):
        generate(ok_dir, out, 40, SynthConfig(size=64), seed=0, holdout=0.4, holdout_seed=3)


def test_gap_meter_is_lower_for_a_set_against_itself_than_against_unrelated_images(ok_dir, tmp_path):
    """`synth gap`: real-like defects (dark pits) against themselves sit at the floor; against noise blotches,
    far above it."""
    from seg.gap import gap_report

    def labelled(folder, seed, kind):
        imgs, masks = folder / "TC_Images", folder / "TC_Masks"
        imgs.mkdir(parents=True)
        masks.mkdir()
        g = np.random.default_rng(seed)
        for i in range(40):
            img = textured(100 + i)[:128, :128].copy()
            m = np.zeros((128, 128), np.uint8)
            c = (int(g.integers(30, 98)), int(g.integers(30, 98)))
            cv2.circle(m, c, int(g.integers(4, 9)), 1, -1)
            img[m > 0] = 15 if kind == "pit" else g.integers(0, 256, int(m.sum()))
            cv2.imwrite(str(imgs / f"c{i}.png"), img)
            cv2.imwrite(str(masks / f"c{i}.png"), m * 255)
        return imgs

    pits, other_pits, noise = (labelled(tmp_path / n, s, k) for n, s, k in
                               (("a", 0, "pit"), ("b", 1, "pit"), ("c", 2, "noise")))
    as_synth = tmp_path / "synth"  # the second pit set as a `synth generate` folder
    (as_synth / "images").mkdir(parents=True)
    (as_synth / "masks").mkdir()
    rows = []
    for i, p in enumerate(sorted(other_pits.iterdir())):
        (as_synth / "images" / f"{i:06d}.png").write_bytes(p.read_bytes())
        (as_synth / "masks" / f"{i:06d}.png").write_bytes((other_pits.parent / "TC_Masks" / p.name).read_bytes())
        rows.append(json.dumps({"id": f"{i:06d}", "normal": False, "families": ["bezier_blob"]}))
    (as_synth / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    same = gap_report(as_synth, pits)
    other = gap_report(as_synth, noise)
    assert same["kid_synthetic"] < 0.25 * other["kid_synthetic"]
    assert abs(same["kid_real_halves"]) < 0.25 * other["kid_synthetic"]
    assert same["families"]["bezier_blob"]["kid"] == pytest.approx(same["kid_synthetic"])
    assert same["picture"][:4] == b"\x89PNG"
