"""Readers, prepare, info, dedupe and splits on the real shared samples, and every bad input."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from histodetect.cli import main
from histodetect.data.decode import decode_patch_file, patch_sha1
from histodetect.data.formats import detect_format, open_source
from histodetect.data.splits import make_validation_split
from histodetect.data.store import PrepareWarning, describe_store, is_store, open_store, prepare
from histodetect.errors import UserError


@pytest.fixture(scope="module")
def pcam_store(pcam_jpeg, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "pcam-jpeg"
    prepare(pcam_jpeg, out, progress=False)
    return out


def copy_kaggle(kaggle_sample: Path, dest: Path) -> Path:
    shutil.copytree(kaggle_sample, dest)
    for path in dest.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    dest.chmod(0o755)
    return dest


def small_folder(pcam_jpeg: Path, dest: Path, n_per_label: int = 4) -> Path:
    """split/label/*.jpg with a few real patches per label."""
    for split in ("train", "valid"):
        for label in ("0", "1"):
            (dest / split / label).mkdir(parents=True)
            for path in sorted((pcam_jpeg / split / label).glob("*.jpg"))[:n_per_label]:
                shutil.copy(path, dest / split / label / path.name)
    return dest


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the acceptance checks -------------------------------------------------


def test_pcam_jpeg_store_counts_duplicates_and_no_leak(pcam_store, capsys):
    code, out, err = run_cli(capsys, "info", pcam_store, "--json")
    info = json.loads(out)
    assert code == 0
    assert info["splits"]["train"]["n"] == 8000 and info["splits"]["valid"]["n"] == 2000
    assert info["duplicates"] == 182
    assert info["shared_across_splits"] == 0
    assert "WARNING" not in err


def test_pcam_jpeg_pixel_sha1_matches_the_shared_table(pcam_jpeg, pcam_store):
    store = open_store(pcam_store)
    with (pcam_jpeg / "labels.csv").open() as handle:
        table = {Path(row["file"]).stem: row for row in csv.DictReader(handle)}
    for row in range(0, len(store), 997):
        expected = table[store.ids[row]]
        assert store.sha1s[row] == expected["pixel_sha1"] == patch_sha1(store.patches[row])
        assert int(store.labels[row]) == int(expected["label"])
        assert store.splits[row] == expected["split"]


def test_kaggle_sample_stores_15_labelled_29_unlabelled_with_ids_equal_to_sha1(kaggle_sample, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "prepare", kaggle_sample, "--out", tmp_path / "k", "--quiet")
    assert code == 0
    assert "Kaggle ids equal to their pixel SHA-1: 44 of 44" in out
    store = open_store(tmp_path / "k")
    labelled = store.labels >= 0
    assert labelled.sum() == 15 and (~labelled).sum() == 29
    assert set(store.splits[labelled]) == {"train", "valid"}, "Kaggle train gets a validation split"
    assert set(store.splits[~labelled]) == {"test"}
    assert all(store.ids[i] == patch_sha1(store.patches[i]) == store.sha1s[i] for i in range(len(store)))
    assert store.manifest["kaggle_id_mismatches"] == 0


# --- readers ---------------------------------------------------------------------------


def test_formats_are_detected_from_the_folder(kaggle_sample, pcam_jpeg, tmp_path):
    x = np.zeros((2, 96, 96, 3), np.uint8)
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_valid_x.h5", "w") as h5:
        h5["x"] = x
    assert detect_format(kaggle_sample) == "kaggle"
    assert detect_format(pcam_jpeg) == "folder"
    assert detect_format(tmp_path) == "pcam_h5"


def test_every_reader_yields_the_same_record(kaggle_sample, pcam_jpeg, tmp_path):
    folder = open_source(small_folder(pcam_jpeg, tmp_path / "f"))
    kaggle = open_source(kaggle_sample)
    patches = np.stack([decode_patch_file(p).patch for p in folder.files])
    write_pcam_h5(tmp_path / "h5", {"valid": (patches, folder.labels)})
    pcam = open_source(tmp_path / "h5")
    for source in (folder, kaggle, pcam):
        batches = list(source.iter_batches(chunk_size=5))
        assert sum(len(b.ids) for b in batches) == len(source)
        for batch in batches:
            assert batch.patches.dtype == np.uint8 and batch.patches.shape[1:] == (96, 96, 3)
            assert len(batch.labels) == len(batch.ids) == len(batch.splits) == len(batch.slides) == len(batch.patches)
            assert set(batch.labels.tolist()) <= {-1, 0, 1}
    h5_pixels = np.concatenate([b.patches for b in pcam.iter_batches()])
    assert np.array_equal(h5_pixels, patches), "h5 pixels are stored losslessly"

    def label_by_pixels(source) -> dict[str, int]:
        return {patch_sha1(patch): int(label) for batch in source.iter_batches(chunk_size=5)
                for patch, label in zip(batch.patches, batch.labels)}

    folder_labels = label_by_pixels(folder)
    assert sorted(folder_labels.values()) == [0] * 8 + [1] * 8
    assert label_by_pixels(pcam) == folder_labels, "each h5 patch keeps the label the folder gave it"
    with (kaggle_sample / "train_labels.csv").open() as handle:
        kaggle_labels = {row["id"]: int(row["label"]) for row in csv.DictReader(handle)}
    assert {sha1: label for sha1, label in label_by_pixels(kaggle).items() if label >= 0} == kaggle_labels


def write_pcam_h5(root: Path, splits: dict, meta: dict | None = None, prefix="camelyonpatch_level_2_split_") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in splits.items():
        with h5py.File(root / f"{prefix}{split}_x.h5", "w") as h5:
            h5.create_dataset("x", data=x, chunks=(min(len(x), 4), 96, 96, 3), compression="gzip")
        with h5py.File(root / f"{prefix}{split}_y.h5", "w") as h5:
            h5["y"] = np.asarray(y, np.uint8).reshape(-1, 1, 1, 1)
        if meta and split in meta:
            with (root / f"{prefix}{split}_meta.csv").open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"])
                writer.writerows([[0, 0, bool(l), bool(l), wsi] for l, wsi in zip(y, meta[split])])
    return root


def test_pcam_h5_keeps_splits_and_reads_slide_ids(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (12, 96, 96, 3), dtype=np.uint8)
    y = np.array([0, 1] * 6)
    slides = [f"slide_{i // 3}" for i in range(12)]
    root = write_pcam_h5(tmp_path / "pcam", {"train": (x, y), "valid": (x[:4], y[:4])}, {"train": slides})
    source = open_source(root)
    assert source.format == "pcam_h5"
    assert source.splits == ["train"] * 12 + ["valid"] * 4
    assert source.slides[:12] == slides and source.slides[12:] == [""] * 4
    assert source.ids[0] == "train_0" and source.ids[12] == "valid_0"
    assert source.labels.tolist() == y.tolist() + y[:4].tolist(), "row i of y labels row i of x"
    report = prepare(root, tmp_path / "store", progress=False)
    assert not report.made_validation_split
    store = open_store(tmp_path / "store")
    assert np.array_equal(store.patches[:12], x)
    assert store.labels[:12].tolist() == y.tolist()


def test_folder_without_splits_gets_a_stratified_validation_split(pcam_jpeg, tmp_path):
    src = tmp_path / "labels"
    for label in ("0", "1"):
        (src / label).mkdir(parents=True)
        for path in sorted((pcam_jpeg / "train" / label).glob("*.jpg"))[:20]:
            shutil.copy(path, src / label / path.name)
    report = prepare(src, tmp_path / "s", valid_fraction=0.2, seed=3, progress=False)
    assert report.made_validation_split
    assert report.counts["valid"] == {"n": 8, "positive": 4, "negative": 4, "unlabelled": 0}
    prepare(src, tmp_path / "s2", valid_fraction=0.2, seed=3, progress=False)
    first, second = open_store(tmp_path / "s"), open_store(tmp_path / "s2")
    assert list(first.splits) == list(second.splits), "the split is reproducible for a seed"


def test_a_validation_split_made_from_an_imbalanced_train_set_keeps_its_class_ratio(tmp_path):
    # 40 normal and 10 tumour patches: a fifth moved is 10 patches, 2 of them tumour, for every seed.
    rng = np.random.default_rng(5)
    x = rng.integers(0, 255, (50, 96, 96, 3), dtype=np.uint8)
    y = np.array([0] * 40 + [1] * 10)
    root = write_pcam_h5(tmp_path / "pcam", {"train": (x, y)})
    report = prepare(root, tmp_path / "s", valid_fraction=0.2, progress=False)
    assert report.made_validation_split
    assert report.counts["valid"] == {"n": 10, "positive": 2, "negative": 8, "unlabelled": 0}
    assert report.counts["train"] == {"n": 40, "positive": 8, "negative": 32, "unlabelled": 0}
    for seed in range(10):
        moved = make_validation_split(y, [""] * len(y), 0.2, seed)
        assert moved.sum() == 10 and y[moved].sum() == 2, f"seed {seed}: {y[moved].sum()} tumour of {moved.sum()}"


def test_validation_split_is_grouped_by_slide_when_slides_are_known(tmp_path):
    rng = np.random.default_rng(1)
    n = 60
    x = rng.integers(0, 255, (n, 96, 96, 3), dtype=np.uint8)
    y = np.array([0, 1] * (n // 2))
    slides = [f"wsi_{i % 10}" for i in range(n)]
    root = write_pcam_h5(tmp_path / "pcam", {"train": (x, y)}, {"train": slides})
    prepare(root, tmp_path / "s", valid_fraction=0.2, progress=False)
    store = open_store(tmp_path / "s")
    train_slides = set(store.slides[store.splits == "train"])
    valid_slides = set(store.slides[store.splits == "valid"])
    assert valid_slides and train_slides and not train_slides & valid_slides


def test_flat_folder_is_unlabelled(kaggle_sample):
    source = open_source(kaggle_sample / "test")
    assert len(source) == 29 and set(source.labels.tolist()) == {-1}


# --- store -------------------------------------------------------------------------------


def test_store_is_memory_mapped_and_reads_random_batches_in_order(pcam_store):
    store = open_store(pcam_store)
    assert isinstance(store.patches, np.memmap)
    indices = np.array([9000, 3, 512, 3])
    batch = store.read_batch(indices)
    for row, index in enumerate(indices):
        assert np.array_equal(batch[row], store.patches[index])
    assert store.manifest["source"]["format"] == "folder"
    assert len(store.fingerprint) == 40


def test_fingerprint_is_stable_but_changes_with_any_label_or_split(tmp_path):
    # The same pixels in the same order each time: only the labels and the split boundary differ.
    rng = np.random.default_rng(6)
    x = rng.integers(0, 255, (12, 96, 96, 3), dtype=np.uint8)
    y = np.array([0, 1] * 6)
    relabelled = y.copy()
    relabelled[3] = 1 - relabelled[3]

    def fingerprint(name: str, splits: dict) -> str:
        prepare(write_pcam_h5(tmp_path / name, splits), tmp_path / f"{name}-store", progress=False)
        return open_store(tmp_path / f"{name}-store").fingerprint

    first = fingerprint("first", {"train": (x[:8], y[:8]), "valid": (x[8:], y[8:])})
    assert fingerprint("again", {"train": (x[:8], y[:8]), "valid": (x[8:], y[8:])}) == first
    assert fingerprint("label", {"train": (x[:8], relabelled[:8]), "valid": (x[8:], y[8:])}) != first
    assert fingerprint("split", {"train": (x[:9], y[:9]), "valid": (x[9:], y[9:])}) != first


def test_dedupe_keeps_the_first_of_each_duplicate_group(pcam_jpeg, tmp_path):
    src = tmp_path / "dups"
    (src / "train" / "1").mkdir(parents=True)
    (src / "train" / "0").mkdir(parents=True)
    files = sorted((pcam_jpeg / "train" / "1").glob("*.jpg"))[:3]
    for path in files:
        shutil.copy(path, src / "train" / "1" / path.name)
    shutil.copy(files[0], src / "train" / "1" / "copy_of_first.jpg")
    shutil.copy(next((pcam_jpeg / "train" / "0").glob("*.jpg")), src / "train" / "0" / "neg.jpg")
    shutil.copytree(src / "train", src / "valid")  # a leak: every valid patch is also in train
    prepare(src, tmp_path / "plain", progress=False)
    info = describe_store(open_store(tmp_path / "plain"))
    assert info["duplicates"] == 2 and info["shared_across_splits"] == 4
    assert describe_store(str(tmp_path / "plain")) == info  # a notebook passes the folder
    report = prepare(src, tmp_path / "dedup", dedupe=True, progress=False)
    store = open_store(tmp_path / "dedup")
    assert report.n_deduplicated == 6 and len(store) == 4
    assert "copy_of_first" not in set(store.ids)
    assert len(set(store.sha1s)) == len(store)


def test_info_warns_loudly_about_patches_shared_across_splits(pcam_jpeg, tmp_path, capsys):
    src = small_folder(pcam_jpeg, tmp_path / "leak", n_per_label=2)
    leaked = next((src / "train" / "0").iterdir())
    shutil.copy(leaked, src / "valid" / "0" / ("leaked" + leaked.suffix))
    prepare(src, tmp_path / "s", progress=False)
    code, _, err = run_cli(capsys, "info", tmp_path / "s")
    assert code == 0
    assert "WARNING: 1 patches appear in more than one split (train/valid: 1)" in err
    assert "--dedupe" in err


def test_prepare_refuses_an_existing_store_unless_overwrite(pcam_jpeg, tmp_path, capsys):
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=1)
    prepare(src, tmp_path / "s", progress=False)
    code, _, err = run_cli(capsys, "prepare", src, "--out", tmp_path / "s", "--quiet")
    assert code == 2 and "already holds a store; pass --overwrite" in err and "Traceback" not in err
    code, _, _ = run_cli(capsys, "prepare", src, "--out", tmp_path / "s", "--quiet", "--overwrite")
    assert code == 0 and is_store(tmp_path / "s")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "prepare", src, "--out", tmp_path / "other", "--quiet", "--overwrite")
    assert code == 2 and "is not empty and is not a store" in err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_interrupted_prepare_leaves_no_store(pcam_jpeg, tmp_path, monkeypatch):
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=2)
    import histodetect.data.store.write as store_module  # where prepare looks them up

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "make_validation_split", crash)
    monkeypatch.setattr(store_module, "_fingerprint", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    assert list(tmp_path.glob(".s.*")) == [], "the partial folder is removed"


def test_prepare_onto_a_disk_too_small_for_the_store_is_one_line_before_decoding(pcam_jpeg, tmp_path, monkeypatch):
    # The space is reserved first: decoding into a sparse memory map on a full disk killed the
    # workers with SIGBUS and prepare hung (checked on a 300 kB tmpfs: now this line, in 0.35 s).
    import errno

    import histodetect.data.store.pack as pack

    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=2)
    reserved, decoded = [], []

    def full_disk(fd, length):
        reserved.append(length)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pack, "_allocate", full_disk)
    monkeypatch.setattr(pack, "read_chunk", lambda task: decoded.append(task))
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path / 's'))}: cannot write the store \(No space left "
                                        r"on device; its 8 patches take 0.00 GB\); free some space or choose another "
                                        r"--out$"):
        prepare(src, tmp_path / "s", progress=False)
    assert reserved and reserved[0] >= 8 * 96 * 96 * 3 and not decoded, "reserved before any decoding"
    assert not (tmp_path / "s").exists() and list(tmp_path.glob(".s.*")) == []


def test_reserving_the_store_allocates_its_blocks_without_writing_them(tmp_path):
    # fallocate(2), not glibc's posix_fallocate: where a file system has none, that one wrote a byte
    # into every block (3x slower prepare onto ext2); here the blocks are allocated, or nothing is.
    import histodetect.data.store.pack as pack

    path = tmp_path / "patches.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(64, 96, 96, 3)).flush()
    pack.reserve_space(path)
    assert os.stat(path).st_blocks * 512 >= path.stat().st_size
    assert not np.load(path, mmap_mode="r").any()


CTRL_C_DURING_PREPARE = """
import sys, time
import histodetect.data.store.pack as store  # where the decoding looks read_chunk up
read_chunk = store.read_chunk
store.read_chunk = lambda task: (time.sleep(0.2), read_chunk(task))[1]  # slow, so Ctrl-C lands mid-decode
from histodetect.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _prepare_signalled_mid_decode(pcam_jpeg: Path, tmp_path: Path, number: int) -> tuple[subprocess.Popen, str]:
    """`prepare --workers 2` in its own process group, given `number` while its pool decodes."""
    out = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_DURING_PREPARE, "prepare", str(pcam_jpeg), "--out", str(out),
                             "--workers", "2", "--quiet"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".s.*/patches.npy")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # the pool is decoding
    assert proc.poll() is None, proc.communicate()[0]
    os.killpg(proc.pid, number)
    return proc, proc.communicate(timeout=60)[0]


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_ctrl_c_during_a_parallel_prepare_prints_one_line_and_leaves_no_store(pcam_jpeg, tmp_path):
    """Ctrl-C reaches every process of the group: the decoding workers must leave it to the parent."""
    proc, output = _prepare_signalled_mid_decode(pcam_jpeg, tmp_path, signal.SIGINT)
    assert proc.returncode == 130, output
    assert output.strip() == "histodetect: interrupted"
    assert not (tmp_path / "s").exists() and list(tmp_path.glob(".s.*")) == []


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGTERM are POSIX")
def test_sigterm_to_a_parallel_prepare_kills_it_and_the_next_prepare_clears_its_partial(pcam_jpeg, tmp_path, capsys):
    """Answered as Ctrl-C is, a scheduler's SIGTERM to the whole group could kill a worker that held the
    task queue's lock, and the cleanup's pool.terminate() then waited forever; the pool's parent now
    dies at once, as it did before SIGTERM was answered, and leaves its hidden partial store behind."""
    proc, output = _prepare_signalled_mid_decode(pcam_jpeg, tmp_path, signal.SIGTERM)
    assert proc.returncode == -signal.SIGTERM, output
    assert not (tmp_path / "s").exists()
    small = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=2)
    assert main(["prepare", str(small), "--out", str(tmp_path / "s"), "--quiet"]) == 0
    assert (tmp_path / "s").is_dir() and list(tmp_path.glob(".s.*")) == [], "the killed prepare's partial is gone"


