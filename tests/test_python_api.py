"""The Python API as a notebook uses it: the README's example, run as written, and the patches it takes."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import copy_patches
from histodetect.data.store import prepare
from histodetect.data.synthetic import write_synthetic
from histodetect.errors import UserError
from histodetect.evaluate import evaluate_run
from histodetect.export import load_exported_run
from histodetect.predict import (
    LoadedRun,
    check_patches,
    load_run,
    predict_logits,
    predict_patches,
    predict_samples,
    predict_to_csv,
)
from histodetect.serve import ServeConfig
from histodetect.slide import SlideConfig
from histodetect.train import preset_config

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
    """The python block of the README's 'From Python' section."""
    section = README.read_text().split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the 'From Python' section holds one python block"
    return blocks[0]


def test_the_readmes_python_example_runs_on_real_patches(pcam_jpeg, tmp_path, monkeypatch):
    copy_patches(pcam_jpeg, tmp_path / "data" / "pcam", {"train": 48, "valid": 16})
    (tmp_path / "my_patches").mkdir()
    for path in sorted((pcam_jpeg / "valid" / "1").glob("*.jpg"))[:3]:
        Image.open(path).save(tmp_path / "my_patches" / f"{path.stem}.png")
    code = _readme_example()
    # The example's 5-minute run, cut to 2 epochs of 96 patches for the test.
    cap = 'preset_config("cpu", max_minutes=5)'
    assert cap in code
    code = code.replace(cap, 'preset_config("cpu", max_minutes=5, epochs=2, batch_size=32, threads=1)')
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example

    assert namespace["result"].epochs_run == 2 and (tmp_path / "runs" / "nb" / "run.json").is_file()
    probs, patches = namespace["probs"], namespace["patches"]
    assert patches.shape == (32, 96, 96, 3) and probs.shape == (32,)
    assert ((probs >= 0) & (probs <= 1)).all()
    assert namespace["tumour"].dtype == bool and namespace["mine_probs"].shape == (3,)
    metrics = namespace["metrics"]
    assert metrics["n"] == 32 and 0 <= metrics["accuracy"] <= 1 and len(metrics["roc_auc_ci"]) == 2
    assert (tmp_path / "runs" / "nb" / "eval-valid-tta8" / "report.html").is_file()
    cams = namespace["cams"]
    assert cams.cams.shape == (8, 96, 96) and cams.probs.shape == (8,)
    # The PNG files hold the pixels of the store's first valid tumour patches, and score alike.
    run, store, mine = namespace["run"], namespace["store"], namespace["mine"]
    rows = [int(np.flatnonzero(store.ids == path.stem)[0]) for path in namespace["files"]]
    assert np.array_equal(mine, store.read_batch(np.asarray(rows)))
    assert np.abs(namespace["mine_probs"] - namespace["predict_patches"](run, store.read_batch(rows))).max() < 0.03
    assert "histo_tinynet" in repr(run) and "Conv2d" not in repr(run), "a short repr, not the whole network"
    assert repr(store).endswith("patches=128, splits={'train': 96, 'valid': 32}, fingerprint="
                                f"{store.fingerprint[:12]!r})"), "not <PatchStore object at 0x...>"
    assert repr(namespace["result"]).endswith("history=[2 epochs])"), "not every epoch's metrics"


