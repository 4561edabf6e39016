"""Service functions behind the evaluation routes. The gateway checks, queues and reports; evaluators run lm-eval.

An evaluation is refused before it is queued when it could not run: a task no live evaluator knows (422,
with near matches), no evaluator running at all (503), a training job that does not exist (422) or has not
succeeded (409), a model name the operator does not allow (422, GRAPE_ALLOWED_MODELS), too many queued
evaluations (429).
"""

from __future__ import annotations

import difflib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from redis.asyncio import Redis

from grape.evaluations import (
    CANCEL_LUA,
    ENQUEUE_LUA,
    REAP_LUA,
    TERMINAL,
    EvalSpec,
    EvalState,
    EvaluationRequest,
    dead_evaluator_reason,
    decode_evaluation,
    is_eval_id,
    new_eval_id,
    new_evaluation_fields,
)
from grape.jobs import JobState, decode_job
from grape.keys import Keys, is_job_id
from grape.redis_client import as_str as _text
from grape.settings import Settings
from service.errors import Busy, Conflict, NotFound, Unprocessable
from service.evaluation_schemas import EvaluationPublic
from service.logs import Progress, stream_log
from service.model_access import check_model

NO_EVALUATOR = "no evaluator is running: start `grape evaluator` (it publishes the lm-eval tasks it can run)"


