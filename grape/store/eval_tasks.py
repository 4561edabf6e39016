"""The lm-eval task names the evaluators can run (`Keys.eval_tasks()`, one set, the union over evaluators).

Each evaluator publishes its names at start (and again when Redis lost the set); the gateway reads them to
refuse, when asked, an evaluation no evaluator could run. Writes are the evaluators' (sync), reads are plans.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from grape.keys import Keys
from grape.redis_client import as_str
from grape.store.io import Plan, one

CHUNK = 2000
"""Names per SADD: one command stays small however many tasks lm-eval knows."""


def publish(client: Any, keys: Keys, names: Iterable[str]) -> None:
    """Add the names one evaluator can run, in one round trip."""
    ordered = sorted(names)
    with client.pipeline(transaction=False) as pipe:
        for i in range(0, len(ordered), CHUNK):
            pipe.sadd(keys.eval_tasks(), *ordered[i : i + CHUNK])
        pipe.execute()


def publish_if_lost(client: Any, keys: Keys, names: Iterable[str]) -> None:
    """Publish again when the set is gone (Redis restarted without persistence); each heartbeat checks."""
    if not client.exists(keys.eval_tasks()):
        publish(client, keys, names)


def known(keys: Keys, names: list[str]) -> Plan[list[bool]]:
    """Whether each of `names` is published, in their order."""
    flags = yield from one("smismember", keys.eval_tasks(), names)
    return [bool(f) for f in flags]


def every(keys: Keys) -> Plan[set[str]]:
    """All the published names (for near matches of an unknown one)."""
    names = yield from one("smembers", keys.eval_tasks())
    return {as_str(n) for n in names}