# --- bad input: one line, naming the file, exit 2, no traceback ---------------------------


def expect_error(capsys, src: Path, out: Path, *needles: str, extra: tuple = ()) -> str:
    code, _, err = run_cli(capsys, "prepare", src, "--out", out, "--quiet", *extra)
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    assert not is_store(out), "no store is left behind"
    return err


def test_truncated_image_names_the_file(pcam_jpeg, tmp_path, capsys):
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=2)
    victim = next((src / "train" / "1").iterdir())
    victim.write_bytes(victim.read_bytes()[:300])
    expect_error(capsys, src, tmp_path / "s", str(victim), "truncated", "--skip-bad")


def test_non_image_file_names_the_file(kaggle_sample, tmp_path, capsys):
    src = copy_kaggle(kaggle_sample, tmp_path / "k")
    victim = next((src / "train").iterdir())
    victim.write_text("this is not a tiff")
    expect_error(capsys, src, tmp_path / "s", str(victim), "not an image")


def test_skip_bad_skips_and_logs_the_bad_files(pcam_jpeg, tmp_path, capsys):
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=3)
    victims = sorted((src / "train" / "0").iterdir())[:2]
    for victim in victims:
        victim.write_bytes(b"garbage")
    code, out, _ = run_cli(capsys, "prepare", src, "--out", tmp_path / "s", "--quiet", "--skip-bad")
    assert code == 0 and "skipped 2 bad files" in out
    store = open_store(tmp_path / "s")
    assert len(store) == 10 and store.manifest["n_skipped"] == 2
    with (tmp_path / "s" / "skipped.csv").open() as handle:
        assert sorted(row["path"] for row in csv.DictReader(handle)) == sorted(str(v) for v in victims)
    good = [p.stem for p in sorted((src / "train" / "0").iterdir())[2:]]
    assert set(good) <= set(store.ids)
    for stem in good:  # rows stay aligned with their pixels after skipping
        row = list(store.ids).index(stem)
        assert np.array_equal(store.patches[row], decode_patch_file(next(src.rglob(stem + ".jpg"))).patch)


