"""Synthetic H&E-like patches: PCam's task in miniature, written in every real layout."""

from __future__ import annotations

import csv
import re

import h5py
import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from histodetect.data.decode import decode_patch_file, patch_sha1
from histodetect.data.formats import open_source
from histodetect.data.synthetic import make_synthetic_patches, write_synthetic
from histodetect.errors import UserError

CENTRE = (slice(32, 64), slice(32, 64))
RING_PX = 16  # the border ring: pixels within 16 of an edge, far from the centre square


@pytest.fixture(scope="module")
def patches_and_labels() -> tuple[np.ndarray, np.ndarray]:
    return make_synthetic_patches(400, seed=7)


def darkness(patches_uint8: np.ndarray) -> np.ndarray:
    """255 - mean of R, G, B: (N, 96, 96) float."""
    return 255.0 - patches_uint8.astype(np.float64).mean(axis=-1)


def ring_mask() -> np.ndarray:
    mask = np.zeros((96, 96), dtype=bool)
    mask[:RING_PX] = mask[-RING_PX:] = True
    mask[:, :RING_PX] = mask[:, -RING_PX:] = True
    return mask


def nuclear_fraction(patches_uint8: np.ndarray) -> np.ndarray:
    """Share of pixels dark and bluer than red, like haematoxylin-stained nuclei: (N, 96, 96) bool."""
    rgb = patches_uint8.astype(np.int16)
    return (rgb.mean(axis=-1) < 120) & (rgb[..., 2] > rgb[..., 0])


def centre_features(patches_uint8: np.ndarray) -> np.ndarray:
    """Simple per-patch features of the centre square, relative to the whole patch: (N, 3)."""
    dark = darkness(patches_uint8)
    nuclear = nuclear_fraction(patches_uint8)
    return np.stack(
        [
            dark[:, CENTRE[0], CENTRE[1]].mean(axis=(1, 2)) - dark.mean(axis=(1, 2)),
            nuclear[:, CENTRE[0], CENTRE[1]].mean(axis=(1, 2)),
            np.percentile(dark[:, CENTRE[0], CENTRE[1]].reshape(len(dark), -1), 90, axis=1),
        ],
        axis=1,
    )


def ring_colour_features(patches_uint8: np.ndarray) -> np.ndarray:
    """Mean and std of R, G, B over the border ring: (N, 6)."""
    ring = patches_uint8[:, ring_mask()].astype(np.float64)  # (N, pixels, 3)
    return np.concatenate([ring.mean(axis=1), ring.std(axis=1)], axis=1)


def accuracy_of_logistic_regression(features, labels, test_features, test_labels) -> float:
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-9
    model = LogisticRegression(max_iter=1000).fit((features - mean) / std, labels)
    return float(model.score((test_features - mean) / std, test_labels))


# --- make_synthetic_patches -------------------------------------------------------


def test_patches_are_pcam_shaped_uint8_with_the_requested_share_of_positives():
    patches, labels = make_synthetic_patches(40, seed=1)
    assert patches.shape == (40, 96, 96, 3) and patches.dtype == np.uint8
    assert labels.shape == (40,) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1}
    assert labels.sum() == 20

    _, quarter = make_synthetic_patches(40, seed=1, positive_fraction=0.25)
    assert quarter.sum() == 10


def test_no_patches_is_an_empty_batch():
    patches, labels = make_synthetic_patches(0)
    assert patches.shape == (0, 96, 96, 3) and labels.shape == (0,)



@pytest.mark.parametrize("kwargs, message", [
    ({"n": "40"}, r"^n '40': expected an int, found str$"),
    ({"n": 4, "seed": 1.5}, r"^--seed 1\.5: expected an int, found float$"),
    ({"n": 4, "positive_fraction": "half"}, r"^positive_fraction 'half': expected a number, found str$"),
    ({"n": -1}, r"^n=-1: expected a non-negative number of patches"),
])
def test_wrong_arguments_from_python_are_one_line(kwargs, message):
    # n="40" was a TypeError from comparing a str with 0
    with pytest.raises(UserError, match=message):
        make_synthetic_patches(**kwargs)

