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
from synth.params import extent
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


def test_sizes_are_drawn_log_uniformly_so_small_defects_are_as_common_as_large_ones():
    rng = np.random.default_rng(0)
    x = np.array([extent(rng, (0.01, 1.0)) for _ in range(4000)])
    assert 0.01 <= x.min() and x.max() <= 1.0
    # every decade equally likely: the median at the geometric mean (0.1), not the midpoint (0.505)
    assert abs(np.median(x) - 0.1) < 0.015 and abs(np.mean(x < 0.1) - 0.5) < 0.03
    assert abs(np.mean(x < 0.0316) - 0.25) < 0.03
    u = [extent(np.random.default_rng(i), (0.0, 0.4)) for i in range(2000)]  # a range from 0: uniform
    assert abs(np.median(u) - 0.2) < 0.02
    # a blob's radius follows `synth.sizes`: over a range of 1 : 8, with `log` half the blobs are smaller than a
    # blob of radius sqrt(1 * 8) = 2.83 units (area ~ radius^2); drawn uniformly, only (2.83 - 1) / 7 = 26 % are
    ref = math.pi * (math.sqrt(0.02 * 0.16) * 128) ** 2
    for sizes, below in (("log", 0.5), ("uniform", 0.26)):
        engine = DefectSynthesizer(SynthConfig(sizes=sizes, params={"bezier_blob": {
            "scale_range": (0.02, 0.16), "irregularity_range": (0, 0), "aspect_range": (1, 1)}}))
        blob = engine.shapes["bezier_blob"]
        areas = np.array([blob.render(blob.get_params(np.random.default_rng(i), 128), 128).sum() for i in range(600)])
        assert abs(np.mean(areas < ref) - below) < 0.07, sizes
    with pytest.raises(ValueError, match="sizes: expected uniform or log"):
        SynthConfig(sizes="big")


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


# ------------------------------------------------------------------------------- texture-relative families (#12)
def one_family(ok_dir, family, n=24, **cfg):
    return [s for s in draws(ok_dir, n, normal_ratio=0, max_defects=1, families={family: 1.0}, **cfg)
            if not s[2]["normal"]]


def high_pass(img):
    f = img.astype(np.float32)
    return f - cv2.GaussianBlur(f, (0, 0), 3)


@pytest.mark.parametrize("family", ["stain", "line", "crack", "blur", "sharpen", "shift", "edge"])
def test_texture_families_give_masks_of_their_kind_and_touch_nothing_else(ok_dir, family):
    from synth.texture import Shift

    samples = one_family(ok_dir, family, 60 if family == "edge" else 24)
    assert len(samples) >= (8 if family == "edge" else 16), family  # edge: only crops that reach the dark band
    r = edge_radius(1.5)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    checked = 0  # samples whose mask has an interior away from the soft rim, where the look is checked
    for image, mask, rec, crop in samples:
        assert rec["families"] == [family]
        outside = cv2.dilate(mask, kernel) == 0
        assert np.array_equal(image[outside], crop[outside]), family
        inner = cv2.erode(mask, kernel) > 0  # away from the soft rim
        d = rec["defects"][0]
        if family == "stain":  # large, and the texture survives under the shading
            assert mask.sum() >= 150
            if inner.sum() > 50:
                checked += 1
                assert np.corrcoef(high_pass(image)[inner], high_pass(crop)[inner])[0, 1] > 0.5
        if family == "line":  # long and thin: crosses a good part of the crop
            checked += 1
            (_, _), (w, h), _ = cv2.minAreaRect(cv2.findNonZero(mask))
            assert max(w, h) >= 0.3 * 128 or max(w, h) >= 4 * min(w, h), (w, h)
        if family == "crack":  # a hair-line: at most 5 px wide, long, and far darker or brighter than the surface
            checked += 1
            assert (cv2.distanceTransform(mask, cv2.DIST_L2, 3) > 3.0).sum() <= 0.05 * mask.sum()  # bar junctions
            (_, _), (w, h), _ = cv2.minAreaRect(cv2.findNonZero(mask))
            assert max(w, h) >= 0.2 * 128, (w, h)
            local = cv2.GaussianBlur(crop.astype(np.float32), (0, 0), 3)[mask > 0].mean()
            assert np.abs(image.astype(int) - crop)[mask > 0].mean() >= 0.08 * local
        if family in ("blur", "sharpen") and inner.sum() > 30:  # the texture is smoothed away or exaggerated
            checked += 1
            before, after = np.abs(high_pass(crop)[inner]).mean(), np.abs(high_pass(image)[inner]).mean()
            assert (after < before) if family == "blur" else (after > before)
        if family == "shift" and inner.sum() > 30:  # the content inside is the crop moved by the recorded offset
            checked += 1
            moved = np.clip(np.round(Shift.render(crop, mask, d["fill"], crop)), 0, 255)
            assert np.abs(image[inner].astype(int) - moved[inner]).mean() < 1.5
        if family == "edge":  # on the image's edge: the dark band of the tile-like images ends at x = 22
            checked += 1
            column = 22 - rec["crop"][0]
            ys, xs = np.nonzero(mask)
            assert 0 <= column < 128 and np.abs(xs - column).min() <= 3, (column, xs.min(), xs.max())
    assert checked >= 4, (family, checked)


