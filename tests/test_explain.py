"""Explain and know when to doubt: CAMs and overlays, MC-dropout and TTA uncertainty, calibration, triage."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histodetect.data.store import open_store, prepare
from histodetect.data.synthetic import write_synthetic
from histodetect.errors import UserError
from histodetect.evaluate import evaluate_run
from histodetect.explain import (
    OVERLAY_SCALE,
    calibrate_run,
    calibrated_threshold,
    centre_fraction,
    class_activation_maps,
    explain_patches,
    fit_temperature,
    nll_at_temperature,
    write_explanations,
)
from histodetect.explain.overlays import OUTLINE_RGB, blend_cams
from histodetect.models import create_model
from histodetect.predict import (
    DEFAULT_UNCERTAINTY,
    entropy_bits,
    load_run,
    mc_dropout,
    predict_logits,
    predict_patches,
    predict_samples,
    predict_to_csv,
    run_thresholds,
    uncertainty_measures,
)
from histodetect.train import fit, load_checkpoint, preset_config, save_atomic
from histodetect.cli import main
from conftest import PooledColour, copy_patches

# Small and fast, as tests/test_train.py: the whole file must run in a few minutes on 2 cores.
# Batches of 16 give 48 steps in 4 epochs of 192 patches: enough for the threshold-sure
# patches to be clearly more accurate than the rest.
TINY = dict(model="histo_tinynet", batch_size=16, epochs=4, max_minutes=0.0, crop_px=48, shift_px=2,
            val_batch_size=128, device="cpu", ema_decay=0.9, warmup_fraction=0.1, drop_rate=0.3)
# Synthetic patches carry their label in the centre 32x32 only; the model sees the whole
# patch (no crop) so that the centre's share of what it saw is the centre's share of the patch.
SYNTHETIC = dict(TINY, epochs=1, crop_px=0, shift_px=0, drop_rate=0.0, hed_sigma=0.0, hed_bias=0.0,
                 brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
CENTRE_SHARE = (32 * 32) / (96 * 96)




@pytest.fixture(scope="module")
def real_store(pcam_jpeg, tmp_path_factory) -> Path:
    """192 real train and 256 real valid patches, balanced."""
    root = tmp_path_factory.mktemp("real")
    copy_patches(pcam_jpeg, root / "src", {"train": 96, "valid": 128})
    prepare(root / "src", root / "store", progress=False)
    return root / "store"


@pytest.fixture(scope="module")
def real_run(real_store, tmp_path_factory) -> Path:
    """histo_tinynet with dropout 0.3, 4 epochs on real patches; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("runs") / "real"
    fit(preset_config("cpu", **TINY), real_store, out, preset="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run, store): histo_tinynet trained for 1 epoch on 480 synthetic patches, validated on 120."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root / "src", 600, format="folder", seed=0)
    prepare(root / "src", root / "store", progress=False)
    fit(preset_config("cpu", **SYNTHETIC), root / "store", root / "run", progress=False)
    return root / "run", root / "store"


