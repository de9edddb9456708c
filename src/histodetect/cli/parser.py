"""The argument parser: one subparser per command, each pointing at its handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import __version__
from .data_commands import _cmd_download, _cmd_info, _cmd_prepare, _cmd_synth
from .run_commands import (
    _cmd_calibrate,
    _cmd_evaluate,
    _cmd_explain,
    _cmd_export,
    _cmd_predict,
    _cmd_serve,
    _cmd_slide,
)
from .train_commands import _cmd_presets, _cmd_train

# augment.TTA_VIEW_COUNTS, spelt here so that --help does not import torch (a test keeps them equal).
TTA_CHOICES = (1, 4, 8, 40, 72)
TTA_HELP = ("test-time views averaged per patch: 1, 4 or 8 dihedral views of the centre crop; "
            "40 or 72 add those of crops moved by the training shift (default 1)")


def _example(text: str) -> str:
    return "example:\n  " + text

def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, overriding the preset's value."""
    from dataclasses import MISSING, fields

    from ..presets import OPTION_HELP, TrainConfig

    group = p.add_argument_group("overrides of the preset's values (see 'histodetect presets')")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default) if f.default is not MISSING and f.default is not None else str
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=OPTION_HELP[f.name])
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(),
                               help=OPTION_HELP[f.name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histodetect",
        description="Find metastatic cancer in lymph-node histopathology patches (PCam / Kaggle).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_example("histodetect synth --out synth --n 2000 && histodetect prepare synth --out store && histodetect info store"),
    )
    parser.add_argument("--version", action="version", version=f"histodetect {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, example: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=_example(example),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    def add_device_options(p: argparse.ArgumentParser) -> None:
        """--device and --fp32, for every command that runs a model."""
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")
        p.add_argument("--fp32", action="store_true",
                       help="compute in float32 (default: bf16 autocast where fast: CUDA, CPUs with AMX / AVX512-BF16)")

    p = add("synth", "Write synthetic H&E-like patches (not tissue: for demos and tests).",
            "histodetect synth --out synth --n 2000 --format kaggle", _cmd_synth)
    p.add_argument("--out", type=Path, required=True, help="folder to create")
    p.add_argument("--n", type=int, default=2000, help="number of labelled patches (default 2000)")
    p.add_argument("--format", default="folder", choices=("kaggle", "pcam_h5", "folder"), help="layout to write")
    p.add_argument("--unlabelled", type=int, default=0, help="also write this many unlabelled test patches")
    p.add_argument("--seed", type=int, default=0)

    p = add("prepare", "Decode patches once into a packed, memory-mapped store for training.",
            "histodetect prepare ../shared/data/pcam-jpeg --out stores/pcam-jpeg", _cmd_prepare)
    p.add_argument("src", type=Path, help="a Kaggle folder, a folder of PCam .h5 files, or an image folder")
    p.add_argument("--out", type=Path, required=True, help="store folder to create")
    p.add_argument("--format", choices=("kaggle", "pcam_h5", "folder"), help="override format detection")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--dedupe", action="store_true", help="keep only the first of each group of identical patches")
    p.add_argument("--resize", action="store_true", help="resize images that are not 96x96 instead of refusing them")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files and list them in skipped.csv")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="share of train moved to validation when the source has no validation split (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of that validation split (default 0)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("info", "Counts, label balance, duplicates and cross-split leaks of a store.",
            "histodetect info stores/pcam-jpeg --json", _cmd_info)
    p.add_argument("store", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("download", "Download PatchCamelyon (md5-checked, resumable) into a folder.",
            "histodetect download pcam --root data/pcam", _cmd_download)
    p.add_argument("dataset", choices=("pcam",), help="the dataset (pcam)")
    p.add_argument("--root", type=Path, required=True, help="folder to download into")
    p.add_argument("--base-url", help="mirror to download from (default: Zenodo record 2546921)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("presets", "List the training presets and every value they set.", "histodetect presets", _cmd_presets)

    p = add("train", "Train a model on a store; writes a run folder (config, metrics, checkpoints).",
            "histodetect train --data stores/pcam-jpeg --preset cpu --out runs/cpu --max-minutes 10", _cmd_train)
    p.add_argument("--data", type=Path, help="a store made by 'histodetect prepare'")
    p.add_argument("--preset", default=None, help="seed-xception, seed-mobilenetv2, default or cpu (default: default)")
    p.add_argument("--out", type=Path, help="run folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run at --out")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue a stopped run where it stopped (with its own config; only --device, --threads, --val-batch-size, --profile and --checkpoint-minutes may change, and --data says where its store is now if it moved)")
    _add_train_options(p)

    p = add("evaluate", "Score a run on a labelled split: metrics with intervals, plots, report.html.",
            "histodetect evaluate runs/cpu --data stores/pcam-jpeg:valid --tta 8", _cmd_evaluate)
    p.add_argument("run", type=Path, help="a run folder made by 'histodetect train'")
    p.add_argument("--data", help="STORE[:split] (default: the run's store; its test split if labelled, else valid)")
    p.add_argument("--tta", type=int, default=1, choices=TTA_CHOICES, help=TTA_HELP)
    p.add_argument("--out", type=Path, help="folder for the report (default: RUN/eval-SPLIT-ttaN, or RUN/eval-STORE-SPLIT-ttaN "
                        "for a store the run was not trained on); an earlier report there is replaced")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the AUC interval")
    p.add_argument("--mc", type=int, default=0, metavar="N",
                   help="also N MC-dropout passes per patch (needs a model with dropout); adds their spread to triage")
    p.add_argument("--seed", type=int, default=0, help="seed of the MC-dropout masks")
    add_device_options(p)
    p.add_argument("--json", action="store_true", help="print metrics.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("predict", "Score patches with a run: a CSV id,prob,pred or a Kaggle submission.",
            "histodetect predict runs/cpu kaggle/test --out submission.csv --kaggle-submission --tta 8", _cmd_predict)
    p.add_argument("run", type=Path, help="a run folder made by 'histodetect train'")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                   help="a store, an image folder, image files or a PCam h5 file")
    p.add_argument("--out", type=Path, required=True, help="CSV file to write")
    p.add_argument("--tta", type=int, default=1, choices=TTA_CHOICES, help=TTA_HELP)
    p.add_argument("--split", help="only this split of a store or folder")
    p.add_argument("--kaggle-submission", action="store_true", help="write exactly id,label (label = probability)")
    p.add_argument("--batch-size", type=int, default=256)
    add_device_options(p)
    p.add_argument("--engine", default="torch", choices=("torch", "onnx"),
                   help="onnx: run RUN/model.onnx (or an exported .onnx file given as RUN) through ONNX Runtime")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--uncertainty", action="store_true",
                   help="add doubt and entropy_bits, and prob_sd_tta / prob_sd_mc with --tta / --mc")
    p.add_argument("--mc", type=int, default=0, metavar="N",
                   help="MC-dropout: N passes with dropout on (needs a model with dropout); prob is their mean")
    p.add_argument("--review-above", type=float, metavar="U",
                   help="add a column decision: tumour, normal, or review where the uncertainty is above U (e.g. 0.5)")
    p.add_argument("--review-by", default="doubt", metavar="UNCERTAINTY",
                   help="doubt (closeness to the threshold, default), entropy, tta_sd (needs --tta) or mc_sd (needs --mc)")
    p.add_argument("--resize", action="store_true", help="resize images that are not 96x96 instead of refusing them")
    p.add_argument("--seed", type=int, default=0, help="seed of the MC-dropout masks")

    p = add("explain", "Class activation maps: where in each patch the model found tumour, centre outlined.",
            "histodetect explain runs/cpu patches/*.tif --out explained --method gradcam++", _cmd_explain)
    p.add_argument("run", type=Path, help="a run folder made by 'histodetect train'")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE",
                   help="image files, an image folder, a store or a PCam h5 file")
    p.add_argument("--out", type=Path, required=True,
                   help="folder to write: one overlay PNG per patch, contact sheets, explanations.csv")
    p.add_argument("--method", default="gradcam", help="gradcam (default), gradcam++ or hirescam")
    p.add_argument("--layer", help="module to explain at (default: the backbone's last feature map)")
    p.add_argument("--split", help="only this split of a store or folder")
    p.add_argument("--resize", action="store_true", help="resize images that are not 96x96 instead of refusing them")
    add_device_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("calibrate", "Fit temperature scaling on a validation split and store it in the run.",
            "histodetect calibrate runs/cpu --data stores/pcam-jpeg:valid", _cmd_calibrate)
    p.add_argument("run", type=Path, help="a run folder made by 'histodetect train'")
    p.add_argument("--data", help="STORE[:split] (default: the run's store and validation split)")
    p.add_argument("--tta", type=int, default=1, choices=TTA_CHOICES,
                   help="fit on the mean of this many test-time views (default 1; see evaluate --tta)")
    add_device_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("export", "Export a run to ONNX or TorchScript, checked against PyTorch on real patches.",
            "histodetect export runs/cpu --format onnx --out runs/cpu/model.onnx", _cmd_export)
    p.add_argument("run", type=Path, help="a run folder made by 'histodetect train'")
    p.add_argument("--format", default="onnx", choices=("onnx", "torchscript"), help="default onnx")
    p.add_argument("--out", type=Path, help="file to write (default: RUN/model.onnx, or RUN/model.pt for torchscript)")
    p.add_argument("--check-data", type=Path, metavar="INPUT",
                   help="real patches to check the export on (default: the run's store, else ../shared/data)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="weights to export (default best)")

    p = add("serve", "Serve a run: a web page at / and a REST API (POST /v1/predict; docs at /docs).",
            "histodetect serve runs/cpu --port 8000", _cmd_serve)
    p.add_argument("run", type=Path, help="a run folder made by 'histodetect train'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--resize", action="store_true", default=None,
                   help="resize images that are not 96x96 (default: refuse them with 422)")
    p.add_argument("--tta", type=int, choices=TTA_CHOICES,
                   help="test-time views per patch when a request does not say (default 1; see evaluate --tta)")
    p.add_argument("--max-upload-bytes", type=int, help="bigger request bodies get 413 (default 16 MiB)")
    p.add_argument("--max-files", type=int, help="patches per request (default 256)")
    p.add_argument("--max-image-pixels", type=int,
                   help="images whose header announces more pixels are refused before decoding (default 1048576)")
    p.add_argument("--max-batch-patches", type=int, help="patches the model scores at once across requests (default 256)")
    p.add_argument("--max-wait-ms", type=float, help="how long a batch waits for more requests (default 2)")
    p.add_argument("--max-queued-patches", type=int,
                   help="queued patches before answering 503 (default 4096), also counted as work at --tta: "
                        "a patch asked for with more views counts for more (at --tta 8, a patch at 72 views "
                        "counts as 9), a Grad-CAM overlay as 8 views more")
    add_device_options(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: one per core)")
    p = add("slide", "Whole slides: find the tissue, score it tile by tile, write a tumour heatmap, regions and a summary.",
            "histodetect slide runs/cpu slides/node_01.svs --out results/node_01 --stride 48", _cmd_slide)
    p.add_argument("run", type=Path, help="a run folder made by 'histodetect train'")
    p.add_argument("slides", nargs="+", metavar="SLIDE",
                   help="a slide (.svs, .tif, .ndpi, ...), a folder of slides or a quoted pattern ('slides/*.svs'); "
                        "several slides give one folder each under --out and a table slides.csv")
    p.add_argument("--out", type=Path, required=True, help="folder for the results")
    p.add_argument("--stride", type=int, help="pixels at PCam's 0.97 um/px between tiles "
                   "(1-96; default 96: side by side; 32: one tile per PCam label region, 9x the work; "
                   "at most 20 million tiles a slide)")
    p.add_argument("--mpp", type=float, help="micrometres per level-0 pixel, for a slide whose metadata lacks it "
                   "(0.25 at 40x, 0.5 at 20x)")
    p.add_argument("--roi", metavar="X,Y,W,H", help="only this region, in level-0 pixels")
    p.add_argument("--threshold", type=float, help="tumour regions are tiles with at least this probability "
                   "(default: the run's threshold for --tta views, chosen on validation)")
    p.add_argument("--min-tissue", type=float, help="score a tile when at least this share of it is tissue (default 0.25)")
    p.add_argument("--tta", type=int, choices=TTA_CHOICES,
                   help="test-time views averaged per tile (default 1; see evaluate --tta)")
    p.add_argument("--batch-size", type=int, help="tiles per inference batch (default 256)")
    p.add_argument("--workers", type=int, help="processes reading the slide (default 0: the main process reads, "
                   "fastest on a 2-core CPU, see benchmarks/slide_speed.py)")
    add_device_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace results made with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser
