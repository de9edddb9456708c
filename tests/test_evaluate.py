"""Specification of histodetect.evaluate: metrics, intervals, plots and the report."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from histodetect.errors import UserError
from histodetect.evaluate import (
    accuracy_coverage,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    evaluate_run,
    expected_calibration_error,
    plot_accuracy_coverage,
    plot_confusion_matrix,
    plot_reliability,
    plot_roc,
    plot_training_curves,
    read_training_curves,
    reliability_curve,
    write_json_atomic,
    write_report,
)

# Three tumour and five normal patches, small enough to count by hand.
# At threshold 0.5: tumour 0.9, 0.6 found, 0.3 missed; normal 0.7 flagged.
TINY_LABELS = np.array([1, 1, 1, 0, 0, 0, 0, 0])
TINY_PROBS = np.array([0.9, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.05])


def separable_scores(n_per_class: int, seed: int = 0, noise: float = 0.15):
    """Labels and probabilities from two overlapping Gaussians at 0.35 and 0.65."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n_per_class)
    probs = np.clip(rng.normal(np.where(labels == 1, 0.65, 0.35), noise), 0, 1)
    return labels, probs


def calibrated_scores(n: int, seed: int = 0):
    """Probabilities uniform on [0, 1] and labels drawn from Bernoulli(prob): calibrated by construction."""
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0, 1, n)
    return (rng.uniform(0, 1, n) < probs).astype(int), probs


# --- choose_threshold -------------------------------------------------------


def test_choose_threshold_separates_perfectly_separable_scores_between_the_classes():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.8, 0.9])
    assert choose_threshold(labels, probs) == pytest.approx(0.625)  # halfway from 0.6 to the lowest tumour's 0.65


def test_choose_threshold_breaks_ties_towards_one_half():
    # Thresholds 0.9 and 0.3 both give sensitivity - (1 - specificity) = 0.5; 0.3 wins, moved halfway to 0.2.
    assert choose_threshold([0, 1, 0, 1], [0.2, 0.3, 0.6, 0.9]) == pytest.approx(0.25)
    assert choose_threshold([1, 0], [0.2, 0.6]) == pytest.approx(0.1), "at the lowest probability: halfway to 0"


def test_no_patch_sits_on_the_chosen_threshold_so_its_printed_probability_keeps_its_decision():
    # bf16 logits take few values, so validation patches share the chosen probability;
    # predict writes probabilities with 6 decimals, and 0.6000004 printed 0.600000 with
    # pred 1 under a threshold of 0.6000004.
    labels = np.array([0, 0, 1, 1, 1, 0, 1])
    probs = np.array([0.2, 0.3, 0.6000004, 0.6000004, 0.9, 0.1, 0.8])
    threshold = choose_threshold(labels, probs)
    assert not np.isin(threshold, probs)
    printed = np.array([float(f"{p:.6f}") for p in probs])
    np.testing.assert_array_equal(printed >= threshold, probs >= threshold)
    np.testing.assert_array_equal(probs >= threshold, labels == 1)  # the same decisions as the ROC point


def test_a_threshold_between_neighbouring_floats_keeps_the_rocs_decisions():
    # Means of the same bf16 view probabilities summed in another order differ by a float64
    # step; halfway between two such neighbours rounds onto one of them, and onto the lower
    # one it called the negative patch tumour.
    below = np.nextafter(0.6, 0.0)
    labels, probs = np.array([0, 1, 0, 1]), np.array([below, 0.6, 0.1, 0.9])
    threshold = choose_threshold(labels, probs)
    np.testing.assert_array_equal(probs >= threshold, labels == 1)
    assert threshold == 0.6



def test_choose_threshold_finds_the_midpoint_of_shifted_scores_whatever_the_class_balance():
    # Equal-variance Gaussians at 0.35 and 0.65: balanced accuracy peaks at 0.5,
    # even with nine normals per tumour (plain accuracy would push it up).
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(18_000, int), np.ones(2_000, int)]
    probs = np.clip(rng.normal(np.where(labels == 1, 0.65, 0.35), 0.1), 0, 1)
    assert choose_threshold(labels, probs) == pytest.approx(0.5, abs=0.02)


