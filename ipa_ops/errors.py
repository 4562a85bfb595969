"""The one error type the CLI prints as a single line instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix; the message names the thing (file, row id, YAML path) and what to do."""


class RunStopped(UserError):
    """A run ended early because it was asked to (SIGTERM, Ctrl-C); what it committed is kept.

    `exit_code` follows the shell convention 128 + signal number (143 for SIGTERM, 130 for SIGINT),
    so a scheduler tells a stopped run from a failed one (exit 1 or 2).
    """

    def __init__(self, message: str, signum: int = 15):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
