"""The one exception type for errors a user can cause and fix."""


class UserError(Exception):
    """A problem with the user's input: path, data set, config value, plug-in.

    The message is one line that names the problem and the fix; the CLI prints
    it without a traceback and exits with status 2.
    """
