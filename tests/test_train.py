"""Train -> evaluate -> predict on real shared patches, presets, resume, DDP and bad input."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from histodetect.cli import main
from histodetect.data.store import open_store, prepare
from histodetect.errors import UserError
from histodetect.models import create_model
from histodetect.train import (
    PRESETS,
    DeviceBatches,
    build_optimizer,
    fit,
    load_checkpoint,
    preset_config,
    sam_second_pass,
    save_atomic,
    training_loss,
)
from conftest import copy_patches

# Small and fast: the whole file must run in a few minutes on 2 cores.
TINY = dict(model="histo_tinynet", batch_size=32, epochs=2, max_minutes=0.0, crop_px=48, shift_px=2,
            val_batch_size=128, device="cpu", ema_decay=0.9, warmup_fraction=0.1)




@pytest.fixture(scope="module")
def small_store(pcam_jpeg, tmp_path_factory) -> Path:
    """192 real train and 64 real valid patches, balanced."""
    root = tmp_path_factory.mktemp("small")
    copy_patches(pcam_jpeg, root / "src", {"train": 96, "valid": 32})
    prepare(root / "src", root / "store", progress=False)
    return root / "store"


@pytest.fixture(scope="module")
def trained_run(small_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    fit(preset_config("cpu", **{**TINY, "epochs": 3}), small_store, out, preset="cpu", progress=False)
    return out


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_run_folder_holds_config_fingerprint_versions_metrics_and_checkpoints(trained_run, small_store):
    run = json.loads((trained_run / "run.json").read_text())
    assert run["preset"] == "cpu" and run["config"]["model"] == "histo_tinynet"
    assert run["data"]["fingerprint"] == open_store(small_store).fingerprint
    assert {"torch", "timm", "histodetect", "numpy"} <= set(run["versions"])
    assert run["seed"] == 0 and run["device"]["type"] == "cpu"
    assert run["preprocessing"]["crop_px"] == 48 and len(run["preprocessing"]["mean"]) == 3
    assert 0 < run["threshold"] < 1
    with (trained_run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(0 <= float(r["val_auc"]) <= 1 and 0 <= float(r["val_acc"]) <= 1 for r in rows)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]), "the training loss falls"
    best_auc = load_checkpoint(trained_run / "checkpoints" / "best.pt")["metrics"]["val_auc"]
    assert best_auc == pytest.approx(max(float(r["val_auc"]) for r in rows), abs=1e-6)
    assert best_auc == pytest.approx(run["best_val_auc"])
    assert not list(trained_run.rglob("*.tmp-*")), "no temporary checkpoint is left"


def test_the_run_chooses_one_threshold_per_tta_view_count_on_validation(trained_run, small_store):
    """Each threshold is the one choose_threshold picks for the mean probability of that many views on validation."""
    from histodetect.evaluate import choose_threshold
    from histodetect.predict import load_run, predict_logits

    run_json = json.loads((trained_run / "run.json").read_text())
    assert set(run_json["thresholds"]) == {"1", "4", "8", "40", "72"}  # 40, 72: the run has a shifted crop
    assert run_json["thresholds"]["1"] == run_json["threshold"]
    run = load_run(trained_run, device="cpu")
    store = open_store(small_store)
    rows = store.split_indices("valid")
    # Training scored validation in batches of val_batch_size // 8 patches: the same batches
    # give the same logits (bf16 ones too), so each threshold is recomputed exactly.
    logits = predict_logits(run, store.read_batch(rows), tta=72, batch_size=run_json["config"]["val_batch_size"] // 8)
    view_probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    labels = store.labels[rows]
    for views in (1, 4, 8, 40, 72):
        chosen = run_json["thresholds"][str(views)]
        expected = choose_threshold(labels, view_probs[:, :views].mean(axis=1))  # the first `views` views averaged
        assert chosen == pytest.approx(expected, abs=1e-6), views
        assert run.threshold_for(views) == chosen


def test_moved_crop_thresholds_are_chosen_on_a_subset_of_a_large_validation_split(trained_run, small_store,
                                                                                  monkeypatch):
    import histodetect.train.loop.thresholds as train_module

    checkpoint = load_checkpoint(trained_run / "checkpoints" / "best.pt")
    cfg, pre = train_module.TrainConfig(**checkpoint["config"]), checkpoint["preprocessing"]
    store = open_store(small_store)
    rows = store.split_indices("valid")
    seen = []
    real_model_logits = train_module.model_logits
    monkeypatch.setattr(train_module, "model_logits",
                        lambda model, patches, *a, **k: seen.append((len(patches), k["tta"])) or
                        real_model_logits(model, patches, *a, **k))
    whole = train_module._validation_thresholds(trained_run, store, rows, cfg, pre["mean"], pre["std"],
                                                torch.device("cpu"))
    assert seen == [(len(rows), 72)]  # one pass serves every count
    monkeypatch.setattr(train_module, "MOVED_CROP_THRESHOLD_ROWS", 16)
    seen.clear()
    subset = train_module._validation_thresholds(trained_run, store, rows, cfg, pre["mean"], pre["std"],
                                                 torch.device("cpu"))
    assert seen == [(len(rows), 8), (16, 72)]
    assert set(subset) == set(whole) == {"1", "4", "8", "40", "72"}
    assert all(subset[n] == pytest.approx(whole[n], abs=1e-6) for n in ("1", "4", "8"))


def test_progressive_crop_grows_the_training_crop_on_schedule(small_store, tmp_path, monkeypatch):
    import histodetect.train.loop.training as train_module

    crops = []
    real_augment = train_module.augment_batch

    def recording_augment(patches, config, *args, **kwargs):
        crops.append(config.crop_px)
        return real_augment(patches, config, *args, **kwargs)

    monkeypatch.setattr(train_module, "augment_batch", recording_augment)
    cfg = preset_config("cpu", **{**TINY, "epochs": 2, "progressive_crop": "32@0.25,40@0.5"})
    fit(cfg, small_store, tmp_path / "run", preset="cpu", progress=False)
    n = len(crops)  # steps; progress is the step count over all steps (no time limit)
    assert crops == [32] * (n // 4) + [40] * (n // 2 - n // 4) + [48] * (n - n // 2)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["preprocessing"]["crop_px"] == 48, "validation and prediction use the final crop"


@pytest.mark.parametrize("text, problem", [
    ("64", "found '64'"),
    ("64@0.7,76@0.4", "the fractions must rise strictly between 0 and 1"),
    ("128@0.5", "each size must be between 1 and 96 px"),
])
def test_a_malformed_progressive_crop_is_one_line_before_anything_is_written(small_store, tmp_path, text, problem):
    with pytest.raises(UserError, match=problem) as caught:
        fit(preset_config("cpu", **{**TINY, "progressive_crop": text}), small_store, tmp_path / "run", progress=False)
    assert "\n" not in str(caught.value) and not (tmp_path / "run").exists()


def test_evaluate_writes_metrics_plots_and_one_self_contained_report(trained_run, small_store, capsys):
    code, out, err = run_cli(capsys, "evaluate", trained_run, "--data", f"{small_store}:valid", "--tta", "8",
                             "--json", "--bootstrap", "200")
    assert code == 0
    # Scoring Kaggle's 22,003 validation patches with --tta 8 took minutes on a CPU: a bar shows it.
    assert "evaluate: 100%" in err and "64/64" in err, err
    metrics = json.loads(out)
    assert metrics["n"] == 64 and metrics["split"] == "valid" and metrics["tta"] == 8
    assert metrics["threshold"] == json.loads((trained_run / "run.json").read_text())["thresholds"]["8"]
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "f1", "sensitivity", "specificity", "brier", "ece"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["nll"] > 0
    low, high = metrics["roc_auc_ci"]
    assert low <= metrics["roc_auc"] <= high
    report_dir = Path(metrics["out"])
    for png in ("confusion_matrix.png", "roc.png", "reliability.png", "training_curves.png", "accuracy_coverage.png"):
        assert (report_dir / png).stat().st_size > 1000
    html = (report_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "http://" not in html
    assert json.loads((report_dir / "metrics.json").read_text())["roc_auc"] == metrics["roc_auc"]


def test_evaluate_on_the_training_split_warns_that_it_shows_fit_not_generalisation(trained_run, small_store,
                                                                                     tmp_path, capsys):
    # It printed training-split scores (accuracy near 1 for a big network) with nothing to tell them from a test.
    code, out, err = run_cli(capsys, "evaluate", trained_run, "--data", f"{small_store}:train", "--out",
                             tmp_path / "ev", "--bootstrap", "100", "--quiet")
    assert code == 0, err
    assert f"histodetect: warning: {small_store}:train is the split {trained_run} trained on" in err, err
    assert "This is the split the run trained on" in (tmp_path / "ev" / "report.html").read_text()
    code, _, err = run_cli(capsys, "evaluate", trained_run, "--data", f"{small_store}:valid", "--out",
                           tmp_path / "ev2", "--bootstrap", "100", "--quiet")
    assert code == 0 and "warning" not in err, err


def test_a_refused_out_on_the_training_split_is_one_line_not_a_warning_and_an_error(trained_run, small_store,
                                                                                     tmp_path, capsys):
    # The fit-not-generalisation warning came before the --out check: two lines for one refusal.
    (tmp_path / "afile").write_text("")
    code, _, err = run_cli(capsys, "evaluate", trained_run, "--data", f"{small_store}:train", "--out",
                           tmp_path / "afile", "--bootstrap", "100", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "warning" not in err and "is a file" in err, err


def assert_preds_follow(rows: list[dict], threshold: float) -> None:
    """pred is prob >= threshold. The threshold is one validation patch's probability: that
    patch, and any within the CSV's 6 decimals or a batch's float noise of it, may fall
    either side."""
    decided = [r for r in rows if abs(float(r["prob"]) - threshold) > 1e-5]
    assert len(decided) >= len(rows) - 2
    assert all(r["pred"] == str(int(float(r["prob"]) >= threshold)) for r in decided)


def test_predict_writes_id_prob_pred_for_folders_files_stores_and_h5(trained_run, small_store, pcam_jpeg, tmp_path, capsys):
    folder = pcam_jpeg / "valid" / "1"
    files = sorted(folder.glob("*.jpg"))[:5]
    code, _, _ = run_cli(capsys, "predict", trained_run, *files, "--out", tmp_path / "files.csv", "--tta", "4")
    assert code == 0
    with (tmp_path / "files.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == [f.stem for f in files]
    assert all(0 <= float(r["prob"]) <= 1 and r["pred"] in ("0", "1") for r in rows)
    threshold = json.loads((trained_run / "run.json").read_text())["thresholds"]["4"]  # the one for 4 views
    assert_preds_follow(rows, threshold)

    from histodetect.predict import load_run, predict_patches

    run = load_run(trained_run, device="cpu")
    store = open_store(small_store)
    rows_valid = store.split_indices("valid")
    code, _, _ = run_cli(capsys, "predict", trained_run, small_store, "--split", "valid", "--out", tmp_path / "store.csv")
    with (tmp_path / "store.csv").open() as handle:
        store_rows = list(csv.DictReader(handle))
    expected = predict_patches(run, store.read_batch(rows_valid))
    assert [r["id"] for r in store_rows] == list(store.ids[rows_valid])
    np.testing.assert_allclose([float(r["prob"]) for r in store_rows], expected, atol=1e-6)

    import h5py

    with h5py.File(tmp_path / "patches_x.h5", "w") as h5:
        h5["x"] = store.read_batch(rows_valid[:7])
    code, _, _ = run_cli(capsys, "predict", trained_run, tmp_path / "patches_x.h5", "--out", tmp_path / "h5.csv")
    with (tmp_path / "h5.csv").open() as handle:
        h5_rows = list(csv.DictReader(handle))
    assert [r["id"] for r in h5_rows] == [str(i) for i in range(7)]
    np.testing.assert_allclose([float(r["prob"]) for r in h5_rows], expected[:7], atol=1e-6)


def test_predict_decides_with_the_threshold_chosen_for_its_view_count(trained_run, small_store, tmp_path):
    from histodetect.predict import load_run, predict_to_csv

    # Thresholds no probability can miss: every patch is 1 by the 1-view one and 0 by the 4-view one.
    run = dataclasses.replace(load_run(trained_run, device="cpu"), thresholds={1: 0.0, 4: 1.01})
    for tta, pred in ((1, "1"), (4, "0"), (8, "0")):  # 8 views use the largest smaller count's
        predict_to_csv(run, [small_store], tmp_path / "p.csv", tta=tta, split="valid", progress=False)
        with (tmp_path / "p.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 64 and {r["pred"] for r in rows} == {pred}, tta


def test_predict_out_never_lands_on_an_input_or_the_runs_files(trained_run, pcam_jpeg, tmp_path, capsys):
    image = tmp_path / "patch.jpg"
    shutil.copy(min((pcam_jpeg / "valid" / "1").glob("*.jpg")), image)
    before = image.read_bytes()
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (tmp_path / "notes.txt").write_text("mine")
    for out, problem in ((image, f"would overwrite {image.resolve()}"),
                         (tmp_path / "notes.txt", "exists and is not an earlier output of this command"),
                         (run / "run.json", f"would overwrite {(run / 'run.json').resolve()}"),
                         (run / "checkpoints" / "preds.csv", f"would overwrite {(run / 'checkpoints').resolve()}")):
        code, _, err = run_cli(capsys, "predict", run, image, "--out", out, "--quiet")
        assert code == 2 and problem in err and err.count("\n") == 1, err
    assert image.read_bytes() == before and json.loads((run / "run.json").read_text())["config"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    code, _, _ = run_cli(capsys, "predict", run, image, "--out", tmp_path / "p.csv", "--quiet")
    assert code == 0
    code, _, _ = run_cli(capsys, "predict", run, image, "--out", tmp_path / "p.csv", "--quiet")
    assert code == 0, "an earlier output is replaced"
    for _ in range(2):  # whatever its name
        code, _, err = run_cli(capsys, "predict", run, image, "--out", tmp_path / "preds", "--quiet")
        assert code == 0, err
    (tmp_path / "made-by-mktemp").touch()
    code, _, err = run_cli(capsys, "predict", run, image, "--out", tmp_path / "made-by-mktemp", "--quiet")
    assert code == 0, "an empty file holds nothing to lose"


@pytest.mark.parametrize("out", ["/dev/stdout", "-"])
def test_predict_to_stdout_redirected_to_a_file_writes_the_csv_alone(trained_run, pcam_jpeg, tmp_path, out):
    """Reopened, /dev/stdout redirected to a file starts at offset 0: the summary line overwrote the CSV."""
    import subprocess
    import sys

    files = [str(f) for f in sorted((pcam_jpeg / "valid" / "1").glob("*.jpg"))[:2]]
    with (tmp_path / "out.csv").open("w") as stdout:
        done = subprocess.run([sys.executable, "-m", "histodetect.cli", "predict", str(trained_run), *files,
                               "--out", out, "--quiet", "--device", "cpu"], stdout=stdout, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    assert done.returncode == 0 and "wrote predictions for 2 patches" in done.stderr, done.stderr
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] == "id,prob,pred" and [line.split(",")[0] for line in lines[1:]] == [Path(f).stem for f in files]
    assert Path("/dev/stdout").is_symlink() or not Path("/dev/stdout").is_file(), "/dev/stdout itself is untouched"


def test_a_hand_edited_run_json_with_wrong_types_is_one_line(trained_run, tmp_path, capsys):
    from histodetect.predict import load_run

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    good = json.loads((run / "run.json").read_text())
    for edit, problem in (([], "not a run file (a JSON list, expected an object)"),
                          ({**good, "thresholds": {"1": "high"}}, "decision thresholds are not numbers"),
                          ({**good, "thresholds": {"1": 2.5}}, "are not probabilities in [0, 1]"),
                          ({**good, "calibration": {"temperature": -1}}, "calibration temperature -1 is not")):
        (run / "run.json").write_text(json.dumps(edit))
        with pytest.raises(UserError, match=re.escape(problem)):
            load_run(run, device="cpu")


def test_evaluate_out_never_replaces_what_it_did_not_write(trained_run, small_store, tmp_path, capsys, monkeypatch):
    data = f"{small_store}:valid"
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("two years of work")
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path / "mine")
    for out, problem in ((run, "would replace"), (tmp_path, "would replace"), (".", "would replace"),
                         (tmp_path / "mine", "would replace"), (tmp_path / "afile", "is a file"),
                         (tmp_path / "afile" / "x", "afile is a file")):
        code, _, err = run_cli(capsys, "evaluate", run, "--data", data, "--out", out, "--bootstrap", "100")
        assert code == 2 and problem in err and err.count("\n") == 1, (out, err)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "evaluate", run, "--data", data, "--out", tmp_path / "mine", "--bootstrap", "100")
    assert code == 2 and "holds other files" in err, err
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "two years of work"
    assert (run / "run.json").is_file() and (run / "checkpoints" / "best.pt").is_file()
    # An earlier evaluation is replaced; one on another store gets its own default folder.
    for _ in range(2):
        code, out, err = run_cli(capsys, "evaluate", run, "--data", data, "--out", tmp_path / "ev", "--json",
                                 "--bootstrap", "100", "--quiet")
        assert code == 0 and "evaluate:" not in err, err
    other = tmp_path / "other-store"
    shutil.copytree(small_store, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "another"}))
    code, out, err = run_cli(capsys, "evaluate", run, "--data", f"{other}:valid", "--json", "--bootstrap", "100")
    assert code == 0 and json.loads(out)["out"] == str(run / "eval-other-store-valid-tta1"), err
    # A run without metrics.csv is still evaluated, without the training curves.
    (run / "metrics.csv").unlink()
    code, out, err = run_cli(capsys, "evaluate", run, "--data", data, "--json", "--bootstrap", "100")
    assert code == 0 and not (Path(json.loads(out)["out"]) / "training_curves.png").exists(), err


def test_evaluate_names_a_missing_store_a_one_class_split_and_a_bad_device(trained_run, small_store, tmp_path, capsys,
                                                                          monkeypatch):
    import histodetect.data.store as store_module
    from histodetect.evaluate import evaluate_run

    code, _, err = run_cli(capsys, "evaluate", trained_run, "--data", f"{tmp_path / 'nostore'}:valid")
    assert code == 2 and f"{tmp_path / 'nostore'}: not a histodetect store" in err, err
    store = open_store(small_store)
    rows = store.split_indices("valid")
    positives = rows[store.labels[rows] == 1]

    class OnlyPositives(store_module.PatchStore):
        def split_indices(self, split):
            return positives

    monkeypatch.setattr(store_module, "open_store", OnlyPositives)
    with pytest.raises(UserError, match=r"split 'valid' holds only label 1 .* need both classes"):
        evaluate_run(trained_run, small_store, split="valid")
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "evaluate", trained_run, "--data", f"{small_store}:valid", "--device", "gpu")
    assert code == 2 and "--device 'gpu': expected auto, cpu, cuda or cuda:N" in err, err
    code, _, err = run_cli(capsys, "evaluate", trained_run, "--data", f"{small_store}:valid", "--bootstrap", "1")
    assert code == 2 and "--bootstrap 1: expected 100 resamples or more" in err, err
    # 2**63 resampled until memory ran out; 100000000 still ran after minutes
    code, _, err = run_cli(capsys, "evaluate", trained_run, "--data", f"{small_store}:valid", "--bootstrap", "100001")
    assert code == 2 and "--bootstrap 100001: expected at most 100,000 resamples" in err, err
    # torch keeps 32 bits of a seed: 2**32 drew seed 0's MC-dropout masks, 2**64 was a traceback
    for seed in ("-1", str(2**32), str(2**64)):
        code, _, err = run_cli(capsys, "evaluate", trained_run, "--data", f"{small_store}:valid", "--seed", seed)
        assert code == 2 and f"--seed {seed}: expected an integer in [0, 2**32)" in err and err.count("\n") == 1, err


def test_predict_checks_out_and_batch_size_before_scoring(trained_run, pcam_jpeg, tmp_path, capsys, monkeypatch):
    files = sorted((pcam_jpeg / "valid" / "1").glob("*.jpg"))[:3]
    import histodetect.predict.csv_output as predict_csv_module  # where predict_to_csv looks predict_samples up

    def never(*args, **kwargs):
        raise AssertionError("scored before checking --out")

    monkeypatch.setattr(predict_csv_module, "predict_samples", never)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    for out, extra, problem in ((tmp_path / "adir", (), "is a folder"),
                                (tmp_path / "afile" / "p.csv", (), "afile is a file"),
                                (tmp_path / "p.csv", ("--batch-size", "0"), "--batch-size 0: expected"),
                                (tmp_path / "p.csv", ("--batch-size", "-1"), "--batch-size -1: expected"),
                                (tmp_path / "p.csv", ("--seed", "-1"), "--seed -1: expected an integer in [0, 2**32)"),
                                (tmp_path / "p.csv", ("--seed", str(2**32)), f"--seed {2**32}: expected an integer")):
        code, _, err = run_cli(capsys, "predict", trained_run, *files, "--out", out, "--quiet", *extra)
        assert code == 2 and problem in err and err.count("\n") == 1, (out, err)
    assert not (tmp_path / "p.csv").exists()


def test_the_largest_seed_scores_every_input_not_only_the_first(trained_run, pcam_jpeg, tmp_path, capsys):
    # Input k's MC-dropout masks come from seed + k: with --seed 2**32 - 1, the second input's
    # 2**32 was refused after the first was scored, in a message naming a seed nobody gave.
    inputs = [pcam_jpeg / "valid" / label for label in ("0", "1")]
    code, _, err = run_cli(capsys, "predict", trained_run, *inputs, "--out", tmp_path / "p.csv", "--quiet",
                           "--seed", 2**32 - 1)
    assert code == 0 and err == "", err
    n_patches = sum(len(list(folder.glob("*.jpg"))) for folder in inputs)
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + n_patches


def test_predict_given_evaluates_store_colon_split_names_the_split_flag(trained_run, small_store, tmp_path, capsys):
    code, _, err = run_cli(capsys, "predict", trained_run, f"{small_store}:valid", "--out", tmp_path / "p.csv", "--quiet")
    assert code == 2 and err.count("\n") == 1
    assert f"{small_store}:valid: no such file or folder; name a store's split with --split: " \
           f"'{small_store} --split valid'" in err
    code, _, err = run_cli(capsys, "predict", trained_run, tmp_path / "missing:valid", "--out", tmp_path / "p.csv")
    assert code == 2 and err.strip().endswith("missing:valid: no such file or folder"), "not a store: no advice"


def test_predict_refuses_repeated_ids_in_a_kaggle_submission_and_warns_elsewhere(trained_run, kaggle_sample, pcam_jpeg,
                                                                                 tmp_path, capsys):
    test = kaggle_sample / "test"
    code, _, err = run_cli(capsys, "predict", trained_run, test, test, "--out", tmp_path / "sub.csv",
                           "--kaggle-submission", "--quiet")
    assert code == 2 and "appears more than once (29 repeats)" in err and not (tmp_path / "sub.csv").exists(), err
    one = sorted((pcam_jpeg / "valid" / "1").glob("*.jpg"))[0]
    code, _, err = run_cli(capsys, "predict", trained_run, one.parent, one, "--out", tmp_path / "p.csv", "--quiet")
    assert code == 0 and f"1 ids appear more than once (first: {one.stem})" in err, err
    raw = (tmp_path / "p.csv").read_bytes()
    assert b"\r" not in raw and raw.startswith(b"id,prob,pred\n"), "Unix line ends"


def test_predict_reads_hdf5_files_by_any_suffix_case(trained_run, small_store, tmp_path, capsys):
    import h5py

    patches = open_store(small_store).read_batch(np.arange(3))
    for name in ("patches.hdf5", "PATCHES.H5"):
        with h5py.File(tmp_path / name, "w") as h5:
            h5["x"] = patches
        code, _, err = run_cli(capsys, "predict", trained_run, tmp_path / name, "--out", tmp_path / "p.csv", "--quiet")
        assert code == 0, err
        assert [line.split(",")[0] for line in (tmp_path / "p.csv").read_text().splitlines()[1:]] == ["0", "1", "2"]


def test_the_command_line_parser_loads_neither_torch_nor_timm():
    """--help, prepare and info must start fast: building the parser (with every train flag) stays torch-free."""
    code = ("import sys; from histodetect.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'timm', 'sklearn') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_every_training_option_explains_itself_in_help(capsys):
    from histodetect.presets import OPTION_HELP, TrainConfig

    assert set(OPTION_HELP) == {f.name for f in dataclasses.fields(TrainConfig)}
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "PX@FRACTION pairs, e.g. 64@0.4,76@0.7" in text and "(0 = never)" in text and "made from 10% of train" in text


def test_moved_crop_tta_extends_the_eight_dihedral_views_and_needs_a_shifted_crop(trained_run, small_store, capsys,
                                                                                  tmp_path):
    import dataclasses

    from histodetect.augment import TTA_VIEW_COUNTS
    from histodetect.cli import TTA_CHOICES
    from histodetect.predict import load_run, predict_logits, predict_patches

    assert TTA_CHOICES == TTA_VIEW_COUNTS  # the CLI's copy, kept free of torch
    run = load_run(trained_run, device="cpu")
    assert run.shift_px == 2 and run.tta_choices == (1, 4, 8, 40, 72)
    patches = open_store(small_store).read_batch(np.arange(12))
    logits = predict_logits(run, patches, tta=72)
    assert logits.shape == (12, 72)
    np.testing.assert_allclose(logits[:, :8], predict_logits(run, patches, tta=8), atol=1e-6)
    assert np.abs(logits[:, 8:] - logits[:, :8].repeat(8, axis=1)).max() > 1e-3  # moved crops are other views

    unshifted = dataclasses.replace(run, config={**run.config, "shift_px": 0})
    assert unshifted.tta_choices == (1, 4, 8)
    with pytest.raises(UserError, match=rf"--tta 40: {re.escape(str(trained_run))} was trained without a shifted "
                                        r"crop \(crop_px 48, shift_px 0\).*use --tta 8"):
        predict_patches(unshifted, patches, tta=40)
    # A run trained before 40 and 72 had thresholds decides with the largest smaller count's.
    older = dataclasses.replace(run, thresholds={1: 0.3, 4: 0.4, 8: 0.45})
    assert older.threshold_for(72) == older.threshold_for(40) == 0.45 and older.threshold_for(4) == 0.4

    code, _, _ = run_cli(capsys, "predict", trained_run, small_store, "--split", "valid", "--tta", "72",
                         "--out", tmp_path / "p72.csv")
    assert code == 0
    with (tmp_path / "p72.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    threshold = json.loads((trained_run / "run.json").read_text())["thresholds"]["72"]
    assert_preds_follow(rows, threshold)


def test_predict_uses_bf16_where_fast_and_fp32_gives_the_plain_float32_model(trained_run, small_store, tmp_path,
                                                                             capsys):
    from histodetect.augment import preprocess_batch
    from histodetect.predict import load_run, predict_patches
    from histodetect.train import bf16_is_fast

    store = open_store(small_store)
    rows = store.split_indices("valid")
    patches = store.read_batch(rows)
    run, run_fp32 = load_run(trained_run, device="cpu"), load_run(trained_run, device="cpu", fp32=True)
    with torch.no_grad():
        x = preprocess_batch(torch.from_numpy(patches), run.mean, run.std, run.crop_px)
        plain = torch.sigmoid(run_fp32.model(x.contiguous())).reshape(-1).numpy()
    np.testing.assert_allclose(predict_patches(run_fp32, patches), plain, atol=1e-6)
    default = predict_patches(run, patches)
    if bf16_is_fast(torch.device("cpu")):
        assert 0 < np.abs(default - plain).max() < 0.05, "bf16 autocast should move probabilities a little"
    else:
        np.testing.assert_allclose(default, plain, atol=1e-6)

    code, _, _ = run_cli(capsys, "predict", trained_run, small_store, "--split", "valid", "--fp32",
                         "--out", tmp_path / "fp32.csv")
    with (tmp_path / "fp32.csv").open() as handle:
        np.testing.assert_allclose([float(r["prob"]) for r in csv.DictReader(handle)], plain, atol=1e-6)


def test_kaggle_submission_is_exactly_id_label_for_the_test_folder(trained_run, kaggle_sample, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "predict", trained_run, kaggle_sample / "test", "--out", tmp_path / "sub.csv",
                           "--kaggle-submission", "--quiet", "--device", "cpu")
    assert code == 0
    lines = (tmp_path / "sub.csv").read_text().splitlines()
    assert lines[0] == "id,label" and len(lines) == 30
    ids = {line.split(",")[0] for line in lines[1:]}
    assert ids == {p.stem for p in (kaggle_sample / "test").glob("*.tif")}
    # The label is the probability (Kaggle scores by AUC), not the 0/1 decision.
    from PIL import Image

    from histodetect.predict import load_run, predict_patches

    files = sorted((kaggle_sample / "test").glob("*.tif"))
    patches = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in files])
    expected = dict(zip((p.stem for p in files), predict_patches(load_run(trained_run, device="cpu"), patches)))
    labels = dict(line.split(",") for line in lines[1:])
    np.testing.assert_allclose([float(labels[i]) for i in expected], list(expected.values()), atol=1e-6)
    code, _, _ = run_cli(capsys, "predict", trained_run, kaggle_sample, "--out", tmp_path / "sub2.csv",
                         "--kaggle-submission", "--quiet")
    assert (tmp_path / "sub2.csv").read_text() == (tmp_path / "sub.csv").read_text(), "a Kaggle root scores test/ only"
    # Its labels file reads "id,label" like a submission, but it is the data set's: never written over.
    root = tmp_path / "kaggle"
    shutil.copytree(kaggle_sample, root)
    before = (root / "train_labels.csv").read_bytes()
    code, _, err = run_cli(capsys, "predict", trained_run, root, "--out", root / "train_labels.csv",
                           "--kaggle-submission", "--quiet")
    assert code == 2 and "would overwrite" in err and (root / "train_labels.csv").read_bytes() == before


def test_a_kaggle_root_whose_first_chunks_are_all_labelled_still_gives_the_submission(trained_run, kaggle_sample,
                                                                                    tmp_path, monkeypatch):
    # The real Kaggle train/ holds 220,025 patches: chunks of 1,024 with no test patch in them.
    import histodetect.predict as predict_module
    import histodetect.predict.csv_output as predict_csv_module  # where predict_to_csv looks open_inputs up

    real_open = predict_module.open_inputs
    monkeypatch.setattr(predict_csv_module, "open_inputs",
                        lambda inputs, **kwargs: real_open(inputs, **kwargs, chunk_size=4))
    run = predict_module.load_run(trained_run, device="cpu")
    predict_module.predict_to_csv(run, [kaggle_sample], tmp_path / "sub.csv", kaggle_submission=True, progress=False)
    ids = [line.split(",")[0] for line in (tmp_path / "sub.csv").read_text().splitlines()[1:]]
    assert sorted(ids) == sorted(p.stem for p in (kaggle_sample / "test").glob("*.tif"))
    assert predict_module.predict_patches(run, np.zeros((0, 96, 96, 3), np.uint8)).shape == (0,)


def test_a_kaggle_root_submission_lists_once_and_decodes_and_counts_only_test(trained_run, kaggle_sample, tmp_path,
                                                                              capsys, monkeypatch):
    # At Kaggle's scale (220,025 train and 57,458 test files) listing the root twice cost 4-5 s
    # before the first line, decoding train/ for nothing 23 s, and the bar counted 277,483 patches.
    import histodetect.predict.inputs as inputs_module

    listed, decoded = [], []
    real_open, real_read = inputs_module.open_source, inputs_module.read_chunk
    monkeypatch.setattr(inputs_module, "open_source", lambda root: listed.append(root) or real_open(root))
    monkeypatch.setattr(inputs_module, "read_chunk", lambda task: decoded.extend(task.files) or real_read(task))
    code, _, err = run_cli(capsys, "predict", trained_run, kaggle_sample, "--out", tmp_path / "sub.csv",
                           "--kaggle-submission")
    assert code == 0, err
    test_files = sorted((kaggle_sample / "test").glob("*.tif"))
    assert listed == [kaggle_sample], "the root is listed once"
    assert decoded == test_files, "train/ is not decoded"
    assert f"{len(test_files)}/{len(test_files)}" in err.split("\r")[-1], "the bar counts the patches scored"


def test_predict_says_once_how_many_patches_it_resized(trained_run, pcam_jpeg, tmp_path, capsys, monkeypatch):
    # A warning per chunk of 1,024 said "resized 1024 patches" and then the last chunk's count,
    # glued to the progress bar's line, never the total.
    from PIL import Image

    import histodetect.predict.csv_output as predict_csv_module

    real_open = predict_csv_module.open_inputs
    monkeypatch.setattr(predict_csv_module, "open_inputs",
                        lambda inputs, **kwargs: real_open(inputs, **kwargs, chunk_size=2))
    (tmp_path / "big").mkdir()
    for path in sorted((pcam_jpeg / "valid" / "1").glob("*.jpg"))[:5]:
        Image.open(path).resize((120, 100)).save(tmp_path / "big" / f"{path.stem}.png")
    code, _, err = run_cli(capsys, "predict", trained_run, tmp_path / "big", "--out", tmp_path / "p.csv", "--resize")
    assert code == 0, err
    warnings_printed = [line for line in err.replace("\r", "\n").splitlines() if "warning" in line]
    assert warnings_printed == [f"histodetect: warning: {tmp_path / 'big'}: resized 5 patches that were not 96x96 "
                                "pixels (--resize); their scores are less reliable"], err


@pytest.mark.parametrize("preset, backbone", [("seed-xception", "legacy_xception"), ("seed-mobilenetv2", "mobilenetv2_100")])
def test_seed_presets_are_the_notebooks_recipe(preset, backbone):
    cfg = PRESETS[preset]
    assert cfg.model == backbone and cfg.epochs == 10 and cfg.pretrained is False
    assert cfg.augment() == type(cfg.augment())(), "no augmentation"
    assert cfg.schedule == "constant" and cfg.label_smoothing == 0 and cfg.ema_decay == 0 and cfg.crop_px == 0
    model = create_model(cfg.model, drop_rate=cfg.drop_rate)
    assert type(model.global_pool).__name__ == "SelectAdaptivePool2d" and model.global_pool.pool_type == "avg"
    assert model.drop_rate == 0.5
    assert model.get_classifier().out_features == 1
    optimizer = build_optimizer(cfg, model)
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["lr"] == 1e-3 and optimizer.param_groups[0]["weight_decay"] == 0
    logits, labels = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    seed_loss = torch.nn.BCELoss()(torch.sigmoid(logits), labels)
    assert training_loss(logits, labels, cfg.label_smoothing) == pytest.approx(float(seed_loss), abs=1e-6)


def test_the_learning_rate_schedules_warm_up_and_decay_as_documented():
    from histodetect.train import lr_factor

    # cosine: a linear warm-up from 0 to 1 over warmup_fraction, then a half cosine down to 0.
    assert lr_factor(0.0, 0.1, "cosine") == 0.0
    assert lr_factor(0.05, 0.1, "cosine") == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1, "cosine") == pytest.approx(1.0)
    assert lr_factor(0.325, 0.1, "cosine") == pytest.approx((1 + np.cos(np.pi / 4)) / 2)
    assert lr_factor(0.55, 0.1, "cosine") == pytest.approx(0.5)  # the middle of the decay
    assert lr_factor(1.0, 0.1, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(1.5, 0.1, "cosine") == pytest.approx(0.0, abs=1e-12), "a time limit overrun stays at 0"
    assert lr_factor(0.0, 0.0, "cosine") == 1.0 and lr_factor(0.5, 0.0, "cosine") == pytest.approx(0.5)
    # onecycle: a half cosine up from 0.04 to 1 over max(warmup_fraction, 0.25), then down to 0.
    assert lr_factor(0.0, 0.1, "onecycle") == pytest.approx(0.04)
    assert lr_factor(0.125, 0.1, "onecycle") == pytest.approx(0.52)
    assert lr_factor(0.25, 0.1, "onecycle") == pytest.approx(1.0)
    assert lr_factor(0.625, 0.1, "onecycle") == pytest.approx(0.5)
    assert lr_factor(1.0, 0.1, "onecycle") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0.4, 0.4, "onecycle") == pytest.approx(1.0) and lr_factor(0.7, 0.4, "onecycle") == pytest.approx(0.5)
    # constant: the seed notebooks' fixed learning rate.
    assert all(lr_factor(p, 0.1, "constant") == 1.0 for p in (0.0, 0.05, 0.5, 1.0))


def test_a_checkpoint_save_that_fails_half_way_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    import io

    from histodetect.train import CHECKPOINT_FORMAT, save_atomic

    path = tmp_path / "checkpoints" / "last.pt"
    save_atomic({"format": CHECKPOINT_FORMAT, "state": {"epoch": 1}, "weights": torch.arange(1000.0)}, path)
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):  # a full disk, or a kill, part-way through
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(UserError, match=r"last.pt: cannot write it \(No space left on device\)$"):
        save_atomic({"format": CHECKPOINT_FORMAT, "state": {"epoch": 2}, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    kept = load_checkpoint(path)
    assert kept["state"]["epoch"] == 1 and torch.equal(kept["weights"], torch.arange(1000.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"], "no half-written temporary file is left"


def test_a_checkpoint_save_on_a_full_disk_is_one_line_with_torchs_own_writer(tmp_path, monkeypatch):
    # torch.save's zip writer turns the file's OSError into "RuntimeError: unexpected pos 704 vs 598":
    # the real torch.save, on a file whose writes fail past 2 kB as a full disk's do.
    import errno

    from histodetect.train import CHECKPOINT_FORMAT, save_atomic

    path = tmp_path / "checkpoints" / "last.pt"
    save_atomic({"format": CHECKPOINT_FORMAT, "state": {"epoch": 1}}, path)
    real_open = Path.open

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            if self.handle.tell() + len(data) > 2000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

        def flush(self):
            self.handle.flush()

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.handle.close()

    def open_on_a_full_disk(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        return FullDisk(handle) if ".tmp-" in self.name else handle

    monkeypatch.setattr(Path, "open", open_on_a_full_disk)
    with pytest.raises(UserError, match=r"last.pt: cannot write it \(No space left on device\)$"):
        save_atomic({"format": CHECKPOINT_FORMAT, "state": {"epoch": 2}, "weights": torch.zeros(10_000)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["state"]["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"], "no half-written temporary file is left"


def test_a_run_under_dev_shm_is_written_as_files_not_streams(small_store):
    from histodetect.outputs import is_stream

    for stream in ("/dev/stdout", "-", "/dev/null", "/dev/stderr", "/dev/fd/3", "/proc/self/fd/1"):
        assert is_stream(Path(stream)), stream
    assert not is_stream(Path("/dev/shm/run/checkpoints/last.pt")), "a tmpfs folder under /dev holds plain files"
    if not Path("/dev/shm").is_dir() or not os.access("/dev/shm", os.W_OK):
        return
    run = Path(f"/dev/shm/histodetect-test-{os.getpid()}")
    try:
        fit(preset_config("cpu", **{**TINY, "epochs": 1}), small_store, run, progress=False)
        assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.pt", "last.pt"}
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_sam_takes_the_gradient_at_the_moved_weights_then_puts_the_weights_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.GELU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1))
    x, labels = torch.randn(8, 3, 12, 12), torch.tensor([0.0, 1.0] * 4)
    cfg = preset_config("cpu", sam_rho=0.1)
    training_loss(model(x).reshape(-1), labels, 0.0).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = [p.grad.clone() for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in first]))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(moved.parameters(), first):
            p.add_(0.1 * g / norm)
    moved.zero_grad()
    training_loss(moved(x).reshape(-1), labels, 0.0).backward()

    sam_second_pass(model, model, x, labels, cfg, bf16=False)
    for key, value in model.state_dict().items():
        if "running" in key or "num_batches" in key:
            assert torch.equal(value, before[key]), f"{key}: the second pass must not update BatchNorm's statistics"
        else:
            assert torch.allclose(value, before[key], atol=1e-7), f"{key}: the weights must be put back"
    for p, q, g in zip(model.parameters(), moved.parameters(), first):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), "the gradient is the one at the moved weights"
    assert not all(torch.allclose(p.grad, g) for p, g in zip(model.parameters(), first))


def test_profile_prints_data_and_compute_time_per_step(small_store, tmp_path, capsys):
    fit(preset_config("cpu", **{**TINY, "epochs": 1, "profile": True}), small_store, tmp_path / "run", progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("profile")]
    assert len(lines) == 1, lines
    found = re.fullmatch(r"profile epoch 1: data ([\d.]+) ms/step, compute ([\d.]+) ms/step \((\d+)% in data\)", lines[0])
    assert found, lines[0]
    data_ms, compute_ms, share = float(found[1]), float(found[2]), int(found[3])
    assert data_ms > 0 and compute_ms > data_ms / 100 and 0 <= share <= 100


def test_compile_trains_like_eager_through_a_progressive_crop(small_store, tmp_path, capsys):
    cfg = preset_config("cpu", **{**TINY, "epochs": 1, "progressive_crop": "32@0.5", "bf16": False})
    fit(cfg, small_store, tmp_path / "eager", progress=False)
    fit(dataclasses.replace(cfg, compile=True), small_store, tmp_path / "compiled", progress=False)
    eager = load_checkpoint(tmp_path / "eager" / "checkpoints" / "last.pt")
    compiled = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "last.pt")
    assert eager["model"].keys() == compiled["model"].keys(), "the checkpoint holds the plain model's weights"
    # The same steps up to the compiler's reordering of float sums: Adam's normalised
    # steps amplify that for near-zero gradients, so the whole model is compared.
    weights = [(compiled["model"][k].double(), v.double()) for k, v in eager["model"].items() if v.is_floating_point()]
    difference = sum(((c - e) ** 2).sum() for c, e in weights).sqrt() / sum((e ** 2).sum() for _, e in weights).sqrt()
    assert difference < 5e-3, f"compiled weights differ from eager ones by {difference:.2e} (relative L2)"
    with (tmp_path / "eager" / "metrics.csv").open() as a, (tmp_path / "compiled" / "metrics.csv").open() as b:
        assert float(next(csv.DictReader(a))["train_loss"]) == pytest.approx(float(next(csv.DictReader(b))["train_loss"]), rel=1e-3)


def test_a_killed_then_resumed_run_ends_with_the_same_weights(small_store, tmp_path, capsys):
    # The crop grows from 32 to 48 px in the resumed epoch (its last 3 of 6 steps);
    # mixup's weights and the turns come from generators the checkpoint must restore.
    # SAM's second pass, the blur and the noise must resume exactly too; dropout's masks
    # come from torch's global generator, which the checkpoint restores as well.
    cfg = preset_config("cpu", **{**TINY, "progressive_crop": "32@0.75", "mixup": 0.4, "rotate_deg": 30.0, "scale": 0.1,
                                  "blur_sigma": 1.0, "noise_std": 0.03, "sam_rho": 0.05, "drop_rate": 0.3})
    fit(cfg, small_store, tmp_path / "straight", progress=False)
    fit(cfg, small_store, tmp_path / "resumed", progress=False, stop_after_epochs=1)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["state"]["epoch"] == 1
    code, out, err = run_cli(capsys, "train", "--resume", tmp_path / "resumed", "--val-batch-size", "64")
    assert code == 0, err
    run = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert [(r["from_epoch"], r["settings"], r["device"]["type"]) for r in run["resumes"]] == \
        [(1, {"val_batch_size": 64}, "cpu")], "run.json says where and how the run was resumed"
    assert run["config"]["val_batch_size"] == cfg.val_batch_size and run["epochs_run"] == 2
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    for key, tensor in straight["ema"].items():
        assert torch.equal(tensor, resumed["ema"][key]), key

    def scores(run: Path) -> list[dict]:  # every column but the wall-clock seconds
        with (run / "metrics.csv").open() as handle:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]

    assert scores(tmp_path / "straight") == scores(tmp_path / "resumed")


def test_ddp_on_two_cpu_processes(small_store, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "histodetect.cli", "train", "--data", str(small_store), "--preset", "cpu",
               "--out", str(tmp_path / "ddp"), "--model", "histo_tinynet", "--batch-size", "16", "--epochs", "1",
               "--max-minutes", "0", "--crop-px", "48", "--threads", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [line for line in result.stdout.splitlines() if "best validation AUC" in line]
    assert len(summaries) == 1 and "AUC -1" not in summaries[0], result.stdout
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["device"]["world_size"] == 2 and run["epochs_run"] == 1
    last = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert len(last["rng"]["augment"]) == 2
    assert last["state"]["global_step"] == 96 // 16, "each process takes its half of the 192 patches"


def test_ddp_with_a_time_limit_stops_every_process_at_the_same_step(small_store, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "histodetect.cli", "train", "--data", str(small_store), "--preset", "cpu",
               "--out", str(tmp_path / "ddp"), "--batch-size", "16", "--epochs", "200", "--max-minutes", "0.02",
               "--crop-px", "48", "--threads", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)  # hung before
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["stopped_because"] == "time limit of 0.02 minutes" and run["epochs_run"] < 200


def test_resume_finishes_a_stopped_run_without_training_more_and_can_follow_a_moved_store(small_store, tmp_path,
                                                                                         capsys):
    store = tmp_path / "store"
    shutil.copytree(small_store, store)
    run = tmp_path / "run"
    fit(preset_config("cpu", **{**TINY, "epochs": 100, "max_minutes": 0.005}), store, run, progress=False)
    before = (run / "metrics.csv").read_text(), load_checkpoint(run / "checkpoints" / "last.pt")["state"]
    assert before[1]["stopped_because"] == "time limit of 0.005 minutes"
    store.rename(tmp_path / "moved")
    code, _, err = run_cli(capsys, "train", "--resume", run)
    assert code == 2 and "not a histodetect store" in err and "pass --data with where it is now" in err, err
    code, out, err = run_cli(capsys, "train", "--resume", run, "--data", tmp_path / "moved")
    assert code == 0 and "had stopped (time limit of 0.005 minutes)" in out and "nothing more to train" in out, err
    assert (run / "metrics.csv").read_text() == before[0], "no epoch added"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["global_step"] == before[1]["global_step"]


def test_a_mid_epoch_resume_keeps_the_epochs_training_loss(small_store, tmp_path, monkeypatch):
    import histodetect.train.loop.training as train_module

    cfg = preset_config("cpu", **{**TINY, "checkpoint_minutes": 1e-5})  # last.pt after every step
    fit(cfg, small_store, tmp_path / "straight", progress=False)
    real_save, saves = train_module.save_atomic, []

    def save_then_die(obj, path):
        real_save(obj, path)
        saves.append(path.name)
        if saves.count("last.pt") == 9:  # mid-epoch 2 (6 steps an epoch; epoch 1 ends with last and best)
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, small_store, tmp_path / "killed", progress=False)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["state"]["step_in_epoch"] > 0
    fit(None, None, tmp_path / "killed", resume=True, progress=False)

    def losses(run: Path) -> list[str]:
        with (run / "metrics.csv").open() as handle:
            return [row["train_loss"] for row in csv.DictReader(handle)]

    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")


def test_early_stopping_stops_after_that_many_epochs_without_a_better_auc_and_keeps_the_best(
        small_store, tmp_path, monkeypatch):
    import histodetect.train.loop.training as train_module

    aucs = iter([0.70, 0.80, 0.79, 0.80, 0.60, 0.99])  # epoch 2 is the best; 3 and 4 are no better (0.80 ties)
    real_validate = train_module.validate

    def scripted(*args, **kwargs):
        return {**real_validate(*args, **kwargs), "val_auc": next(aucs)}

    monkeypatch.setattr(train_module, "validate", scripted)
    run = tmp_path / "r"
    result = fit(preset_config("cpu", **{**TINY, "epochs": 6, "early_stopping": 2}), small_store, run, progress=False)
    assert result.epochs_run == 4 and result.best_auc == 0.80
    assert result.stopped_because == "early stopping: no better validation AUC for 2 epochs"
    assert json.loads((run / "run.json").read_text())["stopped_because"] == result.stopped_because
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == 2
    with (run / "metrics.csv").open() as handle:
        assert [float(row["val_auc"]) for row in csv.DictReader(handle)] == [0.70, 0.80, 0.79, 0.80]


@pytest.mark.parametrize("killed_at", ["best.pt", "last.pt", "metrics.csv"])
def test_a_kill_between_an_epochs_last_writes_resumes_to_the_same_run(small_store, tmp_path, monkeypatch, killed_at):
    # Epoch 2's end writes best.pt (it improves), last.pt, then metrics.csv; a kill before
    # any of them must resume to the uninterrupted run: no missing best.pt, no repeated row.
    import histodetect.train.loop.training as train_module

    cfg = preset_config("cpu", **TINY)
    fit(cfg, small_store, tmp_path / "straight", progress=False)
    with (tmp_path / "straight" / "metrics.csv").open() as handle:
        aucs = [float(row["val_auc"]) for row in csv.DictReader(handle)]
    assert aucs[1] > aucs[0], "the test needs epoch 2 to improve, so that it writes best.pt"
    real_save, real_metrics, calls = train_module.save_atomic, train_module.write_metrics_csv, []

    def save(obj, path):
        calls.append(path.name)
        if path.name == killed_at and calls.count(killed_at) == 2:
            raise KeyboardInterrupt
        real_save(obj, path)

    def write_metrics(path, history):
        calls.append(path.name)
        if path.name == killed_at and calls.count(killed_at) == 3:  # the start, epoch 1, epoch 2
            raise KeyboardInterrupt
        real_metrics(path, history)

    monkeypatch.setattr(train_module, "save_atomic", save)
    monkeypatch.setattr(train_module, "write_metrics_csv", write_metrics)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, small_store, tmp_path / "killed", progress=False)
    monkeypatch.undo()
    fit(None, None, tmp_path / "killed", resume=True, progress=False)

    def scores(run: Path) -> list[dict]:  # every column but the wall-clock seconds
        with (run / "metrics.csv").open() as handle:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]

    assert scores(tmp_path / "killed") == scores(tmp_path / "straight")
    for name in ("best.pt", "last.pt"):
        straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / name)["model"]
        resumed = load_checkpoint(tmp_path / "killed" / "checkpoints" / name)["model"]
        assert all(torch.equal(tensor, resumed[key]) for key, tensor in straight.items()), name


def test_a_run_killed_before_its_first_checkpoint_says_how_to_start_again(small_store, tmp_path, capsys,
                                                                           monkeypatch):
    import histodetect.train.loop.training as train_module

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_atomic", die)
    with pytest.raises(KeyboardInterrupt):
        fit(preset_config("cpu", **TINY), small_store, tmp_path / "r", progress=False)
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "r")
    assert code == 2 and "stopped before its first checkpoint" in err and "--overwrite" in err, err



def tiny_train_flags() -> list[str]:
    """TINY as the train command's flags."""
    return [a for key, value in TINY.items() for a in (f"--{key.replace('_', '-')}", str(value))]