def test_a_seed_gives_the_same_patches_and_another_seed_different_ones():
    patches, labels = make_synthetic_patches(12, seed=3)
    again, labels_again = make_synthetic_patches(12, seed=3)
    other, _ = make_synthetic_patches(12, seed=4)
    np.testing.assert_array_equal(patches, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert not np.array_equal(patches, other)


def test_patches_are_coloured_like_real_h_and_e(patches_and_labels, pcam_jpeg):
    """Pink-purple as in real PCam: green, absorbed by both stains, is the darkest channel."""
    patches, _ = patches_and_labels
    real_files = sorted((pcam_jpeg / "train" / "0").glob("*.jpg"))[:100]
    real = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in real_files])
    for sample in (patches, real):
        red, green, blue = sample.reshape(-1, 3).astype(np.float64).mean(axis=0)
        assert green < red - 15 and green < blue - 15
    np.testing.assert_allclose(patches.reshape(-1, 3).mean(axis=0), real.reshape(-1, 3).mean(axis=0), atol=30)


def test_positives_are_darker_in_the_centre_and_alike_in_the_border_ring(patches_and_labels):
    patches, labels = patches_and_labels
    dark = darkness(patches)
    positive, negative = labels == 1, labels == 0
    centre_gap = (
        dark[positive][:, CENTRE[0], CENTRE[1]].mean() - dark[negative][:, CENTRE[0], CENTRE[1]].mean()
    )
    ring_gap = dark[positive][:, ring_mask()].mean() - dark[negative][:, ring_mask()].mean()
    assert centre_gap > 15  # grey levels
    # Staining varies a lot between patches: the ring's class gap has a standard
    # error of about 3 grey levels at 200 patches a class.
    assert abs(ring_gap) < 8

    nuclear = nuclear_fraction(patches)
    assert (
        nuclear[positive][:, CENTRE[0], CENTRE[1]].mean()
        > 2 * nuclear[negative][:, CENTRE[0], CENTRE[1]].mean()
    )


def test_nothing_of_the_tumour_spills_over_the_edge_of_the_centre_square(patches_and_labels):
    """Just outside pixels 32..63 (a 6-pixel band), positives look like negatives.

    Darkness is taken relative to each patch's own border ring, which removes most of
    the per-patch staining variation; the band's class gap then has a standard error
    of about 1.3 grey levels at 200 patches a class.
    """
    patches, labels = patches_and_labels
    dark = darkness(patches)
    centre = np.zeros((96, 96), dtype=bool)
    centre[CENTRE] = True
    band = np.zeros((96, 96), dtype=bool)
    band[26:70, 26:70] = True
    band &= ~centre

    def class_gap(region: np.ndarray) -> float:
        relative = dark[:, region].mean(axis=1) - dark[:, ring_mask()].mean(axis=1)
        return relative[labels == 1].mean() - relative[labels == 0].mean()

    assert class_gap(centre) > 20
    assert abs(class_gap(band)) < 5


def test_simple_centre_features_separate_the_classes(patches_and_labels):
    patches, labels = patches_and_labels
    test_patches, test_labels = make_synthetic_patches(200, seed=8)
    accuracy = accuracy_of_logistic_regression(
        centre_features(patches), labels, centre_features(test_patches), test_labels
    )
    assert accuracy > 0.85


def test_the_border_ring_colour_does_not_give_the_label_away(patches_and_labels):
    patches, labels = patches_and_labels
    test_patches, test_labels = make_synthetic_patches(200, seed=8)
    accuracy = accuracy_of_logistic_regression(
        ring_colour_features(patches), labels, ring_colour_features(test_patches), test_labels
    )
    assert accuracy < 0.65  # chance is 0.5; 0.65 is about 4 standard errors above it


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": -1}, "n=-1: expected a non-negative number of patches; pass n >= 0."),
        ({"n": 4, "seed": -2}, "--seed -2: expected a non-negative integer; pass e.g. --seed 0."),
        (
            {"n": 4, "positive_fraction": 1.5},
            "positive_fraction=1.5: expected a fraction in [0, 1]; pass e.g. 0.5 for balanced classes.",
        ),
    ],
)
def test_bad_arguments_name_the_argument_and_the_fix(kwargs, message):
    with pytest.raises(UserError) as error:
        make_synthetic_patches(**kwargs)
    assert str(error.value) == message


