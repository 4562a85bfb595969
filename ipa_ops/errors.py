"""The one error type the CLI prints as a single line instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix; the message names the thing (file, row id, YAML path) and what to do."""