def weights_equal(run_a: Path, run_b: Path) -> bool:
    a = load_checkpoint(run_a / "checkpoints" / "last.pt")
    b = load_checkpoint(run_b / "checkpoints" / "last.pt")
    return all(torch.equal(t, b[part][k]) for part in ("model", "ema") for k, t in a[part].items())


@pytest.fixture(scope="module")
def straight_tiny_run(small_store, tmp_path_factory) -> Path:
    """TINY trained without a stop, to compare stopped-and-resumed runs with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    fit(preset_config("cpu", **TINY), small_store, out, progress=False)
    return out


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_saves_the_step_and_the_resume_ends_as_an_uninterrupted_run(
        small_store, straight_tiny_run, tmp_path, capsys, monkeypatch, signal_name):
    import histodetect.train.loop.training as train_module

    number = getattr(signal, signal_name)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    real_augment, steps = train_module.augment_batch, []

    def augment_then_signal(*args, **kwargs):
        steps.append(1)
        if len(steps) == 8:  # step 2 of epoch 2 (6 steps an epoch); lost before, back to epoch 1's last.pt
            os.kill(os.getpid(), number)
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(train_module, "augment_batch", augment_then_signal)
    run = tmp_path / "stopped"
    code, _, err = run_cli(capsys, "train", "--data", small_store, "--preset", "cpu", "--out", run, *tiny_train_flags())
    monkeypatch.undo()
    assert code == 128 + number, err
    assert f"saving {run} at the end of this step" in err, err
    assert err.strip().endswith(f"interrupted: {run}: saved after step 2 of epoch 2; continue with: "
                                f"histodetect train --resume {run}"), err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers, "handlers put back"
    state = load_checkpoint(run / "checkpoints" / "last.pt")["state"]
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    code, _, err = run_cli(capsys, "train", "--resume", run)
    assert code == 0, err
    assert weights_equal(straight_tiny_run, run)


def test_a_second_ctrl_c_stops_at_once_and_the_run_resumes_from_its_last_save(small_store, tmp_path, capsys,
                                                                             monkeypatch):
    import histodetect.train.loop.training as train_module

    real_augment, steps = train_module.augment_batch, []

    def augment_then_two_signals(*args, **kwargs):
        steps.append(1)
        if len(steps) == 8:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(train_module, "augment_batch", augment_then_two_signals)
    run = tmp_path / "stopped"
    code, _, err = run_cli(capsys, "train", "--data", small_store, "--preset", "cpu", "--out", run, *tiny_train_flags())
    monkeypatch.undo()
    assert code == 130 and err.strip().endswith(
        f"interrupted: {run}: stopped at once; continue from its last save with: histodetect train --resume {run}"), err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step_in_epoch"] == 0, "epoch 1's save"
    assert run_cli(capsys, "train", "--resume", run)[0] == 0


def test_ctrl_c_while_choosing_thresholds_stops_at_once_and_the_resume_chooses_them(small_store, tmp_path, capsys,
                                                                                   monkeypatch):
    import histodetect.train.loop.training as train_module

    def signal_instead(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the signal lands first
        raise AssertionError("the first Ctrl-C did not stop the choice of thresholds")

    monkeypatch.setattr(train_module, "_validation_thresholds", signal_instead)
    run = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt, match="stopped at once; continue from its last save"):
        fit(preset_config("cpu", **TINY), small_store, run, progress=False)
    monkeypatch.undo()
    assert "thresholds" not in json.loads((run / "run.json").read_text())
    # Scoring with it meanwhile decides at 0.5, and says so (it said nothing).
    code, _, err = run_cli(capsys, "predict", run, small_store, "--split", "valid", "--out", tmp_path / "p.csv")
    assert code == 0 and err.count("warning") == 1 and (
        f"histodetect: warning: {run.absolute()}: its training has not finished (the decision thresholds are chosen "
        f"at its end), so it decides at 0.5; once it is not training, 'histodetect train --resume {run.absolute()}' "
        "finishes it") in err, err
    fit(None, None, run, resume=True, progress=False)
    assert set(json.loads((run / "run.json").read_text())["thresholds"]) >= {"1", "8"}


# --- bad input ------------------------------------------------------------------------------


def test_a_store_with_one_class_is_refused(pcam_jpeg, tmp_path, capsys):
    src = tmp_path / "src"
    for split in ("train", "valid"):
        (src / split / "1").mkdir(parents=True)
        for path in sorted((pcam_jpeg / split / "1").glob("*.jpg"))[:8]:
            shutil.copy(path, src / split / "1" / path.name)
    prepare(src, tmp_path / "store", progress=False)
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "store", "--preset", "cpu", "--out", tmp_path / "r")
    assert code == 2 and "has only label 1 (8 patches); training needs both classes" in err
    assert "Traceback" not in err


def test_a_store_without_validation_split_gets_one_and_says_so(small_store, tmp_path, capsys):
    cfg = preset_config("cpu", **{**TINY, "epochs": 1, "val_split": "holdout"})
    fit(cfg, small_store, tmp_path / "r", progress=False)
    assert "no 'holdout' split; validating on a stratified 10% of 'train'" in capsys.readouterr().out
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["data"]["n_val"] == 20 and run["data"]["n_train"] == 172


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(small_store, tmp_path, monkeypatch):
    import histodetect.train.loop.training as train_module

    calls = {"n": 0}
    real_loss = train_module.training_loss

    def loss_going_nan(logits, labels, smoothing):
        calls["n"] += 1
        loss = real_loss(logits, labels, smoothing)
        return loss * float("nan") if calls["n"] == 8 else loss

    monkeypatch.setattr(train_module, "training_loss", loss_going_nan)
    with pytest.raises(UserError, match=r"loss became nan at step 7 \(epoch 2\).*last.pt holds the last good weights"):
        fit(preset_config("cpu", **TINY), small_store, tmp_path / "r", progress=False)
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["state"]["epoch"] == 1
    calls["n"] = 0  # now in the first epoch, before any checkpoint
    monkeypatch.setattr(train_module, "training_loss",
                        lambda logits, labels, smoothing: real_loss(logits, labels, smoothing) * float("nan"))
    with pytest.raises(UserError, match=r"loss became nan at step 0 \(epoch 1\).*no checkpoint had been written yet"):
        fit(preset_config("cpu", **TINY), small_store, tmp_path / "r0", progress=False)


def test_weights_made_non_finite_by_an_epochs_last_update_stop_in_one_line(small_store, tmp_path, monkeypatch):
    """Every loss was finite, but the update after the last step was not: validation sees NaN weights."""
    import histodetect.train.loop.training as train_module

    real_validate = train_module.validate

    def validate_after_a_bad_second_epoch(model, *args, **kwargs):
        if len(calls) == 1:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        calls.append(1)
        return real_validate(model, *args, **kwargs)

    calls: list[int] = []
    monkeypatch.setattr(train_module, "validate", validate_after_a_bad_second_epoch)
    with pytest.raises(UserError, match=r"the weights became non-finite in epoch 2's last update \(step \d+\); "
                                        r"training stopped and .*last.pt holds the last good weights; start again with a lower --lr and --overwrite"):
        fit(preset_config("cpu", **TINY), small_store, tmp_path / "r", progress=False)
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["state"]["epoch"] == 1


def test_a_mid_epoch_checkpoint_never_saves_weights_an_update_made_non_finite(small_store, tmp_path, monkeypatch):
    """The update after a finite loss makes the weights NaN; the save that follows must refuse them."""
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_then_poison_the_third(parameters, *args, **kwargs):
        parameters = list(parameters)
        calls.append(1)
        if len(calls) == 3:
            parameters[0].grad.fill_(float("nan"))
        return real_clip(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_poison_the_third)
    cfg = preset_config("cpu", **{**TINY, "grad_clip_norm": 1e9, "checkpoint_minutes": 1e-9})  # a save after every step
    with pytest.raises(UserError, match=r"the weights became non-finite by step 2 \(epoch 1\); training stopped and "
                                        r".*last.pt holds the last good weights"):
        fit(cfg, small_store, tmp_path / "r", progress=False)
    kept = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert kept["state"]["global_step"] == 2 and all(torch.isfinite(v).all() for v in kept["model"].values())


@pytest.mark.parametrize("flag, value, problem", [
    ("--hue", "0.7", r"--hue 0.7: expected a value in \[0.0, 0.5\]; pass a value in that range"),
    ("--rotate-deg", "-5", r"--rotate-deg -5.0: expected a value in \[0.0, 180.0\]"),
    ("--mixup", "-0.2", r"--mixup -0.2: expected an alpha >= 0"),
    ("--sam-rho", "-0.1", r"--sam-rho -0.1: expected a radius in \[0, 1\]"),
    ("--blur-sigma", "9", r"--blur-sigma 9.0: expected a value in \[0.0, 4.0\]"),
    ("--crop-px", "96", r"--crop-px 96 with --shift-px 4: the crop reads a 104-pixel window"),
    ("--shift-px", "20", r"--crop-px 88 with --shift-px 20: the crop reads a 128-pixel window"),
    ("--schedule", "linear", r"--schedule 'linear': expected one of cosine, onecycle, constant"),
    ("--batch-size", "0", r"--batch-size 0: expected a finite value >= 1"),
    ("--epochs", "0", r"--epochs 0: expected a finite value >= 1"),
    ("--lr", "-1", r"--lr -1.0: expected a finite value > 0"),
    ("--lr", "inf", r"--lr inf: expected a finite value > 0"),
    ("--seed", "-1", r"--seed -1: expected a value in \[0, 2\*\*32\)"),
    ("--hed-bias", "inf", r"--hed-bias inf: expected a value in \[0.0, 10.0\]"),
    ("--mixup", "inf", r"--mixup inf: expected an alpha >= 0"),
    ("--drop-rate", "1.5", r"--drop-rate 1.5: expected a value in \[0, 1\)"),
    ("--threads", "-1", r"--threads -1: expected a value in \[0, 1024\] \(0 = one per core\)"),
    # 2**63 was a traceback from torch; 100000000 killed the process in OpenMP (a segmentation fault)
    ("--threads", str(2**63), r"--threads 9223372036854775808: expected a value in \[0, 1024\]"),
    ("--crop-px", "-1", r"--crop-px -1: expected a value in \[0, inf\]"),
    ("--shift-px", "-1", r"--shift-px -1: expected a value in \[0, inf\]"),
    # A network built for one size (its attention biases) and one whose last stage needs more than 64 px
    ("--model", "levit_128s", r"--model levit_128s: cannot take 88 px crops \(.*\); choose another --crop-px \(0: the whole"),
    ("--model", "inception_v3", r"--model inception_v3: cannot take the 64 px crops of --progressive-crop 64@0.4,76@0.7 "
                                r"\(.*\); pass --progressive-crop '' or choose another model"),
])
def test_a_setting_out_of_range_is_one_line_and_writes_no_run(small_store, tmp_path, capsys, flag, value, problem):
    code, _, err = run_cli(capsys, "train", "--data", small_store, "--preset", "cpu", "--out", tmp_path / "run",
                           flag, value)
    assert code == 2 and re.search(problem, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra", [["--crop-px", "8"], ["--progressive-crop", "8@0.5"]], ids=["crop", "progressive"])
def test_a_blur_wider_than_a_training_crop_is_one_line_and_writes_no_run(small_store, tmp_path, capsys, extra):
    code, _, err = run_cli(capsys, "train", "--data", small_store, "--preset", "cpu", "--out", tmp_path / "run",
                           "--blur-sigma", "3", *extra)
    size = extra[1].split("@")[0]
    assert code != 0 and f"--blur-sigma 3.0: the 19-pixel kernel does not fit {size}x{size} images" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_resume_from_a_corrupt_or_foreign_checkpoint_is_one_line(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "checkpoints" / "last.pt").write_bytes(b"\x00garbage")
    code, _, err = run_cli(capsys, "train", "--resume", run)
    assert code == 2 and "last.pt: not a readable checkpoint" in err and err.count("\n") == 1
    torch.save({"weights": torch.zeros(2)}, run / "checkpoints" / "last.pt")
    code, _, err = run_cli(capsys, "train", "--resume", run)
    assert code == 2 and "last.pt: not a histodetect checkpoint" in err


def test_unknown_model_name_suggests_close_timm_names(small_store, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", small_store, "--out", tmp_path / "r", "--model", "resnet19")
    assert code == 2 and "resnet18" in err and "Traceback" not in err


def test_out_of_gpu_memory_suggests_a_smaller_batch(small_store, tmp_path, monkeypatch):
    import histodetect.train.loop.training as train_module

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train_module, "training_loss", out_of_memory)
    with pytest.raises(UserError, match=r"out of GPU memory with --batch-size 32 .* try --batch-size 16"):
        fit(preset_config("cpu", **TINY), small_store, tmp_path / "r", progress=False)


def test_out_of_gpu_memory_while_validating_names_the_validation_batch_and_resume_finishes_the_run(
        small_store, tmp_path, monkeypatch, capsys):
    import histodetect.train.loop.training as train_module

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    run = tmp_path / "r"
    start = rf"^{re.escape(str(run))}: out of GPU memory validating with --val-batch-size 128 for histo_tinynet; "
    expected = start + rf"continue with --resume {re.escape(str(run))} --val-batch-size 64$"
    with monkeypatch.context() as patched:  # in epoch 1's validation, before its last.pt: nothing to resume
        patched.setattr(train_module, "validate", out_of_memory)
        with pytest.raises(UserError, match=start + "no checkpoint had been written yet: start it again with "
                                                    "--overwrite --val-batch-size 64$"):
            fit(preset_config("cpu", **TINY), small_store, run, progress=False, overwrite=True)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--val-batch-size", "64")
    assert code == 2 and "stopped before its first checkpoint" in err, err
    real_validate, validations = train_module.validate, []

    def out_of_memory_in_epoch_2(*args, **kwargs):
        validations.append(1)
        return out_of_memory() if len(validations) == 2 else real_validate(*args, **kwargs)

    with monkeypatch.context() as patched:  # in epoch 2's validation: epoch 1's last.pt resumes
        patched.setattr(train_module, "validate", out_of_memory_in_epoch_2)
        with pytest.raises(UserError, match=expected):
            fit(preset_config("cpu", **TINY), small_store, run, progress=False, overwrite=True)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--val-batch-size", "64")
    assert code == 0 and json.loads((run / "run.json").read_text())["epochs_run"] == 2, err
    with monkeypatch.context() as patched:  # in the choice of thresholds, after the last epoch
        patched.setattr(train_module, "_validation_thresholds", out_of_memory)
        with pytest.raises(UserError, match=expected):
            fit(preset_config("cpu", **TINY), small_store, run, progress=False, overwrite=True)
    assert "thresholds" not in json.loads((run / "run.json").read_text())
    code, out, err = run_cli(capsys, "train", "--resume", run, "--val-batch-size", "64", "--threads", "1")
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["thresholds"].keys() >= {"1", "8"}
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["config"]
    assert saved["val_batch_size"] == 128 and saved == json.loads((run / "run.json").read_text())["config"], \
        "the run keeps its own config: a resume's settings are for that process only"
    code, _, err = run_cli(capsys, "train", "--resume", run, "--lr", "0.1")
    assert code == 2 and "drop --out and the overrides" in err and "--val-batch-size" in err, err
    with pytest.raises(UserError, match=r"--resume: lr would change what the run trains"):
        fit(None, None, run, resume=True, progress=False, resume_settings={"lr": 0.1})


def test_out_of_gpu_memory_resuming_does_not_suggest_a_batch_size_the_resume_refuses(small_store, tmp_path,
                                                                                      monkeypatch):
    import histodetect.train.loop.training as train_module

    run = tmp_path / "r"
    fit(preset_config("cpu", **TINY), small_store, run, progress=False, stop_after_epochs=1)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train_module, "training_loss", out_of_memory)
    with pytest.raises(UserError, match=r"out of GPU memory resuming with the run's --batch-size 32 for histo_tinynet; "
                                        r"resume it on a GPU with more memory, or start it again with "
                                        r"--overwrite --batch-size 16$"):
        fit(None, None, run, resume=True, progress=False)


@pytest.mark.parametrize("weights", [{"weights": ""}, {"weights": "start.safetensors", "pretrained": True}])
def test_a_run_saved_with_starting_weights_now_refused_still_resumes(small_store, tmp_path, monkeypatch, weights):
    # Runs saved before --weights '' and --pretrained with --weights were refused: a resume
    # starts from last.pt, not from those, and cannot change them, so refusing it stranded the run.
    import histodetect.train.loop.training as train_module

    run = tmp_path / "r"
    cfg = dataclasses.replace(preset_config("cpu", **TINY), **weights)
    with monkeypatch.context() as old:  # the checks and the starting weights of the older version
        old.setattr(train_module, "check_train_config", lambda cfg, **kw: None)
        old.setattr(train_module, "create_model", lambda name, **kw: create_model(name, drop_rate=kw["drop_rate"]))
        fit(cfg, small_store, run, progress=False, stop_after_epochs=1)
    result = fit(None, None, run, resume=True, progress=False)
    assert result.epochs_run == 2


@pytest.mark.parametrize("flag, problem", [
    ("--weights", "--weights '': expected a .safetensors or state dict file; drop --weights to start from random"),
    ("--preset", "--preset '': unknown preset (choose from seed-xception, seed-mobilenetv2, default, cpu)"),
])
def test_an_empty_weights_or_preset_is_refused_not_taken_as_unset(small_store, tmp_path, capsys, flag, problem):
    # `--weights "$W"` with W unset trained from random weights, `--preset ""` the default preset, in silence
    code, _, err = run_cli(capsys, "train", "--data", small_store, "--out", tmp_path / "run", "--epochs", "1",
                           "--batch-size", "64", "--crop-px", "48", flag, "")
    assert code == 2 and problem in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_pretrained_and_weights_together_are_refused_before_any_download(small_store, tmp_path, capsys, monkeypatch):
    # --weights replaced the hub's weights after they were fetched: minutes of download (or an offline failure) for nothing
    import histodetect.models as models_module

    def no_download(*args, **kwargs):
        raise AssertionError("the hub was asked for weights")

    monkeypatch.setattr(models_module, "create_pretrained", no_download)
    code, _, err = run_cli(capsys, "train", "--data", small_store, "--out", tmp_path / "run", "--model", "resnet18",
                           "--pretrained", "--weights", tmp_path / "w.safetensors")
    assert code == 2 and "--pretrained and --weights" in err and "both choose the starting weights" in err, err
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_preset_or_overwrite_it_would_ignore(trained_run, capsys):
    for extra in (["--preset", "seed-xception"], ["--overwrite"], ["--preset", ""]):
        code, _, err = run_cli(capsys, "train", "--resume", trained_run, *extra)
        assert code == 2 and "drop --out and the overrides" in err and "--preset" in err, err


def test_an_error_mid_epoch_starts_its_own_line_after_the_progress_bar(small_store, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", small_store, "--preset", "cpu", "--out", tmp_path / "nan",
                           "--lr", "1e30", "--warmup-fraction", "0", "--epochs", "2", "--crop-px", "48",
                           "--shift-px", "2", "--batch-size", "32", "--threads", "1", "--device", "cpu",
                           "--progressive-crop", "")
    assert code == 2 and "the loss became nan" in err, err
    error_lines = [line for line in err.splitlines() if "histodetect: error:" in line]
    assert len(error_lines) == 1 and error_lines[0].startswith("histodetect: error:"), err[-500:]


def test_the_final_choice_of_thresholds_shows_a_progress_bar(small_store, tmp_path, capsys):
    # 72 views of every validation patch: minutes on a CPU (4.6 for Kaggle's 22,003), silent before.
    code, _, err = run_cli(capsys, "train", "--data", small_store, "--preset", "cpu", "--out", tmp_path / "r",
                           "--epochs", "1", "--crop-px", "48", "--shift-px", "2", "--batch-size", "32",
                           "--threads", "1", "--device", "cpu", "--progressive-crop", "")
    assert code == 0, err
    bar = err.replace("\r", "\n").splitlines()
    assert any(line.startswith("thresholds: 100%") for line in bar), err[-800:]


def test_out_pointing_at_an_existing_run_is_refused_unless_overwrite(trained_run, small_store, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", small_store, "--out", trained_run)
    assert code == 2 and "already holds a run; pass --resume" in err and "--overwrite" in err
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "model.onnx").write_bytes(b"the old run's export")
    (run / "eval-valid-tta1").mkdir()
    code, _, err = run_cli(capsys, "train", "--data", small_store, "--out", run, "--overwrite", "--preset", "cpu",
                           "--epochs", "1", "--batch-size", "64", "--crop-px", "48")
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["epochs_run"] == 1
    assert not (run / "model.onnx").exists() and not (run / "eval-valid-tta1").exists(), "nothing of the old run"
    assert not list(tmp_path.glob(".run.replaced-*"))


def test_overwrite_refuses_to_delete_a_store_or_weights_inside_the_old_run(trained_run, small_store, tmp_path, capsys):
    # `--data run/store --out run --overwrite` trained, then deleted the store it had trained on.
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.copytree(small_store, run / "store")
    weights = run / "checkpoints" / "best.pt"
    fast = ("--preset", "cpu", "--epochs", "1", "--batch-size", "64", "--crop-px", "48")
    for inputs, named in ((("--data", run / "store"), f"--data {run / 'store'}"),
                          (("--data", small_store, "--weights", weights), f"--weights {weights}")):
        code, _, err = run_cli(capsys, "train", *inputs, "--out", run, "--overwrite", *fast)
        assert code == 2 and err.count("\n") == 1, err
        assert f"{run}: --overwrite would delete the old run and with it {named}, which lies inside it" in err, err
    assert (run / "store" / "manifest.json").is_file() and weights.is_file()
    assert json.loads((run / "run.json").read_text()) == json.loads((trained_run / "run.json").read_text())


def test_device_batches_follow_the_epochs_order_from_any_step(small_store):
    store = open_store(small_store)
    rows = store.split_indices("train")
    batches = DeviceBatches(store, rows, torch.device("cpu"), 32, seed=3, resident_fraction=0.5)
    # Kaggle's train split is 5.5 GB: the CPU gathers each batch from the memory map, holding no copy.
    assert not batches.resident and batches.patches is None
    order = batches.order(1).numpy()
    assert sorted(order) == sorted(batches.order(0).numpy()) == list(range(len(rows))), "each order is a permutation"
    assert not np.array_equal(order, batches.order(0).numpy()), "each epoch is shuffled anew"
    assert np.array_equal(order, batches.order(1).numpy()), "and the same whenever it is asked for (resume)"
    whole = list(batches.epoch(1))
    assert len(whole) == len(rows) // 32 == batches.steps_per_epoch
    for s, (patches, labels) in enumerate(whole):
        expected = rows[order[s * 32 : (s + 1) * 32]]
        assert np.array_equal(patches.numpy(), store.read_batch(expected))
        assert np.array_equal(labels.numpy(), store.labels[expected].astype(np.float32))
    resumed = list(batches.epoch(1, first_step=2))
    assert len(resumed) == len(whole) - 2 and torch.equal(resumed[0][0], whole[2][0])


def test_streamed_batches_raise_a_read_error_and_stop_their_thread_when_left(small_store, monkeypatch):
    """The GPU's streamed path (store too big for the GPU), run on the CPU with the CUDA calls stubbed."""
    import contextlib
    import threading
    import types

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: types.SimpleNamespace(wait_stream=lambda s: None))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None, raising=False)
    store = open_store(small_store)
    rows = store.split_indices("train")
    gathered = DeviceBatches(store, rows, torch.device("cpu"), 16, seed=3, resident_fraction=0.5)  # the CPU's path

    def streamed_epoch(epoch: int, first_step: int = 0):
        order = gathered.order(epoch)
        return gathered._streamed(order, order, range(first_step, gathered.steps_per_epoch))

    for first_step in (0, 5):
        pairs = list(zip(gathered.epoch(1, first_step), streamed_epoch(1, first_step), strict=True))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)

    def producers() -> int:
        return sum(thread.name == "histodetect-batches" for thread in threading.enumerate())

    for _ in zip(range(2), streamed_epoch(0)):  # the loop leaves early, as on a time limit
        pass
    for _ in range(50):
        if producers() == 0:
            break
        time.sleep(0.1)
    assert producers() == 0, "the reading thread ends with the loop"

    def broken_read(rows):
        raise OSError("the disk went away")

    monkeypatch.setattr(store, "read_batch", broken_read)
    with pytest.raises(OSError, match="the disk went away"):  # raised in the loop, not a hang
        list(streamed_epoch(0))