def test_choose_threshold_with_one_class_names_the_fix():
    expected = (
        r"^labels: choosing a threshold needs both normal \(0\) and tumour \(1\) patches, "
        r"found only tumour \(1\) in 3 patches\. Evaluate on a split that has both classes\.$"
    )
    with pytest.raises(UserError, match=expected):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])


# --- binary_metrics ---------------------------------------------------------


def test_binary_metrics_match_hand_counted_confusion_matrix():
    metrics = binary_metrics(TINY_LABELS, TINY_PROBS, threshold=0.5)
    assert (metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"]) == (4, 1, 1, 2)
    assert metrics["n"] == 8 and metrics["n_positive"] == 3 and metrics["threshold"] == 0.5
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["sensitivity"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == pytest.approx(4 / 5)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # Tumour scores beat 5, 4 and 3 of the 5 normal scores.
    assert metrics["roc_auc"] == pytest.approx(12 / 15)
    assert metrics["brier"] == pytest.approx(1.3625 / 8)
    probability_of_truth = [0.9, 0.6, 0.3, 0.3, 0.6, 0.8, 0.9, 0.95]
    assert metrics["nll"] == pytest.approx(-np.mean(np.log(probability_of_truth)))


def test_binary_metrics_agree_with_sklearn_at_any_threshold():
    labels, probs = separable_scores(500, seed=3)
    threshold = 0.37
    preds = probs >= threshold
    metrics = binary_metrics(labels, probs, threshold)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert metrics["sensitivity"] == pytest.approx(recall_score(labels, preds))
    assert metrics["specificity"] == pytest.approx(recall_score(labels, preds, pos_label=0))
    assert metrics["precision"] == pytest.approx(precision_score(labels, preds))
    assert metrics["f1"] == pytest.approx(f1_score(labels, preds))


def test_binary_metrics_are_plain_python_numbers_for_json():
    metrics = binary_metrics(TINY_LABELS, TINY_PROBS)
    assert all(type(value) in (int, float) for value in metrics.values())


def test_a_probability_equal_to_the_threshold_counts_as_tumour():
    metrics = binary_metrics([1, 0], [0.5, 0.2], threshold=0.5)
    assert metrics["tp"] == 1 and metrics["fn"] == 0


def test_perfect_random_and_inverted_classifiers_score_auc_one_half_and_zero():
    labels, probs = separable_scores(2_000, noise=0.05)
    perfect = np.where(labels == 1, 0.6 + 0.4 * probs, 0.4 * probs)
    random = np.random.default_rng(0).uniform(0, 1, labels.size)
    assert binary_metrics(labels, perfect)["roc_auc"] == 1.0
    assert binary_metrics(labels, random)["roc_auc"] == pytest.approx(0.5, abs=0.03)
    assert binary_metrics(labels, 1 - perfect)["roc_auc"] == 0.0


def test_log_loss_stays_finite_when_a_tumour_gets_probability_zero():
    nll = binary_metrics([1, 0], [0.0, 0.0])["nll"]
    assert nll == pytest.approx(-math.log(1e-7) / 2)


def test_binary_metrics_reject_probabilities_outside_zero_one_with_the_fix():
    expected = r"^probs: expected tumour probabilities in \[0, 1\], found range \[-2, 3\.5\].*Apply a sigmoid"
    with pytest.raises(UserError, match=expected):
        binary_metrics([0, 1], [-2.0, 3.5])


def test_binary_metrics_reject_misaligned_arrays():
    expected = r"^probs: expected one tumour probability per label, shape \(3,\), found \(2,\)\."
    with pytest.raises(UserError, match=expected):
        binary_metrics([0, 1, 1], [0.1, 0.9])


def test_binary_metrics_reject_labels_other_than_zero_and_one():
    expected = r"^labels: expected 0 \(normal\) or 1 \(tumour\), found values \[0, 2\]\. Map them to 0/1"
    with pytest.raises(UserError, match=expected):
        binary_metrics([0, 2], [0.1, 0.9])


def test_binary_metrics_reject_a_split_with_one_class():
    expected = r"^labels: binary_metrics needs both .* found only normal \(0\) in 2 patches\."
    with pytest.raises(UserError, match=expected):
        binary_metrics([0, 0], [0.1, 0.9])


# --- calibration ------------------------------------------------------------


def test_expected_calibration_error_by_hand():
    # Bin [0.1, 0.2): mean 0.1, half tumour -> gap 0.4; bin [0.9, 1]: mean 0.9, all tumour -> gap 0.1.
    ece = expected_calibration_error([0, 1, 1, 1], [0.1, 0.1, 0.9, 0.9], n_bins=10)
    assert ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)


def test_expected_calibration_error_weights_each_bin_by_its_share_of_patches():
    # Bin [0.1, 0.2): one normal at 0.1 -> gap 0.1. Bin [0.9, 1]: three at 0.9, two tumour -> gap 0.9 - 2/3.
    # Weighted by count: (1 * 0.1 + 3 * (0.9 - 2/3)) / 4 = 0.2 (an unweighted mean of the gaps would be 1/6).
    ece = expected_calibration_error([0, 1, 1, 0], [0.1, 0.9, 0.9, 0.9], n_bins=10)
    assert ece == pytest.approx(0.2)


def test_calibrated_probabilities_have_small_ece_and_overconfident_ones_large():
    labels, probs = calibrated_scores(20_000)
    overconfident = np.where(probs > 0.5, 0.99, 0.01)
    assert expected_calibration_error(labels, probs) < 0.02
    # Patches called 0.99 are tumour 75% of the time: a gap of about 0.24.
    assert expected_calibration_error(labels, overconfident) > 0.2


def test_reliability_curve_counts_every_patch_once_and_leaves_empty_bins_nan():
    mean_prob, tumour_frequency, count = reliability_curve([0, 1, 1], [0.0, 0.55, 1.0], n_bins=4)
    assert count.tolist() == [1, 0, 1, 1]  # a probability of exactly 1 lands in the last bin
    assert np.isnan(mean_prob[1]) and np.isnan(tumour_frequency[1])
    assert mean_prob[[0, 2, 3]].tolist() == [0.0, 0.55, 1.0]
    assert tumour_frequency[[0, 2, 3]].tolist() == [0.0, 1.0, 1.0]


# --- bootstrap_ci -----------------------------------------------------------


def test_bootstrap_interval_contains_the_point_estimate():
    labels, probs = separable_scores(500)
    low, high = bootstrap_ci(labels, probs, roc_auc_score, n_boot=300)
    assert low < roc_auc_score(labels, probs) < high

    def accuracy_at_half(y, p):
        return accuracy_score(y, p >= 0.5)

    low, high = bootstrap_ci(labels, probs, accuracy_at_half, n_boot=300)
    assert low < accuracy_at_half(labels, probs) < high


def test_bootstrap_interval_of_an_accuracy_is_as_wide_as_the_normal_approximation():
    # The bootstrap distribution of a proportion over n patches is close to normal with
    # sd sqrt(a (1 - a) / n): a 95% interval spans 2 * 1.96 sd (a 90% one only 2 * 1.64 sd).
    labels, probs = separable_scores(1_000)

    def accuracy_at_half(y, p):
        return np.mean((p >= 0.5) == y)

    accuracy = accuracy_at_half(labels, probs)
    sd = math.sqrt(accuracy * (1 - accuracy) / labels.size)
    low, high = bootstrap_ci(labels, probs, accuracy_at_half, n_boot=2_000)
    assert (high - low) / sd == pytest.approx(2 * 1.96, rel=0.07)
    assert (low + high) / 2 == pytest.approx(accuracy, abs=0.5 * sd)


def test_bootstrap_interval_narrows_with_more_patches():
    small = bootstrap_ci(*separable_scores(200), roc_auc_score, n_boot=300)
    large = bootstrap_ci(*separable_scores(5_000), roc_auc_score, n_boot=300)
    assert (large[1] - large[0]) < 0.4 * (small[1] - small[0])


def test_bootstrap_interval_is_reproducible_for_a_seed():
    labels, probs = separable_scores(300)
    first = bootstrap_ci(labels, probs, roc_auc_score, seed=7)
    assert bootstrap_ci(labels, probs, roc_auc_score, seed=7) == first
    assert bootstrap_ci(labels, probs, roc_auc_score, seed=8) != first


@pytest.mark.parametrize("with_groups", [False, True])
def test_fast_auc_bootstrap_gives_the_same_interval_as_calling_sklearn(with_groups):
    labels, probs = separable_scores(300)
    probs = np.round(probs, 1)  # ties, which the rank formula must count as half
    groups = np.arange(labels.size) % 17 if with_groups else None

    def sklearn_auc(y, p):  # not roc_auc_score itself, so bootstrap_ci takes the generic path
        return roc_auc_score(y, p)

    fast = bootstrap_ci(labels, probs, roc_auc_score, n_boot=200, groups=groups)
    generic = bootstrap_ci(labels, probs, sklearn_auc, n_boot=200, groups=groups)
    assert fast == pytest.approx(generic, abs=1e-12)


def test_cluster_bootstrap_is_wider_when_patches_of_a_slide_are_correlated():
    # 40 slides of 100 patches; each slide shifts all its scores together, as a
    # stain or scanner would, so accuracy varies more between slides than patches.
    rng = np.random.default_rng(0)
    slide_of_patch = np.repeat(np.arange(40), 100)
    labels = rng.integers(0, 2, slide_of_patch.size)
    slide_shift = rng.normal(0, 0.25, 40)[slide_of_patch]
    probs = np.clip(np.where(labels == 1, 0.65, 0.35) + slide_shift + rng.normal(0, 0.05, labels.size), 0, 1)

    def accuracy_at_half(y, p):
        return accuracy_score(y, p >= 0.5)

    patch_low, patch_high = bootstrap_ci(labels, probs, accuracy_at_half, n_boot=200)
    slide_low, slide_high = bootstrap_ci(labels, probs, accuracy_at_half, n_boot=200, groups=slide_of_patch)
    assert (slide_high - slide_low) > 2 * (patch_high - patch_low)


def test_bootstrap_rejects_groups_not_aligned_with_patches():
    expected = r"^groups: expected one group id per patch, shape \(4,\), found \(3,\)\. Pass the slide id"
    with pytest.raises(UserError, match=expected):
        bootstrap_ci([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], roc_auc_score, groups=["a", "b", "c"])


def test_bootstrap_names_the_fix_when_every_resample_of_groups_has_one_class():
    # Two slides, one all normal and one all tumour: a resample has both classes
    # only when it draws both slides. With this seed none of the 3 does.
    slides = ["a", "a", "b", "b"]
    expected = r"^groups: all 3 resamples of 2 groups held only one class\. Use more groups with both classes"
    with pytest.raises(UserError, match=expected):
        bootstrap_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], roc_auc_score, n_boot=3, seed=4, groups=slides)