def test_lines_follow_the_texture_direction(ok_dir):
    """The tile-like images have vertical streaks: lines drawn along the texture are near vertical."""
    samples = one_family(ok_dir, "line", params={"line": {"along_probability": 1.0}})
    angles = []
    for image, mask, rec, crop in samples:
        p = np.asarray(rec["defects"][0]["shape"]["points"])
        dx, dy = p[-1] - p[0]
        angles.append(abs(math.degrees(math.atan2(abs(dy), abs(dx)))))
    assert np.median(angles) > 70, angles


def test_cracks_follow_the_texture_direction_when_asked_and_wander_about_it(ok_dir):
    """Along the vertical streaks of the tile-like images when `along_probability` is 1, at any angle when it is 0;
    the path is jagged (not a straight segment) and replays from its record."""
    def main_paths(prob):
        out, cfg = [], {"params": {"crack": {"along_probability": prob}}}
        for image, mask, rec, crop in one_family(ok_dir, "crack", **cfg):
            out.append(np.asarray(rec["defects"][0]["shape"]["paths"][0]))
            assert np.array_equal(SHAPES["crack"].render(rec["defects"][0]["shape"], 128) > 0, mask > 0)
            again = engine_for(ok_dir, **cfg).render(json.loads(json.dumps(rec)), SourcePool(ok_dir))
            assert np.array_equal(again[0], image) and np.array_equal(again[1], mask)
        return out

    def steepness(p):
        dx, dy = p[-1] - p[0]
        return abs(math.degrees(math.atan2(abs(dy), abs(dx))))

    along, anyway = main_paths(1.0), main_paths(0.0)
    assert np.median([steepness(p) for p in along]) > 70
    assert np.median([steepness(p) for p in anyway]) < 60
    turns = [np.abs(np.diff(np.unwrap(np.arctan2(*np.diff(p, axis=0).T[::-1])))).mean() for p in along]
    assert np.median(turns) > 0.05  # radians per step: a crack, not a ruler line


def test_edge_family_draws_another_family_on_crops_without_an_edge(tmp_path):
    d = tmp_path / "flat"
    d.mkdir()
    g = np.random.default_rng(0)
    for i in range(3):  # a fine texture, no edge
        cv2.imwrite(str(d / f"f{i}.png"), np.clip(120 + g.normal(0, 6, (160, 160)), 0, 255).astype(np.uint8))
    samples = draws(d, 20, normal_ratio=0, max_defects=1, families={"edge": 1.0, "blur": 1.0})
    fams = [s[2]["families"] for s in samples]
    assert ["edge"] not in fams and fams.count(["blur"]) >= 15
    only = draws(d, 5, normal_ratio=0, families={"edge": 1.0})  # nothing else to draw: stays normal, says why
    assert all(s[2]["normal"] and "no visible defect" in s[2]["note"] for s in only)