def test_a_decompression_bomb_is_called_far_too_large(pcam_jpeg, tmp_path, capsys):
    import struct
    import zlib

    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=1)
    # A PNG header announcing 20,000 x 20,000 pixels (Pillow refuses it in Image.open itself).
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    bomb = next((src / "train" / "0").iterdir()).with_name("bomb.png")
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    expect_error(capsys, src, tmp_path / "s", "bomb.png: is far too large for a patch")


def test_an_h5_pair_without_patches_is_an_empty_source(tmp_path, capsys):
    root = tmp_path / "pcam"
    root.mkdir()
    with h5py.File(root / "camelyonpatch_level_2_split_train_x.h5", "w") as h5:
        h5["x"] = np.zeros((0, 96, 96, 3), np.uint8)
    with h5py.File(root / "camelyonpatch_level_2_split_train_y.h5", "w") as h5:
        h5["y"] = np.zeros((0, 1, 1, 1), np.uint8)
    expect_error(capsys, root, tmp_path / "s", "the source holds no patches")


def test_wrong_size_is_refused_unless_resize(pcam_jpeg, tmp_path, capsys):
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=1)
    victim = next((src / "valid" / "1").iterdir())
    Image.open(victim).resize((128, 128)).save(victim)
    expect_error(capsys, src, tmp_path / "s", str(victim), "128x128", "expected 96x96", "--resize")
    code, out, _ = run_cli(capsys, "prepare", src, "--out", tmp_path / "s", "--quiet", "--resize")
    assert code == 0 and "resized 1 patches" in out


