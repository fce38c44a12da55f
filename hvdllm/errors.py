"""The one exception type for bad input.

Anything the user can fix - a job file, an override, a data source, a checkpoint path, a launch
that does not fit the job - raises UserError with a one-line message. The CLI prints that line
and exits with status 2. Every other exception is a bug or a failure and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input; the message is one line meant for the user."""
