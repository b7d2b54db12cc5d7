"""The one exception type the CLI turns into a clean one-line error."""


class InputError(ValueError):
    """Bad input from the user: a file, column, table, block or option that is wrong.

    The message must say what is wrong and where (the path, table, column or block name).
    The CLI prints it as one line and exits non-zero, without a traceback unless ``--debug``.
    """