def test_grayscale_and_rgba_are_converted_with_one_warning(pcam_jpeg, tmp_path, capsys):
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=2)
    gray, rgba = sorted((src / "train" / "0").iterdir())[:2]
    Image.open(gray).convert("L").save(gray.with_suffix(".png"))
    Image.open(rgba).convert("RGBA").save(rgba.with_suffix(".png"))
    gray.unlink()
    rgba.unlink()
    with pytest.warns(PrepareWarning, match=r"converted 1 L, 1 RGBA image\(s\) to RGB|converted 1 RGBA, 1 L image\(s\) to RGB"):
        report = prepare(src, tmp_path / "s", progress=False)
    assert report.converted_modes == {"L": 1, "RGBA": 1}
    store = open_store(tmp_path / "s")
    row = list(store.ids).index(gray.stem)
    assert np.array_equal(store.patches[row][..., 0], store.patches[row][..., 2]), "gray becomes equal RGB"


def test_label_csv_id_without_a_file(kaggle_sample, tmp_path, capsys):
    src = copy_kaggle(kaggle_sample, tmp_path / "k")
    victim = next((src / "train").iterdir())
    victim.unlink()
    expect_error(capsys, src, tmp_path / "s", "train_labels.csv", f"id {victim.stem} has no file")


def test_file_without_a_label(kaggle_sample, tmp_path, capsys):
    src = copy_kaggle(kaggle_sample, tmp_path / "k")
    extra = src / "train" / "ffffffffffffffffffffffffffffffffffffffff.tif"
    shutil.copy(next((src / "test").iterdir()), extra)
    expect_error(capsys, src, tmp_path / "s", str(extra), "no label")


