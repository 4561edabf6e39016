"""Tenants at the gateway: who is calling (`identity`), whether a resource is theirs (one owner check per kind,
each also a FastAPI dependency for the path id), and what they hold against their quotas (`usage`, `check_free`).

Another tenant's resource answers exactly as an unknown id does (the same 404 and words, from the same
function: `dataset_missing`, `job_missing`, `evaluation_missing`, `experiment_missing`), before anything is
read or changed. An admin (GRAPE_ADMIN_KEYS; the one user of local mode) sees every tenant's. Lists read the
tenant's own index (grape.store.tenants), never the whole deployment's.

The owner checks, for routes to come (DELETE of evaluations and experiments...):
`owned_dataset`, `owned_job`, `owned_evaluation`, `owned_experiment` (service functions) and
`OwnedDatasetId`, `OwnedJobId`, `OwnedEvalId`, `OwnedExpId` (route parameters that do the check).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.exceptions import RedisError

from grape.evaluations import is_eval_id
from grape.experiments import is_experiment_id
from grape.keys import Keys, is_job_id
from grape.settings import Settings
from grape.store import datasets as ds_store
from grape.store import experiments as exp_store
from grape.store import tenants as store
from grape.store.errors import NotFound as StoreNotFound
from grape.store.errors import OverQuota
from grape.store.io import Plan, acall, arun, cmd
from grape.store.jobqueue import EVALUATIONS, TRAINING, JobQueue
from grape.tenancy import LOCAL, QUOTAS, Identity, Quotas, configured_tenants, quotas_of
from service.deps import DatasetId, JobId, get_keys, get_redis
from service.errors import ApiError, NotFound, shown

log = logging.getLogger(__name__)


# ---- who is calling --------------------------------------------------------------------------------------


class Unauthenticated(ApiError):
    status = 401


def identity(request: Request) -> Identity:
    """The caller, as service.auth resolved it from the bearer key (LOCAL on a gateway without keys)."""
    who = request.scope.get("state", {}).get("identity")
    if isinstance(who, Identity):
        return who
    if not request.app.state.settings.keys_list():
        return LOCAL
    raise Unauthenticated("missing or invalid API key: send Authorization: Bearer <key>")


IdentityDep = Annotated[Identity, Depends(identity)]


# ---- not found: one answer for "no such id" and "not yours" ----------------------------------------------


def dataset_missing(dataset_id: str) -> StoreNotFound:
    return ds_store.missing(dataset_id)


def job_missing(job_id: str) -> NotFound:
    return NotFound(f"training job {shown(job_id)} not found")


def evaluation_missing(eval_id: str) -> NotFound:
    return NotFound(f"evaluation {eval_id!r} not found")


def experiment_missing(exp_id: str) -> NotFound:
    return NotFound(f"experiment {exp_id!r} not found")


# ---- the owner checks ------------------------------------------------------------------------------------


async def owned_dataset(redis: Redis, keys: Keys, who: Identity, dataset_id: str) -> dict[str, str]:
    """The dataset's metadata when `who` may see it; else the unknown dataset's 404."""
    meta = await arun(redis, ds_store.meta(keys, dataset_id))
    if meta is None or not who.sees(store.owner(meta.get("tenant"))):
        raise dataset_missing(dataset_id)
    return meta


async def _queued_owner(redis: Redis, keys: Keys, queue: JobQueue, item_id: str) -> str | None:
    """The tenant of a job's or an evaluation's record (None: no record). Read alone, so a record this version
    cannot decode still has an owner (and can be deleted by it)."""
    record_key = queue.space(keys).record(item_id)
    exists, tenant = await arun(redis, _exists_and_field(record_key, "tenant"))
    return store.owner(tenant) if exists else None


def _exists_and_field(key: str, name: str) -> Plan[tuple[bool, Any]]:
    exists, value = yield [cmd("exists", key), cmd("hget", key, name)]
    return bool(exists), value


async def owned_job(redis: Redis, keys: Keys, who: Identity, job_id: str) -> str:
    """The job's tenant when `who` may see it; else the unknown job's 404."""
    tenant = await _queued_owner(redis, keys, TRAINING, job_id) if is_job_id(job_id) else None
    if tenant is None or not who.sees(tenant):
        raise job_missing(job_id)
    return tenant


async def owned_evaluation(redis: Redis, keys: Keys, who: Identity, eval_id: str) -> str:
    """The evaluation's tenant when `who` may see it; else the unknown evaluation's 404."""
    tenant = await _queued_owner(redis, keys, EVALUATIONS, eval_id) if is_eval_id(eval_id) else None
    if tenant is None or not who.sees(tenant):
        raise evaluation_missing(eval_id)
    return tenant


async def owned_experiment(redis: Redis, keys: Keys, who: Identity, exp_id: str) -> dict[str, Any]:
    """The experiment's record when `who` may see it; else the unknown experiment's 404."""
    try:
        exp = await arun(redis, exp_store.load(keys, exp_id)) if is_experiment_id(exp_id) else None
    except ValueError:  # not JSON: its owner cannot be read
        exp = ...
    if exp is ... or (exp is not None and not isinstance(exp, dict)):
        # a record this version cannot read has no owner to check: only an admin reaches it (the routes answer 409
        # naming DELETE, which removes it); to everyone else it is unknown
        if who.admin:
            return {}
        raise experiment_missing(exp_id)
    if exp is None or not who.sees(store.owner(exp.get("tenant"))):
        raise experiment_missing(exp_id)
    return exp


# the same checks as route parameters: `dataset_id: OwnedDatasetId` is the id, checked (edge form, owner)


async def _dataset_param(dataset_id: DatasetId, request: Request) -> str:
    await owned_dataset(get_redis(request), get_keys(request), identity(request), dataset_id)
    return dataset_id


async def _job_param(job_id: JobId, request: Request) -> str:
    await owned_job(get_redis(request), get_keys(request), identity(request), job_id)
    return job_id


async def _eval_param(eval_id: str, request: Request) -> str:
    await owned_evaluation(get_redis(request), get_keys(request), identity(request), eval_id)
    return eval_id


async def _exp_param(exp_id: Annotated[str, Path(max_length=100)], request: Request) -> str:
    await owned_experiment(get_redis(request), get_keys(request), identity(request), exp_id)
    return exp_id


OwnedDatasetId = Annotated[str, Depends(_dataset_param)]
OwnedJobId = Annotated[str, Depends(_job_param)]
OwnedEvalId = Annotated[str, Depends(_eval_param)]
OwnedExpId = Annotated[str, Depends(_exp_param)]


def scope_of(who: Identity) -> str | None:
    """The tenant a list shows: the caller's own, or None (every tenant's) for an admin."""
    return None if who.admin else who.tenant


# ---- usage and quotas ------------------------------------------------------------------------------------

_QUEUE_OF = {"active_training_jobs": TRAINING, "active_evaluations": EVALUATIONS}


async def count_active(redis: Redis, keys: Keys, tenant: str, quota: str) -> int:
    """A tenant's use of one quota now, pruning its index of what ended or is gone (grape.store.tenants)."""
    if quota == "stored_pairs":
        return await arun(redis, store.stored_pairs(keys, tenant))
    if quota == "datasets":
        ids = await arun(redis, store.ids(keys, tenant, "datasets"))
        return int(await acall(redis, store.prune_datasets(keys, tenant, ids)))
    if quota == "active_experiments":
        ids = await arun(redis, store.active(keys, tenant, "experiments"))
        return int(await acall(redis, store.prune_experiments(keys, tenant, ids)))
    queue = _QUEUE_OF[quota]
    kind = queue.space(keys).plural
    ids = await arun(redis, store.active(keys, tenant, kind))
    records = [(i, queue.space(keys).record(i)) for i in ids]
    return int(await acall(redis, store.prune_queued(keys, tenant, kind, records)))


