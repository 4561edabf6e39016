"""An experiment in Redis: its record (one JSON string), the selection each arm trains on, the set of
experiments still to advance, and the short lock of the process advancing one.

Plans (grape.store.io): the gateway runs them (`arun`), the trainer reads an arm's stored selection (`run`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from grape.keys import Keys
from grape.redis_client import as_str
from grape.store.errors import OverQuota
from grape.store.io import Lua, Plan, cmd, one
from grape.store.tenants import UNLIMITED, owner

LOCK_MS = 60_000
"""How long a lock holds when its process dies before releasing it."""

UNLOCK = Lua("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
"""Release the lock only if this process still holds it (its token)."""


RESERVE = Lua("""
-- KEYS: the owner's active experiments (pruned just before), the tenants set   ARGV: id, owner's limit, owner
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
""")


def create(
    keys: Keys,
    exp_id: str,
    record: dict[str, Any],
    selections: Iterable[bytes],
    now: float,
    limit: int = UNLIMITED,
    usage: int = 0,
) -> Plan[None]:
    """Store a new experiment of `record["tenant"]`, its arms' selections, and mark it active. First a slot
    among the tenant's `limit` active experiments is taken (`OverQuota` when none is free: nothing stored;
    `usage` is for its message); then, in one round trip, the selections, the record, and the ids and active
    sets last, so nothing names a record whose selections are not stored."""
    tenant = owner(record.get("tenant"))
    active_key = keys.tenant_active(tenant, "experiments")
    taken = yield from one("eval", RESERVE.source, 2, active_key, keys.tenants(), exp_id, limit, tenant)
    if not taken:
        raise OverQuota("active_experiments", limit, usage, tenant)
    yield [
        *(cmd("set", keys.experiment_selection(exp_id, i), sel) for i, sel in enumerate(selections)),
        cmd("set", keys.experiment(exp_id), orjson.dumps(record)),
        cmd("zadd", keys.experiments(), {exp_id: now}),
        cmd("zadd", keys.tenant_ids(tenant, "experiments"), {exp_id: now}),
        cmd("sadd", keys.experiments_active(), exp_id),
    ]


def load(keys: Keys, exp_id: str) -> Plan[dict[str, Any] | None]:
    raw = yield from one("get", keys.experiment(exp_id))
    return None if raw is None else orjson.loads(raw)


def save(keys: Keys, exp_id: str, record: dict[str, Any] | None, *, finished: bool) -> Plan[None]:
    """Write the record (None: unchanged); a finished experiment leaves the active set (the driver stops
    advancing it)."""
    cmds = [cmd("set", keys.experiment(exp_id), orjson.dumps(record))] if record is not None else []
    cmds += [cmd("srem", keys.experiments_active(), exp_id)] if finished else []
    if cmds:
        yield cmds


def newest(keys: Keys, limit: int) -> Plan[list[str]]:
    raw = yield from one("zrevrange", keys.experiments(), 0, limit - 1)
    return [as_str(x) for x in raw]


def active(keys: Keys) -> Plan[list[str]]:
    raw = yield from one("smembers", keys.experiments_active())
    return [as_str(x) for x in raw]


def forget(keys: Keys, exp_id: str) -> Plan[None]:
    """An active id whose record is gone: not advanced again."""
    yield [cmd("srem", keys.experiments_active(), exp_id)]


def arm_selection(keys: Keys, exp_id: str, arm: int) -> Plan[bytes | None]:
    """The NDJSON an arm trains on, as stored at creation (None: not stored)."""
    return (yield from one("get", keys.experiment_selection(exp_id, arm)))


def try_lock(keys: Keys, exp_id: str, token: str) -> Plan[bool]:
    return bool((yield from one("set", keys.experiment_lock(exp_id), token, px=LOCK_MS, nx=True)))


def unlock(keys: Keys, exp_id: str, token: str) -> Any:
    return UNLOCK.call([keys.experiment_lock(exp_id)], [token])
