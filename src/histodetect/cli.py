"""The `histodetect` command: one public API call per subcommand.

Heavy imports (torch, timm) happen inside the subcommands that need them, so
that `histodetect --help`, `prepare` and `info` start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import UserError

# augment.TTA_VIEW_COUNTS, spelt here so that --help does not import torch (a test keeps them equal).
TTA_CHOICES = (1, 4, 8, 40, 72)
TTA_HELP = ("test-time views averaged per patch: 1, 4 or 8 dihedral views of the centre crop; "
            "40 or 72 add those of crops moved by the training shift")


def _example(text: str) -> str:
    return "example:\n  " + text


def _cmd_synth(args: argparse.Namespace) -> None:
    from .data.synthetic import write_synthetic
    from .outputs import check_folder_location

    check_folder_location(args.out)
    out = write_synthetic(args.out, args.n, format=args.format, seed=args.seed, unlabelled=args.unlabelled)
    print(f"wrote {args.n} synthetic patches ({args.format} layout) to {out}")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from .data.store import prepare

    report = prepare(
        args.src, args.out, format=args.format, overwrite=args.overwrite, dedupe=args.dedupe,
        resize=args.resize, skip_bad=args.skip_bad, valid_fraction=args.valid_fraction,
        seed=args.seed, workers=args.workers, progress=not args.quiet,
    )
    rate = report.n_patches / max(report.seconds, 1e-9)
    print(f"stored {report.n_patches} patches in {report.store} ({report.seconds:.1f} s, {rate:,.0f} patches/s)")
    for split, c in report.counts.items():
        print(f"  {split:>6}: {c['n']:>7}  positive {c['positive']}  negative {c['negative']}  unlabelled {c['unlabelled']}")
    if report.made_validation_split:
        kept = report.counts.get("train", {})
        n_train = kept.get("positive", 0) + kept.get("negative", 0) + report.n_moved_to_valid
        how = "whole slides, stratified" if report.moved_by_slide else "stratified"
        print(f"  made a validation split: moved {report.n_moved_to_valid} of {n_train} train patches "
              f"({report.n_moved_to_valid / max(n_train, 1):.0%}; {how}; --valid-fraction {args.valid_fraction}, seed {args.seed})")
    if report.kaggle_ids_checked:
        n_ok = report.kaggle_ids_checked - len(report.kaggle_id_mismatches)
        print(f"  Kaggle ids equal to their pixel SHA-1: {n_ok} of {report.kaggle_ids_checked}")
    if report.n_deduplicated:
        print(f"  removed {report.n_deduplicated} exact duplicates (--dedupe)")
    if report.n_resized:
        print(f"  resized {report.n_resized} patches to 96x96")
    if report.skipped:
        print(f"  skipped {len(report.skipped)} bad files, listed in {report.store / 'skipped.csv'}")


def _cmd_info(args: argparse.Namespace) -> None:
    from .data.store import describe_store, open_store

    info = describe_store(open_store(args.store))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{info['store']}: {info['n_patches']} patches from {info['source']['format']} {info['source']['path']}")
        print(f"  fingerprint {info['fingerprint']}")
        for split, s in info["splits"].items():
            balance = "" if s["positive_fraction"] is None else f"  {s['positive_fraction']:.1%} positive"
            print(f"  {split:>6}: {s['n']:>7}  positive {s['positive']}  negative {s['negative']}"
                  f"  unlabelled {s['unlabelled']}{balance}  duplicates {s['duplicates']}")
        print(f"  exact duplicates within splits: {info['duplicates']}")
        print(f"  patches shared across splits: {info['shared_across_splits']}")
    if info["shared_across_splits"]:
        pairs = ", ".join(f"{pair}: {n}" for pair, n in info["shared_pairs"].items())
        print(
            f"WARNING: {info['shared_across_splits']} patches appear in more than one split ({pairs}). "
            "That is a leak: scores on the later split are optimistic. Prepare again with --dedupe.",
            file=sys.stderr,
        )


def _cmd_download(args: argparse.Namespace) -> None:
    from .data.download import DEFAULT_BASE_URL, download_pcam

    paths = download_pcam(args.root, base_url=args.base_url or DEFAULT_BASE_URL, progress=not args.quiet)
    print(f"PCam is complete in {args.root} ({len(paths)} files); next: histodetect prepare {args.root} --out STORE")


def _cmd_presets(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from .presets import PRESETS

    names = list(PRESETS)
    rows = asdict(PRESETS[names[0]]).keys()
    width = max(len(r) for r in rows)
    print(f"{'':<{width}}  " + "  ".join(f"{n:>17}" for n in names))
    for row in rows:
        values = [asdict(PRESETS[n])[row] for n in names]
        print(f"{row:<{width}}  " + "  ".join(f"{str(v):>17}" for v in values))


def _train_overrides(args: argparse.Namespace) -> dict:
    from dataclasses import fields

    from .presets import TrainConfig

    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}


def _cmd_train(args: argparse.Namespace) -> None:
    from .train import fit, preset_config

    if args.resume:
        from .train.loop import RESUME_SETTINGS

        overrides = _train_overrides(args)
        settings = {name: value for name, value in overrides.items() if name in RESUME_SETTINGS}
        if len(settings) < len(overrides) or args.out:
            flags = ", ".join("--" + name.replace("_", "-") for name in RESUME_SETTINGS)
            raise UserError("--resume RUN continues a run with its saved config; drop --out and the overrides "
                            f"(--data may say where its store is now; {flags} may change)")
        result = fit(None, args.data, args.resume, resume=True, resume_settings=settings)
    else:
        if not args.data or not args.out:
            raise UserError("train needs --data STORE and --out RUN (or --resume RUN)")
        config = preset_config(args.preset, **_train_overrides(args))
        result = fit(config, args.data, args.out, overwrite=args.overwrite, preset=args.preset)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only the first process validates and reports
        print(f"run {result.run_dir}: best validation AUC {result.best_auc:.4f} after {result.epochs_run} epochs "
              f"({result.stopped_because})")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate_run, parse_data_arg

    if args.bootstrap < 100:
        raise UserError(f"--bootstrap {args.bootstrap}: expected 100 resamples or more for a 95% interval "
                        "(1000, the default, is usual)")
    data, split = parse_data_arg(args.data) if args.data else (None, None)
    metrics = evaluate_run(args.run, data, split=split, tta=args.tta, out=args.out, device=args.device,
                           fp32=args.fp32, n_boot=args.bootstrap, mc_passes=args.mc, seed=args.seed)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return
    low, high = metrics["roc_auc_ci"]
    print(f"{metrics['store']}:{metrics['split']}  TTA {metrics['tta']}  n={metrics['n']}")
    print(f"  ROC AUC {metrics['roc_auc']:.4f} [{low:.4f}, {high:.4f}]  accuracy {metrics['accuracy']:.4f} "
          f"(threshold {metrics['threshold']:.3f}; {metrics['accuracy_at_0.5']:.4f} at 0.5)")
    print(f"  balanced accuracy {metrics['balanced_accuracy']:.4f}  F1 {metrics['f1']:.4f}  sensitivity "
          f"{metrics['sensitivity']:.4f}  specificity {metrics['specificity']:.4f}")
    if metrics["temperature"] != 1:
        calibration = (f" (before temperature scaling: NLL {metrics['nll_uncalibrated']:.4f}, "
                       f"ECE {metrics['ece_uncalibrated']:.4f})")
    else:
        calibration = " (not calibrated: see 'histodetect calibrate')"
    print(f"  NLL {metrics['nll']:.4f}  ECE {metrics['ece']:.4f}{calibration}  Brier {metrics['brier']:.4f}")
    half = next(row for row in metrics["accuracy_coverage"] if row["coverage"] == 0.5)
    print(f"  accuracy on the most confident half, by {metrics['triage_uncertainty']}: {half['accuracy']:.4f}")
    print(f"  report: {metrics['report']}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from .predict import load_run, predict_to_csv

    if args.engine == "onnx":
        from .export import load_exported_run

        if args.device not in ("auto", "cpu"):
            raise UserError(f"--engine onnx runs on the CPU (ONNX Runtime); drop --device {args.device}")
        if args.mc:
            raise UserError(f"--mc {args.mc}: MC-dropout needs the PyTorch engine (the ONNX export runs the model "
                            "without dropout); drop --engine onnx or --mc")
        run = load_exported_run(args.run)
    else:
        run = load_run(args.run, device=args.device, fp32=args.fp32)
    path, n = predict_to_csv(run, args.inputs, args.out, tta=args.tta, split=args.split,
                             kaggle_submission=args.kaggle_submission, batch_size=args.batch_size,
                             progress=not args.quiet, uncertainty=args.uncertainty, mc_passes=args.mc,
                             review_above=args.review_above, review_by=args.review_by, resize=args.resize,
                             seed=args.seed)
    kind = "Kaggle submission" if args.kaggle_submission else "predictions"
    from .outputs import is_stdout

    # With the CSV on stdout, the summary goes to stderr: a reader of the pipe gets the CSV alone.
    print(f"wrote {kind} for {n} patches to {path}", file=sys.stderr if is_stdout(path) else sys.stdout)


def _cmd_explain(args: argparse.Namespace) -> None:
    from .explain import check_explain_out, write_explanations
    from .predict import load_run

    check_explain_out(Path(args.out), Path(args.run))  # before the model loads
    run = load_run(args.run, device=args.device, fp32=args.fp32)
    report = write_explanations(run, args.images, args.out, method=args.method, layer=args.layer,
                                split=args.split, resize=args.resize, progress=not args.quiet)
    sheets = f", {len(report.sheets)} contact sheet(s)" if report.sheets else ""
    print(f"wrote {report.method} overlays of {report.n_patches} patches (layer {report.layer}){sheets} "
          f"and explanations.csv to {report.out}")


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from .evaluate import parse_data_arg
    from .explain import calibrate_run

    data, split = parse_data_arg(args.data) if args.data else (None, None)
    record = calibrate_run(args.run, data, split=split, tta=args.tta, device=args.device, fp32=args.fp32)
    print(f"{args.run}: temperature {record['temperature']:.4f}, fitted on {record['store']}:{record['split']} "
          f"({record['n']} patches)")
    # runs trained before a view count had its own threshold use the largest smaller count's
    views = str(max(int(v) for v in record["thresholds"] if int(v) <= args.tta))
    print(f"  NLL {record['nll_before']:.4f} -> {record['nll_after']:.4f}  ECE {record['ece_before']:.4f} -> "
          f"{record['ece_after']:.4f}  threshold (TTA {views}) {record['uncalibrated_thresholds'][views]:.3f} -> "
          f"{record['thresholds'][views]:.3f}")
    print("  stored in run.json: predict, evaluate and explain apply it from now on")


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import MAX_PROB_DIFF, export_run

    report = export_run(args.run, format=args.format, out=args.out, check_data=args.check_data,
                        checkpoint=args.checkpoint)
    print(f"wrote {report.format} model to {report.path} ({report.path.stat().st_size / 1e6:.1f} MB, "
          f"{report.seconds:.1f} s)")
    print(f"  checked: its probabilities equal PyTorch's on {report.n_checked} real patches from "
          f"{report.checked_on} (max |difference| {report.max_abs_prob_diff:.1e} < {MAX_PROB_DIFF:.0e})")


def _cmd_serve(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from .serve import ServeConfig, serve_run

    limits = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if getattr(args, f.name, None) is not None}
    serve_run(args.run, host=args.host, port=args.port, config=ServeConfig(**limits), device=args.device,
              threads=args.threads, fp32=args.fp32)


def _cmd_slide(args: argparse.Namespace) -> None:
    from .outputs import check_folder_location
    from .predict import load_run
    from .slide import SlideConfig, analyse_slides, parse_roi

    options = dict(stride_px=args.stride, tta=args.tta, mpp=args.mpp, threshold=args.threshold,
                   min_tissue_fraction=args.min_tissue, batch_size=args.batch_size, workers=args.workers,
                   roi=parse_roi(args.roi) if args.roi else None)
    config = SlideConfig(**{k: v for k, v in options.items() if v is not None})
    check_folder_location(args.out)  # before the model loads and the slide is read
    run = load_run(args.run, device=args.device, fp32=args.fp32)
    report = analyse_slides(run, args.slides, args.out, config, overwrite=args.overwrite, progress=not args.quiet)
    for result in report.results:
        s = result.summary
        done = " (already done)" if result.reused else ""
        if s["tiles_read"] == 0:
            print(f"{result.slide}: {s['message']}{done} -> {result.out_dir}")
        else:
            print(f"{result.slide}: {s['tiles_read']} tiles, max prob {s['max_prob']:.3f}, mean {s['mean_prob']:.3f}, "
                  f"{s['n_regions']} regions >= {s['threshold']:.2f} ({s['tumour_area_mm2']:.3f} mm^2), "
                  f"{s['seconds']:.0f} s{done} -> {result.out_dir}")
    for slide, reason in report.failed:
        print(f"{slide}: failed: {reason}", file=sys.stderr)
    n_slides = len(report.results) + len(report.failed)
    if report.table:
        print(f"table of the {n_slides} slides: {report.table}")
    if report.failed:
        raise UserError(f"{len(report.failed)} of {n_slides} slides failed (above, and in {report.table}); "
                        "the others are done; fix or remove those and rerun to finish")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, overriding the preset's value."""
    from dataclasses import MISSING, fields

    from .presets import OPTION_HELP, TrainConfig

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
    p.add_argument("--preset", default="default", help="seed-xception, seed-mobilenetv2, default or cpu (default: default)")
    p.add_argument("--out", type=Path, help="run folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run at --out")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue a stopped run where it stopped (with its own config; only --device, --threads, --val-batch-size, --profile and --checkpoint-minutes may change)")
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
    p.add_argument("--max-queued-patches", type=int, help="queued patches before answering 503 (default 4096)")
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
                   "(default 96: side by side; 32: one tile per PCam label region, 9x the work)")
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


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"histodetect: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _print_warning
    try:
        args.func(args)
    except UserError as exc:
        print(f"histodetect: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("histodetect: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `histodetect info X | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as exc:  # the disk or the system said no (full, read-only, permissions): one line
        print(f"histodetect: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