@pytest.fixture
def copied_run(real_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    return run


def valid_patches(store_path: Path, label: int | None = None) -> np.ndarray:
    store = open_store(store_path)
    rows = store.split_indices("valid")
    if label is not None:
        rows = rows[store.labels[rows] == label]
    return store.read_batch(rows)


# --- class activation maps ------------------------------------------------------------------


def test_gradcam_mass_inside_the_centre_exceeds_its_share_on_synthetic_positives(synthetic_run):
    run_dir, store_path = synthetic_run
    run = load_run(run_dir, device="cpu")
    store = open_store(store_path)
    rows = store.split_indices("valid")
    probs = predict_patches(run, store.read_batch(rows))
    accuracy = ((probs >= run.threshold) == (store.labels[rows] == 1)).mean()
    assert accuracy >= 0.85, f"the model must have learnt the task first (accuracy {accuracy:.3f})"
    positives = valid_patches(store_path, label=1)
    for method in ("gradcam", "gradcam++"):
        result = explain_patches(run, positives, method=method)
        fractions = centre_fraction(result.cams)
        assert fractions.mean() > CENTRE_SHARE, (method, fractions.mean())
        assert np.median(fractions) > CENTRE_SHARE, (method, np.median(fractions))


@pytest.mark.parametrize("method, package_class", [("gradcam", "GradCAM"), ("gradcam++", "GradCAMPlusPlus"),
                                                   ("hirescam", "HiResCAM")])
def test_maps_equal_the_grad_cam_package_and_are_zero_outside_the_crop(real_run, real_store, method, package_class):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from histodetect.augment import preprocess_batch

    run = load_run(real_run, device="cpu", fp32=True)  # maps and their logits are computed in float32
    patches = valid_patches(real_store)[::8]
    cams, logits, layer = class_activation_maps(run.model, patches, mean=run.mean, std=run.std,
                                                crop_px=run.crop_px, device=run.device, method=method)
    assert all(p.grad is None for p in run.model.parameters()), "no gradient is left on the shared model"
    x = preprocess_batch(torch.from_numpy(patches), run.mean, run.std, crop_px=run.crop_px)
    with getattr(pytorch_grad_cam, package_class)(run.model, [dict(run.model.named_modules())[layer]]) as cam:
        expected = cam(x, targets=[ClassifierOutputTarget(0)] * len(x))
    top = (96 - run.crop_px) // 2  # 48 px crop -> pixels 24..71
    inside = cams[:, top : top + run.crop_px, top : top + run.crop_px]
    assert inside.max() == pytest.approx(1.0, abs=1e-5), "each map is scaled to a maximum of 1"
    np.testing.assert_allclose(inside, expected, atol=1e-4)
    outside = cams.copy()
    outside[:, top : top + run.crop_px, top : top + run.crop_px] = 0
    assert not outside.any(), "the model never saw the border outside its centre crop"
    assert cams.dtype == np.float32 and cams.shape == (len(patches), 96, 96)
    np.testing.assert_allclose(logits, predict_samples(run, patches)[:, 0, 0], atol=1e-4)



def test_a_channels_last_model_is_explained_over_its_height_and_width(real_store):
    # swin, mambaout and sequencer keep maps (N, H, W, C): read as (N, C, H, W), the map was a
    # (H, C) strip stretched over the patch. The grad-cam package needs a reshape for them.
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from histodetect.augment import preprocess_batch
    from histodetect.explain.cams import channels_last_maps, feature_map_layers
    from histodetect.models import create_model

    torch.manual_seed(0)
    model = create_model("test_mambaout").eval()
    assert channels_last_maps(model) and not channels_last_maps(create_model("resnet18"))
    patches = valid_patches(real_store)[:4]
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    cams, _, layer = class_activation_maps(model, patches, mean=mean, std=std, crop_px=0, device=torch.device("cpu"))
    height, width, channels = feature_map_layers(model, 96)[layer][1:]
    assert channels == model.num_features and height == width < channels
    x = preprocess_batch(torch.from_numpy(patches), mean, std, crop_px=0)
    with pytorch_grad_cam.GradCAM(model, [dict(model.named_modules())[layer]],
                                  reshape_transform=lambda t: t.permute(0, 3, 1, 2)) as cam:
        expected = cam(x, targets=[ClassifierOutputTarget(0)] * len(x))
    np.testing.assert_allclose(cams, expected, atol=5e-4)  # OpenCV resizes theirs; 1.4e-4 apart here

def test_a_layer_modified_in_place_afterwards_keeps_its_own_activations(real_run, real_store):
    import copy

    run = load_run(real_run, device="cpu")
    patches = valid_patches(real_store)[::16]
    # stages.3.0.1 is a BatchNorm whose output the next ReLU(inplace=True) overwrites.
    layer = "stages.3.0.1"
    assert dict(run.model.named_modules())["stages.3.0.2"].inplace
    not_in_place = copy.deepcopy(run.model)
    for module in not_in_place.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    for method in ("hirescam", "gradcam++"):
        kwargs = dict(mean=run.mean, std=run.std, crop_px=run.crop_px, device=run.device, method=method, layer=layer)
        maps = class_activation_maps(run.model, patches, **kwargs)[0]
        np.testing.assert_allclose(maps, class_activation_maps(not_in_place, patches, **kwargs)[0], atol=1e-5)
        assert maps.max() > 0


def test_overlays_decode_have_the_stated_size_and_outline_pixels_32_to_63(real_run, pcam_jpeg, tmp_path):
    run = load_run(real_run, device="cpu")
    files = sorted((pcam_jpeg / "valid" / "1").glob("*.jpg"))[:3]
    report = write_explanations(run, files, tmp_path / "explained", method="gradcam++", progress=False)
    assert report.n_patches == 3 and report.layer == "stages.3" and len(report.sheets) == 1
    with (tmp_path / "explained" / "explanations.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == [f.stem for f in files]

    patches = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    result = explain_patches(run, patches, method="gradcam++")
    side = 96 * OVERLAY_SCALE
    assert result.overlays.shape == (3, side, side, 3) and result.overlays.dtype == np.uint8
    for row, overlay in zip(rows, result.overlays):
        decoded = np.asarray(Image.open(tmp_path / "explained" / row["overlay"]))
        assert decoded.shape == (side, side, 3)
        np.testing.assert_array_equal(decoded, overlay)
        assert float(row["prob"]) == pytest.approx(float(result.probs[rows.index(row)]), abs=1e-6)

    k = OVERLAY_SCALE
    plain = blend_cams(patches, result.cams)
    outline = np.zeros((side, side), dtype=bool)
    for edge_px in (32, 63):  # the first and last pixel of the labelled centre, one patch pixel wide
        outline[edge_px * k : (edge_px + 1) * k, 32 * k : 64 * k] = True
        outline[32 * k : 64 * k, edge_px * k : (edge_px + 1) * k] = True
    label_box = np.zeros((side, side), dtype=bool)
    label_box[: 10 * k, : 48 * k] = True  # the printed probability's corner
    for overlay, blend in zip(result.overlays, plain):
        assert (overlay[outline] == OUTLINE_RGB).all()
        np.testing.assert_array_equal(overlay[~outline & ~label_box], blend[~outline & ~label_box])
        assert (overlay[1, 1] == 0).all(), "the probability is printed on a dark box in the top-left corner"
    sheet = Image.open(report.sheets[0])
    assert sheet.size[0] == 3 * side and sheet.size[1] > side


def test_probabilities_are_the_calibrated_ones_predict_gives(copied_run, real_store):
    calibrate_run(copied_run, real_store, split="valid", device="cpu")
    run = load_run(copied_run, device="cpu")
    patches = valid_patches(real_store)[:16]
    result = explain_patches(run, patches)
    np.testing.assert_allclose(result.probs, predict_patches(run, patches), atol=1e-5)
    # In float64, as predict's: float32 rounding could move a patch on the threshold to the other side.
    assert result.probs.dtype == np.float64
    fp32 = load_run(copied_run, device="cpu", fp32=True)
    np.testing.assert_allclose(explain_patches(fp32, patches).probs, predict_patches(fp32, patches), rtol=0, atol=1e-12)


@pytest.mark.parametrize("model_name, layer", [
    ("resnet18", "layer4"), ("mobilenetv2_100", "bn2"), ("legacy_xception", "act4"),
    ("efficientnet_b0", "bn2"), ("convnext_atto", "stages"), ("histo_tinynet", "stages.3"),
    ("regnetx_002", "final_conv"),  # no entry: the last module to finish in forward_features
])
def test_each_backbone_family_has_a_default_layer_that_gives_a_map(model_name, layer):
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    patches = np.random.default_rng(0).integers(0, 256, (1, 96, 96, 3), dtype=np.uint8)
    cams, logits, used = class_activation_maps(model, patches, mean=(0.5,) * 3, std=(0.25,) * 3, crop_px=64,
                                               device=torch.device("cpu"), method="gradcam")
    assert used == layer and cams.shape == (1, 96, 96) and logits.shape == (1,)
    assert 0 <= cams.min() and cams.max() <= 1


def test_a_layer_that_does_not_exist_lists_the_valid_ones(real_run, real_store):
    run = load_run(real_run, device="cpu")
    patches = valid_patches(real_store)[:2]
    with pytest.raises(UserError) as error:
        explain_patches(run, patches, layer="stages.9")
    message = str(error.value)
    assert message.startswith("--layer stages.9: no such layer in histo_tinynet;") and "\n" not in message
    assert "did you mean" in message and "stages.3" in message and "(default stages.3)" in message
    with pytest.raises(UserError, match=r"--layer fc: is not a feature map \(N, C, H, W\) of forward_features"):
        explain_patches(run, patches, layer="fc")
    other = explain_patches(run, patches, layer="stages.2")
    assert other.layer == "stages.2" and other.cams.shape == (2, 96, 96)
    with pytest.raises(UserError, match=r"--method 'scorecam': expected one of gradcam, gradcam\+\+, hirescam"):
        explain_patches(run, patches, method="scorecam")


def test_a_patch_that_is_not_96x96_is_refused_or_resized_with_a_note(real_run, pcam_jpeg, tmp_path):
    run = load_run(real_run, device="cpu")
    big = tmp_path / "big.png"
    Image.open(min((pcam_jpeg / "valid" / "1").glob("*.jpg"))).resize((120, 100)).save(big)
    with pytest.raises(UserError, match=r"big.png: is 120x100 pixels, expected 96x96 \(pass --resize to resize it\)"):
        write_explanations(run, [big], tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists(), "nothing is half-written"
    with pytest.warns(UserWarning, match=r"resized 1 patches that were not 96x96 pixels \(--resize\)"):
        report = write_explanations(run, [big], tmp_path / "resized", resize=True, progress=False)
    assert report.n_patches == 1 and report.sheets == []
    with pytest.raises(UserError, match=r"patches_uint8: expected uint8 RGB patches \(N, 96, 96, 3\), "
                                        r"found uint8 \(1, 100, 120, 3\)"):
        explain_patches(run, np.asarray(Image.open(big))[None])


def test_an_out_folder_that_is_not_an_explain_output_is_left_alone(real_run, pcam_jpeg, tmp_path):
    run = load_run(real_run, device="cpu")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    file = min((pcam_jpeg / "valid" / "0").glob("*.jpg"))
    with pytest.raises(UserError, match="exists and holds other files; name a new folder for the output"):
        write_explanations(run, [file], tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match=f"would replace {re.escape(str(real_run))}"):
        write_explanations(run, [file], real_run, progress=False)
    write_explanations(run, [file], tmp_path / "again", progress=False)
    write_explanations(run, [file], tmp_path / "again", progress=False)  # an earlier output is replaced
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(
        ["explain.json", "explanations.csv", f"{file.stem}.png"])


def test_a_full_disk_is_one_line_naming_the_output_folder_and_leaves_nothing(real_run, pcam_jpeg, tmp_path,
                                                                            monkeypatch):
    # Pillow says "[Errno 28] No space left on device", naming no file.
    import errno
    import os

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    run = load_run(real_run, device="cpu")
    file = min((pcam_jpeg / "valid" / "0").glob("*.jpg"))
    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path / 'out'))}: cannot write it "
                                        r"\(No space left on device\)$"):
        write_explanations(run, [file], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == [], "no output and no partial folder"


# --- uncertainty ----------------------------------------------------------------------------


def test_mc_dropout_turns_on_dropout_only_and_restores_every_mode():
    torch.manual_seed(0)
    for name in ("histo_tinynet", "resnet18"):  # a Dropout module; timm's functional F.dropout in the head
        model = create_model(name, drop_rate=0.5)
        model.train()
        model.get_classifier().train(False)  # a mixed state must come back as it was
        before = {n: m.training for n, m in model.named_modules()}
        batch_norm_means = [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        x = torch.randn(4, 3, 64, 64)
        with mc_dropout(model), torch.no_grad():
            assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            first, second = model(x), model(x)
        assert not torch.equal(first, second), f"{name}: dropout samples differ between passes"
        for m, mean_before in zip([m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)], batch_norm_means):
            assert torch.equal(m.running_mean, mean_before), "BatchNorm statistics stay frozen"
        assert {n: m.training for n, m in model.named_modules()} == before


def test_mc_passes_are_reproducible_and_average_to_the_plain_prediction(real_run, real_store):
    run = load_run(real_run, device="cpu")
    patches = valid_patches(real_store)[:24]
    plain = predict_samples(run, patches, tta=4)  # (N, 1, 4)
    sampled = predict_samples(run, patches, tta=4, mc_passes=200, seed=3)
    assert sampled.shape == (24, 200, 4)
    np.testing.assert_array_equal(sampled, predict_samples(run, patches, tta=4, mc_passes=200, seed=3))
    assert sampled.std(axis=1).min() > 0, "every patch's passes differ"
    # Inverted dropout keeps the expectation: the mean logit of many passes is the plain
    # logit, within a few standard errors of that mean.
    standard_error = sampled.std(axis=1) / np.sqrt(sampled.shape[1])
    assert (np.abs(sampled.mean(axis=1) - plain[:, 0]) < 4.5 * standard_error).all()
    assert not run.model.training and not any(m.training for m in run.model.modules())


@pytest.mark.parametrize("mc_passes", [0, 4])
def test_predict_samples_reports_each_scored_batch_and_gives_the_same_logits(real_run, real_store, mc_passes):
    # evaluate's bar moved once per 4,096 patches: 3 minutes apart with --tta 72 on one CPU thread.
    run = load_run(real_run, device="cpu")
    patches = valid_patches(real_store)[:40]
    scored = []
    logits = predict_samples(run, patches, tta=8, mc_passes=mc_passes, batch_size=16, seed=1, on_batch=scored.append)
    assert scored == [16, 16, 8]
    np.testing.assert_array_equal(logits, predict_samples(run, patches, tta=8, mc_passes=mc_passes, batch_size=16,
                                                          seed=1))


def test_mc_on_a_model_without_dropout_is_one_clear_line(real_run, real_store):
    run = load_run(real_run, device="cpu")
    no_dropout = dataclasses.replace(run, model=create_model("histo_tinynet").eval(),
                                     config={**run.config, "drop_rate": 0.0})
    with pytest.raises(UserError) as error:
        predict_samples(no_dropout, valid_patches(real_store)[:2], mc_passes=10)
    assert str(error.value).endswith("(histo_tinynet, drop_rate 0.0) has no dropout to sample; "
                                     "drop --mc, or train with --drop-rate 0.2 or more")
    with pytest.raises(UserError, match="--mc 1: expected 0 .* or at least 2 MC-dropout passes"):
        predict_samples(run, valid_patches(real_store)[:2], mc_passes=1)
    # --mc 2**63 grew a list of passes until the kernel killed the process
    with pytest.raises(UserError, match=r"--mc 1001: expected at most 1000 MC-dropout passes \(20-100 are usual\)"):
        predict_samples(run, valid_patches(real_store)[:2], mc_passes=1001)


def test_uncertainty_measures_are_entropy_and_spreads_over_views_and_passes():
    np.testing.assert_allclose(entropy_bits(np.array([0.5, 0.0, 1.0, 0.11])), [1.0, 0.0, 0.0, 0.4999], atol=1e-3)
    probs = np.random.default_rng(0).uniform(size=(5, 3, 4))  # (N, passes, views)
    measures = uncertainty_measures(probs, threshold=0.4)
    mean = probs.mean(axis=(1, 2))
    np.testing.assert_allclose(measures["doubt"], np.where(mean < 0.4, mean / 0.4, (1 - mean) / 0.6))
    np.testing.assert_allclose(measures["entropy"], entropy_bits(mean))
    np.testing.assert_allclose(measures["tta_sd"], probs.mean(axis=1).std(axis=1))
    np.testing.assert_allclose(measures["mc_sd"], probs.mean(axis=2).std(axis=1))
    assert set(uncertainty_measures(probs[:, :1, :1], 0.5)) == {"doubt", "entropy"}
    # Each side of the threshold is scaled on its own: 0 at both certainties, whatever the threshold.
    doubt = uncertainty_measures(np.array([0.3, 0.0, 1.0, 0.65, 0.15])[:, None, None], threshold=0.3)["doubt"]
    np.testing.assert_allclose(doubt, [1.0, 0.0, 0.0, 0.5, 0.5])


def test_predict_writes_uncertainty_columns_and_marks_doubtful_patches_review(real_run, real_store, tmp_path):
    run = load_run(real_run, device="cpu")
    path, n = predict_to_csv(run, [real_store], tmp_path / "p.csv", tta=8, split="valid", mc_passes=5,
                             review_above=0.5, progress=False)
    with path.open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == ["id", "prob", "pred", "doubt", "entropy_bits", "prob_sd_tta", "prob_sd_mc",
                                 "decision"]
    assert n == len(rows) == 256
    for row in rows:
        doubtful = float(row["doubt"]) > 0.5  # reviewed by doubt, the default
        expected = "review" if doubtful else ("tumour" if row["pred"] == "1" else "normal")
        assert row["decision"] == expected
        assert float(row["entropy_bits"]) == pytest.approx(float(entropy_bits(float(row["prob"]))), abs=1e-5)
        assert 0 <= float(row["prob_sd_tta"]) <= 0.5 and 0 <= float(row["prob_sd_mc"]) <= 0.5
    assert 0 < sum(row["decision"] == "review" for row in rows) < len(rows)
    with pytest.raises(UserError, match="--review-by tta_sd: this uncertainty needs --tta 4 or more"):
        predict_to_csv(run, [real_store], tmp_path / "q.csv", review_above=0.1, review_by="tta_sd", progress=False)
    with pytest.raises(UserError, match=r"--review-by entropy: it picks the uncertainty --review-above compares; "
                                        r"add --review-above U"):  # alone it changed nothing and said nothing
        predict_to_csv(run, [real_store], tmp_path / "q.csv", review_by="entropy", progress=False)
    # It said "or --uncertainty for the columns", and with --uncertainty refused the same way
    with pytest.raises(UserError) as refused:
        predict_to_csv(run, [real_store], tmp_path / "q.csv", review_by="entropy", uncertainty=True, progress=False)
    assert "or drop --review-by (--uncertainty writes every uncertainty column)" in str(refused.value)
    with pytest.raises(UserError, match="--kaggle-submission writes exactly id,label"):
        predict_to_csv(run, [real_store], tmp_path / "k.csv", uncertainty=True, kaggle_submission=True, progress=False)
    assert not (tmp_path / "q.csv").exists() and not (tmp_path / "k.csv").exists()


# --- calibration ----------------------------------------------------------------------------


def test_fit_temperature_undoes_a_known_over_confidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 20_000)
    labels = (rng.uniform(size=true_logits.size) < 1 / (1 + np.exp(-true_logits))).astype(np.int64)
    temperature = fit_temperature(3.0 * true_logits, labels)
    assert temperature == pytest.approx(3.0, rel=0.05)
    assert nll_at_temperature(3.0 * true_logits, labels, temperature) < nll_at_temperature(3.0 * true_logits, labels, 1.0)
    assert fit_temperature(true_logits, labels) == pytest.approx(1.0, rel=0.05)
    assert calibrated_threshold(0.5, 3.0) == pytest.approx(0.5)
    assert calibrated_threshold(0.8, 2.0) == pytest.approx(1 / (1 + np.exp(-np.log(4) / 2)))


def test_calibration_does_not_raise_validation_nll_and_keeps_decisions(copied_run, real_store):
    before = load_run(copied_run, device="cpu")
    patches = valid_patches(real_store)
    decisions_before = predict_patches(before, patches) >= before.threshold
    record = calibrate_run(copied_run, real_store, split="valid", device="cpu")
    assert record["nll_after"] <= record["nll_before"]
    stored = json.loads((copied_run / "run.json").read_text())["calibration"]
    assert stored == record
    assert {"temperature", "nll_before", "nll_after", "ece_before", "ece_after", "split", "store_fingerprint"} <= set(record)
    assert record["split"] == "valid" and record["store_fingerprint"] == open_store(real_store).fingerprint
    after = load_run(copied_run, device="cpu")
    assert after.temperature == record["temperature"] and after.threshold == record["threshold"]
    np.testing.assert_array_equal(predict_patches(after, patches) >= after.threshold, decisions_before)
    for views in (1, 4, 8):  # every TTA view count's threshold moves with the temperature
        assert after.threshold_for(views) == pytest.approx(
            calibrated_threshold(before.threshold_for(views), record["temperature"]))
    assert not list(copied_run.glob("*.tmp-*")), "run.json is replaced, not half-written"



def test_calibrating_a_loaded_run_gives_it_the_new_temperature_and_thresholds(copied_run, real_store):
    run = load_run(copied_run, device="cpu")
    with pytest.raises(UserError, match=r"^calibrate_run: device and fp32 are set when a run is loaded; pass "
                                        r"load_run\('.*', device=\.\.\., fp32=\.\.\.\) or the folder's path$"):
        calibrate_run(run, real_store, split="valid", device="cpu")
    record = calibrate_run(run, real_store, split="valid", progress=False)  # it kept temperature 1 before
    reloaded = load_run(copied_run, device="cpu")
    assert run.temperature == reloaded.temperature == record["temperature"] != 1.0
    assert run.thresholds == reloaded.thresholds and run.run == reloaded.run
    np.testing.assert_array_equal(predict_patches(run, valid_patches(real_store)),
                                  predict_patches(reloaded, valid_patches(real_store)))