def test_label_other_than_0_or_1(kaggle_sample, tmp_path, capsys):
    src = copy_kaggle(kaggle_sample, tmp_path / "k")
    csv_path = src / "train_labels.csv"
    lines = csv_path.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",2"
    csv_path.write_text("\n".join(lines) + "\n")
    expect_error(capsys, src, tmp_path / "s", "train_labels.csv:4", "'2'", "must be 0 or 1")


def test_duplicate_ids_in_the_csv(kaggle_sample, tmp_path, capsys):
    src = copy_kaggle(kaggle_sample, tmp_path / "k")
    csv_path = src / "train_labels.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines + [lines[1]]) + "\n")
    expect_error(capsys, src, tmp_path / "s", "train_labels.csv:17", "duplicate id")


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    expect_error(capsys, tmp_path / "empty", tmp_path / "s", str(tmp_path / "empty"), "no images")


def test_h5_whose_x_and_y_lengths_differ(tmp_path, capsys):
    root = write_pcam_h5(tmp_path / "pcam", {"train": (np.zeros((5, 96, 96, 3), np.uint8), [0, 1, 0, 1, 0])})
    with h5py.File(root / "camelyonpatch_level_2_split_train_y.h5", "w") as h5:
        h5["y"] = np.zeros((4, 1, 1, 1), np.uint8)
    expect_error(capsys, root, tmp_path / "s", "train_y.h5", "4 labels", "5 patches")


