"""The one base class of the errors a user can fix (a bad config, input file, cache, checkpoint or output place).

`saeforge.cli` turns any of these, and the operating system's file errors, into one line on stderr and exit code 2;
every other exception is a bug and keeps its traceback. Each message names the file, field or entry at fault and
what was expected.
"""


class UserError(Exception):
    """Something the user caused and can fix; the message alone must say what and where."""