def test_bootstrap_rejects_a_nonsense_alpha():
    expected = r"^n_boot, alpha: expected n_boot >= 1 and 0 < alpha < 1, found 1000 and 5\. Use n_boot=1000"
    with pytest.raises(UserError, match=expected):
        bootstrap_ci([0, 1], [0.1, 0.9], roc_auc_score, alpha=5)


# --- accuracy_coverage ------------------------------------------------------


def test_accuracy_coverage_by_hand():
    rows = accuracy_coverage([1, 0, 1, 0], [1, 0, 0, 1], [0.1, 0.2, 0.3, 0.4], coverages=(1.0, 0.5))
    assert rows == [
        {"coverage": 1.0, "n_patches": 4, "accuracy": 0.5, "max_uncertainty": 0.4},
        {"coverage": 0.5, "n_patches": 2, "accuracy": 1.0, "max_uncertainty": 0.2},
    ]


def test_accuracy_coverage_at_full_coverage_is_plain_accuracy_and_rises_as_coverage_shrinks():
    labels, probs = calibrated_scores(10_000)
    preds = (probs >= 0.5).astype(int)
    distance_from_certainty = 1 - 2 * np.abs(probs - 0.5)
    rows = accuracy_coverage(labels, preds, distance_from_certainty)
    assert rows[0]["accuracy"] == accuracy_score(labels, preds)
    accuracies = [row["accuracy"] for row in rows]
    assert accuracies == sorted(accuracies)
    assert [row["coverage"] for row in rows] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]


