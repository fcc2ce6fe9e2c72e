"""The one exception type users see: a clear message naming the cause."""


class PruneflowError(Exception):
    """Bad input or an unsatisfiable request; the CLI prints the message and exits non-zero."""
