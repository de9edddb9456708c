"""Handlers of the commands that use a trained run: evaluate, predict, explain, calibrate, export, serve, slide."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError

MAX_BOOTSTRAP = 100_000


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from ..evaluate import evaluate_run, parse_data_arg

    if args.bootstrap < 100:
        raise UserError(f"--bootstrap {args.bootstrap}: expected 100 resamples or more for a 95% interval "
                        "(1000, the default, is usual)")
    # The interval is stable long before: --bootstrap 100000000 still ran after 2 minutes on 120 patches.
    if args.bootstrap > MAX_BOOTSTRAP:
        raise UserError(f"--bootstrap {args.bootstrap}: expected at most {MAX_BOOTSTRAP:,} resamples "
                        "(1000, the default, is usual)")
    data, split = parse_data_arg(args.data) if args.data else (None, None)
    metrics = evaluate_run(args.run, data, split=split, tta=args.tta, out=args.out, device=args.device,
                           fp32=args.fp32, n_boot=args.bootstrap, mc_passes=args.mc, seed=args.seed,
                           progress=not args.quiet)
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
    from ..predict import load_run, predict_to_csv

    if args.engine == "onnx":
        from ..export import load_exported_run

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
    from ..outputs import is_stdout

    # With the CSV on stdout, the summary goes to stderr: a reader of the pipe gets the CSV alone.
    print(f"wrote {kind} for {n} patches to {path}", file=sys.stderr if is_stdout(path) else sys.stdout)


def _cmd_explain(args: argparse.Namespace) -> None:
    from ..explain import check_explain_out, write_explanations
    from ..predict import load_run

    check_explain_out(Path(args.out), Path(args.run))  # before the model loads
    run = load_run(args.run, device=args.device, fp32=args.fp32)
    report = write_explanations(run, args.images, args.out, method=args.method, layer=args.layer,
                                split=args.split, resize=args.resize, progress=not args.quiet)
    sheets = f", {len(report.sheets)} contact sheet(s)" if report.sheets else ""
    print(f"wrote {report.method} overlays of {report.n_patches} patches (layer {report.layer}){sheets} "
          f"and explanations.csv to {report.out}")


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from ..evaluate import parse_data_arg
    from ..explain import calibrate_run

    data, split = parse_data_arg(args.data) if args.data else (None, None)
    record = calibrate_run(args.run, data, split=split, tta=args.tta, device=args.device, fp32=args.fp32,
                           progress=not args.quiet)
    print(f"{args.run}: temperature {record['temperature']:.4f}, fitted on {record['store']}:{record['split']} "
          f"({record['n']} patches)")
    # runs trained before a view count had its own threshold use the largest smaller count's
    views = str(max(int(v) for v in record["thresholds"] if int(v) <= args.tta))
    print(f"  NLL {record['nll_before']:.4f} -> {record['nll_after']:.4f}  ECE {record['ece_before']:.4f} -> "
          f"{record['ece_after']:.4f}  threshold (TTA {views}) {record['uncalibrated_thresholds'][views]:.3f} -> "
          f"{record['thresholds'][views]:.3f}")
    print("  stored in run.json: predict, evaluate, explain, slide, export and serve apply it from now on")


def _cmd_export(args: argparse.Namespace) -> None:
    from ..export import INPUT_NAME, MAX_PROB_DIFF, OUTPUT_NAMES, TORCHSCRIPT_EXTRA_FILE, export_run

    report = export_run(args.run, format=args.format, out=args.out, check_data=args.check_data,
                        checkpoint=args.checkpoint)
    print(f"wrote {report.format} model to {report.path} ({report.path.stat().st_size / 1e6:.1f} MB, "
          f"{report.seconds:.1f} s)")
    print(f"  checked: its probabilities equal PyTorch's on {report.n_checked} real patches from "
          f"{report.checked_on} (max |difference| {report.max_abs_prob_diff:.1e} < {MAX_PROB_DIFF:.0e})")
    # What a service that runs the file without histodetect must do, so nobody reads our source for it.
    meta = report.metadata
    side_px = meta.crop_px or meta.patch_size_px
    crop = f"the centre {side_px}x{side_px} px" if meta.crop_px else "the whole patch"
    print(f"  input '{INPUT_NAME}': float32 (N, 3, {side_px}, {side_px}), any N: uint8 RGB {meta.patch_size_px}x"
          f"{meta.patch_size_px} patches, {crop}, (x / 255 - mean) / std with mean {meta.mean}, std {meta.std}")
    print(f"  outputs '{OUTPUT_NAMES[0]}' and '{OUTPUT_NAMES[1]}' = sigmoid(logit / {meta.temperature:.6g}), (N, 1); "
          f"tumour where {OUTPUT_NAMES[1]} >= {meta.threshold:.6g} (one view; the mean of k TTA views: 'thresholds')")
    where = ("its metadata_props" if report.format == "onnx"
             else f"its extra file {TORCHSCRIPT_EXTRA_FILE} (torch.jit.load's _extra_files)")
    print(f"  all of it is in {where}, each value JSON")


def _cmd_serve(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from ..serve import ServeConfig, serve_run

    limits = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if getattr(args, f.name, None) is not None}
    serve_run(args.run, host=args.host, port=args.port, config=ServeConfig(**limits), device=args.device,
              threads=args.threads, fp32=args.fp32)


def _cmd_slide(args: argparse.Namespace) -> None:
    from ..outputs import check_folder_location
    from ..predict import load_run
    from ..slide import SlideConfig, analyse_slides, parse_roi

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
            regions = f"{s['n_regions']} region{'' if s['n_regions'] == 1 else 's'}"
            print(f"{result.slide}: {s['tiles_read']} tiles, max prob {s['max_prob']:.3f}, mean {s['mean_prob']:.3f}, "
                  f"{regions} >= {s['threshold']:.2f} ({s['tumour_area_mm2']:.3f} mm^2), "
                  f"{s['seconds']:.0f} s{done} -> {result.out_dir}")
    for slide, reason in report.failed:
        print(f"{slide}: failed: {reason}", file=sys.stderr)
    n_slides = len(report.results) + len(report.failed)
    if report.table:
        print(f"table of the {n_slides} slides: {report.table}")
    if report.failed:
        raise UserError(f"{len(report.failed)} of {n_slides} slides failed (above, and in {report.table}); "
                        "the others are done; fix or remove those and rerun to finish")