def test_h5_without_key_x_asks_if_it_is_pcam(tmp_path, capsys):
    (tmp_path / "pcam").mkdir()
    with h5py.File(tmp_path / "pcam" / "camelyonpatch_level_2_split_test_x.h5", "w") as h5:
        h5["images"] = np.zeros((2, 96, 96, 3), np.uint8)
    expect_error(capsys, tmp_path / "pcam", tmp_path / "s", "no dataset 'x' (found 'images'). Is this a PCam file?")


def test_h5_with_one_hot_labels_is_refused_not_read_inverted(tmp_path, capsys):
    labels = np.array([0, 1, 1, 0])
    root = write_pcam_h5(tmp_path / "pcam", {"train": (np.zeros((4, 96, 96, 3), np.uint8), labels)})
    with h5py.File(root / "camelyonpatch_level_2_split_train_y.h5", "w") as h5:
        h5["y"] = np.eye(2, dtype=np.uint8)[labels]  # (4, 2): its first column is the inverted label
    expect_error(capsys, root, tmp_path / "s", "train_y.h5", "dataset 'y' is (4, 2)", "one 0/1 label per patch")


def test_h5_with_a_group_for_x_or_a_meta_csv_not_in_utf8(tmp_path, capsys):
    (tmp_path / "group").mkdir()
    with h5py.File(tmp_path / "group" / "camelyonpatch_level_2_split_test_x.h5", "w") as h5:
        h5.create_group("x")
    expect_error(capsys, tmp_path / "group", tmp_path / "s", "'x' is an HDF5 group, not a dataset")
    root = write_pcam_h5(tmp_path / "pcam", {"train": (np.zeros((2, 96, 96, 3), np.uint8), [0, 1])})
    (root / "camelyonpatch_level_2_split_train_meta.csv").write_bytes("wsi\ncaf\xe9\ncaf\xe9\n".encode("latin-1"))
    expect_error(capsys, root, tmp_path / "s", "train_meta.csv: not a UTF-8 text CSV")


def test_prepare_refuses_a_seed_numpy_cannot_take(pcam_jpeg, tmp_path, capsys):
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=2)
    expect_error(capsys, src, tmp_path / "s", "--seed -1: expected an integer in [0, 2**32)", extra=("--seed", "-1"))


@pytest.mark.parametrize("workers", ["-1", "257", str(2**63)])
def test_prepare_refuses_a_number_of_workers_out_of_range(pcam_jpeg, tmp_path, capsys, workers):
    # -1 was taken as 1 in silence; 2**63 forked processes until the system refused
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=2)
    expect_error(capsys, src, tmp_path / "s", f"--workers {workers}: expected 0 (one per core) to 256 decoding processes",
                 extra=("--workers", workers))


def test_damaged_store_files_are_one_line_each(pcam_jpeg, tmp_path, capsys):
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=2)
    prepare(src, tmp_path / "good", progress=False)
    for name, damage, needle in (
        ("empty-patches", lambda s: (s / "patches.npy").write_bytes(b""), "patches.npy: unreadable (No data left in file)"),
        ("list-manifest", lambda s: (s / "manifest.json").write_text("[]"), "not a store manifest (no 'n_patches'"),
        ("no-splits", lambda s: (s / "manifest.json").write_text(json.dumps(
            {k: v for k, v in json.loads((s / "manifest.json").read_text()).items() if k != "splits"})),
         "not a store manifest (no 'splits')"),
    ):
        store = tmp_path / name
        shutil.copytree(tmp_path / "good", store)
        damage(store)
        code, _, err = run_cli(capsys, "info", store)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and needle in err, (name, err)
    # Pointed at the images instead of a store: the advice prepares them, into a new folder.
    code, _, err = run_cli(capsys, "info", src)
    assert code == 2 and f"make one with 'histodetect prepare {src} --out STORE'" in err
    (tmp_path / "new").mkdir()  # made ahead for the store
    code, _, err = run_cli(capsys, "info", tmp_path / "new")
    assert code == 2 and f"make one with 'histodetect prepare SRC --out {tmp_path / 'new'}'" in err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    code, _, err = run_cli(capsys, "info", tmp_path / "run")
    assert code == 2 and "a run folder, not a store; pass the store it was trained on" in err


def test_missing_source_and_unknown_format(tmp_path, capsys):
    expect_error(capsys, tmp_path / "nowhere", tmp_path / "s", "nowhere: no such file or folder")
    code, _, err = run_cli(capsys, "info", tmp_path)
    assert code == 2 and "not a histodetect store" in err


