"""Handlers of the data commands: synth, prepare, info, download."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_synth(args: argparse.Namespace) -> None:
    from ..data.synthetic import write_synthetic
    from ..outputs import check_folder_location

    check_folder_location(args.out)
    out = write_synthetic(args.out, args.n, format=args.format, seed=args.seed, unlabelled=args.unlabelled)
    print(f"wrote {args.n} synthetic patches ({args.format} layout) to {out}")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from ..data.store import prepare

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
    from ..data.store import describe_store, open_store

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
    from ..data.download import DEFAULT_BASE_URL, download_pcam

    paths = download_pcam(args.root, base_url=args.base_url or DEFAULT_BASE_URL, progress=not args.quiet)
    print(f"PCam is complete in {args.root} ({len(paths)} files); next: histodetect prepare {args.root} --out STORE")