def test_calibrating_a_loaded_run_of_other_weights_than_best_is_refused(copied_run, real_store):
    # run.json's temperature is applied to best.pt wherever the run is loaded: one fitted on
    # last.pt's logits calibrated other weights, silently.
    from histodetect.export import export_run, load_exported_run

    last = load_run(copied_run, checkpoint="last", device="cpu")
    with pytest.raises(UserError, match=r"^calibrate_run: this LoadedRun runs checkpoints/last.pt, but run.json's "
                                        r"calibration applies to best.pt; pass load_run\('.*'\) or the folder's path$"):
        calibrate_run(last, real_store, split="valid", progress=False)
    exported = load_exported_run(export_run(copied_run, format="onnx").path)
    with pytest.raises(UserError, match=r"^calibrate_run: this LoadedRun runs the export .*model.onnx; calibrate "
                                        r"the run folder it was exported from, then export it again$"):
        calibrate_run(exported, real_store, split="valid", progress=False)
    assert "calibration" not in json.loads((copied_run / "run.json").read_text())

def test_runs_from_before_per_tta_thresholds_use_their_one_threshold_for_every_view_count():
    assert run_thresholds({"threshold": 0.3}) == {1: 0.3}
    assert run_thresholds({}) == {1: 0.5}
    calibrated = {"threshold": 0.3, "thresholds": {"1": 0.3, "8": 0.45},
                  "calibration": {"threshold": 0.35, "thresholds": {"1": 0.35, "8": 0.5}}}
    assert run_thresholds(calibrated) == {1: 0.35, 8: 0.5}
    assert run_thresholds(calibrated, calibrated=False) == {1: 0.3, 8: 0.45}


