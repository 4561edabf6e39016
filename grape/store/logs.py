"""Reading a queued record's log stream (training jobs, evaluations: grape.store.jobqueue writes it)."""

from __future__ import annotations

from typing import Any

from grape.store.io import Plan, one
from grape.store.jobqueue import decode_log


def page(log_key: str, after: str = "0-0", count: int | None = None) -> Plan[list[dict[str, Any]]]:
    """Up to `count` records (None: all) after the record id `after` ("0-0": from the first), oldest first,
    each as the API returns it (`decode_log`)."""
    rows = yield from one("xrange", log_key, "-" if after == "0-0" else f"({after}", "+", count)
    return [decode_log(entry_id, fields) for entry_id, fields in rows]


def wait(log_key: str, after: str, block_ms: int) -> Plan[bool]:
    """Wait up to `block_ms` for a record after `after`; whether one came (it is read with `page`)."""
    got = yield from one("xread", {log_key: after}, 1, block_ms)
    return bool(got)
