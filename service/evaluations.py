"""Service functions behind the evaluation routes. The gateway checks, queues and reports; evaluators run lm-eval.

An evaluation is refused before it is queued when it could not run: a task the operator does not allow
(422 naming GRAPE_EVAL_TASKS), a task no live evaluator offers (422, with near matches or the evaluators'
reason), no evaluator running at all (503), a training job that does not exist (422) or has not succeeded
(409), a model name the operator does not allow (422, GRAPE_ALLOWED_MODELS), too many queued evaluations (429).
"""

from __future__ import annotations

import asyncio
import difflib
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from redis.asyncio import Redis

from grape.evaluations import (
    EvalSpec,
    EvaluationRequest,
    is_eval_id,
    new_eval_id,
    new_evaluation_fields,
    task_allowed,
)
from grape.jobs import JobState
from grape.keys import Keys, is_job_id
from grape.redis_client import as_str as _text
from grape.settings import Settings
from grape.store import eval_tasks, tenants
from grape.store.errors import OverQuota
from grape.store.io import acall, arun
from grape.store.jobqueue import EVALUATIONS, TRAINING
from grape.store.tenants import owner
from grape.tenancy import LOCAL, Identity
from service.errors import Busy, Conflict, NotFound, Unprocessable, shown
from service.evaluation_schemas import EvaluationPublic
from service.logs import record_log
from service.model_access import check_model
from service.tenancy import check_free, evaluation_missing, owned_evaluation

NO_EVALUATOR = "no evaluator is running: start `grape evaluator` (it publishes the lm-eval tasks it can run)"


HOUR_S = 3600.0


async def live_evaluators(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    """Heartbeats of the evaluators alive now (their TTL key exists)."""
    # any name that beat in the last hour, kept only while its TTL key exists: the gateway does not know the
    # evaluators' GRAPE_EVALUATOR_HEARTBEAT_S
    return await EVALUATIONS.beats(keys, HOUR_S).live(redis)


HINT_TTL_S = 60.0
"""How long the names near matches are searched in are kept per key prefix (they change when evaluators start)."""
_hint_names: dict[tuple[str, tuple[str, ...]], tuple[float, tuple[str, ...]]] = {}
_hint_reads: dict[tuple[str, tuple[str, ...]], asyncio.Task] = {}
# one near-match search at a time per gateway process (the rest wait for the thread): CPU-bound, each holds
# the GIL the event loop needs, and would otherwise take threads of the default pool selections use
_hint_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grape-hint")


async def check_tasks(*, redis: Redis, keys: Keys, settings: Settings, tasks: list[str]) -> None:
    """Every task must be one the operator allows (GRAPE_EVAL_TASKS; unset: the tasks of the evaluators'
    GRAPE_EVAL_TASK_DIR) and a live evaluator offers: checked when asked, not after an hour of training. 503
    without a live evaluator, 422 naming the setting or the task (cut to 64 characters)."""
    if not await live_evaluators(redis, keys):
        raise Busy(NO_EVALUATOR, retry_after=30, status=503)
    patterns = settings.eval_task_patterns()
    if patterns:
        allowed = [task_allowed(t, patterns, set()) for t in tasks]
    else:
        allowed = await arun(redis, eval_tasks.in_task_dir(keys, tasks))
    refused = [t for t, ok in zip(tasks, allowed, strict=True) if not ok]
    if refused:
        rule = (
            f"GRAPE_EVAL_TASKS={settings.eval_tasks}"
            if patterns
            else "GRAPE_EVAL_TASKS is unset: only the tasks of the evaluators' GRAPE_EVAL_TASK_DIR"
        )
        raise await _unknown(redis, keys, settings, refused, f" or not allowed by the operator ({rule})")
    known = await arun(redis, eval_tasks.known(keys, tasks))
    unknown = [t for t, ok in zip(tasks, known, strict=True) if not ok]
    if unknown:
        why = [w for w in await arun(redis, eval_tasks.refusals(keys, unknown)) if w]
        raise await _unknown(redis, keys, settings, unknown, f": {why[0]}" if why else " (no live evaluator offers it)")


async def _unknown(redis: Redis, keys: Keys, settings: Settings, names: list[str], why: str) -> Unprocessable:
    """The 422 of tasks a request may not use: each name cut to 64 characters, with near matches."""
    near = await _near(redis, keys, settings, names[0][:64])
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    return Unprocessable(
        f"tasks: {', '.join(shown(t) for t in names[:10])} not known to the evaluators{why}{hint}",
        field="tasks",
        unknown=[t[:64] for t in names[:10]],
        near=near,
    )


async def _near(redis: Redis, keys: Keys, settings: Settings, name: str) -> list[str]:
    """Near matches among the names a request may use (allowed and offered), off the event loop: difflib over
    thousands of names takes a CPU-bound fraction of a second."""
    names = await _hint_list(redis, keys, tuple(settings.eval_task_patterns()))
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_hint_pool, difflib.get_close_matches, name, names, 5, 0.6)