async def usage(redis: Redis, keys: Keys, tenant: str) -> dict[str, int]:
    """Every quota's use by `tenant`, exact now."""
    return {q: await count_active(redis, keys, tenant, q) for q in QUOTAS}


async def check_free(
    redis: Redis, keys: Keys, settings: Settings, tenant: str, quota: str, needed: int = 1
) -> tuple[int, int]:
    """(limit, usage) of the tenant's quota after pruning; OverQuota (403, naming it) when `needed` more do not
    fit. The creating script checks again atomically: this is the early, explained refusal."""
    limit = quotas_of(settings).limit(tenant, quota)
    used = await count_active(redis, keys, tenant, quota)
    if used + needed > limit:
        raise OverQuota(quota, limit, used, tenant, needed)
    return limit, used


class TenantUsage(BaseModel):
    tenant: str
    usage: dict[str, int] = Field(description="Per quota, what the tenant holds now.")
    limits: dict[str, int] = Field(description="Per quota, the most it may hold (GRAPE_QUOTA_*, GRAPE_TENANTS_FILE).")


class UsagePublic(TenantUsage):
    admin: bool = Field(description="Whether the caller's key is an operator key (GRAPE_ADMIN_KEYS).")
    tenants: list[TenantUsage] | None = Field(
        None, description="An admin only: every tenant configured or owning something, with its usage."
    )


