"""An experiment in Redis: its record (one JSON string), the selection each arm trains on, the set of
experiments still to advance, the index of finished ones (retention), and the short lock of the process
advancing one.

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

SELECTION_PAGE = 256 * 1024
"""Bytes of a stored arm selection read per Redis command when it is served: the gateway holds one page."""

MAX_ARMS = 16
"""Arms an experiment may have (grape.experiments.ExperimentRequest): a delete of a record that cannot be read
removes this many arm selections."""

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


def save(
    keys: Keys, exp_id: str, record: dict[str, Any] | None, *, finished: bool, ended_at: float | None = None
) -> Plan[None]:
    """Write the record (None: unchanged); a finished experiment leaves the active set (the driver stops
    advancing it) and enters the finished index at `ended_at` (kept when it is there already)."""
    cmds = [cmd("set", keys.experiment(exp_id), orjson.dumps(record))] if record is not None else []
    cmds += [cmd("srem", keys.experiments_active(), exp_id)] if finished else []
    if finished and ended_at is not None:
        cmds += [cmd("zadd", keys.experiments_finished(), {exp_id: ended_at}, nx=True)]
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


def selection_size(keys: Keys, exp_id: str, arm: int) -> Plan[int]:
    """Bytes of an arm's stored selection (0: not stored; a stored one is never empty)."""
    return int((yield from one("strlen", keys.experiment_selection(exp_id, arm))))


def selection_page(keys: Keys, exp_id: str, arm: int, start: int, size: int = SELECTION_PAGE) -> Plan[bytes]:
    """Bytes `start` to `start + size` of an arm's stored selection (empty past its end, or once deleted)."""
    return bytes((yield from one("getrange", keys.experiment_selection(exp_id, arm), start, start + size - 1)))


def delete(keys: Keys, exp_id: str, arms: int, tenant: str | None = None) -> Plan[None]:
    """Remove the record, its arms' selections and every index entry (the owner's too, when known), in one round
    trip (the caller holds the experiment's lock, so no driver writes the record back)."""
    selections = [keys.experiment_selection(exp_id, i) for i in range(max(arms, MAX_ARMS))]
    commands = [
        cmd("delete", keys.experiment(exp_id), *selections),
        cmd("zrem", keys.experiments(), exp_id),
        cmd("srem", keys.experiments_active(), exp_id),
        cmd("zrem", keys.experiments_finished(), exp_id),
    ]
    if tenant is not None:
        commands += [
            cmd("zrem", keys.tenant_ids(tenant, "experiments"), exp_id),
            cmd("srem", keys.tenant_active(tenant, "experiments"), exp_id),
        ]
    yield commands


def created_after(keys: Keys, after: float, until: float, limit: int) -> Plan[list[tuple[str, float]]]:
    """Up to `limit` (id, creation time) created in (`after`, `until`], oldest first: a walk over the ids."""
    rows = yield from one("zrangebyscore", keys.experiments(), f"({after}", until, start=0, num=limit, withscores=True)
    return [(as_str(i), float(t)) for i, t in rows]


def index_ended(keys: Keys, exp_ids: list[str]) -> Plan[int]:
    """Enter those of `exp_ids` that have ended into the finished index (records older than the index)."""
    if not exp_ids:
        return 0
    raws = yield from one("mget", [keys.experiment(i) for i in exp_ids])
    ended: dict[str, float] = {}
    for exp_id, raw in zip(exp_ids, raws, strict=True):
        try:
            rec = orjson.loads(raw) if raw is not None else None
        except ValueError:
            continue
        ends = isinstance(rec, dict) and rec.get("state") in ("succeeded", "failed", "cancelled")
        if ends and isinstance(rec.get("finished"), int | float):
            ended[exp_id] = float(rec["finished"])
    if ended:
        yield [cmd("zadd", keys.experiments_finished(), ended, nx=True)]
    return len(ended)


def reindex(keys: Keys, exp_id: str, ended_at: float | None) -> Plan[None]:
    """Put an experiment's finished-index entry right: at `ended_at`, or out of it (None: it has not ended)."""
    if ended_at is None:
        yield [cmd("zrem", keys.experiments_finished(), exp_id)]
    else:
        yield [cmd("zadd", keys.experiments_finished(), {exp_id: ended_at})]


def expired(keys: Keys, before: float, limit: int) -> Plan[list[str]]:
    """Up to `limit` experiments that ended before `before` (GRAPE_RETENTION_DAYS), oldest first."""
    raw = yield from one("zrangebyscore", keys.experiments_finished(), "-inf", f"({before}", start=0, num=limit)
    return [as_str(x) for x in raw]


def try_lock(keys: Keys, exp_id: str, token: str) -> Plan[bool]:
    return bool((yield from one("set", keys.experiment_lock(exp_id), token, px=LOCK_MS, nx=True)))


def unlock(keys: Keys, exp_id: str, token: str) -> Any:
    return UNLOCK.call([keys.experiment_lock(exp_id)], [token])
