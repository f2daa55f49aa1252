"""The error type of problems with what the user asked for, as opposed to bugs.

A `UserError`'s message names the problem and its fix; the command line (vdm/main.py) prints
it as one message without a traceback. Library errors of this kind subclass it alongside the
builtin type callers already catch (DatasetNotPreparedError is also a FileNotFoundError).
"""


class UserError(Exception):
    """A wrong setting, a missing file or an unusable workdir; the message says what to do."""
