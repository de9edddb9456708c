"""The `histodetect` command: one public API call per subcommand.

Heavy imports (torch, timm) happen inside the subcommands that need them, so
that `histodetect --help`, `prepare` and `info` start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import UserError


def _example(text: str) -> str:
    return "example:\n  " + text


def _cmd_synth(args: argparse.Namespace) -> None:
    from .data.synthetic import write_synthetic

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
        print(f"  made a stratified validation split ({args.valid_fraction:.0%} of train, seed {args.seed})")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