async def _hint_list(redis: Redis, keys: Keys, patterns: tuple[str, ...]) -> tuple[str, ...]:
    """The allowed offered names, read once per HINT_TTL_S; concurrent requests share one read."""
    slot = (keys.prefix, patterns)
    cached = _hint_names.get(slot)
    if cached is not None and time.monotonic() - cached[0] <= HINT_TTL_S:
        return cached[1]
    read = _hint_reads.get(slot)
    if read is None or read.done():
        read = _hint_reads[slot] = asyncio.ensure_future(_read_hint_list(redis, keys, patterns))
    return await asyncio.shield(read)


async def _read_hint_list(redis: Redis, keys: Keys, patterns: tuple[str, ...]) -> tuple[str, ...]:
    offered = await arun(redis, eval_tasks.every(keys))
    local = set() if patterns else await arun(redis, eval_tasks.dir_tasks(keys))
    loop = asyncio.get_running_loop()
    names = await loop.run_in_executor(
        _hint_pool, lambda: tuple(sorted(n for n in offered if task_allowed(n, list(patterns), local)))
    )
    if len(_hint_names) >= 64:  # one entry per key prefix and setting: a few in any deployment
        _hint_names.clear()
    _hint_names[(keys.prefix, patterns)] = (time.monotonic(), names)
    return names


async def resolve_model(
    *, redis: Redis, keys: Keys, settings: Settings, model: str, who: Identity = LOCAL
) -> dict[str, str | None]:
    """What lm-eval loads for `model`: an allowed model name (GRAPE_ALLOWED_MODELS) as it is, or a succeeded
    training job's model / LoRA adapter (its base model was checked when the job was created). A job `who` may
    not see is answered as one that does not exist."""
    if not is_job_id(model):
        await check_model(redis=redis, keys=keys, settings=settings, name=model, field="model")
        return {"base_model": model, "adapter": None, "training_job": None}
    job = await arun(redis, TRAINING.read(keys, model))
    if job is None or not who.sees(owner(job.get("tenant"))):
        raise Unprocessable(f"model: training job {model} not found", field="model")
    if job["state"] != JobState.succeeded or not job.get("model_path"):
        raise Conflict(
            f"model: training job {model} is {job['state']}; a job is evaluated once it has succeeded",
            field="model",
            job_state=job["state"],
        )
    spec = job["spec"]
    if spec.get("lora"):
        return {"base_model": spec["base_model"], "adapter": job["model_path"], "training_job": model}
    return {"base_model": job["model_path"], "adapter": None, "training_job": model}


async def create_evaluation(
    *,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    body: EvaluationRequest,
    experiment_id: str | None = None,
    who: Identity = LOCAL,
) -> str:
    """Check and queue an evaluation of `who`'s tenant (403 past its active_evaluations quota); its id."""
    resolved = await resolve_model(redis=redis, keys=keys, settings=settings, model=body.model, who=who)
    await check_tasks(redis=redis, keys=keys, settings=settings, tasks=body.tasks)
    spec = EvalSpec(**body.model_dump(), **resolved, experiment_id=experiment_id)
    eval_id = new_eval_id()
    fields = new_evaluation_fields(eval_id, spec, time.time(), settings.eval_max_attempts)
    limit, used = await check_free(redis, keys, settings, who.tenant, "active_evaluations")
    res = await acall(redis, EVALUATIONS.enqueue(keys, eval_id, fields, settings.max_queued_evals, who.tenant, limit))
    if res == -1:  # taken meanwhile by another request of the tenant
        raise OverQuota("active_evaluations", limit, used, who.tenant)
    if not res:
        raise Busy(
            f"{settings.max_queued_evals} evaluations are queued (GRAPE_MAX_QUEUED_EVALS): start evaluators or "
            "retry later",
            retry_after=60,
        )
    return eval_id


