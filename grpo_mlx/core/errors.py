"""The one exception type for errors a user can cause and fix."""


class UserError(Exception):
    """A problem with the user's input: path, data set, config value, plug-in.

    The message is one line that names the problem and the fix; the CLI prints
    it without a traceback and exits with status 2.
    """


class Interrupted(Exception):
    """Training stopped early by SIGINT or SIGTERM, after saving its last step.

    The CLI prints the message (where the run was saved, how to go on) and exits
    with 128 + the signal's number, the shell's convention: 130 for Ctrl-C,
    143 for SIGTERM. Scripts can tell a stopped run from a finished one (0).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
