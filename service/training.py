"""Service functions behind the training-job routes. The gateway queues and reports; trainers train.

A job is refused before it is queued when it could not produce a useful run: unknown dataset (404),
unknown strategy or scores the strategy needs not requested (422), dataset still scoring (409),
empty selection (422), a base model the operator does not allow (422, GRAPE_ALLOWED_MODELS), more
training or checkpoints than the operator's budget (422, GRAPE_MAX_TRAIN_TOKENS, GRAPE_MAX_TRAIN_SAVES), too
many queued jobs (429). The request itself is an allow-list (grape.jobs.Hyperparameters): nothing in it names a
file, a directory, code or a machine setting.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis

from grape.jobs import Hyperparameters, JobRequest, JobSpec, JobState, OverBudget, check_budget, new_job_fields
from grape.keys import Keys, is_job_id, new_job_id
from grape.records import DatasetState
from grape.redis_client import as_str as _text
from grape.settings import Settings
from grape.store import tenants
from grape.store.datasets import check_selection
from grape.store.errors import OverQuota
from grape.store.io import Call, acall, arun
from grape.store.jobqueue import TRAINING
from grape.store.tenants import UNLIMITED
from grape.strategies import SelectParams, get_strategy
from grape.tenancy import LOCAL, Identity, quotas_of
from service.datasets import dataset_status, selection_lines
from service.errors import Busy, Conflict, NotFound, Unprocessable
from service.logs import record_log
from service.model_access import check_chat_template, check_model
from service.tenancy import check_free, count_active, job_missing, owned_dataset, owned_job
from service.training_schemas import TrainingJobCreate, TrainingJobCreated, TrainingJobList, TrainingJobPublic

log = logging.getLogger(__name__)

UNREADABLE = (ValidationError, ValueError, KeyError, TypeError)
"""What decoding a stored job record can raise when the record is not one this version wrote."""


async def create_job(
    *, redis: Redis, keys: Keys, settings: Settings, body: TrainingJobCreate, who: Identity = LOCAL
) -> TrainingJobCreated:
    """Check and queue a job of `who`'s tenant, on a dataset `who` may see (another tenant's: the 404 of an
    unknown dataset)."""
    meta = await owned_dataset(redis, keys, who, body.dataset_id)
    # a dataset's target model is checked too: it may predate the operator's list
    base_model = body.base_model or meta["target_model"]
    await check_model(redis=redis, keys=keys, settings=settings, name=base_model, field="base_model")
    check_chat_template(settings, body.hyperparameters.chat_template)
    check_selection(meta, [body.strategy], body.dataset_id)
    ds = await dataset_status(redis=redis, keys=keys, dataset_id=body.dataset_id)
    if ds.state is not DatasetState.done:
        raise Conflict(
            f"dataset {body.dataset_id} is {ds.state.value} ({ds.scored_items + ds.failed_items} of {ds.items} "
            "items scored or failed): a job trains on a fully scored dataset; retry when its state is done",
            dataset_state=ds.state.value,
            items=ds.items,
            scored_items=ds.scored_items,
        )
    check_job_budget(settings, body.hyperparameters, selection_bound(body, ds.items, ds.candidates))
    params = body.select_params()
    if not await _selection_nonempty(redis, keys, body.dataset_id, body.strategy, params):
        raise Unprocessable(
            f"the selection of dataset {body.dataset_id} with strategy {body.strategy!r} is empty "
            f"({ds.scored_items} items scored, {ds.failed_items} failed): nothing to train on"
        )
    spec = JobSpec(
        **body.model_dump(exclude={"base_model"}),
        base_model=base_model,
        template=meta.get("template", "auto"),
    )
    job_id = new_job_id()
    fields = new_job_fields(job_id, spec, time.time())
    limit, used = await check_free(redis, keys, settings, who.tenant, "active_training_jobs")
    res = await acall(redis, TRAINING.enqueue(keys, job_id, fields, settings.max_queued_jobs, who.tenant, limit))
    if res == -1:  # taken meanwhile by another request of the tenant
        raise OverQuota("active_training_jobs", limit, used, who.tenant)
    if not res:
        raise Busy(
            f"{settings.max_queued_jobs} training jobs are queued (GRAPE_MAX_QUEUED_JOBS): start trainers or "
            "retry later",
            retry_after=60,
        )
    return TrainingJobCreated(id=job_id, state=JobState.queued)


def selection_bound(body: JobRequest, items: int, candidates: int) -> int:
    """At most how many records the job's selection holds, from the dataset's counts: a per-instruction
    strategy keeps at most k of each instruction's candidates, a pool-wide one at most n. An upper bound
    (counting the selection exactly would run it whole at every submit), so epochs are never undercounted."""
    if get_strategy(body.strategy).per_instruction:
        return min(items * body.k, candidates)
    return min(body.n, candidates) if body.n is not None else candidates


def check_job_budget(settings: Settings, hp: Hyperparameters, records: int, where: str = "hyperparameters") -> None:
    """422 when the job asks for more training than GRAPE_MAX_TRAIN_TOKENS or more checkpoints than
    GRAPE_MAX_TRAIN_SAVES. One process counted: the gateway cannot know the trainer's world size (the trainer
    checks again with it)."""
    try:
        check_budget(hp, records, max_tokens=settings.max_train_tokens, max_saves=settings.max_train_saves, where=where)
    except OverBudget as exc:
        raise Unprocessable(str(exc), field=where) from None


async def _selection_nonempty(redis: Redis, keys: Keys, dataset_id: str, strategy: str, params: SelectParams) -> bool:
    lines = selection_lines(redis=redis, keys=keys, dataset_id=dataset_id, strategy=strategy, params=params)
    try:
        async for chunk in lines:
            if chunk:
                return True
        return False
    except ValueError as exc:  # a strategy refusing its parameters
        raise Unprocessable(f"selection: {exc}") from None
    finally:
        await lines.aclose()


def _not_found(job_id: str) -> NotFound:
    return job_missing(job_id)


async def _load(redis: Redis, keys: Keys, job_id: str) -> dict[str, Any]:
    if not is_job_id(job_id):  # a value that is not an id must never name another key
        raise _not_found(job_id)
    try:
        job = await arun(redis, TRAINING.read(keys, job_id))
    except UNREADABLE as exc:
        raise _unreadable(job_id, exc) from None
    if job is None:
        raise _not_found(job_id)
    return job


def _unreadable(job_id: str, exc: Exception) -> Conflict:
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return Conflict(
        f"training job {job_id}: its stored record cannot be read ({reason}); DELETE /v1/training-jobs/{job_id} "
        "removes it",
        unreadable=True,
    )


def _public(job: dict[str, Any]) -> TrainingJobPublic:
    fields = set(TrainingJobPublic.model_fields)
    try:
        return TrainingJobPublic(**{k: v for k, v in job.items() if k in fields and v is not None})
    except UNREADABLE as exc:
        raise _unreadable(str(job.get("id")), exc) from None


async def get_job(*, redis: Redis, keys: Keys, job_id: str) -> TrainingJobPublic:
    job = await _load(redis, keys, job_id)
    if await TRAINING.areap_if_dead(redis, keys, job):
        job = await _load(redis, keys, job_id)
    return _public(job)


async def list_jobs(*, redis: Redis, keys: Keys, limit: int, tenant: str | None = None) -> TrainingJobList:
    """The newest jobs of `tenant` (None: of every tenant); a record this version cannot read is listed by id in
    `unreadable`, never a 500."""
    out, unreadable, gone = [], [], []
    newest = TRAINING.newest(keys, limit) if tenant is None else tenants.ids(keys, tenant, "jobs", limit)
    for job_id in await arun(redis, newest):
        try:
            out.append(await get_job(redis=redis, keys=keys, job_id=job_id))
        except NotFound:
            gone.append(job_id)
        except Conflict as exc:
            log.warning("%s", exc.message)
            unreadable.append(job_id)
    if tenant is not None:
        await arun(redis, tenants.forget(keys, tenant, "jobs", gone))
    return TrainingJobList(jobs=out, unreadable=unreadable)


async def _move(redis: Redis, keys: Keys, job_id: str, move: Callable[[Keys, str], Call]) -> str:
    """Run one of the job state-move scripts; its answer, or NotFound when the job does not exist."""
    if not is_job_id(job_id):
        raise _not_found(job_id)
    res = _text(await acall(redis, move(keys, job_id)))
    if res == "missing":
        raise _not_found(job_id)
    return res


async def cancel_job(*, redis: Redis, keys: Keys, job_id: str) -> TrainingJobPublic:
    res = await _move(redis, keys, job_id, TRAINING.cancel)
    if res not in ("cancelled-now", "cancelling"):
        raise Conflict(f"training job {job_id} is already {res}; only queued or running jobs can be cancelled")
    return await get_job(redis=redis, keys=keys, job_id=job_id)


async def resume_job(*, redis: Redis, keys: Keys, job_id: str, settings: Settings | None = None) -> TrainingJobPublic:
    """Queue a failed or cancelled job again, counted against its tenant's active_training_jobs (with `settings`:
    the quotas' source)."""
    tenant = await owned_job(redis, keys, LOCAL, job_id)
    limit, used = UNLIMITED, 0
    if settings is not None:
        limit = quotas_of(settings).limit(tenant, "active_training_jobs")
        used = await count_active(redis, keys, tenant, "active_training_jobs")
    res = await _move(redis, keys, job_id, lambda k, i: TRAINING.resume(k, i, tenant, limit))
    if res == "quota":
        raise OverQuota("active_training_jobs", limit, used, tenant)
    if res != "queued":
        raise Conflict(f"training job {job_id} is {res}; only failed or cancelled jobs can be resumed")
    return await get_job(redis=redis, keys=keys, job_id=job_id)