def test_calibration_lowers_nll_of_a_deliberately_over_confident_model(copied_run, real_store):
    best = load_checkpoint(copied_run / "checkpoints" / "best.pt")
    best["model"]["fc.weight"] *= 6  # six times the logits: the same ranking, far too sure
    best["model"]["fc.bias"] *= 6
    save_atomic(best, copied_run / "checkpoints" / "best.pt")
    record = calibrate_run(copied_run, real_store, split="valid", device="cpu")
    assert record["temperature"] > 3
    assert record["nll_after"] < 0.8 * record["nll_before"]
    assert record["ece_after"] < record["ece_before"]


def test_a_checkpoint_of_another_architecture_is_one_line(copied_run):
    best = load_checkpoint(copied_run / "checkpoints" / "best.pt")
    best["model"]["fc.weight"] = torch.zeros(1, 7)  # as if histo_tinynet had changed width since training
    save_atomic(best, copied_run / "checkpoints" / "best.pt")
    with pytest.raises(UserError) as error:
        load_run(copied_run, device="cpu")
    message = str(error.value)
    assert message.startswith(f"{copied_run / 'checkpoints' / 'best.pt'}: its weights do not fit histo_tinynet")
    assert "size mismatch for fc.weight" in message and message.endswith("or train again") and "\n" not in message


