"""What the store raises: errors a caller can act on. The gateway answers them as 404 / 422 / 409; the
trainer and the evaluator fail the job with the message."""

from __future__ import annotations


def shown(value: str, limit: int = 64) -> str:
    """A caller's value quoted for an error message: repr (escapes anything odd), cut to `limit` characters."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


class StoreError(Exception):
    """Base of the store's errors; the message is for the user."""


class NotFound(StoreError, LookupError):
    """No such dataset, item, job or evaluation."""


class Invalid(StoreError, ValueError):
    """The request cannot be served as asked (an unknown strategy, scores that were not requested...)."""


class Conflict(StoreError):
    """Valid, but not in this state (a running job cannot be deleted...)."""