async def _load(redis: Redis, keys: Keys, eval_id: str) -> dict[str, Any]:
    ev = await arun(redis, EVALUATIONS.read(keys, eval_id)) if is_eval_id(eval_id) else None
    if ev is None:
        raise evaluation_missing(eval_id)
    return ev


def _public(ev: dict[str, Any]) -> EvaluationPublic:
    spec = ev["spec"]
    fields = set(EvaluationPublic.model_fields)
    row = {k: v for k, v in spec.items() if k in fields and v is not None}
    row.update({k: v for k, v in ev.items() if k in fields and k != "spec" and v is not None})
    return EvaluationPublic(**row)


async def get_evaluation(*, redis: Redis, keys: Keys, eval_id: str) -> EvaluationPublic:
    ev = await _load(redis, keys, eval_id)
    if await EVALUATIONS.areap_if_dead(redis, keys, ev):
        ev = await _load(redis, keys, eval_id)
    return _public(ev)


async def list_evaluations(
    *, redis: Redis, keys: Keys, limit: int, experiment_id: str | None = None, tenant: str | None = None
) -> list[EvaluationPublic]:
    """The newest evaluations of `tenant` (None: of every tenant)."""
    out, gone = [], []
    newest = EVALUATIONS.newest(keys, limit) if tenant is None else tenants.ids(keys, tenant, "evals", limit)
    for eval_id in await arun(redis, newest):
        try:
            ev = await get_evaluation(redis=redis, keys=keys, eval_id=eval_id)
        except NotFound:
            gone.append(eval_id)
            continue
        if experiment_id is None or ev.experiment_id == experiment_id:
            out.append(ev)
    if tenant is not None:
        await arun(redis, tenants.forget(keys, tenant, "evals", gone))
    return out


async def cancel_evaluation(*, redis: Redis, keys: Keys, eval_id: str) -> EvaluationPublic:
    """A queued evaluation is cancelled at once; a running one when its evaluator stops lm-eval (about a second)."""
    await _load(redis, keys, eval_id)
    res = _text(await acall(redis, EVALUATIONS.cancel(keys, eval_id)))
    if res == "missing":
        raise evaluation_missing(eval_id)
    if res not in ("cancelled-now", "cancelling"):
        raise Conflict(f"evaluation {eval_id} is already {res}; only queued or running evaluations can be cancelled")
    return await get_evaluation(redis=redis, keys=keys, eval_id=eval_id)


async def delete_evaluation(*, redis: Redis, keys: Keys, eval_id: str) -> None:
    """Remove an evaluation that has ended: its record, its log and its flags, at once. A queued or running one
    is refused (409: cancel it first); one whose evaluator died is reaped first, like a GET does."""
    ev = await _load(redis, keys, eval_id)  # the GET's own lookup: 404 for an id that is not one
    await EVALUATIONS.areap_if_dead(redis, keys, ev)
    tenant = await owned_evaluation(redis, keys, LOCAL, eval_id)  # the owner's index loses it too
    res = _text(await acall(redis, EVALUATIONS.delete(keys, eval_id, tenant)))
    if res == "missing":
        raise NotFound(f"evaluation {eval_id!r} not found")
    if res != "deleted":
        raise Conflict(
            f"evaluation {eval_id} is {res}: cancel it first (POST /v1/evaluations/{eval_id}/cancel), then delete "
            "it once it is cancelled",
            state=res,
        )


def log_lines(
    *, redis: Redis, keys: Keys, eval_id: str, follow: bool, after: str = "0-0", poll_ms: int = 1000
) -> AsyncIterator[bytes]:
    """The evaluation's log records as NDJSON, oldest first; with `follow`, new ones until it ends."""
    return record_log(
        redis,
        keys,
        EVALUATIONS,
        eval_id,
        lambda: _load(redis, keys, eval_id),
        follow=follow,
        after=after,
        poll_ms=poll_ms,
    )
