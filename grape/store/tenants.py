"""Who owns what, and how much a tenant holds (grape.tenancy), in Redis.

Every record carries its tenant in a field of its own (a dataset's metadata `tenant`, a job's or an
evaluation's hash `tenant`, an experiment's JSON `tenant`); a record without one predates tenants and belongs
to `default` (`owner`). Beside the records, per tenant and kind (`datasets`, `jobs`, `evals`, `experiments`):

- `Keys.tenant_ids`: every id the tenant owns (its lists read these, never the whole deployment's);
- `Keys.tenant_active`: the ids that were queued or running when last looked at. A count of active resources
  is this set *pruned* at the time it is read (`prune_queued`, `prune_experiments`): an id whose record ended,
  or is gone (deleted, expired, by whatever path), leaves the set. Nothing has to remember to decrement a
  counter, so usage stays exact however a resource ends; the cost is the tenant's own active ids, bounded by
  its quota (plus those that ended since the last look).
- `Keys.tenant_usage` `stored_pairs`: a counter, kept by the ingest script (which refuses what does not fit,
  atomically) and the dataset delete script (which subtracts what the dataset held).

The scripts that create records take the tenant's limit and refuse past it in the same step that creates
(so two concurrent requests cannot both take the last slot); the prune runs just before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from grape.keys import Keys
from grape.redis_client import as_str
from grape.settings import DEFAULT_TENANT
from grape.store.io import Call, Lua, Plan, cmd, one

KINDS = ("datasets", "jobs", "evals", "experiments")
UNLIMITED = 2**62
"""A limit that is never reached (a script call whose caller checks no quota)."""


def owner(raw: Any) -> str:
    """The tenant of a record from its stored field (bytes, str or None): `default` when it has none."""
    return as_str(raw) if raw else DEFAULT_TENANT


def ids(keys: Keys, tenant: str, kind: str, limit: int | None = None) -> Plan[list[str]]:
    """A tenant's ids of one kind, newest first (the newest `limit` when given)."""
    raw = yield from one("zrevrange", keys.tenant_ids(tenant, kind), 0, -1 if limit is None else limit - 1)
    return [as_str(x) for x in raw]


def forget(keys: Keys, tenant: str, kind: str, gone: list[str]) -> Plan[None]:
    """Drop ids whose records are gone (removed by a path that did not know the owner) from a tenant's index: a
    list that met them cleans up after itself."""
    if gone:
        yield [cmd("zrem", keys.tenant_ids(tenant, kind), *gone), cmd("srem", keys.tenant_active(tenant, kind), *gone)]


def active(keys: Keys, tenant: str, kind: str) -> Plan[list[str]]:
    """The tenant's ids of a kind in its active set (not pruned: see `prune_queued`)."""
    raw = yield from one("smembers", keys.tenant_active(tenant, kind))
    return sorted(as_str(x) for x in raw)


def known(keys: Keys) -> Plan[list[str]]:
    """The tenants that have owned something here."""
    raw = yield from one("smembers", keys.tenants())
    return sorted(as_str(x) for x in raw)


def stored_pairs(keys: Keys, tenant: str) -> Plan[int]:
    raw = yield from one("hget", keys.tenant_usage(tenant), "stored_pairs")
    return int(raw or 0)


PRUNE_QUEUED = Lua("""
-- KEYS: a tenant's active set, then the record hash of each id   ARGV: the ids
-- a record gone, or in a terminal state, is no longer active
for i = 1, #ARGV do
  local st = redis.call('HGET', KEYS[i + 1], 'state')
  if not st or st == 'succeeded' or st == 'failed' or st == 'cancelled' then
    redis.call('SREM', KEYS[1], ARGV[i])
  end
end
return redis.call('SCARD', KEYS[1])
""")

PRUNE_EXPERIMENTS = Lua("""
-- KEYS: a tenant's active experiments, the deployment's active experiments, then each id's record
-- ARGV: the ids. An experiment is active while its record exists and the driver still advances it.
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 2]) == 0 or redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 0 then
    redis.call('SREM', KEYS[1], ARGV[i])
  end
end
return redis.call('SCARD', KEYS[1])
""")

PRUNE_DATASETS = Lua("""
-- KEYS: a tenant's dataset ids, then each id's metadata   ARGV: the ids
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return redis.call('ZCARD', KEYS[1])
""")


