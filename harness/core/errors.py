"""Errors a user can cause: the CLI prints their one line and exits 2."""


class UsageError(Exception):
    """Unknown suite/impl, malformed case, unreadable baseline, fingerprint mismatch..."""