def test_visibility_is_relative_to_the_texture():
    """The same 8-grey-level darkening stands out on a flat surface and not on a busy one."""
    from synth.texture import visibility

    g = np.random.default_rng(0)
    flat = np.clip(120 + g.normal(0, 1, (64, 64)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:64, :64]
    busy = np.clip(120 + 40 * ((yy // 2 + xx // 2) % 2) - 20 + g.normal(0, 1, (64, 64)), 0, 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 1
    for surface, seen in ((flat, True), (busy, False)):
        after = surface.copy()
        after[mask > 0] -= 8
        contrast, vis = visibility(surface, after, mask)
        assert abs(contrast - 8) < 1e-6 and (vis >= SynthConfig().min_visibility) == seen, vis


def test_kept_defects_stand_out_from_their_texture(ok_dir):
    from synth.texture import visibility

    cfg = SynthConfig()
    for image, mask, rec, crop in draws(ok_dir, 60, normal_ratio=0, max_defects=1):
        if not rec["normal"]:
            contrast, vis = visibility(crop, image, mask)
            assert contrast >= cfg.min_contrast and vis >= cfg.min_visibility, rec["families"]


def test_half_of_splits_the_labelled_defects_in_fixed_disjoint_halves():
    from core.io import half_of

    items = list(range(11))
    fit, score = half_of(items, "fit"), half_of(items, "score")
    assert len(fit) == 6 and len(score) == 5 and sorted(fit + score) == items
    assert half_of(items, "fit") == fit and half_of(items, "all") == items
    with pytest.raises(InputError, match="half"):
        half_of(items, "first")


def test_simplex_qp_finds_the_constrained_minimum():
    from seg.gap import simplex_qp

    a = np.eye(3)
    w = simplex_qp(a, np.array([1.0, 0.2, 0.0]))  # min |w|^2 - 2 w.b on the simplex: (0.9, 0.1, 0)
    assert np.allclose(w, [0.9, 0.1, 0.0], atol=1e-4) and abs(w.sum() - 1) < 1e-9


def test_fit_weights_favour_the_family_that_looks_like_the_real_defects(ok_dir, tmp_path):
    """Real defects that are long lines: the fitted mix moves most of its weight to `line`."""
    from seg.gap import fit_family_weights

    pool = tmp_path / "pool"
    generate(ok_dir, pool, 120, SynthConfig(normal_ratio=0, max_defects=1,
                                            families={"bezier_blob": 1.0, "line": 1.0}), seed=0)
    real = tmp_path / "real"
    generate(ok_dir, real, 40, SynthConfig(normal_ratio=0, max_defects=1, families={"line": 1.0}), seed=9)
    defaults = {"bezier_blob": 1.0, "line": 1.0, "stain": 2.0, "shift": 0.0}
    r = fit_family_weights(pool, real / "images", defaults, keep=0.0)
    assert r["weights"]["line"] > 0.35 and r["mmd_fitted"] < r["mmd_default"]
    assert r["weights"]["stain"] == 0.5 and r["unmeasured"] == ["stain"]  # no samples of it: its default share
    assert r["weights"]["shift"] == 0.0  # off by default: stays off
    kept = fit_family_weights(pool, real / "images", defaults, keep=0.5)
    assert kept["weights"]["bezier_blob"] >= 0.125  # half the default mix stays in


def labelled_pits(folder, n=3):
    """n labelled crops, each with one dark elliptic pit on the tile-like texture."""
    (folder / "TC_Images").mkdir(parents=True)
    (folder / "TC_Masks").mkdir()
    for i in range(n):
        img = textured(50 + i)[:128, :128].copy()
        m = np.zeros((128, 128), np.uint8)
        cv2.ellipse(m, (60 + 5 * i, 70), (9, 4), 30, 0, 360, 1, -1)
        img[m > 0] = 20
        cv2.imwrite(str(folder / "TC_Images" / f"d{i}.png"), img)
        cv2.imwrite(str(folder / "TC_Masks" / f"d{i}.png"), m * 255)
    return folder / "TC_Images"


def test_transplant_reproduces_the_pasted_defects_mask_exactly(tmp_path):
    from synth.transplant import RING, TransplantBank

    real = labelled_pits(tmp_path / "real")
    bank = TransplantBank(real)
    assert len(bank.items) == 3
    name = bank.names[0]
    patch, pm = bank.items[name]
    crop = textured(7)[:128, :128]
    h, w = pm.shape
    x0, y0 = 50, 40  # top-left corner of the pasted patch: a whole-pixel move
    params = {"defect": name, "angle": 0.0, "scale": 1.0, "flip": 0, "center": [x0 + w / 2, y0 + h / 2],
              "gain": 1.0}
    out, mask = bank.render(crop, params)
    expected = np.zeros((128, 128), np.uint8)
    expected[y0:y0 + h, x0:x0 + w] = pm
    assert np.array_equal(mask, expected)  # the real mask, moved, pixel for pixel
    reach = cv2.dilate(mask, np.ones((2 * RING + 1, 2 * RING + 1), np.uint8))
    assert np.array_equal(out[reach == 0], crop[reach == 0])
    assert crop[mask > 0].mean() - out[mask > 0].mean() > 30  # the pit stays dark on its new surface


def test_transplant_family_replays_and_refuses_a_missing_folder(ok_dir, tmp_path):
    real = labelled_pits(tmp_path / "real")
    cfg = dict(normal_ratio=0, families={"transplant": 1.0}, transplant=str(real))
    samples = draws(ok_dir, 12, **cfg)
    assert sum(s[2]["families"] == ["transplant"] for s in samples) >= 10
    for image, mask, rec, crop in samples:
        if not rec["normal"]:
            again = engine_for(ok_dir, **cfg).render(rec, SourcePool(ok_dir))
            assert np.array_equal(again[0], image) and np.array_equal(again[1], mask)
    with pytest.raises(ValueError, match="families.transplant: needs synth.transplant"):
        SynthConfig(families={"transplant": 1.0})
    with pytest.raises(ValueError, match="no such folder"):
        SynthConfig(transplant=str(tmp_path / "nowhere"))


def test_cli_fit_weights_prints_an_override_that_trains(ok_dir, tmp_path):
    """`synth fit-weights` prints every family (zeros too: a -s override merges into the defaults) and the
    printed override is a valid config; a bad --half is one line."""
    from seg.config import load_config

    pool, real = tmp_path / "pool", tmp_path / "real"
    generate(ok_dir, pool, 60, SynthConfig(normal_ratio=0, max_defects=1,
                                           families={"bezier_blob": 1.0, "line": 1.0}), seed=0)
    generate(ok_dir, real, 20, SynthConfig(normal_ratio=0, max_defects=1, families={"line": 1.0}), seed=9)
    r = run_cli("synth", "fit-weights", str(pool), "--real", str(real / "images"), "-o", str(tmp_path / "w.json"))
    assert r.returncode == 0, r.stderr
    override = next(line for line in r.stdout.splitlines() if line.startswith("-s "))[4:-1]
    weights = json.loads((tmp_path / "w.json").read_text())["weights"]
    assert set(weights) == set(SynthConfig().families) and "edge: 0.0" in override
    cfg = load_config(None, [override])
    assert cfg["synth"]["families"] == weights
    r = run_cli("synth", "fit-weights", str(pool), "--real", str(real / "images"), "--half", "first")
    assert r.returncode == 2 and "half: expected all, fit or score" in r.stderr and "Traceback" not in r.stderr


def test_bad_synthesis_settings_are_one_line_before_any_worker_starts(ok_dir, tmp_path):
    with pytest.raises(ValueError, match="params.line: unknown key 'widht_range'"):
        DefectSynthesizer(SynthConfig(params={"line": {"widht_range": (0.01, 0.02)}}))
    with pytest.raises(ValueError, match="params.edge: .*'bogus'"):
        DefectSynthesizer(SynthConfig(params={"edge": {"bogus": 1}}))
    bare = tmp_path / "bare" / "images"  # a transplant folder without masks: named by the main process
    bare.mkdir(parents=True)
    cv2.imwrite(str(bare / "a.png"), textured(1))
    cfg = SynthConfig(transplant=str(bare), families={"transplant": 1.0})
    with pytest.raises(InputError, match="no masks folder beside it"):
        generate(ok_dir, tmp_path / "out", 10, cfg, workers=2)


def test_draw_pair_is_draw_with_the_clean_crop_and_training_items_carry_it_augmented_alike(ok_dir):
    """The clean original of a synthetic sample (what a reconstruction model learns to restore) is the source
    crop it was drawn on, and the training augmentation transforms it exactly as the image: a normal sample's clean
    image equals it, a defective one differs from it only under (and next to) its mask."""
    from seg.data import SeededAugment, build_augment
    from synth.dataset import SynthDataset

    engine = DefectSynthesizer(SynthConfig(size=64, normal_ratio=0.3))
    pool = SourcePool(ok_dir, 1, 64)
    for i in range(6):
        image, mask, rec = engine.draw(np.random.default_rng([9, i]), pool)
        image2, clean, mask2, rec2 = engine.draw_pair(np.random.default_rng([9, i]), pool)
        assert np.array_equal(image, image2) and np.array_equal(mask, mask2) and rec == rec2
        assert np.array_equal(clean, engine._crop(pool.load(pool.index(rec["source"])), rec["crop"]))
    aug = SeededAugment(build_augment({"flip": 0.5, "vflip": 0.5, "rot90": 0.5, "brightness_contrast": 0.8,
                                       "noise": 0.8, "blur": 0.3, "shift": 0.5}))
    assert "clean" not in SynthDataset(engine, pool, 2, seed=3, augment=aug)[0]  # only for a model that wants it
    ds = SynthDataset(engine, pool, 24, seed=3, augment=aug, with_clean=True)
    kinds = set()
    for k in range(len(ds)):
        item = ds[k]
        img, clean, m = item["image"][0].numpy(), item["clean"][0].numpy(), item["mask"][0].numpy()
        if not m.any():
            assert np.array_equal(img, clean)
            kinds.add("normal")
            continue
        near = cv2.dilate(m.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        assert np.abs(img - clean)[m > 0].mean() > 2 / 255
        assert (np.abs(img - clean)[~near] > 1 / 255).mean() < 0.02
        kinds.add("defective")
    assert kinds == {"normal", "defective"}