async def live_evaluators(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    """Heartbeats of the evaluators alive now (their TTL key exists)."""
    now = time.time()
    await redis.zremrangebyscore(keys.evaluators(), "-inf", now - 3600)
    names = [_text(n) for n in await redis.zrange(keys.evaluators(), 0, -1)]
    if not names:
        return []
    raws = await redis.mget([keys.evaluator(n) for n in names])
    return [orjson.loads(r) for r in raws if r]


async def check_tasks(*, redis: Redis, keys: Keys, tasks: list[str]) -> None:
    """Every task must be one a live evaluator published (lm-eval's TaskManager names, with GRAPE_EVAL_TASK_DIR):
    checked when asked, not after an hour of training. 503 without a live evaluator, 422 naming the task."""
    if not await live_evaluators(redis, keys):
        raise Busy(NO_EVALUATOR, retry_after=30, status=503)
    known = await redis.smismember(keys.eval_tasks(), tasks)
    unknown = [t for t, ok in zip(tasks, known, strict=True) if not ok]
    if not unknown:
        return
    names = [_text(n) for n in await redis.smembers(keys.eval_tasks())]
    near = difflib.get_close_matches(unknown[0], names, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise Unprocessable(
        f"tasks: {', '.join(repr(t) for t in unknown)} not known to the evaluators (lm-eval's tasks and those in "
        f"their GRAPE_EVAL_TASK_DIR){hint}",
        field="tasks",
        unknown=unknown,
        near=near,
    )


async def resolve_model(*, redis: Redis, keys: Keys, settings: Settings, model: str) -> dict[str, str | None]:
    """What lm-eval loads for `model`: an allowed model name (GRAPE_ALLOWED_MODELS) as it is, or a succeeded
    training job's model / LoRA adapter (its base model was checked when the job was created)."""
    if not is_job_id(model):
        await check_model(redis=redis, keys=keys, settings=settings, name=model, field="model")
        return {"base_model": model, "adapter": None, "training_job": None}
    raw = await redis.hgetall(keys.job(model))
    if not raw:
        raise Unprocessable(f"model: training job {model} not found", field="model")
    job = decode_job(raw)
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
    *, redis: Redis, keys: Keys, settings: Settings, body: EvaluationRequest, experiment_id: str | None = None
) -> str:
    """Check and queue an evaluation; its id."""
    resolved = await resolve_model(redis=redis, keys=keys, settings=settings, model=body.model)
    await check_tasks(redis=redis, keys=keys, tasks=body.tasks)
    spec = EvalSpec(**body.model_dump(), **resolved, experiment_id=experiment_id)
    eval_id = new_eval_id()
    now = time.time()
    fields = new_evaluation_fields(eval_id, spec, now, settings.eval_max_attempts)
    args: list[Any] = [eval_id, f"{now:.3f}", settings.max_queued_evals]
    for k, v in fields.items():
        args += [k, v]
    ok = await redis.register_script(ENQUEUE_LUA)(
        keys=[keys.evaluation(eval_id), keys.evaluations(), keys.eval_queue(), keys.eval_log(eval_id)], args=args
    )
    if not ok:
        raise Busy(
            f"{settings.max_queued_evals} evaluations are queued (GRAPE_MAX_QUEUED_EVALS): start evaluators or "
            "retry later",
            retry_after=60,
        )
    return eval_id


async def _load(redis: Redis, keys: Keys, eval_id: str) -> dict[str, Any]:
    raw = await redis.hgetall(keys.evaluation(eval_id)) if is_eval_id(eval_id) else None
    if not raw:
        raise NotFound(f"evaluation {eval_id!r} not found")
    return decode_evaluation(raw)


async def reap_if_dead(*, redis: Redis, keys: Keys, ev: dict[str, Any]) -> bool:
    """A running evaluation whose evaluator has no heartbeat is queued again (or failed) now, not left running."""
    name = ev.get("evaluator")
    if ev["state"] != EvalState.running or not name or await redis.exists(keys.evaluator(name)):
        return False
    res = await redis.register_script(REAP_LUA)(
        keys=[
            keys.evaluator(name),
            keys.eval_claimed(name),
            keys.evaluation(ev["id"]),
            keys.eval_log(ev["id"]),
            keys.eval_queue(),
            keys.eval_cancel(ev["id"]),
        ],
        args=[ev["id"], name, f"{time.time():.3f}", dead_evaluator_reason(name)],
    )
    return _text(res) != "alive"


def _public(ev: dict[str, Any]) -> EvaluationPublic:
    spec = ev["spec"]
    fields = set(EvaluationPublic.model_fields)
    row = {k: v for k, v in spec.items() if k in fields and v is not None}
    row.update({k: v for k, v in ev.items() if k in fields and k != "spec" and v is not None})
    return EvaluationPublic(**row)


async def get_evaluation(*, redis: Redis, keys: Keys, eval_id: str) -> EvaluationPublic:
    ev = await _load(redis, keys, eval_id)
    if await reap_if_dead(redis=redis, keys=keys, ev=ev):
        ev = await _load(redis, keys, eval_id)
    return _public(ev)


async def list_evaluations(
    *, redis: Redis, keys: Keys, limit: int, experiment_id: str | None = None
) -> list[EvaluationPublic]:
    ids = [_text(x) for x in await redis.zrevrange(keys.evaluations(), 0, limit - 1)]
    out = []
    for eval_id in ids:
        try:
            ev = await get_evaluation(redis=redis, keys=keys, eval_id=eval_id)
        except NotFound:
            continue
        if experiment_id is None or ev.experiment_id == experiment_id:
            out.append(ev)
    return out


async def cancel_evaluation(*, redis: Redis, keys: Keys, eval_id: str) -> EvaluationPublic:
    """A queued evaluation is cancelled at once; a running one when its evaluator stops lm-eval (about a second)."""
    await _load(redis, keys, eval_id)
    res = _text(
        await redis.register_script(CANCEL_LUA)(
            keys=[keys.evaluation(eval_id), keys.eval_queue(), keys.eval_cancel(eval_id), keys.eval_log(eval_id)],
            args=[eval_id, f"{time.time():.3f}"],
        )
    )
    if res == "missing":
        raise NotFound(f"evaluation {eval_id!r} not found")
    if res not in ("cancelled-now", "cancelling"):
        raise Conflict(f"evaluation {eval_id} is already {res}; only queued or running evaluations can be cancelled")
    return await get_evaluation(redis=redis, keys=keys, eval_id=eval_id)


async def log_lines(
    *, redis: Redis, keys: Keys, eval_id: str, follow: bool, after: str = "0-0", poll_ms: int = 1000
) -> AsyncIterator[bytes]:
    """The evaluation's log records as NDJSON, oldest first; with `follow`, new ones until it ends."""
    await _load(redis, keys, eval_id)

    async def progress() -> Progress:
        ev = await _load(redis, keys, eval_id)
        if EvalState(ev["state"]) in TERMINAL:
            return "ended"
        return "reaped" if await reap_if_dead(redis=redis, keys=keys, ev=ev) else "running"

    async for line in stream_log(
        redis, keys.eval_log(eval_id), follow=follow, after=after, poll_ms=poll_ms, progress=progress
    ):
        yield line
