"""Handlers of the training commands: presets, train."""

from __future__ import annotations

import argparse
import os

from ..errors import UserError


def _cmd_presets(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from ..presets import PRESETS

    names = list(PRESETS)
    rows = asdict(PRESETS[names[0]]).keys()
    width = max(len(r) for r in rows)
    print(f"{'':<{width}}  " + "  ".join(f"{n:>17}" for n in names))
    for row in rows:
        values = [asdict(PRESETS[n])[row] for n in names]
        print(f"{row:<{width}}  " + "  ".join(f"{str(v):>17}" for v in values))


def _train_overrides(args: argparse.Namespace) -> dict:
    from dataclasses import fields

    from ..presets import TrainConfig

    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}


def _cmd_train(args: argparse.Namespace) -> None:
    from ..train import fit, preset_config

    if args.resume:
        from ..train.loop import RESUME_SETTINGS

        overrides = _train_overrides(args)
        settings = {name: value for name, value in overrides.items() if name in RESUME_SETTINGS}
        if len(settings) < len(overrides) or args.out or args.preset is not None or args.overwrite:
            flags = ", ".join("--" + name.replace("_", "-") for name in RESUME_SETTINGS)
            raise UserError("--resume RUN continues a run with its saved config; drop --out and the overrides, "
                            f"--preset and --overwrite too (--data may say where its store is now; {flags} may change)")
        result = fit(None, args.data, args.resume, resume=True, resume_settings=settings)
    else:
        if not args.data or not args.out:
            raise UserError("train needs --data STORE and --out RUN (or --resume RUN)")
        # None when not given, so that --resume can refuse one; --preset '' is an unknown preset, not the default
        preset = "default" if args.preset is None else args.preset
        config = preset_config(preset, **_train_overrides(args))
        result = fit(config, args.data, args.out, overwrite=args.overwrite, preset=preset)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only the first process validates and reports
        print(f"run {result.run_dir}: best validation AUC {result.best_auc:.4f} after {result.epochs_run} epochs "
              f"({result.stopped_because})")