def test_accuracy_coverage_rejects_probabilities_passed_as_predictions():
    expected = r"^preds: expected 0 \(normal\) or 1 \(tumour\), found values \[0\.2, 0\.9\]\."
    with pytest.raises(UserError, match=expected):
        accuracy_coverage([0, 1], [0.2, 0.9], [0.1, 0.2])


def test_accuracy_coverage_rejects_coverage_outside_zero_one():
    with pytest.raises(UserError, match=r"^coverages: expected fractions in \(0, 1\], found \[1\.0, 0\.0\]\."):
        accuracy_coverage([0, 1], [0, 1], [0.1, 0.2], coverages=(1.0, 0.0))


# --- plots ------------------------------------------------------------------


def write_metrics_csv(path: Path, rows: list[list]) -> Path:
    with path.open("w", newline="") as csv_file:
        writer = csv.writer(csv_file)
        writer.writerow(["epoch", "train_loss", "val_loss", "val_auc", "val_acc", "lr", "seconds"])
        writer.writerows(rows)
    return path


def assert_readable_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        width_px, height_px = image.size
    assert 300 <= width_px <= 1200 and 300 <= height_px <= 1200, image.size


def test_every_plot_writes_a_readable_png(tmp_path):
    labels, probs = separable_scores(1_000)
    metrics = binary_metrics(labels, probs)
    metrics_csv = write_metrics_csv(
        tmp_path / "metrics.csv",
        [
            [1, 0.69, 0.62, 0.71, 0.66, 1e-3, 31.0],
            [2, 0.55, 0.51, 0.82, 0.74, 8e-4, 30.2],
            [3, 0.44, 0.47, 0.86, 0.78, 3e-4, 30.4],
        ],
    )
    counts = metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"]
    written = [
        plot_confusion_matrix(*counts, tmp_path / "confusion.png"),
        plot_roc(labels, probs, metrics["roc_auc"], (0.81, 0.85), tmp_path / "roc.png"),
        plot_roc(labels, probs, metrics["roc_auc"], None, tmp_path / "roc_without_interval.png"),
        plot_reliability(labels, probs, metrics["ece"], 15, tmp_path / "reliability.png"),
        plot_training_curves(metrics_csv, tmp_path / "training.png"),
        plot_accuracy_coverage(labels, probs, 1 - 2 * np.abs(probs - 0.5), tmp_path / "coverage.png"),
    ]
    for path in written:
        assert_readable_png(path)


