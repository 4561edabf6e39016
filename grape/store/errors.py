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


class OverQuota(StoreError):
    """A tenant's quota (grape.tenancy.QUOTAS) would be passed: nothing was created. The gateway answers 403
    with the quota, its limit and the usage in the body."""

    def __init__(self, quota: str, limit: int, usage: int, tenant: str, needed: int = 1) -> None:
        self.quota, self.limit, self.usage, self.tenant, self.needed = quota, limit, usage, tenant, needed
        more = f" and this request needs {needed} more" if needed != 1 else ""
        super().__init__(
            f"quota {quota} of tenant {tenant!r} is reached: limit {limit}, in use {usage}{more}; "
            "end or delete some, or ask the operator for more (GRAPE_TENANTS_FILE)"
        )

    def body(self) -> dict[str, object]:
        return {"quota": self.quota, "limit": self.limit, "usage": self.usage, "tenant": self.tenant}
