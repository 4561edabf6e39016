"""The lm-eval task names the evaluators offer (`Keys.eval_tasks()`, one set, the union over evaluators): those
the operator's GRAPE_EVAL_TASKS allows, within GRAPE_MAX_EVAL_SUBTASKS, without unallowed unsafe code. Beside
it, the names of their GRAPE_EVAL_TASK_DIR (`Keys.eval_dir_tasks()`, what an unset GRAPE_EVAL_TASKS allows)
and why allowed names are not offered (`Keys.eval_refused_tasks()`).

Each evaluator publishes its names at start (and again when Redis lost the set); the gateway reads them to
refuse, when asked, an evaluation no evaluator could run. Writes are the evaluators' (sync), reads are plans.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from grape.keys import Keys
from grape.redis_client import as_str
from grape.store.io import Plan, one

CHUNK = 2000
"""Names per SADD: one command stays small however many tasks lm-eval knows."""


def publish(
    client: Any,
    keys: Keys,
    names: Iterable[str],
    local: Iterable[str] = (),
    refused: Mapping[str, str] | None = None,
) -> None:
    """Add the names one evaluator offers, those of its task directory and why it refuses others, in one
    round trip."""
    offered, own, why = sorted(names), sorted(local), sorted((refused or {}).items())
    with client.pipeline(transaction=False) as pipe:
        for i in range(0, len(offered), CHUNK):
            pipe.sadd(keys.eval_tasks(), *offered[i : i + CHUNK])
        for i in range(0, len(own), CHUNK):
            pipe.sadd(keys.eval_dir_tasks(), *own[i : i + CHUNK])
        for i in range(0, len(why), CHUNK):
            pipe.hset(keys.eval_refused_tasks(), mapping=dict(why[i : i + CHUNK]))
        pipe.execute()


def publish_if_lost(
    client: Any, keys: Keys, names: Iterable[str], local: Iterable[str] = (), refused: Mapping[str, str] | None = None
) -> None:
    """Publish again when the set is gone (Redis restarted without persistence); each heartbeat checks."""
    if not client.exists(keys.eval_tasks(), keys.eval_dir_tasks()):
        publish(client, keys, names, local, refused)


def known(keys: Keys, names: list[str]) -> Plan[list[bool]]:
    """Whether each of `names` is published, in their order."""
    flags = yield from one("smismember", keys.eval_tasks(), names)
    return [bool(f) for f in flags]


def every(keys: Keys) -> Plan[set[str]]:
    """All the published names (for near matches of an unknown one)."""
    names = yield from one("smembers", keys.eval_tasks())
    return {as_str(n) for n in names}


def in_task_dir(keys: Keys, names: list[str]) -> Plan[list[bool]]:
    """Whether each of `names` is a task of some evaluator's GRAPE_EVAL_TASK_DIR, in their order."""
    flags = yield from one("smismember", keys.eval_dir_tasks(), names)
    return [bool(f) for f in flags]


def dir_tasks(keys: Keys) -> Plan[set[str]]:
    """The task names of the evaluators' GRAPE_EVAL_TASK_DIR."""
    names = yield from one("smembers", keys.eval_dir_tasks())
    return {as_str(n) for n in names}


def refusals(keys: Keys, names: list[str]) -> Plan[list[str | None]]:
    """Why the evaluators do not offer each of `names` (None: no reason recorded)."""
    why = yield from one("hmget", keys.eval_refused_tasks(), names)
    return [as_str(w) if w is not None else None for w in why]
