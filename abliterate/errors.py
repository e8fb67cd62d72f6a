"""The one error type for user mistakes.

Library code raises `UserError` with a message that says what went wrong and which flag or file fixes it.
The CLI's single top-level handler turns it into a one-line message and a non-zero exit code.
"""


class UserError(Exception):
    """A mistake the user can fix: a bad flag, file, model or environment. The message names the fix."""
