"""ONNX / TorchScript export: metadata, dynamic batch, the same probabilities as PyTorch, predict through ONNX Runtime."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from histodetect import export as export_module
from histodetect.data.decode import decode_patch_file
from histodetect.data.store import prepare
from histodetect.errors import UserError
from histodetect.export import MAX_PROB_DIFF, ExportedModel, export_run, exported_path, load_exported_run
from histodetect.predict import load_run, predict_patches, predict_to_csv
from histodetect.train import fit, preset_config
from conftest import calibrated_copy, copy_patches

# Small and fast: one epoch of 4 steps is all an export needs to have weights to check.
TINY = dict(model="histo_tinynet", batch_size=32, epochs=1, max_minutes=0.0, crop_px=48, shift_px=2,
            val_batch_size=128, device="cpu", ema_decay=0.9, warmup_fraction=0.1)




@pytest.fixture(scope="module")
def small_store(pcam_jpeg, tmp_path_factory) -> Path:
    """128 real train and 64 real valid patches, balanced."""
    root = tmp_path_factory.mktemp("small")
    copy_patches(pcam_jpeg, root / "src", {"train": 64, "valid": 32})
    prepare(root / "src", root / "store", progress=False)
    return root / "store"


@pytest.fixture(scope="module")
def trained_run(small_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    fit(preset_config("cpu", **TINY), small_store, out, preset="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def onnx_export(trained_run):
    return export_run(trained_run, format="onnx")


@pytest.fixture(scope="module")
def valid_patches(pcam_jpeg) -> np.ndarray:
    """50 real patches the run never trained on (PCam's valid split, beyond the store's)."""
    files = sorted((pcam_jpeg / "valid" / "1").glob("*.jpg"))[100:125] + sorted((pcam_jpeg / "valid" / "0").glob("*.jpg"))[100:125]
    return np.stack([decode_patch_file(f).patch for f in files])


def test_onnx_export_is_checked_against_pytorch_on_real_patches_of_the_runs_store(onnx_export, trained_run, small_store):
    assert onnx_export.path == trained_run / "model.onnx" and onnx_export.path.is_file()
    assert onnx_export.n_checked == 64 and str(small_store) in onnx_export.checked_on
    assert onnx_export.max_abs_prob_diff < MAX_PROB_DIFF
    assert not list(trained_run.glob(".*tmp*")), "no temporary file is left"


def test_onnx_probabilities_equal_pytorchs_for_any_batch_size(onnx_export, trained_run, valid_patches):
    run = load_run(trained_run, device="cpu", fp32=True)  # exports run in float32
    expected = predict_patches(run, valid_patches)
    exported = ExportedModel(onnx_export.path)
    for batch in (1, 7, 50):
        probs = np.concatenate([exported.probabilities(valid_patches[i : i + batch])
                                for i in range(0, len(valid_patches), batch)])
        np.testing.assert_allclose(probs, expected, atol=MAX_PROB_DIFF, rtol=0)
    assert expected.std() > 0, "the check compares patches that score differently"


def test_the_onnx_file_carries_preprocessing_threshold_and_temperature(onnx_export, trained_run):
    run = load_run(trained_run, device="cpu")
    graph = onnx.load(str(onnx_export.path))
    props = {p.key: json.loads(p.value) for p in graph.metadata_props}
    assert props["mean"] == pytest.approx(list(run.mean)) and props["std"] == pytest.approx(list(run.std))
    assert props["crop_px"] == 48 and props["patch_size_px"] == 96
    assert props["threshold"] == pytest.approx(run.threshold) and props["temperature"] == 1.0
    assert props["model"] == "histo_tinynet" and props["preset"] == "cpu"
    assert props["data_fingerprint"] == run.run["data"]["fingerprint"]
    exported = load_exported_run(onnx_export.path)  # TTA thresholds travel in the run record
    assert {views: exported.threshold_for(views) for views in (1, 4, 8)} == pytest.approx(
        {views: run.threshold_for(views) for views in (1, 4, 8)})
    (image,) = graph.graph.input
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 48, 48]
    assert [o.name for o in graph.graph.output] == ["logit", "prob_tumour"]


def test_a_calibration_temperature_is_applied_inside_the_export(trained_run, tmp_path, valid_patches):
    calibrated = calibrated_copy(trained_run, tmp_path / "calibrated", temperature=2.5)
    report = export_run(calibrated, format="onnx")
    exported = ExportedModel(report.path)
    assert exported.metadata.temperature == 2.5
    logit, prob = exported(exported.images(valid_patches))
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-logit / 2.5)), atol=1e-6)
    np.testing.assert_allclose(prob[:, 0], predict_patches(load_run(calibrated, device="cpu", fp32=True), valid_patches),
                               atol=MAX_PROB_DIFF)


class _FirstPixelLogit(nn.Module):
    """A stand-in network whose logit is the image's first value, to put any logit through the export's head."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image[:, 0, 0, 0:1]  # (N, 1)


