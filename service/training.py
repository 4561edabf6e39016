"""Service functions behind the training-job routes. The gateway queues and reports; trainers train.

A job is refused before it is queued when it could not produce a useful run: unknown dataset (404),
unknown strategy or scores the strategy needs not requested (422), dataset still scoring (409),
empty selection (422), a base model the operator does not allow (422, GRAPE_ALLOWED_MODELS), too many
queued jobs (429). The request itself is an allow-list (grape.jobs.Hyperparameters): nothing in it names a
file, a directory, code or a machine setting.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis

from grape.jobs import (
    CANCEL_LUA,
    DELETE_LUA,
    ENQUEUE_LUA,
    REAP_LUA,
    RESUME_LUA,
    TERMINAL,
    JobSpec,
    JobState,
    dead_trainer_reason,
    decode_job,
    new_job_fields,
)
from grape.keys import Keys, is_job_id, new_job_id
from grape.records import DatasetState
from grape.redis_client import as_str as _text
from grape.settings import Settings
from grape.strategies import SelectParams
from service import tasks as task_svc
from service.datasets import dataset_status, selection_lines
from service.errors import Busy, Conflict, NotFound, Unprocessable, shown
from service.logs import Progress, stream_log
from service.model_access import check_chat_template, check_model
from service.store import dataset_meta
from service.training_schemas import TrainingJobCreate, TrainingJobCreated, TrainingJobList, TrainingJobPublic

log = logging.getLogger(__name__)

UNREADABLE = (ValidationError, ValueError, KeyError, TypeError)
"""What decoding a stored job record can raise when the record is not one this version wrote."""


async def create_job(*, redis: Redis, keys: Keys, settings: Settings, body: TrainingJobCreate) -> TrainingJobCreated:
    meta = await dataset_meta(redis, keys, body.dataset_id)
    # a dataset's target model is checked too: it may predate the operator's list
    base_model = body.base_model or meta["target_model"]
    await check_model(redis=redis, keys=keys, settings=settings, name=base_model, field="base_model")
    check_chat_template(settings, body.hyperparameters.chat_template)
    task_svc.check_strategies(meta, [body.strategy], body.dataset_id)
    ds = await dataset_status(redis=redis, keys=keys, dataset_id=body.dataset_id)
    if ds.state is not DatasetState.done:
        raise Conflict(
            f"dataset {body.dataset_id} is {ds.state.value} ({ds.scored_items + ds.failed_items} of {ds.items} "
            "items scored or failed): a job trains on a fully scored dataset; retry when its state is done",
            dataset_state=ds.state.value,
            items=ds.items,
            scored_items=ds.scored_items,
        )
    params = SelectParams(k=body.k, reduce=body.reduce, n=body.n, tau=body.tau, seed=body.seed)
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
    now = time.time()
    fields = new_job_fields(job_id, spec, now)
    script = redis.register_script(ENQUEUE_LUA)
    args: list[Any] = [job_id, f"{now:.3f}", settings.max_queued_jobs]
    for k, v in fields.items():
        args += [k, v]
    ok = await script(keys=[keys.job(job_id), keys.jobs(), keys.job_queue(), keys.job_log(job_id)], args=args)
    if not ok:
        raise Busy(
            f"{settings.max_queued_jobs} training jobs are queued (GRAPE_MAX_QUEUED_JOBS): start trainers or "
            "retry later",
            retry_after=60,
        )
    return TrainingJobCreated(id=job_id, state=JobState.queued)


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
    return NotFound(f"training job {shown(job_id)} not found")


async def _load(redis: Redis, keys: Keys, job_id: str) -> dict[str, Any]:
    if not is_job_id(job_id):  # a value that is not an id must never name another key
        raise _not_found(job_id)
    raw = await redis.hgetall(keys.job(job_id))
    if not raw:
        raise _not_found(job_id)
    try:
        return decode_job(raw)
    except UNREADABLE as exc:
        raise _unreadable(job_id, exc) from None


def _unreadable(job_id: str, exc: Exception) -> Conflict:
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return Conflict(
        f"training job {job_id}: its stored record cannot be read ({reason}); DELETE /v1/training-jobs/{job_id} "
        "removes it",
        unreadable=True,
    )


async def reap_if_dead(*, redis: Redis, keys: Keys, job: dict[str, Any]) -> bool:
    """A running job whose trainer has no heartbeat is failed (or queued to resume) now, not left running."""
    trainer = job.get("trainer")
    if job["state"] != JobState.running or not trainer or await redis.exists(keys.trainer(trainer)):
        return False
    script = redis.register_script(REAP_LUA)
    res = await script(
        keys=[
            keys.trainer(trainer),
            keys.job_claimed(trainer),
            keys.job(job["id"]),
            keys.job_log(job["id"]),
            keys.job_queue(),
            keys.job_cancel(job["id"]),
        ],
        args=[job["id"], trainer, f"{time.time():.3f}", dead_trainer_reason(trainer, job.get("step"))],
    )
    return res not in (b"alive", "alive")


def _public(job: dict[str, Any]) -> TrainingJobPublic:
    fields = set(TrainingJobPublic.model_fields)
    try:
        return TrainingJobPublic(**{k: v for k, v in job.items() if k in fields and v is not None})
    except UNREADABLE as exc:
        raise _unreadable(str(job.get("id")), exc) from None


async def get_job(*, redis: Redis, keys: Keys, job_id: str) -> TrainingJobPublic:
    job = await _load(redis, keys, job_id)
    if await reap_if_dead(redis=redis, keys=keys, job=job):
        job = await _load(redis, keys, job_id)
    return _public(job)


async def list_jobs(*, redis: Redis, keys: Keys, limit: int) -> TrainingJobList:
    """The newest jobs; a record this version cannot read is listed by id in `unreadable`, never a 500."""
    ids = [x.decode() if isinstance(x, bytes) else x for x in await redis.zrevrange(keys.jobs(), 0, limit - 1)]
    out, unreadable = [], []
    for job_id in ids:
        try:
            out.append(await get_job(redis=redis, keys=keys, job_id=job_id))
        except NotFound:
            continue
        except Conflict as exc:
            log.warning("%s", exc.message)
            unreadable.append(job_id)
    return TrainingJobList(jobs=out, unreadable=unreadable)


async def _move(redis: Redis, keys: Keys, job_id: str, lua: str) -> str:
    """Run one of the job state-move scripts; its answer, or NotFound when the job does not exist."""
    if not is_job_id(job_id):
        raise _not_found(job_id)
    res = await redis.register_script(lua)(
        keys=[keys.job(job_id), keys.job_queue(), keys.job_cancel(job_id), keys.job_log(job_id)],
        args=[job_id, f"{time.time():.3f}"],
    )
    res = _text(res)
    if res == "missing":
        raise _not_found(job_id)
    return res


async def cancel_job(*, redis: Redis, keys: Keys, job_id: str) -> TrainingJobPublic:
    res = await _move(redis, keys, job_id, CANCEL_LUA)
    if res not in ("cancelled-now", "cancelling"):
        raise Conflict(f"training job {job_id} is already {res}; only queued or running jobs can be cancelled")
    return await get_job(redis=redis, keys=keys, job_id=job_id)


async def resume_job(*, redis: Redis, keys: Keys, job_id: str) -> TrainingJobPublic:
    res = await _move(redis, keys, job_id, RESUME_LUA)
    if res != "queued":
        raise Conflict(f"training job {job_id} is {res}; only failed or cancelled jobs can be resumed")
    return await get_job(redis=redis, keys=keys, job_id=job_id)


async def delete_job(*, redis: Redis, keys: Keys, job_id: str) -> None:
    """Remove a job that is not running: its record, log and flags at once; its directory
    (GRAPE_TRAIN_DIR/<job id>) is removed by the trainers, which watch `Keys.jobs_deleted`."""
    if not is_job_id(job_id):
        raise _not_found(job_id)
    state = _text(await redis.hget(keys.job(job_id), "state"))
    if state == JobState.running:  # a running job whose trainer died is reaped first, then deletable
        with contextlib.suppress(Conflict):  # an unreadable record: the script below decides on the raw state
            await reap_if_dead(redis=redis, keys=keys, job=await _load(redis, keys, job_id))
    res = _text(
        await redis.register_script(DELETE_LUA)(
            keys=[
                keys.job(job_id),
                keys.jobs(),
                keys.job_queue(),
                keys.job_log(job_id),
                keys.job_cancel(job_id),
                keys.jobs_deleted(),
            ],
            args=[job_id, f"{time.time():.3f}"],
        )
    )
    if res == "missing":
        raise _not_found(job_id)
    if res == "running":
        raise Conflict(
            f"training job {job_id} is running: cancel it first (POST /v1/training-jobs/{job_id}/cancel), "
            "then delete it once it is cancelled"
        )


async def log_lines(
    *, redis: Redis, keys: Keys, job_id: str, follow: bool, after: str = "0-0", poll_ms: int = 1000
) -> AsyncIterator[bytes]:
    """The job's log records as NDJSON, oldest first; with `follow`, then new ones as they come, until
    the job reaches a terminal state (a job whose trainer died is reaped on the way)."""
    await _load(redis, keys, job_id)

    async def progress() -> Progress:
        try:
            job = await _load(redis, keys, job_id)
        except (NotFound, Conflict):  # deleted (or unreadable) while followed: the stream ends
            return "ended"
        if JobState(job["state"]) in TERMINAL:
            return "ended"
        return "reaped" if await reap_if_dead(redis=redis, keys=keys, job=job) else "running"

    async for line in stream_log(
        redis, keys.job_log(job_id), follow=follow, after=after, poll_ms=poll_ms, progress=progress
    ):
        yield line