def test_training_curves_are_read_per_column(tmp_path):
    metrics_csv = write_metrics_csv(tmp_path / "metrics.csv", [[1, 0.7, 0.6, 0.8, 0.75, 1e-3, 12.5]])
    curves = read_training_curves(metrics_csv)
    assert curves["epoch"].tolist() == [1.0] and curves["val_auc"].tolist() == [0.8]


def test_training_curves_ignore_columns_they_do_not_plot(tmp_path):
    metrics_csv = tmp_path / "metrics.csv"
    metrics_csv.write_text("epoch,train_loss,val_loss,val_auc,val_acc,grad_norm\n1,0.7,0.6,0.8,0.75,3.2\n")
    curves = read_training_curves(metrics_csv)
    assert sorted(curves) == ["epoch", "train_loss", "val_acc", "val_auc", "val_loss"]


def test_training_curves_name_the_file_and_the_missing_columns(tmp_path):
    metrics_csv = tmp_path / "metrics.csv"
    metrics_csv.write_text("epoch,loss\n1,0.5\n")
    expected = re.escape(
        f"{metrics_csv}: expected columns epoch,train_loss,val_loss,val_auc,val_acc, missing "
        "train_loss,val_loss,val_auc,val_acc (found 'epoch,loss'). Is this a training run's metrics.csv?"
    )
    with pytest.raises(UserError, match=expected):
        plot_training_curves(metrics_csv, tmp_path / "training.png")


def test_training_curves_name_the_line_and_column_that_is_not_a_number(tmp_path):
    rows = [[1, 0.7, 0.6, 0.8, 0.75, 1e-3, 12.5], [2, 0.6, "oops"]]
    metrics_csv = write_metrics_csv(tmp_path / "metrics.csv", rows)
    expected = re.escape(f"{metrics_csv}: line 3, column 'val_loss': expected a number, found 'oops'. Was")
    with pytest.raises(UserError, match=expected):
        read_training_curves(metrics_csv)


