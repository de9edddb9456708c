"""The one exception type for user mistakes.

A `UserError` carries one line that names the file (or flag) and says what was
expected, what was found and how to fix it. The CLI prints it without a
traceback and exits with status 2; the web service answers 4xx with it.
Everything else is a bug and is left to propagate.
"""


class UserError(Exception):
    """A mistake in the user's input: a bad file, flag, or combination of them."""
