"""The one exception type for user mistakes, the type checks of the options a function takes, and
Interrupted with the signal handlers that raise it.

A `UserError` carries one line that names the file (or flag) and says what was
expected, what was found and how to fix it. The CLI prints it without a
traceback and exits with status 2; the web service answers 4xx with it.
Everything else is a bug and is left to propagate.
"""

from __future__ import annotations

import numbers
import signal
import threading


class UserError(Exception):
    """A mistake in the user's input: a bad file, flag, or combination of them."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, after the work so far was saved: the one line says how to go on.

    A KeyboardInterrupt, so that a notebook's "interrupt the kernel" ends as it always does;
    the CLI prints the line and exits with 128 + the signal's number.
    """

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def install_handlers(handler, numbers=STOP_SIGNALS) -> dict:
    """`handler` for each of `numbers` not ignored by a parent (`nohup`), in the main thread only
    (Python delivers signals nowhere else); returns the handlers it replaced, for restore_handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {number: signal.signal(number, handler) for number in numbers
            if signal.getsignal(number) is not signal.SIG_IGN}


def restore_handlers(previous: dict) -> None:
    for number, handler in previous.items():
        # None: a handler not set from Python; the default is the closest there is
        signal.signal(number, handler if handler is not None else signal.SIG_DFL)


# From Python, a str "8", a float or True where a count goes failed deep inside as a TypeError,
# or ran (True as 1). numpy's numbers (a sweep's np.arange) are taken, as Python's: as they were,
# numpy's ints could not go into a JSON file (a store's manifest, metrics.json, summary.json).
def check_int(flag: str, value) -> int:
    """`value` as an int, else a UserError naming `flag` (e.g. `--tta '8': expected an int, found str`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{flag} {value!r}: expected an int, found {type(value).__name__}")
    return int(value)


def check_number(flag: str, value) -> int | float:
    """`value` as an int or float, else a UserError naming `flag` (a bool and a str are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{flag} {value!r}: expected a number, found {type(value).__name__}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_bool(flag: str, value) -> bool:
    """`value` as a bool (numpy's too), else a UserError naming `flag` (e.g. `--resize 'no': expected True or False`).

    A str "no" was true, and numpy's bool_ could not go into a JSON file (a store's manifest, after
    decoding every patch; /v1/model).
    """
    # numpy's bool by name: importing numpy here would slow every command's start (the CLI imports this first)
    is_numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not (isinstance(value, bool) or is_numpy_bool):
        raise UserError(f"{flag} {value!r}: expected True or False, found {type(value).__name__}")
    return bool(value)
