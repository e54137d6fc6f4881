"""User-facing errors.

A `UserError` is a problem with the user's input (a file, a flag, a config). Entry scripts print
its message as one line, without a traceback, and exit with status 2. The message names the
file or flag involved and, where one exists, the fix.
"""


class UserError(Exception):
    """Bad input from the user; the message is a complete one-line explanation."""