def test_training_curves_name_a_row_that_is_cut_short(tmp_path):
    metrics_csv = write_metrics_csv(tmp_path / "metrics.csv", [[1, 0.7, 0.6]])
    expected = re.escape(f"{metrics_csv}: line 2, column 'val_auc': expected a number, found None.")
    with pytest.raises(UserError, match=expected):
        read_training_curves(metrics_csv)


def test_training_curves_refuse_a_file_without_epochs(tmp_path):
    metrics_csv = write_metrics_csv(tmp_path / "metrics.csv", [])
    with pytest.raises(UserError, match=re.escape(f"{metrics_csv}: expected one row per epoch, found none.")):
        read_training_curves(metrics_csv)


def test_training_curves_name_a_missing_file(tmp_path):
    metrics_csv = tmp_path / "metrics.csv"
    expected = re.escape(f"{metrics_csv}: no such file. Pass the metrics.csv inside a training run folder.")
    with pytest.raises(UserError, match=expected):
        read_training_curves(metrics_csv)


# --- report -----------------------------------------------------------------


def test_report_is_one_self_contained_html_file(tmp_path):
    labels, probs = separable_scores(300)
    images = {
        "ROC curve": plot_roc(labels, probs, 0.953, (0.944, 0.961), tmp_path / "plots" / "roc.png"),
        "Confusion matrix": plot_confusion_matrix(50, 5, 7, 40, tmp_path / "plots" / "confusion.png"),
    }
    metrics = {
        "n": 30_000,
        "n_positive": 12_000,
        "roc_auc": 0.953,
        "roc_auc_ci": (0.944, 0.961),
        "accuracy": 0.8812,
    }
    out_dir = tmp_path / "report"
    path = write_report(
        out_dir,
        "Run 7 on PCam valid",
        metrics,
        images,
        tables={"Selective prediction": [{"coverage": 1.0, "n_patches": 30_000, "accuracy": 0.881}]},
        notes=["Threshold chosen on validation & applied as is."],
    )
    assert path == out_dir / "report.html"
    assert [p.name for p in out_dir.iterdir()] == ["report.html"]
    page = path.read_text(encoding="utf-8")
    assert "0.953 [0.944, 0.961]" in page
    assert "30,000" in page and "0.881" in page
    assert page.count("data:image/png;base64,") == len(images)
    assert "Selective prediction" in page and "max_uncertainty" not in page
    assert "validation &amp; applied" in page
    assert 'src="http' not in page and "href=" not in page and "<script" not in page


def test_report_escapes_html_in_every_string(tmp_path):
    page = write_report(
        tmp_path,
        "<script>alert(1)</script>",
        {"<b>metric</b>": "<i>value</i>"},
        images={},
        tables={"<table>": [{"<col>": "<cell>"}]},
        notes=["<img src=x>"],
    ).read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for raw in ("<b>", "<i>", "<col>", "<cell>", "<img src=x>"):
        assert raw not in page


def test_report_refuses_an_image_it_cannot_inline(tmp_path):
    (tmp_path / "plot.svg").write_text("<svg/>")
    expected = r"^images\['ROC'\]: expected a \.png or \.jpg file, found .*plot\.svg\. Save the figure as PNG"
    with pytest.raises(UserError, match=expected):
        write_report(tmp_path, "t", {}, {"ROC": tmp_path / "plot.svg"})


def test_json_is_written_whole_and_refuses_nan(tmp_path):
    path = write_json_atomic(tmp_path / "metrics.json", {"roc_auc": 0.9, "roc_auc_ci": (0.8, 0.95)})
    assert path.read_text() == '{\n  "roc_auc": 0.9,\n  "roc_auc_ci": [\n    0.8,\n    0.95\n  ]\n}\n'
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "metrics.json", {"roc_auc": float("nan")})
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind


# --- real patches -----------------------------------------------------------


