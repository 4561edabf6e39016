"""GRAPE_RETENTION_DAYS: training jobs, evaluations and experiments that ended long enough ago expire.

Every end of a record (a job's or an evaluation's state script, an experiment's last save) enters its id in
its kind's finished index, a zset by the time it ended (grape.store.jobqueue, grape.store.experiments); a
resume or a delete takes it out. The gateway's background task (service.experiments.driver, which
service.routes.experiments gives `sweep`) reads, every GRAPE_EXPERIMENT_POLL_S seconds, the part of each
index older than the cutoff, a bounded batch at a time, and removes those records as DELETE does: the record,
its log, its flags, an experiment's stored selections, every index entry (a training job's directory goes
too: the trainers remove it when they see the job in the deleted index). Each removal checks again,
atomically, that the record did end before the cutoff. No scan of the keyspace, and no TTL to keep in step
with the trainers' and evaluators' settings: only the gateway needs the setting. Records that ended before
the index existed (an upgrade) are entered into it by a walk over the ids indexes, a batch per pass, once per
gateway process. An experiment's own training jobs and evaluations expire on their own clock. Datasets never
expire: they have no end, and jobs and experiments are built on them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from redis.asyncio import Redis

from grape.keys import Keys
from grape.redis_client import as_str
from grape.settings import Settings
from grape.store import experiments as exp_store
from grape.store.io import acall, arun
from grape.store.jobqueue import EVALUATIONS, TRAINING
from grape.store.tenants import owner
from service import experiments as exp_svc

log = logging.getLogger(__name__)

BATCH = 100
"""Ids read from an index per round trip."""

MAX_PER_PASS = 2_000
"""Records of one kind removed per pass at most: a pass stays short; the next one goes on."""

QUEUES = (("training_jobs", TRAINING), ("evaluations", EVALUATIONS))


@dataclass
class _Walk:
    """How far this process has walked the ids indexes to enter older ended records into the finished ones."""

    until: float = field(default_factory=time.time)  # records created later are indexed by the scripts
    after: dict[str, float] = field(default_factory=dict)  # kind -> creation time walked up to
    done: set[str] = field(default_factory=set)


_walks: dict[str, _Walk] = {}


async def sweep(*, redis: Redis, keys: Keys, settings: Settings) -> dict[str, int]:
    """Remove what has expired; how many of each kind (nothing without GRAPE_RETENTION_DAYS)."""
    keep_s = settings.retention_s()
    if keep_s is None:
        return {}
    await _index_older(redis, keys)
    cutoff = time.time() - keep_s
    removed = {"training_jobs": 0, "evaluations": 0, "experiments": 0}
    for name, queue in QUEUES:
        seen = 0
        while seen < MAX_PER_PASS:
            ids = await arun(redis, queue.expired(keys, cutoff, BATCH))
            for item_id in ids:  # each leaves the index: removed, gone already, or put right
                tenant = await arun(redis, queue.field(keys, item_id, "tenant"))
                expire = queue.expire(keys, item_id, cutoff, owner(tenant))
                removed[name] += as_str(await acall(redis, expire)) == "deleted"
            seen += len(ids)
            if len(ids) < BATCH:
                break
    seen = 0
    while seen < MAX_PER_PASS:
        ids = await arun(redis, exp_store.expired(keys, cutoff, BATCH))
        done = [exp_id for exp_id in ids if await exp_svc.remove_expired(redis, keys, exp_id, cutoff)]
        removed["experiments"] += len(done)
        seen += len(ids)
        if len(ids) < BATCH or not done:  # the rest are locked by another process now: next pass
            break
    if any(removed.values()):
        log.info("retention (GRAPE_RETENTION_DAYS=%s): removed %s", settings.retention_days, removed)
    return removed


async def _index_older(redis: Redis, keys: Keys) -> None:
    """One batch per kind of the walk over records created before this process started."""
    walk = _walks.setdefault(keys.prefix, _Walk())
    kinds = [(name, q.created_after, lambda ids, q=q: q.index_ended(keys, ids), acall) for name, q in QUEUES]
    kinds.append(("experiments", exp_store.created_after, lambda ids: exp_store.index_ended(keys, ids), arun))
    for name, created_after, index, run in kinds:
        if name in walk.done:
            continue
        rows = await arun(redis, created_after(keys, walk.after.get(name, float("-inf")), walk.until, BATCH))
        if rows:
            await run(redis, index([i for i, _ in rows]))
            walk.after[name] = rows[-1][1]
        if len(rows) < BATCH:
            walk.done.add(name)
