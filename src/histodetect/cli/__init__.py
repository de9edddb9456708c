"""The `histodetect` command: one public API call per subcommand.

Heavy imports (torch, timm) happen inside the subcommands that need them, so
that `histodetect --help`, `prepare` and `info` start fast.

The package, in the order a command meets it:

    entry.py           main(): parse, run one command, turn its errors into exit codes
    parser.py          build_parser(): one subparser per command, each pointing at its handler
    data_commands.py   synth, prepare, info, download
    train_commands.py  presets, train
    run_commands.py    the commands that use a trained run: evaluate, predict, explain,
                       calibrate, export, serve, slide
"""

from .entry import main
from .parser import TTA_CHOICES, TTA_HELP, build_parser

__all__ = ["TTA_CHOICES", "TTA_HELP", "build_parser", "main"]
