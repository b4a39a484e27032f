"""Inference, submission format, score, TTA, voting, tiling, atomic outputs, calibration, evaluation."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch
from conftest import SAMPLE, SHARED, textured
from torch import nn

from ensemble.calibrate import calibrate
from ensemble.evaluate import compute_metrics, evaluate, load_ground_truth
from ensemble.metrics import average_precision, competition_score, roc_auc
from ensemble.models import Ensemble
from ensemble.predict import run_predict
from ensemble.submission import mask_to_record, read_submission, record_to_mask
from synth.io import read_image

PARAMS = {"threshold": 0.5, "image_threshold": 0.5, "min_area": 0, "opening": 0}


class Pointwise(nn.Module):
    """mask logit = a * pixel + b: a per-pixel model, so tiling must reproduce the whole image exactly."""

    def __init__(self, a=8.0, b=-4.0, head=None):
        super().__init__()
        self.a, self.b, self.head = a, b, head

    def forward(self, x):
        image = None if self.head is None else torch.full((x.shape[0], 1), self.head)
        return {"mask": self.a * x[:, :1] + self.b, "image": image}


class Isotropic(nn.Module):
    """A convolution with a kernel symmetric under the dihedral group D4: equivariant to flips and rot90."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        k = torch.rand(5, 5)
        k = sum(torch.rot90(kk, r) for kk in (k, k.T) for r in range(4))
        self.conv = nn.Conv2d(1, 1, 5, padding=2, bias=False)
        self.conv.weight.data = (k / k.sum() * 8)[None, None]

    def forward(self, x):
        return {"mask": self.conv(x) - 3.5, "image": None}


def test_submission_json_round_trips_masks_in_row_col_order():
    mask = np.zeros((128, 128), np.uint8)
    mask[3, 7] = 1
    rec = mask_to_record(mask, "a.bmp")
    assert rec["regions"] == [{"points": ["3, 7"]}] and rec["Height"] == 128 and rec["name"] == "a.bmp"
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = (cv2.GaussianBlur(rng.random((128, 96)), (0, 0), 3) > 0.55).astype(np.uint8)
        rec = mask_to_record(m, "x.bmp")
        n_components = cv2.connectedComponents(m, connectivity=8)[0] - 1
        assert len(rec["regions"]) == n_components > 1
        assert np.array_equal(record_to_mask(rec), m)


def test_score_of_ground_truth_is_one_and_of_nothing_is_point_three():
    _, _, gt = load_ground_truth(SAMPLE / "round_test/part1/TC_Images")
    assert competition_score(gt, gt)["score"] == pytest.approx(1.0)
    empty = [np.zeros_like(g) for g in gt]
    assert competition_score(empty, gt)["score"] == pytest.approx(0.3)
    if SHARED.exists():  # the full shared set: labels in JSON and masks in PNG agree
        paths, stems, masks = load_ground_truth(SHARED / "round_test/part1/TC_Images")
        labels = read_submission(SHARED / "round_test/part1/TC_Labels", [p.stem for p in paths])
        assert all(np.array_equal(a, b) for a, b in zip(masks, labels))
        assert competition_score(labels, masks)["score"] == pytest.approx(1.0)


def test_metrics_match_known_values():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.8333333)
    gt = [np.ones((4, 4), np.uint8), np.zeros((4, 4), np.uint8)]
    half = np.zeros((4, 4), np.uint8)
    half[:2] = 1
    m = competition_score([half, half], gt)  # defective found with IoU 0.5, normal flagged
    assert m["escape"] == 0 and m["overkill"] == 1 and m["miou"] == pytest.approx(0.5)
    assert m["score"] == pytest.approx(0.5 + 0 + 0.1)


def test_d4_tta_on_an_equivariant_model_changes_nothing():
    img = textured(4)[:128, :128]
    plain = Ensemble([Isotropic()], 1, 128, "cpu", tta_mode="none").predict([img])[0]
    d4 = Ensemble([Isotropic()], 1, 128, "cpu", tta_mode="d4").predict([img])[0]
    assert np.allclose(plain["prob"], d4["prob"], atol=1e-5)
    assert np.array_equal(plain["hits"], d4["hits"]) and 0 < plain["hits"].mean() < 1


def test_k_of_n_voting():
    img = np.zeros((128, 128), np.uint8)
    img[:, :64] = 255  # models see 1.0 on the left half and 0.0 on the right
    models = [Pointwise(8, -4), Pointwise(8, -4), Pointwise(0, -1)]  # two say "left half", one says "nothing"
    hits = {k: Ensemble(models, 1, 128, "cpu", "none", "vote", vote_k=k).predict([img])[0]["hits"]
            for k in (1, 2, 3)}
    assert hits[1][:, :64].all() and hits[2][:, :64].all() and not hits[3].any()
    assert not hits[1][:, 64:].any()
    weighted = Ensemble(models, 1, 128, "cpu", "none", "vote", vote_k=2, weights=[0.2, 0.2, 2.6]).predict([img])[0]
    assert not weighted["hits"].any()  # the heavy "nothing" model outvotes the two others
    mean = Ensemble(models, 1, 128, "cpu", "none", "mean").predict([img])[0]
    assert mean["prob"][0, 0] == pytest.approx((2 / (1 + np.exp(-4)) + 1 / (1 + np.e)) / 3, abs=1e-6)


