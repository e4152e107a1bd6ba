"""`UserError`: the base of every error that is the user's to fix (bad data, settings, paths).

A leaf without dependencies, so the data and io readers can raise it without importing torch; the one
place that prints it is `minispin.log.run_main` (one line, once over all ranks, no traceback).
"""


class UserError(ValueError):
    """A mistake in the user's input (a data row, a setting, a path): reported as one line, no traceback.
    The message says what is wrong and where (file, 1-based row, key) and how to fix it. exit_code: the
    process's exit status (2 for usage errors)."""
    exit_code = 1