# --- write_synthetic: folder ------------------------------------------------------


def test_folder_layout_holds_split_label_png_files_with_the_exact_pixels(tmp_path):
    out = tmp_path / "synth"
    assert write_synthetic(out, 20, format="folder", seed=5) == out
    patches, labels = make_synthetic_patches(20, seed=5)

    files = sorted(path.relative_to(out) for path in out.rglob("*.png"))
    assert len(files) == 20
    assert {path.parts[0] for path in files} == {"train", "valid"}
    assert sum(path.parts[0] == "train" for path in files) == 16
    for path in files:
        split, label, name = path.parts
        assert re.fullmatch(r"synth\d{7}\.png", name)
        index = int(name[len("synth") : -len(".png")])
        assert int(label) == labels[index]
        np.testing.assert_array_equal(np.asarray(Image.open(out / path)), patches[index])
    for split in ("train", "valid"):  # stratified: both classes in every split
        assert {path.parts[1] for path in files if path.parts[0] == split} == {"0", "1"}


def test_folder_layout_takes_custom_splits(tmp_path):
    out = write_synthetic(tmp_path / "synth", 10, format="folder", splits={"train": 0.5, "val": 0.5})
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    assert len(list((out / "val").rglob("*.png"))) == 5


# --- write_synthetic: kaggle ------------------------------------------------------


def test_kaggle_layout_names_each_tiff_by_the_sha1_of_its_pixels(tmp_path):
    out = write_synthetic(tmp_path / "synth", 12, format="kaggle", seed=2, unlabelled=3)
    patches, labels = make_synthetic_patches(12, seed=2)

    with (out / "train_labels.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "label"]
    assert [row[1] for row in rows[1:]] == [str(label) for label in labels]
    for (patch_id, _), patch in zip(rows[1:], patches):
        path = out / "train" / f"{patch_id}.tif"
        decoded = np.asarray(Image.open(path))
        np.testing.assert_array_equal(decoded, patch)
        assert patch_id == patch_sha1(decoded)
    assert len(list((out / "train").iterdir())) == 12

    test_files = sorted((out / "test").iterdir())
    assert len(test_files) == 3
    for path in test_files:
        assert path.suffix == ".tif"
        assert path.stem == patch_sha1(np.asarray(Image.open(path)))
    # Unlabelled patches are new pixels, not copies of labelled ones.
    assert not {p.stem for p in test_files} & {row[0] for row in rows[1:]}


def test_kaggle_layout_without_unlabelled_patches_has_no_test_folder(tmp_path):
    out = write_synthetic(tmp_path / "synth", 4, format="kaggle")
    assert sorted(p.name for p in out.iterdir()) == ["train", "train_labels.csv"]


def test_kaggle_tiffs_are_stored_like_the_competitions_files(tmp_path, kaggle_sample):
    """Uncompressed RGB, 8 bits a sample, interleaved, in one strip: the fast-read path."""
    out = write_synthetic(tmp_path / "synth", 2, format="kaggle")
    ours = Image.open(next((out / "train").glob("*.tif")))
    real = Image.open(next((kaggle_sample / "train").glob("*.tif")))
    with (kaggle_sample / "train_labels.csv").open(newline="") as handle:
        real_header = next(csv.reader(handle))
    assert (out / "train_labels.csv").read_text().splitlines()[0].split(",") == real_header

    def layout(image: Image.Image) -> tuple:
        tags = image.tag_v2
        # 258 bits per sample, 259 compression, 262 photometric, 277 samples per pixel,
        # 284 planar configuration, 273 strip offsets (one entry per strip).
        return (
            image.mode,
            image.size,
            tags[258],
            tags[259],
            tags[262],
            tags[277],
            tags.get(284, 1),
            len(tags[273]),
        )

    assert layout(ours) == layout(real)


# --- write_synthetic: pcam_h5 -----------------------------------------------------


def test_pcam_layout_writes_x_y_and_meta_per_split_like_pcam(tmp_path):
    out = write_synthetic(tmp_path / "synth", 40, format="pcam_h5", seed=9)
    patches, labels = make_synthetic_patches(40, seed=9)
    prefix = "camelyonpatch_level_2_split_"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{prefix}{split}_{suffix}"
        for split in ("train", "valid", "test")
        for suffix in ("x.h5", "y.h5", "meta.csv")
    )

    seen = []
    slides_of_split = {}
    for split, n_expected in (("train", 32), ("valid", 4), ("test", 4)):
        with h5py.File(out / f"{prefix}{split}_x.h5", "r") as h5:
            x = h5["x"]
            assert list(h5.keys()) == ["x"]
            assert x.shape == (n_expected, 96, 96, 3) and x.dtype == np.uint8
            assert x.compression == "gzip" and x.chunks[1:] == (96, 96, 3)
            split_patches = x[:]
        with h5py.File(out / f"{prefix}{split}_y.h5", "r") as h5:
            y = h5["y"]
            assert list(h5.keys()) == ["y"]
            assert y.shape == (n_expected, 1, 1, 1) and y.dtype == np.uint8
            split_labels = y[:].reshape(-1)
        with (out / f"{prefix}{split}_meta.csv").open(newline="") as handle:
            rows = list(csv.reader(handle))
        assert rows[0] == ["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"]
        assert len(rows) == n_expected + 1
        for row_number, (index, coord_y, coord_x, tumour, centre_tumour, wsi) in enumerate(rows[1:]):
            assert int(index) == row_number
            assert int(coord_y) > 0 and int(coord_x) > 0
            assert centre_tumour == ("True" if split_labels[row_number] else "False")
            assert tumour == centre_tumour
            kind = r"test_\d{3,}" if split == "test" else r"train_(normal|tumor)_\d{3,}"
            assert re.fullmatch(rf"camelyon16_{kind}", wsi)
            if split != "test" and split_labels[row_number]:
                assert "_tumor_" in wsi
        slides_of_split[split] = [row[5] for row in rows[1:]]

        for patch, label in zip(split_patches, split_labels):
            index = next(i for i in range(40) if np.array_equal(patches[i], patch))
            assert labels[index] == label
            seen.append(index)
    assert sorted(seen) == list(range(40))  # every patch in exactly one split

    train_slides = slides_of_split["train"]
    assert len(set(train_slides)) < len(train_slides)  # several patches per slide
    all_slides = [set(names) for names in slides_of_split.values()]
    assert sum(len(names) for names in all_slides) == len(set().union(*all_slides))  # no slide in two splits


# --- write_synthetic: every layout ------------------------------------------------


@pytest.mark.parametrize("format", ["kaggle", "pcam_h5", "folder"])
def test_every_layout_reads_back_with_its_labels_and_pixels(tmp_path, format):
    out = write_synthetic(tmp_path / format, 20, format=format, seed=11)
    patches, labels = make_synthetic_patches(20, seed=11)
    by_sha1 = {patch_sha1(patch): label for patch, label in zip(patches, labels)}

    source = open_source(out)
    assert source.format == format
    assert len(source.ids) == 20
    if format == "pcam_h5":
        assert sorted(set(source.splits)) == ["test", "train", "valid"]
        read_back = {patch_sha1(patch): label for batch in source.iter_batches()
                     for patch, label in zip(batch.patches, batch.labels)}
        assert read_back == by_sha1, "every patch reads back with its own label"
    else:
        for path, label in zip(source.files, source.labels):
            assert by_sha1[patch_sha1(decode_patch_file(path).patch)] == label


def test_an_existing_empty_folder_is_filled_and_no_partial_folder_is_left(tmp_path):
    out = tmp_path / "synth"
    out.mkdir()
    write_synthetic(out, 4, format="folder", splits={"train": 1.0})
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]
    assert len(list(out.rglob("*.png"))) == 4