@pytest.mark.parametrize(("given", "found", "fix"), [
    (np.zeros((2, 96, 96, 3), np.float32), r"float32 \(2, 96, 96, 3\)", r"floats in 0-1: \(x \* 255\)"),
    (np.zeros((2, 3, 96, 96), np.float32), r"float32 \(2, 3, 96, 96\)", r"floats in 0-1"),  # the shape as given
    (np.zeros((2, 96, 96, 3), np.int64), r"int64 \(2, 96, 96, 3\)", r"x.astype\(np.uint8\)"),
    (np.zeros((96, 96, 3), np.uint8), r"uint8 \(96, 96, 3\)", r"one patch needs its batch axis: patches\[None\]"),
    (np.zeros((3, 96, 96), np.uint8), r"uint8 \(3, 96, 96\)", r"one patch needs its batch axis: patches\[None\]"),
    ([], r"float64 \(0,\)", r"no patches: an empty batch is np.empty\(\(0, 96, 96, 3\), np.uint8\)"),
    (np.zeros((2, 64, 64, 3), np.uint8), r"uint8 \(2, 64, 64, 3\)", r"resize the patches to 96x96 first"),
    (np.zeros((2, 96, 96, 4), np.uint8), r"uint8 \(2, 96, 96, 4\)", r"RGB patches, channels last"),
    ([np.zeros((96, 96, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)], r"list", r"pass a numpy array"),
])
def test_patches_other_than_uint8_96x96_rgb_are_refused_saying_how_to_fix_them(given, found, fix):
    with pytest.raises(UserError, match=rf"^patches_uint8: expected uint8 RGB patches \(N, 96, 96, 3\), "
                                        rf"found {found}.*; .*{fix}"):
        check_patches(given)


def test_patches_may_come_channels_first_as_a_list_or_a_tensor():
    patches = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    for given in (patches.transpose(0, 3, 1, 2), list(patches), torch.from_numpy(patches), patches[:0]):
        checked = check_patches(given)
        assert checked.dtype == np.uint8 and np.array_equal(checked, patches[: len(checked)])


def test_a_path_where_a_loaded_run_goes_and_a_loaded_run_where_a_path_goes_are_refused_saying_how():
    from histodetect.predict import LoadedRun, check_run, predict_patches, run_folder

    with pytest.raises(UserError, match=r"^run: expected a LoadedRun, found the path 'runs/a'; load it first: "
                                        r"run = load_run\('runs/a'\)$"):
        predict_patches("runs/a", np.zeros((1, 96, 96, 3), np.uint8))
    with pytest.raises(UserError, match=r"^run: expected a LoadedRun \(run = load_run\(RUN_DIR\)\), found dict$"):
        check_run({})
    run = LoadedRun(run_dir=Path("/runs/a"), model=torch.nn.Identity(), device=torch.device("cpu"), mean=(0, 0, 0),
                    std=(1, 1, 1), crop_px=0, temperature=1.0, config={}, run={})
    with pytest.raises(UserError, match=r"^run_dir: expected a run folder's path, found a LoadedRun; pass its "
                                        r"folder, run.run_dir \(/runs/a\)$"):
        run_folder(run)
    with pytest.raises(UserError, match=r"^run_dir: expected a run folder's path, found list$"):
        run_folder(["runs/a"])
    assert run_folder("runs/a") == Path("runs/a") and check_run(run) is run


def test_one_input_path_is_a_list_of_one_not_of_its_characters():
    from histodetect.predict import input_paths

    assert input_paths("data/valid") == [Path("data/valid")]
    assert input_paths(Path("a")) == [Path("a")] and input_paths(["a", Path("b")]) == [Path("a"), Path("b")]
    with pytest.raises(UserError, match=r"^inputs: expected a path or a list of paths .*, found int 3$"):
        input_paths(["a", 3])


def test_any_iterable_of_input_paths_is_a_list_of_them(tmp_path):
    # Path.glob's generator and a numpy array of names were scored as inputs before input_paths
    # existed; only a str was split into its letters.
    from histodetect.predict import input_paths

    for name in ("a.png", "b.png"):
        (tmp_path / name).touch()
    assert sorted(input_paths(tmp_path.glob("*.png"))) == [tmp_path / "a.png", tmp_path / "b.png"]
    assert input_paths(np.array(["a.png", "b.png"])) == [Path("a.png"), Path("b.png")]
    assert input_paths({"a.png": 1}.keys()) == [Path("a.png")]
    with pytest.raises(UserError, match=r"^inputs: expected a path or a list of paths .*, found int 3$"):
        input_paths(3)


def test_a_cam_result_prints_its_shapes_not_its_numbers():
    from histodetect.explain import CamResult

    result = CamResult(cams=np.zeros((8, 96, 96), np.float32), probs=np.zeros(8), overlays=np.zeros(
        (8, 288, 288, 3), np.uint8), layer="stages.3")
    assert repr(result) == ("CamResult(cams=float32 (8, 96, 96), probs=float64 (8,), "
                            "overlays=uint8 (8, 288, 288, 3), layer='stages.3')")


def _identity_run() -> LoadedRun:
    return LoadedRun(run_dir=Path("/runs/a"), model=torch.nn.Identity(), device=torch.device("cpu"), mean=(0, 0, 0),
                     std=(1, 1, 1), crop_px=0, temperature=1.0, config={}, run={})


_PATCHES = np.zeros((2, 96, 96, 3), np.uint8)


# Each call got a TypeError or AttributeError from deep inside (or, for n_boot, one after the scoring);
# True was a batch of 1 and 100.0 patches a numpy error. The run folders need not exist: the options come first.
@pytest.mark.parametrize("case", [
    (lambda run, tmp: load_run(tmp / "run", threads="2"), "--threads '2': expected an int, found str"),
    (lambda run, tmp: predict_patches(run, _PATCHES, batch_size="64"), "--batch-size '64': expected an int, found str"),
    (lambda run, tmp: predict_logits(run, _PATCHES, batch_size="64"), "--batch-size '64': expected an int, found str"),
    (lambda run, tmp: predict_samples(run, _PATCHES, batch_size="64"), "--batch-size '64': expected an int, found str"),
    (lambda run, tmp: predict_patches(run, _PATCHES, batch_size=True), "--batch-size True: expected an int, found bool"),
    (lambda run, tmp: predict_to_csv(run, tmp, tmp / "p.csv", tta="8"), "--tta '8': expected an int, found str"),
    (lambda run, tmp: predict_to_csv(run, tmp, tmp / "p.csv", review_above="0.5"),
     "--review-above '0.5': expected a number, found str"),
    (lambda run, tmp: predict_to_csv(run, tmp, tmp / "p.csv", mc_passes="20"), "--mc '20': expected an int, found str"),
    (lambda run, tmp: predict_to_csv(run, tmp, tmp / "p.csv", review_by=["doubt"]),
     "--review-by ['doubt']: expected one of doubt, entropy, tta_sd, mc_sd"),
    (lambda run, tmp: predict_to_csv(run, tmp, tmp / "p.csv", seed="1"), "--seed '1': expected an int, found str"),
    (lambda run, tmp: prepare(tmp, tmp / "store", workers="2"), "--workers '2': expected an int, found str"),
    (lambda run, tmp: prepare(tmp, tmp / "store", valid_fraction="0.1"),
     "--valid-fraction '0.1': expected a number, found str"),
    (lambda run, tmp: write_synthetic(tmp / "synth", "100"), "--n '100': expected an int, found str"),
    (lambda run, tmp: write_synthetic(tmp / "synth", 100.0), "--n 100.0: expected an int, found float"),
    (lambda run, tmp: write_synthetic(tmp / "synth", 100, seed="1"), "--seed '1': expected an int, found str"),
    (lambda run, tmp: write_synthetic(tmp / "synth", 100, splits=["train", "valid"]),
     ("splits=['train', 'valid']: expected a mapping of split names to fractions, found list; pass e.g. "
      "{'train': 0.8, 'valid': 0.2}.")),
    (lambda run, tmp: evaluate_run(tmp / "run", n_boot="100"), "--bootstrap '100': expected an int, found str"),
    (lambda run, tmp: evaluate_run(tmp / "run", tta="8"), "--tta '8': expected an int, found str"),
    (lambda run, tmp: SlideConfig(stride_px="48"), "--stride '48': expected an int, found str"),
    (lambda run, tmp: SlideConfig(tta=True), "--tta True: expected an int, found bool"),
    (lambda run, tmp: ServeConfig(max_files="8"), "--max-files '8': expected an int, found str"),
    (lambda run, tmp: ServeConfig(resize="no"), "--resize 'no': expected True or False, found str"),
    (lambda run, tmp: prepare(tmp, tmp / "store", skip_bad="no"), "--skip-bad 'no': expected True or False, found str"),
    (lambda run, tmp: load_exported_run(tmp / "run", threads="1"), "--threads '1': expected an int, found str"),
], ids=lambda case: case[1].split(":")[0])
def test_an_option_of_the_wrong_type_is_refused_in_one_line_naming_it(case, tmp_path):
    call, message = case
    with pytest.raises(UserError, match=rf"^{re.escape(message)}$"):
        call(_identity_run(), tmp_path)


def test_numpy_numbers_are_taken_as_pythons_where_they_are_stored_in_json(pcam_jpeg, tmp_path):
    # A sweep's np.arange: a SlideConfig goes into summary.json, a ServeConfig into /v1/model, a seed
    # into a store's manifest; numpy's int64 could not (prepare failed after decoding every patch).
    import json

    config = SlideConfig(stride_px=np.int64(48), roi=[0, 0, np.int64(96), 96], threshold=np.float32(0.5))
    assert (type(config.stride_px), config.roi, type(config.threshold)) == (int, (0, 0, 96, 96), float)
    assert type(ServeConfig(max_files=np.int64(8)).max_files) is int
    assert type(ServeConfig(resize=np.bool_(True)).resize) is bool  # a numpy bool failed /v1/model's JSON
    # A training config goes into run.json: numpy's numbers were refused there, as no other option's were.
    train = preset_config("cpu", epochs=np.int64(3), lr=np.float32(0.002), dihedral=np.bool_(False))
    assert (type(train.epochs), type(train.lr), type(train.dihedral)) == (int, float, bool)
    json.dumps(dataclasses.asdict(train))
    src = copy_patches(pcam_jpeg, tmp_path / "src", {"train": 8})
    prepare(src, tmp_path / "store", seed=np.int64(3), workers=np.int64(1), dedupe=np.bool_(True), progress=False)
    options = json.loads((tmp_path / "store" / "manifest.json").read_text())["options"]
    assert (options["seed"], options["dedupe"]) == (3, True)