def test_the_onnx_probability_keeps_float32_precision_for_extreme_logits(trained_run, tmp_path):
    # ONNX Runtime's own Sigmoid gives 0 below a logit of -18 and is not monotonic near
    # -17, which flipped the decisions of a seed-mobilenetv2 run whose threshold was 2e-9.
    meta = export_module._metadata(load_run(trained_run, device="cpu"))
    model = export_module.CalibratedModel(_FirstPixelLogit(), temperature=1.5).eval()
    path = tmp_path / "head.onnx"
    export_module._write_onnx(model, torch.zeros(2, 3, 4, 4), meta, path)
    images = np.zeros((601, 3, 4, 4), np.float32)
    images[:, 0, 0, 0] = np.linspace(-120, 60, 601)  # logits down to a probability of 3e-35
    logit, prob = ExportedModel(path)(images)
    expected = 1 / (1 + np.exp(-logit.astype(np.float64) / 1.5))
    np.testing.assert_allclose(prob, expected, rtol=1e-5, atol=0)
    assert np.all(np.diff(prob[:, 0]) >= 0), "a larger logit never gets a smaller probability"


def test_the_export_carries_the_calibrated_threshold_of_each_view_count(trained_run, tmp_path):
    # run.json's top-level thresholds are the uncalibrated ones; a service that reads the
    # export alone must not have to know that calibration.thresholds replaces them.
    run = calibrated_copy(trained_run, tmp_path / "calibrated", temperature=2.0)
    run_json = json.loads((run / "run.json").read_text())
    run_json["calibration"]["thresholds"] = {"1": 0.3, "4": 0.35, "8": 0.4}
    (run / "run.json").write_text(json.dumps(run_json))
    for format in ("onnx", "torchscript"):
        exported = ExportedModel(export_run(run, format=format).path)
        assert exported.metadata.thresholds == {"1": 0.3, "4": 0.35, "8": 0.4}
        assert exported.metadata.threshold == 0.3
    graph = onnx.load(str(run / "model.onnx"))
    assert json.loads({p.key: p.value for p in graph.metadata_props}["thresholds"])["8"] == 0.4
    alone = tmp_path / "alone.onnx"
    shutil.copy(run / "model.onnx", alone)
    assert load_exported_run(alone).threshold_for(8) == 0.4
    # An export written before the field existed still loads, with its run record's thresholds.
    old = [p for p in graph.metadata_props if p.key != "thresholds"]
    del graph.metadata_props[:]
    graph.metadata_props.extend(old)
    onnx.save(graph, str(alone))
    assert ExportedModel(alone).metadata.thresholds is None
    assert load_exported_run(alone).threshold_for(8) == 0.4


def test_torchscript_export_keeps_the_metadata_beside_the_graph_and_matches_pytorch(trained_run, valid_patches):
    report = export_run(trained_run, format="torchscript")
    assert report.path == trained_run / "model.pt" and report.max_abs_prob_diff < MAX_PROB_DIFF
    exported = ExportedModel(report.path)
    assert exported.format == "torchscript"
    assert exported.metadata.crop_px == 48 and exported.metadata.run["preset"] == "cpu"
    run = load_run(trained_run, device="cpu", fp32=True)
    np.testing.assert_allclose(exported.probabilities(valid_patches[:9]), predict_patches(run, valid_patches[:9]),
                               atol=MAX_PROB_DIFF)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated upstream
