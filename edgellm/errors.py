"""User-facing errors: the CLI prints these as one line, without a traceback."""


class EdgeLLMError(Exception):
    """A problem with the user's input (path, file, model, prompt) rather than a bug."""
