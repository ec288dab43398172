"""The one exception type for user mistakes.

A `UserError` carries a single sentence for a person: what is wrong (naming the file, key or value)
and what to do. The CLI prints it to stderr and exits with code 2, without a traceback. Any other
exception is our bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: bad file, bad config value, mismatched checkpoint, ..."""

    exit_code = 2