def test_every_subcommand_help_has_an_example(capsys):
    for command in ("synth", "prepare", "info", "download"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "example:" in capsys.readouterr().out


# --- small sources, odd layouts and damaged files (found in review, 2026-11-28) -----------


def test_a_tiny_train_set_gets_a_validation_split_without_stratifying(kaggle_sample, pcam_jpeg, tmp_path, capsys):
    # kaggle-sample: 15 labelled; 5% is one patch, too few to hold both classes.
    src = copy_kaggle(kaggle_sample, tmp_path / "k")
    code, out, err = run_cli(capsys, "prepare", src, "--out", tmp_path / "s", "--quiet", "--valid-fraction", "0.05")
    assert code == 0, err
    assert "moved 1 of 15 train patches (7%" in out
    assert open_store(tmp_path / "s").manifest["splits"]["valid"]["n"] == 1
    # label/* with 5 images: 10% rounds up to one patch, four stay for training.
    for label, n in (("0", 3), ("1", 2)):
        (tmp_path / "f" / label).mkdir(parents=True)
        for path in sorted((pcam_jpeg / "train" / label).glob("*.jpg"))[:n]:
            shutil.copy(path, tmp_path / "f" / label / path.name)
    report = prepare(tmp_path / "f", tmp_path / "s2", progress=False)
    assert report.counts["valid"]["n"] == 1 and report.counts["train"]["n"] == 4


def test_a_slide_grouped_split_moves_slides_near_the_fraction_and_says_how_many(tmp_path, capsys):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 255, (100, 96, 96, 3), dtype=np.uint8)
    y = np.array([0, 1] * 50)
    # Five slides of 40, 30, 15, 10 and 5 patches: too few for 10-fold groups.
    slides = [f"wsi_{s}" for s, n in enumerate((40, 30, 15, 10, 5)) for _ in range(n)]
    root = write_pcam_h5(tmp_path / "pcam", {"train": (x, y)}, {"train": slides})
    code, out, err = run_cli(capsys, "prepare", root, "--out", tmp_path / "s", "--quiet")
    assert code == 0, err
    store = open_store(tmp_path / "s")
    valid = store.splits == "valid"
    assert not set(store.slides[valid]) & set(store.slides[~valid]), "no slide on both sides"
    assert 5 <= valid.sum() <= 15, "whole slides as close to 10% as they come"
    assert f"moved {valid.sum()} of 100 train patches" in out and "whole slides" in out
    # Two slides: one of them moves, and the message says so (50%, not 10%).
    root2 = write_pcam_h5(tmp_path / "pcam2", {"train": (x, y)}, {"train": ["a"] * 50 + ["b"] * 50})
    code, out, _ = run_cli(capsys, "prepare", root2, "--out", tmp_path / "s2", "--quiet")
    assert code == 0 and "moved 50 of 100 train patches (50%" in out


def test_split_folder_names_are_matched_in_any_case(pcam_jpeg, tmp_path):
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=2)
    (src / "train").rename(src / "Training")
    (src / "valid").rename(src / "Val")
    store = open_store(prepare(src, tmp_path / "s", progress=False).store)
    assert sorted(store.split_names) == ["train", "valid"]


@pytest.mark.parametrize("layout", ["split/label", "label"])
def test_a_store_prepared_inside_its_image_folder_does_not_break_the_folder(pcam_jpeg, tmp_path, layout):
    # `prepare data --out data/store` worked once; then data held a "store" folder beside its
    # label folders and every later prepare or predict of data refused it ("found folders 0, 1, store").
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=2)
    if layout == "label":
        src = src / "train"
    first = open_store(prepare(src, src / "store", progress=False).store)
    again = open_store(prepare(src, tmp_path / "again", progress=False).store)
    assert again.fingerprint == first.fingerprint and len(again.labels) == len(first.labels)


@pytest.mark.parametrize("holder, marker", [("valid", "manifest.json"), ("valid", "run.json"),
                                             ("valid/1", "manifest.json"), ("train/0", "run.json")])
def test_a_split_or_label_folder_holding_a_json_file_of_ours_by_name_is_still_read(pcam_jpeg, tmp_path, holder, marker):
    # Only folders holding a store or run are skipped: a split or label folder with a
    # manifest.json (another tool's) or run.json lost its patches in silence.
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=2)
    (src / holder / marker).write_text("{}")
    source = open_source(src)
    assert sorted(set(source.splits)) == ["train", "valid"] and len(source.labels) == 8
    assert sorted(source.labels.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_a_run_folder_inside_an_image_folder_is_not_taken_for_a_split(pcam_jpeg, tmp_path):
    # `train --out data/run` beside the split folders: only the store case was tested.
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=2)
    (src / "run" / "checkpoints").mkdir(parents=True)
    (src / "run" / "run.json").write_text("{}")
    assert sorted(set(open_source(src).splits)) == ["train", "valid"]


def test_label_folders_each_holding_a_manifest_json_are_still_read(pcam_jpeg, tmp_path):
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=2) / "train"
    for label in ("0", "1"):
        (src / label / "manifest.json").write_text("{}")
    assert sorted(open_source(src).labels.tolist()) == [0, 0, 1, 1]