async def delete_job(*, redis: Redis, keys: Keys, job_id: str) -> None:
    """Remove a job that is not running: its record, log and flags at once; its directory
    (GRAPE_TRAIN_DIR/<job id>) is removed by the trainers, which watch `Keys.training.deleted()`."""
    if not is_job_id(job_id):
        raise _not_found(job_id)
    state = await arun(redis, TRAINING.field(keys, job_id, "state"))
    if state == JobState.running:  # a running job whose trainer died is reaped first, then deletable
        with contextlib.suppress(Conflict):  # an unreadable record: the script below decides on the raw state
            await TRAINING.areap_if_dead(redis, keys, await _load(redis, keys, job_id))
    tenant = await owned_job(redis, keys, LOCAL, job_id)
    res = _text(await acall(redis, TRAINING.delete(keys, job_id, tenant)))
    if res == "missing":
        raise _not_found(job_id)
    if res == "running":
        raise Conflict(
            f"training job {job_id} is running: cancel it first (POST /v1/training-jobs/{job_id}/cancel), "
            "then delete it once it is cancelled"
        )


def log_lines(
    *, redis: Redis, keys: Keys, job_id: str, follow: bool, after: str = "0-0", poll_ms: int = 1000
) -> AsyncIterator[bytes]:
    """The job's log records as NDJSON, oldest first; with `follow`, then new ones as they come, until
    the job reaches a terminal state (a job whose trainer died is reaped on the way)."""
    return record_log(
        redis, keys, TRAINING, job_id, lambda: _load(redis, keys, job_id), follow=follow, after=after, poll_ms=poll_ms
    )