async def usage_of(redis: Redis, keys: Keys, settings: Settings, who: Identity) -> UsagePublic:
    quotas: Quotas = quotas_of(settings)
    own = TenantUsage(tenant=who.tenant, usage=await usage(redis, keys, who.tenant), limits=quotas.limits(who.tenant))
    every = None
    if who.admin:
        names = sorted(set(configured_tenants(settings, quotas)) | set(await arun(redis, store.known(keys))))
        every = [
            own
            if t == who.tenant
            else TenantUsage(tenant=t, usage=await usage(redis, keys, t), limits=quotas.limits(t))
            for t in names
        ]
    return UsagePublic(**own.model_dump(), admin=who.admin, tenants=every)


# ---- records made before tenants -------------------------------------------------------------------------


async def adopt_legacy(redis: Redis, keys: Keys) -> int:
    """Records made before tenants belong to `default`: tag and index them once (the gateway does it at start,
    in the background; records read meanwhile are `default`'s already, `store.owner`). How many were adopted."""
    adopted = 0
    dataset_ids = await arun(redis, ds_store.ids(keys))
    for i in range(0, len(dataset_ids), 500):
        page = dataset_ids[i : i + 500]
        flags = await arun(redis, store.untagged([keys.dataset(d) for d in page]))
        for d, untagged in zip(page, flags, strict=True):
            if untagged:
                adopted += int(await acall(redis, store.adopt_dataset(keys, d)))
    for queue in (TRAINING, EVALUATIONS):
        q = queue.space(keys)
        item_ids = await arun(redis, queue.newest(keys, 10**9))
        for i in range(0, len(item_ids), 500):
            page = item_ids[i : i + 500]
            flags = await arun(redis, store.untagged([q.record(x) for x in page]))
            for x, untagged in zip(page, flags, strict=True):
                if untagged:
                    adopted += int(await acall(redis, store.adopt_queued(keys, q.plural, q.record(x), q.ids(), x)))
    # an experiment's tenant is inside its (large) JSON record: read only those no tenant's index names yet
    indexed: set[str] = set()
    for tenant in {*await arun(redis, store.known(keys)), "default"}:
        indexed |= set(await arun(redis, store.ids(keys, tenant, "experiments")))
    active = set(await arun(redis, exp_store.active(keys)))
    for exp_id in await arun(redis, exp_store.newest(keys, 10**9)):
        if exp_id in indexed:
            continue
        try:
            exp = await arun(redis, exp_store.load(keys, exp_id))
        except ValueError:  # a record this version cannot read: it answers 409 naming DELETE, owner unknown
            continue
        if isinstance(exp, dict) and "tenant" not in exp:
            await arun(redis, store.adopt_experiment(keys, exp_id, float(exp.get("created") or 0), exp_id in active))
            adopted += 1
    return adopted


async def adopt_in_background(redis: Redis, keys: Keys) -> None:
    try:
        n = await adopt_legacy(redis, keys)
        if n:
            log.info("tenancy: %d records made before tenants now belong to tenant 'default'", n)
    except asyncio.CancelledError:
        raise
    except RedisError as exc:  # Redis not there at start: the records stay `default`'s, just not listed yet
        log.warning("tenancy: could not adopt records made before tenants (%s); they are adopted at next start", exc)
