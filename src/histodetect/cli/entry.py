"""The entry point `main`: parse the arguments, run one command, turn its errors into exit codes."""

from __future__ import annotations

import os
import signal
import sys
import warnings

from tqdm import tqdm

from ..errors import Interrupted, UserError, install_handlers, restore_handlers
from .parser import build_parser


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # tqdm.write clears a progress bar first and draws it again below: a plain print
    # appended the warning to the bar's line.
    tqdm.write(f"histodetect: warning: {message}", file=sys.stderr)


def _terminated(number: int, frame) -> None:
    raise Interrupted("", number)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _print_warning
    # SIGTERM (a scheduler's limit, `kill`) cleans up as Ctrl-C does: partial outputs are removed,
    # not left behind as hidden folders. Not under torchrun, which sends it to stop the other
    # processes: one waiting in a collective would take its handler only when that returns.
    catch_term = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and "TORCHELASTIC_RUN_ID" not in os.environ
    replaced = install_handlers(_terminated, (signal.SIGTERM,)) if catch_term else {}
    try:
        args.func(args)
    except UserError as exc:
        print(f"histodetect: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # an Interrupted says what was saved and how to go on
        print(f"histodetect: interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    except BrokenPipeError:  # `histodetect info X | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as exc:  # the disk or the system said no (full, read-only, permissions): one line
        print(f"histodetect: error: {exc}", file=sys.stderr)
        return 1
    finally:
        restore_handlers(replaced)
    return 0
