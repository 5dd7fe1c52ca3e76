"""Errors a user can cause (the CLI prints their one line and exits 2), and how a failure is worded in a record."""


class UsageError(Exception):
    """Unknown suite/impl, malformed case, unreadable baseline, fingerprint mismatch..."""


OUT_OF_MEMORY_WORDS = ("out of memory", "can't allocate memory", "not enough memory")


def failure_reason(exc: BaseException) -> str:
    """One line for a failed call, as records state it; an exhausted allocator is named "out of memory"."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:400]
    if isinstance(exc, MemoryError) or any(word in text.lower() for word in OUT_OF_MEMORY_WORDS):
        return f"out of memory: {text}"
    return text