def prune_queued(keys: Keys, tenant: str, kind: str, record_keys: Iterable[tuple[str, str]]) -> Call:
    """Drop the ended or gone ids from a tenant's active jobs or evaluations; answers how many stay.
    `record_keys`: (id, its record key) of the set's members (`active` read them)."""
    pairs = list(record_keys)
    return PRUNE_QUEUED.call([keys.tenant_active(tenant, kind), *(k for _, k in pairs)], [i for i, _ in pairs])


def prune_experiments(keys: Keys, tenant: str, exp_ids: list[str]) -> Call:
    """Drop the finished or gone experiments from a tenant's active set; answers how many stay."""
    return PRUNE_EXPERIMENTS.call(
        [keys.tenant_active(tenant, "experiments"), keys.experiments_active(), *map(keys.experiment, exp_ids)],
        exp_ids,
    )


def prune_datasets(keys: Keys, tenant: str, dataset_ids: list[str]) -> Call:
    """Drop the ids of datasets that are gone from a tenant's index; answers how many it owns."""
    return PRUNE_DATASETS.call([keys.tenant_ids(tenant, "datasets"), *map(keys.dataset, dataset_ids)], dataset_ids)


# ---- records made before tenants ---------------------------------------------------------------------------

ADOPT_HASH = Lua("""
-- KEYS: record hash, deployment's ids zset, tenant's ids zset, tenant's active set, tenants set, usage, stats
-- ARGV: id, tenant, whether the record can be active ('1'/'0'), counter to add the stats' candidates to ('' none)
-- a record without a tenant field is the default tenant's: say so in the record and index it, once
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[1], 'tenant', ARGV[2]) == 0 then return 0 end
local created = redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0'
redis.call('ZADD', KEYS[3], created, ARGV[1])
redis.call('SADD', KEYS[5], ARGV[2])
local st = redis.call('HGET', KEYS[1], 'state')
if ARGV[3] == '1' and st ~= 'succeeded' and st ~= 'failed' and st ~= 'cancelled' then
  redis.call('SADD', KEYS[4], ARGV[1])
end
if ARGV[4] ~= '' then
  local n = tonumber(redis.call('HGET', KEYS[7], 'candidates') or '0')
  if n ~= 0 then redis.call('HINCRBY', KEYS[6], ARGV[4], n) end
end
return 1
""")


def untagged(record_keys: list[str]) -> Plan[list[bool]]:
    """Per record hash, whether it exists without a `tenant` field (made before tenants)."""
    if not record_keys:
        return []
    replies = yield [c for k in record_keys for c in (cmd("exists", k), cmd("hexists", k, "tenant"))]
    return [bool(replies[2 * i]) and not replies[2 * i + 1] for i in range(len(record_keys))]


def adopt_dataset(keys: Keys, dataset_id: str) -> Call:
    t = DEFAULT_TENANT
    return ADOPT_HASH.call(
        [
            keys.dataset(dataset_id),
            keys.datasets(),
            keys.tenant_ids(t, "datasets"),
            keys.tenant_active(t, "datasets"),
            keys.tenants(),
            keys.tenant_usage(t),
            keys.stats(dataset_id),
        ],
        [dataset_id, t, "0", "stored_pairs"],
    )


def adopt_queued(keys: Keys, kind: str, record_key: str, ids_key: str, item_id: str) -> Call:
    t = DEFAULT_TENANT
    return ADOPT_HASH.call(
        [
            record_key,
            ids_key,
            keys.tenant_ids(t, kind),
            keys.tenant_active(t, kind),
            keys.tenants(),
            keys.tenant_usage(t),
            record_key,
        ],
        [item_id, t, "1", ""],
    )


def adopt_experiment(keys: Keys, exp_id: str, created: float, is_active: bool) -> Plan[None]:
    """Index an experiment made before tenants as the default tenant's (its record says nothing: `owner`)."""
    t = DEFAULT_TENANT
    yield [
        cmd("zadd", keys.tenant_ids(t, "experiments"), {exp_id: created}),
        cmd("sadd", keys.tenants(), t),
        *([cmd("sadd", keys.tenant_active(t, "experiments"), exp_id)] if is_active else []),
    ]
