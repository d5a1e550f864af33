"""The one exception type users see: run.py prints it as a single line and exits non-zero."""


class RecipeError(Exception):
    """Bad input or an unsupported request; the message names the problem and the choices."""