def test_the_torchscript_file_refuses_an_input_of_another_layout_size_or_dtype(trained_run, tmp_path):
    # A CNN scores any size: an uncropped patch gave probabilities 0.11 away, silently.
    module = torch.jit.load(str(export_run(trained_run, format="torchscript", out=tmp_path / "m.pt").path))
    assert module(torch.zeros(1, 3, 48, 48))[1].shape == (1, 1)
    assert module(torch.zeros(256, 3, 48, 48))[1].shape == (256, 1)
    for image, message in (
        (torch.zeros(2, 3, 96, 96), r"expected \(N, 3, 48, 48\), channels first.*found \[2, 3, 96, 96\]"),  # uncropped
        (torch.zeros(2, 48, 48, 3), r"found \[2, 48, 48, 3\]"),  # channels last
        (torch.zeros(2, 3, 48, 48, dtype=torch.uint8), r"expected float32 values, \(x / 255 - mean\) / std"),
    ):
        with pytest.raises(Exception, match=message) as error:
            module(image)
        assert "histodetect.json" in str(error.value)


@pytest.mark.parametrize("tta", [8, 72])  # 72: crops moved by the training shift, which the export's metadata keeps
def test_predict_through_onnx_runtime_writes_the_csv_pytorch_writes(onnx_export, trained_run, pcam_jpeg, tmp_path,
                                                                     tta):
    files = sorted((pcam_jpeg / "valid" / "1").glob("*.jpg"))[:6] + sorted((pcam_jpeg / "valid" / "0").glob("*.jpg"))[:6]
    onnx_run = load_exported_run(trained_run)  # the run folder's model.onnx
    assert type(onnx_run.model).__name__ == "ExportedLogits"
    predict_to_csv(onnx_run, files, tmp_path / "onnx.csv", tta=tta, progress=False)
    predict_to_csv(load_run(trained_run, device="cpu", fp32=True), files, tmp_path / "torch.csv", tta=tta,
                   progress=False)

    def read(path: Path) -> list[dict]:
        with path.open() as handle:
            return list(csv.DictReader(handle))

    onnx_rows, torch_rows = read(tmp_path / "onnx.csv"), read(tmp_path / "torch.csv")
    assert [r["id"] for r in onnx_rows] == [f.stem for f in files]
    np.testing.assert_allclose([float(r["prob"]) for r in onnx_rows], [float(r["prob"]) for r in torch_rows],
                               atol=MAX_PROB_DIFF)
    # A patch within the engines' float noise of the threshold may fall either side of it.
    threshold = onnx_run.threshold_for(tta)
    assert threshold == load_run(trained_run, device="cpu").threshold_for(tta)
    decided = [i for i, r in enumerate(torch_rows) if abs(float(r["prob"]) - threshold) > MAX_PROB_DIFF]
    assert len(decided) >= len(files) // 2  # the fixture's model has seen little: its probabilities sit near 0.507
    assert [onnx_rows[i]["pred"] for i in decided] == [torch_rows[i]["pred"] for i in decided]
    assert all(rows[i]["pred"] == str(int(float(rows[i]["prob"]) >= threshold))
               for rows in (onnx_rows, torch_rows) for i in decided)