def test_a_colour_score_on_real_pcam_valid_patches_is_honestly_reported(pcam_jpeg, tmp_path):
    # Mean colour saturation stands in for a model: densely stained tumour is
    # more saturated than normal tissue and white background (AUC ~0.72).
    with (pcam_jpeg / "labels.csv").open(newline="") as csv_file:
        rows = [row for row in csv.DictReader(csv_file) if row["split"] == "valid"]
    labels = np.array([int(row["label"]) for row in rows])
    patches_uint8 = np.stack([np.asarray(Image.open(pcam_jpeg / row["file"])) for row in rows])  # (N, 96, 96, 3)
    saturation = (patches_uint8.max(axis=-1) - patches_uint8.min(axis=-1)).mean(axis=(1, 2)) / 255

    threshold = choose_threshold(labels, saturation)
    metrics = binary_metrics(labels, saturation, threshold)
    metrics["roc_auc_ci"] = bootstrap_ci(labels, saturation, roc_auc_score, n_boot=200)
    assert metrics["n"] == 2_000 and metrics["n_positive"] == 1_000
    assert 0.5 < metrics["roc_auc_ci"][0] < metrics["roc_auc"] < metrics["roc_auc_ci"][1]
    assert metrics["balanced_accuracy"] > 0.6
    page = write_report(
        tmp_path,
        "Saturation baseline on PCam valid",
        metrics,
        {"ROC": plot_roc(labels, saturation, metrics["roc_auc"], metrics["roc_auc_ci"], tmp_path / "roc.png")},
    ).read_text(encoding="utf-8")
    assert f"{metrics['roc_auc']:.3f} [{metrics['roc_auc_ci'][0]:.3f}, {metrics['roc_auc_ci'][1]:.3f}]" in page


# --- evaluate_run -----------------------------------------------------------


def test_evaluate_bootstraps_whole_slides_when_every_patch_names_its_slide(tmp_path):
    # Synthetic PCam h5 files name each patch's slide in *_meta.csv, as PCam's own do.
    # (A store without slide ids resamples patches: every other evaluate_run test.)
    from histodetect.data.store import prepare
    from histodetect.data.synthetic import write_synthetic
    from histodetect.train import fit, preset_config

    source = write_synthetic(tmp_path / "src", 200, format="pcam_h5", seed=0)
    store = prepare(source, tmp_path / "store", progress=False).store
    config = preset_config("cpu", model="histo_tinynet", epochs=1, batch_size=32, max_minutes=0.0, crop_px=0,
                           shift_px=0, device="cpu")
    fit(config, store, tmp_path / "run", preset="cpu", progress=False)
    metrics = evaluate_run(tmp_path / "run", store, split="valid", out=tmp_path / "eval", device="cpu", n_boot=50)
    assert metrics["bootstrap"] == "slide-grouped"
    report = (tmp_path / "eval" / "report.html").read_text(encoding="utf-8")
    assert "ROC AUC interval: 95% slide-grouped bootstrap, 50 resamples." in report


def test_metrics_json_records_what_made_its_numbers(tmp_path, monkeypatch):
    # Months later a number must lead back to its inputs: the store as an absolute path (as typed,
    # "store" named whatever the working folder held), the weights, the precision (bf16 moves
    # probabilities by up to ~1e-2), the bootstrap's resamples, the MC seed and the package version.
    import hashlib
    import json

    from histodetect import __version__
    from histodetect.data.store import prepare
    from histodetect.data.synthetic import write_synthetic
    from histodetect.train import fit, preset_config

    monkeypatch.chdir(tmp_path)
    prepare(write_synthetic(Path("src"), 120, format="folder", seed=0), Path("store"), progress=False)
    config = preset_config("cpu", model="histo_tinynet", epochs=1, batch_size=32, max_minutes=0.0, crop_px=0,
                           shift_px=0, device="cpu")
    fit(config, "store", "run", preset="cpu", progress=False)
    evaluate_run("run", Path("store"), split="valid", out="eval", device="cpu", n_boot=100, seed=3, fp32=True,
                 progress=False)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    weights = tmp_path / "run" / "checkpoints" / "best.pt"
    assert metrics["store"] == str(tmp_path / "store") and metrics["run"] == str(tmp_path / "run")
    assert metrics["weights"] == str(weights)
    assert metrics["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert metrics["run_started"] == json.loads((tmp_path / "run" / "run.json").read_text())["started"]
    assert (metrics["histodetect"], metrics["device"], metrics["bf16_autocast"]) == (__version__, "cpu", False)
    assert (metrics["bootstrap_resamples"], metrics["seed"]) == (100, 3)