def test_an_existing_non_empty_out_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "synth"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError) as error:
        write_synthetic(out, 4)
    assert str(error.value) == (
        f"{out}: already exists and is not an empty folder; expected a new or empty folder. "
        "Pass another --out or remove it."
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"format": "tfrecord"},
            "--format 'tfrecord': unknown layout; expected one of kaggle, pcam_h5, folder.",
        ),
        ({"n": 0}, "--n 0: expected at least 1 patch; pass e.g. --n 1000."),
        (
            {"splits": {"train": 0.8}},
            (
                "splits={'train': 0.8}: expected positive fractions that sum to 1 (found sum 0.8); "
                "pass e.g. {'train': 0.8, 'valid': 0.2}."
            ),
        ),
        (
            {"n": 5, "format": "pcam_h5"},
            "--n 5: split 'valid' (fraction 0.1) would get no patches; pass a larger --n.",
        ),
        (
            {"format": "pcam_h5", "splits": {"train": 0.5, "val": 0.5}},
            (
                "splits: 'val' is not a PCam split; the pcam_h5 layout names its files after "
                "train, valid, test; use those names."
            ),
        ),
        (
            {"splits": {"train": 0.5, "../up": 0.5}},
            (
                "splits: split name '../up' is not a plain folder name; use letters, digits, '_' or '-' "
                "(e.g. 'train')."
            ),
        ),
        (
            {"format": "kaggle", "splits": {"train": 1.0}},
            (
                "splits={'train': 1.0}: the kaggle layout has no splits (all labelled patches go to "
                "out/train/); drop splits or pass --format folder or pcam_h5."
            ),
        ),
        (
            {"format": "folder", "unlabelled": 3},
            (
                "--unlabelled 3: only the kaggle layout has unlabelled patches (out/test/), found "
                "--format folder; pass --format kaggle or --unlabelled 0."
            ),
        ),
        ({"format": "kaggle", "unlabelled": -1}, "--unlabelled -1: expected a count >= 0; pass 0 for none."),
    ],
)
def test_bad_write_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    arguments = {"n": 20, **kwargs}
    with pytest.raises(UserError) as error:
        write_synthetic(tmp_path / "synth", arguments.pop("n"), **arguments)
    assert str(error.value) == message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, flags", [
    (["--n", str(2**63)], f"--n {2**63}"),
    (["--n", str(10**11)], f"--n {10**11}"),
    (["--n", "10", "--format", "kaggle", "--unlabelled", str(10**11)], f"--n 10 and --unlabelled {10**11}"),
])
def test_more_patches_than_memory_holds_is_one_line_naming_the_flag(tmp_path, capsys, argv, flags):
    from histodetect.cli import main

    assert main(["synth", "--out", str(tmp_path / "synth"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{flags}: the patches are drawn in memory" in err and "pass a smaller --n" in err
    assert list(tmp_path.iterdir()) == []


def test_too_many_unlabelled_patches_get_the_fix_for_their_cause(tmp_path, capsys):
    from histodetect.cli import main

    # The memory check came first: --format folder heard of memory, not that only kaggle has
    # unlabelled patches, and a huge --unlabelled was told to pass a smaller --n.
    argv = ["synth", "--out", str(tmp_path / "synth"), "--n", "10", "--unlabelled", str(10**11)]
    assert main([*argv, "--format", "folder"]) == 2
    assert "only the kaggle layout has unlabelled patches" in capsys.readouterr().err
    assert main([*argv, "--format", "kaggle"]) == 2
    assert "pass a smaller --n or --unlabelled" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_synth_command_refuses_an_out_inside_a_file_in_one_line(tmp_path, capsys):
    from histodetect.cli import main

    (tmp_path / "afile").write_text("not a folder")
    assert main(["synth", "--out", str(tmp_path / "afile" / "x"), "--n", "10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'afile'} is a file, not a folder; choose another path" in err
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tmp_path, monkeypatch):
    # h5py's OSError for a full disk carries a paragraph ("Can't synchronously write data (file write
    # failed: time = ..."); Pillow's names no file.
    import errno

    import histodetect.data.synthetic.write as write_module

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: time = ..., errno = 28)")

    monkeypatch.setattr(write_module, "_write_pcam_h5", full_disk)
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path / 'syn'))}: cannot write it "
                                        r"\(No space left on device\)$"):
        write_synthetic(tmp_path / "syn", 20, format="pcam_h5")
    assert list(tmp_path.iterdir()) == []