def test_when_the_store_is_gone_the_check_uses_check_data_or_the_shared_patches(trained_run, kaggle_sample, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(trained_run, moved)
    run_json = json.loads((moved / "run.json").read_text())
    run_json["data"]["path"] = str(tmp_path / "deleted-store")
    (moved / "run.json").write_text(json.dumps(run_json))
    report = export_run(moved, out=tmp_path / "kaggle.onnx", check_data=kaggle_sample / "test")
    assert report.n_checked == 29 and report.checked_on == str(kaggle_sample / "test")
    report = export_run(moved, out=tmp_path / "shared.onnx")
    assert report.n_checked == 64 and "pcam-jpeg" in report.checked_on


def test_a_failed_check_leaves_no_file_behind(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "MAX_PROB_DIFF", -1.0)  # no export can pass
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export_run(trained_run, out=tmp_path / "never.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(format="tflite"), "--format 'tflite': expected one of onnx, torchscript"),
    (dict(format="onnx", out=Path("model.pt")), "--out model.pt: onnx exports are .onnx files; name it e.g. model.onnx"),
    (dict(format="torchscript", out=Path("model.onnx")), "torchscript exports are .pt files"),
])
def test_export_refuses_a_wrong_format_or_file_name(trained_run, kwargs, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
        export_run(trained_run, **kwargs)


def test_export_refuses_to_write_over_a_folder(trained_run, tmp_path):
    (tmp_path / "model.onnx").mkdir()
    with pytest.raises(UserError, match=r"--out .*model\.onnx: is a folder; pass a file name"):
        export_run(trained_run, out=tmp_path / "model.onnx")


@pytest.mark.parametrize("out", [".", "", "/"])
def test_an_out_naming_a_folder_without_a_file_name_is_one_line(trained_run, capsys, out):
    from histodetect.cli import main

    # Path("."), Path("") and Path("/") have no name: with_suffix raised a ValueError traceback.
    assert main(["export", str(trained_run), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--out {Path(out)}: is a folder; pass a file name such as {Path(out) / 'model.onnx'}" in err


def test_export_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="not a run folder"):
        export_run(tmp_path)


def test_check_data_without_patches_is_refused(trained_run, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: no images \(.*\) found"):
        export_run(trained_run, out=tmp_path / "m.onnx", check_data=tmp_path / "empty")


def test_loading_something_that_is_not_an_export_names_the_file_and_the_fix(trained_run, tmp_path, onnx_export):
    with pytest.raises(UserError, match=r"no model\.onnx in this run folder; run 'histodetect export"):
        exported_path(tmp_path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(UserError, match="garbage.onnx: not a readable ONNX model"):
        ExportedModel(garbage)
    stripped = onnx.load(str(onnx_export.path))
    del stripped.metadata_props[:]
    onnx.save(stripped, str(tmp_path / "plain.onnx"))
    with pytest.raises(UserError, match=r"plain\.onnx: not a histodetect export .*'histodetect export RUN'"):
        ExportedModel(tmp_path / "plain.onnx")
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(UserError, match=r"notes\.pt: not a TorchScript archive"):
        ExportedModel(tmp_path / "notes.pt")
    with pytest.raises(UserError, match="missing.onnx: no such file"):
        ExportedModel(tmp_path / "missing.onnx")


def test_the_export_command_checks_and_says_so_and_predict_runs_through_onnx(trained_run, pcam_jpeg, tmp_path, capsys):
    from histodetect.cli import main

    assert main(["export", str(trained_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert f"wrote onnx model to {tmp_path / 'm.onnx'}" in out
    assert "checked: its probabilities equal PyTorch's on 64 real patches" in out and "< 1e-04" in out
    # What a service running the file without histodetect needs, said where the user looks.
    threshold = load_run(trained_run, device="cpu").threshold
    assert "input 'image': float32 (N, 3, 48, 48), any N: uint8 RGB 96x96 patches, the centre 48x48 px" in out
    assert "mean [0.485, 0.456, 0.406]" in out and "sigmoid(logit / 1)" in out
    assert f"tumour where prob_tumour >= {threshold:.6g} (one view" in out and "metadata_props" in out
    files = [str(f) for f in sorted((pcam_jpeg / "valid" / "1").glob("*.jpg"))[:3]]
    assert main(["predict", str(tmp_path / "m.onnx"), *files, "--out", str(tmp_path / "p.csv"),
                 "--engine", "onnx", "--quiet"]) == 0
    assert (tmp_path / "p.csv").read_text().count("\n") == 4
    assert main(["predict", str(tmp_path / "m.onnx"), *files, "--out", str(tmp_path / "mc.csv"),
                 "--engine", "onnx", "--mc", "4", "--quiet"]) == 2
    assert "--mc 4: MC-dropout needs the PyTorch engine" in capsys.readouterr().err
    assert not (tmp_path / "mc.csv").exists()
    assert main(["export", str(trained_run), "--out", str(tmp_path / "m.pt")]) == 2
    assert "--out" in capsys.readouterr().err
    best = trained_run / "checkpoints" / "best.pt"
    before = best.read_bytes()
    assert main(["export", str(trained_run), "--format", "torchscript", "--out", str(best)]) == 2
    assert f"would overwrite {(trained_run / 'checkpoints').resolve()}" in capsys.readouterr().err
    assert best.read_bytes() == before, "the run's weights are untouched"


def test_an_export_older_than_its_runs_calibration_is_refused(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    export_run(run, format="onnx")
    load_exported_run(run)  # current: loads
    run_json = json.loads((run / "run.json").read_text())
    run_json["calibration"] = {"temperature": 1.5}
    (run / "run.json").write_text(json.dumps(run_json))
    with pytest.raises(UserError, match=r"model.onnx: older than its run \(temperature 1 in the export, 1.5 in "
                                        r"run.json.*export it again"):
        load_exported_run(run)
    export_run(run, format="onnx")
    assert load_exported_run(run).temperature == 1.5
    moved = tmp_path / "alone.onnx"  # away from its run folder, an export is all there is
    shutil.copy(run / "model.onnx", moved)
    assert load_exported_run(moved).temperature == 1.5


def test_the_metadata_says_which_checkpoint_and_histodetect_made_the_export(trained_run, tmp_path):
    # An export of last.pt had the same metadata as one of best.pt: nothing told them apart.
    import hashlib

    from histodetect import __version__

    for checkpoint in ("best", "last"):
        report = export_run(trained_run, format="onnx", out=tmp_path / f"{checkpoint}.onnx", checkpoint=checkpoint)
        meta = ExportedModel(report.path).metadata
        weights = trained_run / "checkpoints" / f"{checkpoint}.pt"
        assert (meta.checkpoint, meta.histodetect) == (checkpoint, __version__)
        assert meta.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_an_export_written_before_the_checkpoint_was_recorded_is_still_read(onnx_export, tmp_path):
    model = onnx.load(str(onnx_export.path))
    kept = [prop for prop in model.metadata_props if prop.key not in ("checkpoint", "weights_sha256", "histodetect")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(tmp_path / "old.onnx"))
    assert ExportedModel(tmp_path / "old.onnx").metadata.checkpoint is None


def test_the_recorded_sha256_is_of_the_weights_loaded_not_of_the_file_there_later(trained_run, tmp_path):
    # Hashed when an output was written, a run trained again meanwhile (best.pt replaced) was
    # recorded as the weights that had not computed the numbers.
    import hashlib

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    best = run_dir / "checkpoints" / "best.pt"
    loaded_sha256 = hashlib.sha256(best.read_bytes()).hexdigest()
    run = load_run(run_dir, device="cpu")
    shutil.copy(run_dir / "checkpoints" / "last.pt", best)
    assert run.computed_by()["weights_sha256"] == loaded_sha256
    assert export_module._metadata(run).weights_sha256 == loaded_sha256


def test_the_torchscript_entry_point_takes_its_input_unscripted_too():
    # shape[1:] != [3, side, side] compared a torch.Size with a list eagerly: never equal.
    checked = export_module.CheckedInput(nn.Conv2d(3, 1, 1), 48)
    assert checked(torch.zeros(2, 3, 48, 48)).shape == (2, 1, 48, 48)
    with pytest.raises(ValueError, match=r"expected \(N, 3, 48, 48\).*found \[2, 3, 96, 96\]"):
        checked(torch.zeros(2, 3, 96, 96))