def test_tiling_reproduces_the_whole_image_prediction():
    big = textured(7, h=300, w=260)
    ens = Ensemble([Pointwise()], 1, 128, "cpu", "none", tile_overlap=40, batch_size=5)
    whole = torch.sigmoid(Pointwise()(torch.from_numpy(big)[None, None].float() / 255)["mask"])[0, 0].numpy()
    out = ens.predict([big, big[:100, :90]])
    assert out[0]["prob"].shape == (300, 260) and np.allclose(out[0]["prob"], whole, atol=1e-6)
    assert out[1]["prob"].shape == (100, 90) and np.allclose(out[1]["prob"], whole[:100, :90], atol=1e-6)
    assert all(y + 128 <= 300 and x + 128 <= 260 for y, x in ens.tiles(300, 260))


def test_predict_writes_submission_and_an_interrupted_run_leaves_no_partial_output(tmp_path):
    images = tmp_path / "TC_Images"
    images.mkdir()
    for i in range(6):
        img = textured(i)[:128, :128].copy()
        if i % 2:
            cv2.circle(img, (64, 64), 6, 250, -1)  # bright spot: "defective" for the pointwise model
        cv2.imwrite(str(images / f"c{i}.bmp"), img)
    ens = Ensemble([Pointwise(40, -36)], 1, 128, "cpu", "flip", batch_size=2)
    out = tmp_path / "pred"
    s = run_predict(ens, images, out, PARAMS)
    jsons = sorted(p.stem for p in (out / "submission").glob("*.json"))
    assert jsons == ["c1", "c3", "c5"] and s["defective"] == 3
    m = record_to_mask(__import__("json").loads((out / "submission" / "c1.json").read_text()))
    assert m[64, 64] and m.sum() > 50
    assert (out / "submission.zip").exists() and (out / "scores.csv").read_text().count("\n") == 7
    before = {p.name: p.read_bytes() for p in (out / "submission").iterdir()}

    def boom(k):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_predict(Ensemble([Pointwise(0, 5)], 1, 128, "cpu", "none", batch_size=2), images, out, PARAMS,
                    progress=boom)
    after = {p.name: p.read_bytes() for p in (out / "submission").iterdir()}
    assert after == before  # the previous submission is intact, not half overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TC_Images", "pred"]  # no partial folder left
    with pytest.raises(KeyboardInterrupt):
        run_predict(ens, images, tmp_path / "fresh", PARAMS, progress=boom)
    assert not (tmp_path / "fresh").exists()


def test_calibration_with_only_normal_images_stays_above_every_normal_score():
    normals = [textured(i)[:128, :128] for i in range(8)]
    ens = Ensemble([Pointwise(10, -6)], 1, 128, "cpu", "none")
    gt = [np.zeros((128, 128), np.uint8) for _ in normals]
    report = calibrate(ens, normals, gt, {**PARAMS, "threshold": 0.3})
    seen = [r["prob"].max() for r in ens.predict(normals)]
    assert report["mode"] == "normal-only" and report["params"]["image_threshold"] > max(seen)
    assert report["overkill_on_val"] == 0
    with_head = Ensemble([Pointwise(10, -6, head=1.5)], 1, 128, "cpu", "none")
    report = calibrate(with_head, normals, gt, PARAMS, target_overkill=0.0)
    assert report["params"]["image_threshold"] > 1 / (1 + np.exp(-1.5))


def test_calibration_on_labelled_images_beats_the_defaults():
    rng = np.random.default_rng(0)
    images, gt = [], []
    for i in range(12):
        img = textured(i)[:128, :128].copy()
        m = np.zeros((128, 128), np.uint8)
        if i % 2:
            cv2.circle(m, (int(rng.integers(20, 108)), int(rng.integers(20, 108))), 8, 1, -1)
            img[m > 0] = 230
        images.append(img)
        gt.append(m)
    ens = Ensemble([Pointwise(12, -7)], 1, 128, "cpu", "none")  # noisy: bright streaks fire at 0.5
    report = calibrate(ens, images, gt, PARAMS)
    default_masks = [r["hits"] for r in ens.predict(images)]
    assert report["score"] > competition_score(default_masks, gt)["score"]
    assert report["score"] > 0.95


def test_evaluate_writes_json_markdown_and_html(tmp_path):
    src = SAMPLE / "round_test/part1"
    pred = tmp_path / "pred" / "submission"
    pred.mkdir(parents=True)
    for j in (src / "TC_Labels").glob("*.json"):
        shutil.copy(j, pred / j.name)
    m = evaluate(tmp_path / "pred", src / "TC_Images", tmp_path / "report")
    assert m["score"] == pytest.approx(1.0) and m["overkill"] == 0 and m["escape"] == 0
    assert "| model | 1.000 |" in (tmp_path / "report" / "eval.md").read_text()
    assert (tmp_path / "report" / "eval.html").read_text().count("<img") >= 12
    # a prediction that misses everything: each defective crop escapes
    (tmp_path / "none").mkdir()
    assert evaluate(tmp_path / "none", src / "TC_Images", tmp_path / "r2")["score"] == pytest.approx(0.3)


def test_pixel_and_image_metrics_rank_a_perfect_probability_map_first():
    _, _, gt = load_ground_truth(SAMPLE / "round_test/part1/TC_Images")
    probs = [g.astype(np.float32) * 0.9 + 0.05 for g in gt]
    m = compute_metrics(gt, gt, probs, [float(g.any()) for g in gt])
    assert m["pixel_auroc"] == pytest.approx(1.0) and m["pixel_ap"] == pytest.approx(1.0)
    assert m["image_auroc"] == pytest.approx(1.0)
    img = read_image(SAMPLE / "round_test/part1/TC_Images" / "0FwKHTAgOaO3gLMsJD5URzAO77Ybr8.bmp")
    assert img.shape == (128, 128)