def test_calibrating_on_the_training_split_is_refused(real_run, real_store):
    with pytest.raises(UserError, match=r"store:train: the run trained on this split, .* calibrate on the "
                                        r"validation split \(.*store:valid\)"):
        calibrate_run(real_run, real_store, split="train", device="cpu")


# --- evaluate: calibration and triage -------------------------------------------------------


def test_evaluate_reports_nll_and_ece_before_and_after_and_the_triage_curve(copied_run, real_store, tmp_path):
    record = calibrate_run(copied_run, real_store, split="valid", device="cpu")
    metrics = evaluate_run(copied_run, real_store, split="valid", tta=8, mc_passes=8, out=tmp_path / "eval",
                           device="cpu", n_boot=50)
    assert metrics["nll_uncalibrated"] == pytest.approx(record["nll_before"], abs=0.05)  # 8 views vs 1
    assert metrics["temperature"] == record["temperature"] and metrics["triage_uncertainty"] == DEFAULT_UNCERTAINTY
    by_uncertainty = metrics["accuracy_coverage_by_uncertainty"]
    assert set(by_uncertainty) == {"doubt", "entropy", "tta_sd", "mc_sd"}
    for rows in by_uncertainty.values():
        full = next(row for row in rows if row["coverage"] == 1.0)
        assert full["accuracy"] == pytest.approx(metrics["accuracy"]), "at 100% coverage: plain accuracy"
    rows = {row["coverage"]: row["accuracy"] for row in metrics["accuracy_coverage"]}
    assert rows[0.5] >= rows[1.0] + 0.03, f"the most confident half is clearly more accurate: {rows}"

    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6, "two reliability diagrams: before and after"
    assert "Reliability diagram before temperature scaling" in html and "Accuracy-coverage" in html
    for column in ("accuracy by doubt", "accuracy by entropy", "accuracy by tta sd", "accuracy by mc sd"):
        assert column in html
    assert "The temperature was fitted on this split" in html
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["ece_uncalibrated"] == metrics["ece_uncalibrated"] and saved["ece"] == metrics["ece"]


def test_evaluate_headline_metrics_are_the_calibrated_ones_with_the_uncalibrated_beside(copied_run, real_store,
                                                                                      tmp_path):
    record = calibrate_run(copied_run, real_store, split="valid", device="cpu")  # 1 view, as evaluated below
    assert record["temperature"] != pytest.approx(1.0, abs=0.05)
    metrics = evaluate_run(copied_run, real_store, split="valid", tta=1, out=tmp_path / "eval", device="cpu", n_boot=20)
    assert metrics["nll"] == pytest.approx(record["nll_after"], abs=1e-6)
    assert metrics["ece"] == pytest.approx(record["ece_after"], abs=1e-6)
    assert metrics["nll_uncalibrated"] == pytest.approx(record["nll_before"], abs=1e-6)
    assert metrics["ece_uncalibrated"] == pytest.approx(record["ece_before"], abs=1e-6)
    assert metrics["nll"] < metrics["nll_uncalibrated"], "fitted on this split, the temperature lowers its NLL"


def test_triage_on_a_real_trained_model_gains_accuracy_at_half_coverage(real_run, real_store, tmp_path):
    metrics = evaluate_run(real_run, real_store, split="valid", tta=1, out=tmp_path / "eval", device="cpu", n_boot=50)
    rows = {row["coverage"]: row for row in metrics["accuracy_coverage"]}
    assert rows[1.0]["accuracy"] == pytest.approx(metrics["accuracy"])
    assert rows[0.5]["accuracy"] >= rows[1.0]["accuracy"] + 0.03, rows
    assert rows[0.5]["n_patches"] == 128
    assert "Not calibrated (T = 1)" in (tmp_path / "eval" / "report.html").read_text()