def test_an_unlabelled_valid_split_is_not_mixed_with_labelled_train_rows(tmp_path, capsys):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 255, (20, 96, 96, 3), dtype=np.uint8)
    root = write_pcam_h5(tmp_path / "pcam", {"train": (x, [0, 1] * 10)})
    with h5py.File(root / "camelyonpatch_level_2_split_valid_x.h5", "w") as h5:
        h5["x"] = x[:6]
    with pytest.warns(PrepareWarning, match="'valid' split has no labels"):
        report = prepare(root, tmp_path / "s", progress=False)
    assert not report.made_validation_split
    assert report.counts["valid"] == {"n": 6, "positive": 0, "negative": 0, "unlabelled": 6}
    assert report.counts["train"]["n"] == 20


def test_two_files_differing_only_in_extension_keep_distinct_ids(pcam_jpeg, tmp_path):
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=1)
    jpg = next((src / "train" / "0").glob("*.jpg"))
    Image.open(jpg).save(jpg.with_suffix(".png"))
    (src / "train" / "0" / "._mac-resource-fork.jpg").write_bytes(b"\x00\x05\x16\x07")  # hidden: skipped
    ids = list(open_store(prepare(src, tmp_path / "s", progress=False).store).ids)
    assert len(ids) == len(set(ids)) == 5
    assert {f"train/0/{jpg.name}", f"train/0/{jpg.stem}.png"} <= set(ids)


def test_a_label_csv_with_a_byte_order_mark_is_read(kaggle_sample, tmp_path):
    src = copy_kaggle(kaggle_sample, tmp_path / "k")
    csv_path = src / "train_labels.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    assert prepare(src, tmp_path / "s", progress=False).n_patches == 44


def test_sixteen_bit_grayscale_keeps_its_levels(tmp_path):
    levels = np.full((96, 96), 50, np.uint16)
    levels[:, 48:] = 100
    Image.fromarray(levels * 257).save(tmp_path / "g16.png")  # 16-bit: 50 and 100 on 0-255 scaled up
    decoded = decode_patch_file(tmp_path / "g16.png", resize=False)
    assert decoded.error is None
    assert decoded.patch[0, 0].tolist() == [50] * 3 and decoded.patch[0, 95].tolist() == [100] * 3


def test_damaged_h5_chunks_are_named_and_skippable(tmp_path, capsys):
    rng = np.random.default_rng(4)
    x = rng.integers(0, 255, (16, 96, 96, 3), dtype=np.uint8)
    root = write_pcam_h5(tmp_path / "pcam", {"train": (x, [0, 1] * 8)})  # gzip chunks of 4 rows
    x_file = root / "camelyonpatch_level_2_split_train_x.h5"
    with h5py.File(x_file, "r") as h5:
        offset = h5["x"].id.get_chunk_info(1).byte_offset  # rows 4-7
    with x_file.open("r+b") as handle:
        handle.seek(offset)
        handle.write(b"\x00" * 64)
    expect_error(capsys, root, tmp_path / "s", str(x_file), "row 4", "damaged", "--skip-bad")
    report = prepare(root, tmp_path / "s", skip_bad=True, progress=False)
    assert report.n_patches == 12 and len(report.skipped) == 4
    assert np.array_equal(open_store(tmp_path / "s").patches[:4], x[:4])


def test_more_user_mistakes_are_one_line(kaggle_sample, pcam_jpeg, tmp_path, capsys, monkeypatch):
    # --format kaggle on a folder without train_labels.csv
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=1)
    expect_error(capsys, src, tmp_path / "s", "train_labels.csv", "not found", extra=("--format", "kaggle"))
    # a PCam h5 with no rows
    empty = tmp_path / "empty"
    empty.mkdir()
    with h5py.File(empty / "camelyonpatch_level_2_split_test_x.h5", "w") as h5:
        h5["x"] = np.zeros((0, 96, 96, 3), np.uint8)
    expect_error(capsys, empty, tmp_path / "s", "holds no patches")
    # --out below a file
    (tmp_path / "afile").write_text("x")
    expect_error(capsys, src, tmp_path / "afile" / "sub", "afile is a file")
    # a store whose index.csv is missing
    prepare(src, tmp_path / "good", progress=False)
    (tmp_path / "good" / "index.csv").unlink()
    code, _, err = run_cli(capsys, "info", tmp_path / "good")
    assert code == 2 and "index.csv" in err and "prepare it again" in err and err.count("\n") == 1, err
    # download into a file, or from a non-http address
    code, _, err = run_cli(capsys, "download", "pcam", "--root", tmp_path / "afile", "--quiet")
    assert code == 2 and "afile is a file" in err, err


def test_prepare_into_the_current_empty_folder(pcam_jpeg, tmp_path, monkeypatch, capsys):
    src = small_folder(pcam_jpeg, tmp_path / "f", n_per_label=1)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    code, _, err = run_cli(capsys, "prepare", src, "--out", ".", "--quiet")
    assert code == 0, err
    assert is_store(tmp_path / "here") and len(open_store(tmp_path / "here")) == 4
