"""The one exception type for user mistakes: the CLI prints it as a single line, never a traceback."""


class RopescopeError(ValueError):
    """Bad input from the user (a value, a path, a config key); the message names it and what is accepted."""