@pytest.mark.parametrize("full_at", ["a plot", "metrics.json"])
def test_evaluate_on_a_full_disk_is_one_line_naming_its_output_folder(real_run, real_store, tmp_path, monkeypatch,
                                                                     full_at):
    # matplotlib says "[Errno 28] No space left on device", naming no file; metrics.json's writer names its
    # temporary file in the hidden partial folder (".eval.partial-123/metrics.json"), which the user never asked for.
    import errno
    import os
    import pathlib

    import matplotlib.figure

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if full_at == "a plot":
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    else:
        real_open = pathlib.Path.open

        def full_disk_for_the_metrics(self, mode="r", *args, **kwargs):
            if self.name.startswith(".metrics.json.tmp") and "w" in mode:
                full_disk()
            return real_open(self, mode, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "open", full_disk_for_the_metrics)
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path / 'eval'))}: cannot write it "
                                        r"\(No space left on device\)$"):
        evaluate_run(real_run, real_store, split="valid", tta=1, out=tmp_path / "eval", device="cpu", n_boot=100)
    assert list(tmp_path.iterdir()) == [], "no output and no partial folder"


# --- the command line -----------------------------------------------------------------------



def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_explain_refuses_an_out_inside_a_file_before_loading_the_model(pcam_jpeg, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    file = min((pcam_jpeg / "valid" / "0").glob("*.jpg"))
    # The run does not exist: the --out mistake is reported first, before any model is loaded.
    code, _, err = run_cli(capsys, "explain", tmp_path / "no-run", file, "--out", tmp_path / "afile" / "x", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"--out {tmp_path / 'afile' / 'x'}: {tmp_path / 'afile'} is a file, not a folder" in err


def test_cli_calibrate_explain_predict_and_evaluate(copied_run, real_store, pcam_jpeg, tmp_path, capsys):
    code, out, err = run_cli(capsys, "calibrate", copied_run, "--data", f"{real_store}:valid")
    assert code == 0, err
    assert "temperature" in out and "stored in run.json" in out
    assert "calibrate: 100%" in err, "a progress bar over the patches"
    code, out, err = run_cli(capsys, "calibrate", copied_run, "--data", f"{real_store}:valid", "--quiet")
    assert code == 0 and "calibrate:" not in err, err
    assert "calibration" in json.loads((copied_run / "run.json").read_text())

    files = sorted((pcam_jpeg / "valid" / "1").glob("*.jpg"))[:2]
    code, out, err = run_cli(capsys, "explain", copied_run, *files, "--out", tmp_path / "ex", "--quiet")
    assert code == 0, err
    assert "overlays of 2 patches (layer stages.3), 1 contact sheet(s)" in out
    assert (tmp_path / "ex" / "contact_sheet-01.png").is_file()

    code, out, err = run_cli(capsys, "predict", copied_run, real_store, "--split", "valid", "--out",
                             tmp_path / "p.csv", "--tta", "4", "--mc", "4", "--review-above", "0.5", "--quiet")
    assert code == 0, err
    with (tmp_path / "p.csv").open() as handle:
        assert next(csv.reader(handle)) == ["id", "prob", "pred", "doubt", "entropy_bits", "prob_sd_tta",
                                            "prob_sd_mc", "decision"]

    # The prob column is the calibrated probability: the mean over views of sigmoid(logit / T).
    calibrated = load_run(copied_run, device="cpu")
    assert calibrated.temperature != pytest.approx(1.0, abs=0.05)
    code, out, err = run_cli(capsys, "predict", copied_run, real_store, "--split", "valid", "--out",
                             tmp_path / "plain.csv", "--tta", "4", "--quiet", "--device", "cpu")
    assert code == 0, err
    with (tmp_path / "plain.csv").open() as handle:
        probs = np.array([float(row["prob"]) for row in csv.DictReader(handle)])
    logits = predict_logits(calibrated, valid_patches(real_store), tta=4)  # (N, 4), before temperature scaling
    np.testing.assert_allclose(probs, (1 / (1 + np.exp(-logits / calibrated.temperature))).mean(axis=1), atol=2e-6)
    assert np.abs(probs - (1 / (1 + np.exp(-logits))).mean(axis=1)).max() > 1e-3, "T moves these probabilities"

    code, out, err = run_cli(capsys, "evaluate", copied_run, "--data", f"{real_store}:valid", "--mc", "4",
                             "--bootstrap", "100", "--out", tmp_path / "eval")
    assert code == 0, err
    assert "(before temperature scaling: NLL" in out and "accuracy on the most confident half, by doubt" in out


def test_a_run_from_before_tta_thresholds_calibrates_and_evaluates_with_tta_8(copied_run, real_store, capsys):
    run_json = json.loads((copied_run / "run.json").read_text())
    del run_json["thresholds"]  # as runs trained before per-TTA thresholds were written
    (copied_run / "run.json").write_text(json.dumps(run_json))
    code, out, err = run_cli(capsys, "calibrate", copied_run, "--data", f"{real_store}:valid", "--tta", "8")
    assert code == 0, err
    assert "threshold (TTA 1)" in out
    record = json.loads((copied_run / "run.json").read_text())["calibration"]
    assert set(record["thresholds"]) == {"1"}
    metrics = evaluate_run(copied_run, real_store, split="valid", tta=8, n_boot=20, device="cpu")
    assert metrics["threshold"] == pytest.approx(record["threshold"]), "the 1-view threshold serves every view count"


def test_cli_bad_input_is_one_line_and_exit_status_2(real_run, pcam_jpeg, tmp_path, capsys):
    file = min((pcam_jpeg / "valid" / "1").glob("*.jpg"))
    code, _, err = run_cli(capsys, "explain", real_run, file, "--out", tmp_path / "ex", "--layer", "stage.3")
    assert code == 2 and err.startswith("histodetect: error: --layer stage.3: no such layer") and err.count("\n") == 1
    code, _, err = run_cli(capsys, "calibrate", real_run, "--data", f"{real_run.parent.parent}/x")
    assert code == 2 and "Traceback" not in err


def test_a_vision_transformer_is_explained_at_its_patch_tokens_and_a_model_without_a_map_is_one_line(real_store):
    # It was refused ("CAMs need a CNN") although it trains; the 4-D tensors inside its attention
    # are still no place to explain at.
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from histodetect.augment import preprocess_batch
    from histodetect.explain import resolve_cam_layer
    from histodetect.models import create_model

    torch.manual_seed(0)
    vit = create_model("test_vit", input_size_px=96).eval()
    layer = resolve_cam_layer(vit, None, 96)
    patches = valid_patches(real_store)[:4]
    mean, std = vit.pretrained_cfg["mean"], vit.pretrained_cfg["std"]
    cams, _, used = class_activation_maps(vit, patches, mean=mean, std=std, crop_px=0, device=torch.device("cpu"))
    assert used == layer and cams.shape == (4, 96, 96) and cams.max() == pytest.approx(1.0, abs=1e-5)
    x = preprocess_batch(torch.from_numpy(patches), mean, std, crop_px=0)
    tokens_to_map = lambda t: t[:, vit.num_prefix_tokens :].unflatten(1, (6, 6)).permute(0, 3, 1, 2)  # noqa: E731
    with pytorch_grad_cam.GradCAM(vit, [dict(vit.named_modules())[layer]], reshape_transform=tokens_to_map) as cam:
        expected = cam(x, targets=[ClassifierOutputTarget(0)] * len(x))
    np.testing.assert_allclose(cams, expected, atol=5e-4)  # 96 px: the 6 x 6 tokens cover it exactly
    with pytest.raises(UserError, match=r"^PooledColour: no layer outputs a feature map \(N, C, H, W\) or a grid of "
                                        r"patch tokens; CAMs need a CNN or a vision transformer$"):
        resolve_cam_layer(PooledColour(), None, 96)


def test_each_patch_tokens_evidence_lands_on_its_own_pixels():
    # 88 px in 16 px patches is padded to 96 on the right and bottom: stretched over the 88 px,
    # the last token's evidence sat up to 8 px inside the patch. Unpadded (80 px seen), the rest saw nothing.
    from histodetect.explain.cams import token_map_pixels

    corner = torch.zeros(1, 6, 6)
    corner[0, 5, 5] = 1.0
    padded = token_map_pixels(corner, 16, 88)[0]
    assert padded.shape == (88, 88) and padded[:64, :].max() == 0 and padded[:, :64].max() == 0
    # The hot token's centre is at 88 px, past the crop: its nearest pixel, 87, is the brightest
    # (stretched, the centre sat at 80.7 px).
    assert divmod(int(padded.argmax()), 88) == (87, 87) and padded[80, 80] < padded[87, 87]
    cropped = token_map_pixels(torch.ones(1, 5, 5), 16, 88)[0]
    assert cropped[:80, :80].min() == 1 and cropped[80:, :].max() == 0 and cropped[:, 80:].max() == 0


def test_patch_ids_that_clash_as_file_names_get_numbered_files():
    from histodetect.explain import _file_stem

    taken: set[str] = set()
    names = [_file_stem(patch_id, taken) for patch_id in ("a/b", "a_b", "..", "", "a_b-2")]
    assert names == ["a_b", "a_b-2", "patch", "patch-2", "a_b-2-2"]


def test_cams_of_an_exported_model_are_refused_saying_to_load_the_run():
    from histodetect.explain import feature_map_layers

    with pytest.raises(UserError, match=r"no PyTorch weights to take gradients of; class activation maps need the "
                                        r"run loaded with load_run\(RUN_DIR\), not an export$"):
        feature_map_layers(torch.nn.Identity(), 88)  # ExportedLogits, like Identity, has no parameters


def test_explain_json_and_the_calibration_record_say_what_made_them(copied_run, real_store, pcam_jpeg, tmp_path,
                                                                   monkeypatch):
    # The inputs as absolute paths (as typed they named whatever the working folder held), the
    # weights by their SHA-256, the precision used and the package version.
    import hashlib

    from histodetect import __version__

    weights_sha256 = hashlib.sha256((copied_run / "checkpoints" / "best.pt").read_bytes()).hexdigest()
    record = calibrate_run(copied_run, real_store, split="valid", device="cpu", fp32=True)
    assert (record["histodetect"], record["weights_sha256"], record["bf16_autocast"]) == (__version__, weights_sha256,
                                                                                          False)
    folder = tmp_path / "patches"
    folder.mkdir()
    for path in sorted((pcam_jpeg / "valid" / "1").glob("*.jpg"))[:2]:
        shutil.copy(path, folder / path.name)
    monkeypatch.chdir(tmp_path)
    write_explanations(load_run(copied_run, device="cpu", fp32=True), "patches", "cams", progress=False)
    written = json.loads((tmp_path / "cams" / "explain.json").read_text())
    assert written["inputs"] == [str(folder)] and written["run"] == str(copied_run)
    assert (written["histodetect"], written["weights_sha256"], written["bf16_autocast"]) == (__version__,
                                                                                           weights_sha256, False)