def test_a_run_resumes_only_on_the_kind_of_device_it_trained_on(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    last["rng"]["device_type"] = "cuda"
    torch.save(last, run / "checkpoints" / "last.pt")
    code, _, err = run_cli(capsys, "train", "--resume", run)
    assert code == 2 and "was trained on cuda and can only be resumed exactly on cuda" in err, err
    if not torch.cuda.is_available():  # no advice to pass a --device that cannot work here
        assert err.rstrip().endswith("resume it on a machine with a CUDA GPU"), err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("resident_fraction", [0.5, 0.0], ids=["resident", "streamed"])
def test_device_batches_never_wait_for_the_gpu_within_an_epoch(small_store, resident_fraction):
    store = open_store(small_store)
    rows = store.split_indices("train")
    batches = DeviceBatches(store, rows, torch.device("cuda"), 32, seed=0, resident_fraction=resident_fraction)
    assert batches.resident == (resident_fraction > 0)
    epoch = batches.epoch(0)
    next(epoch)  # the epoch's order goes to the GPU once, here
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [patches.float().mean() + labels.sum() for patches, labels in epoch]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(got) == batches.steps_per_epoch - 1


def test_fit_restores_torchs_threads_and_random_states_and_refuses_options_of_the_wrong_type(small_store, tmp_path):
    """A notebook trains with threads=1 and goes on with its own thread count; epochs="2" is one line."""
    with pytest.raises(UserError, match=r"^--epochs '2': expected an int, found str$"):
        preset_config("cpu", epochs="2")
    with pytest.raises(UserError, match=r"^--lr '1e-3': expected a number, found str$"):
        fit(dataclasses.replace(preset_config("cpu", **TINY), lr="1e-3"), small_store, tmp_path / "lr", progress=False)
    with pytest.raises(UserError, match=r"^cfg: expected a TrainConfig .*, found str$"):
        fit("cpu", small_store, tmp_path / "str", progress=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)

    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    try:
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        untouched = draws()
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        fit(preset_config("cpu", **{**TINY, "epochs": 1, "threads": 1}), str(small_store), str(tmp_path / "run"),
            progress=False)
        assert torch.get_num_threads() == 2
        assert draws() == untouched, "the notebook's random streams go on as if fit had not run"
    finally:
        torch.set_num_threads(before)


def test_a_loaded_run_names_its_folder_after_a_chdir(trained_run, monkeypatch, tmp_path):
    from histodetect.predict import load_run

    monkeypatch.chdir(trained_run.parent)
    run = load_run(trained_run.name)
    monkeypatch.chdir(tmp_path)
    assert run.run_dir == trained_run and (run.run_dir / "run.json").is_file()


def test_a_run_started_with_a_float_epoch_count_still_resumes(small_store, tmp_path):
    """Before check_config_types, preset_config(epochs=2.0) trained: its run must resume, not be refused."""
    run = tmp_path / "run"
    fit(preset_config("cpu", **TINY), small_store, run, progress=False, stop_after_epochs=1)
    last = run / "checkpoints" / "last.pt"
    checkpoint = load_checkpoint(last)
    checkpoint["config"]["epochs"] = 2.0  # as the older version wrote it
    save_atomic(checkpoint, last)
    run_json = json.loads((run / "run.json").read_text())
    run_json["config"]["epochs"] = 2.0
    (run / "run.json").write_text(json.dumps(run_json))
    with pytest.raises(UserError, match=r"^--val-batch-size '64': expected an int, found str$"):
        fit(None, None, run, resume=True, progress=False, resume_settings={"val_batch_size": "64"})
    result = fit(None, None, run, resume=True, progress=False)
    assert result.epochs_run == 2
