"""Service functions behind the experiment routes, and the driver that advances experiments.

Creation checks everything that could waste an hour of training (unknown dataset, strategy or task,
duplicate arms, a dataset still scoring, an arm whose selection is smaller than the budget) and stores
each arm's selection. Then the experiment is a small state machine over existing pieces, advanced by
`advance` (idempotent; under a short per-experiment lock): one training job per arm (the ordinary
training-job record, training on the stored selection), then one evaluation per trained arm and one for
the base model. The state lives in Redis, so a gateway restart loses nothing: the driver task of any
gateway (or a GET) takes it up where it was. A dead trainer's job is queued again (auto_resume); a dead
evaluator's evaluation is handled by the evaluation protocol; an arm whose job or evaluation fails is
marked failed with the reason, and the other arms go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from grape import experiments as ex
from grape.evaluations import EvaluationRequest
from grape.experiments import ArmSpec, ExperimentState
from grape.jobs import JobSpec, JobState, new_job_fields
from grape.keys import Keys
from grape.records import DatasetState
from grape.settings import Settings
from grape.store import experiments as exp_store
from grape.store import tenants
from grape.store.datasets import check_selection
from grape.store.errors import Invalid, OverQuota
from grape.store.io import acall, arun
from grape.store.jobqueue import EVALUATIONS, TERMINAL, TRAINING
from grape.store.tenants import owner
from grape.tenancy import LOCAL, Identity, quotas_of
from service import evaluations as eval_svc
from service.datasets import dataset_status, selection_lines
from service.errors import ApiError, Conflict, NotFound, Unprocessable, shown
from service.experiment_schemas import ExperimentCreate, ExperimentCreated, ExperimentPublic
from service.model_access import check_chat_template, check_model
from service.tenancy import check_free, count_active, experiment_missing, owned_dataset
from service.training import check_job_budget

log = logging.getLogger(__name__)

ARM_ACTIVE = ("queued", "training", "evaluating")


# ---- creation ------------------------------------------------------------------------------------------


def check_arms(body: ExperimentCreate, meta: dict[str, str]) -> None:
    """Known strategies with their scores requested, parameters that fit the budget, no arm twice."""
    seen: dict[str, int] = {}
    for i, arm in enumerate(body.arms):
        try:
            check_selection(meta, [arm.strategy], body.dataset_id)
        except Invalid as exc:
            raise Unprocessable(f"arms[{i}].{exc}") from None
        if ex.shares_draw(arm) and arm.n is not None:
            raise Unprocessable(
                f"arms[{i}].n: {arm.strategy} picks a response per instruction; the experiment draws "
                f"budget.pairs={body.budget.pairs} instructions for it (leave n out)"
            )
        if not ex.shares_draw(arm) and arm.n not in (None, body.budget.pairs):
            raise Unprocessable(
                f"arms[{i}].n: every arm trains on budget.pairs={body.budget.pairs} pairs; leave n out (got {arm.n})"
            )
        key = orjson.dumps(ex.arm_params(arm, body.budget.pairs).model_dump() | {"strategy": arm.strategy}).decode()
        if key in seen:
            raise Unprocessable(f"arms[{i}]: the same arm as arms[{seen[key]}] ({arm.label()}); arms must differ")
        seen[key] = i


async def _lines(redis: Redis, keys: Keys, dataset_id: str, arm: ArmSpec, pairs: int) -> AsyncIterator[bytes]:
    """The arm's selection, one NDJSON line per pair, streamed (the gateway's own selection code)."""
    params = ex.arm_params(arm, pairs)
    try:
        async for chunk in selection_lines(
            redis=redis, keys=keys, dataset_id=dataset_id, strategy=arm.strategy, params=params
        ):
            for line in chunk.split(b"\n"):
                if line:
                    yield line + b"\n"
    except ValueError as exc:  # a strategy refusing its parameters
        raise Unprocessable(f"arms: {arm.label()}: {exc}") from None


def _too_small(i: int, arm: ArmSpec, size: int, pairs: int, what: str) -> Unprocessable:
    return Unprocessable(
        f"arms[{i}] ({arm.label()}): {what}, fewer than budget.pairs={pairs}; lower the budget or drop the arm",
        arm=i,
        size=size,
    )


async def materialize(redis: Redis, keys: Keys, body: ExperimentCreate) -> tuple[list[list[bytes]], int]:
    """Each arm's selection, fair by construction: the per-instruction arms get the same `pairs`
    instructions, drawn with the experiment's seed from those every such arm can serve; pool-wide arms
    their own top `pairs`. An arm that cannot fill the budget is refused (422 naming it and its size).
    Per-instruction selections are read twice (their ids, then the drawn records), so the gateway holds
    the budget's records, never a whole pool's. Returns the selections and the number of instructions
    the per-instruction arms had in common."""
    pairs, ds = body.budget.pairs, body.dataset_id
    per = [i for i, arm in enumerate(body.arms) if ex.shares_draw(arm)]
    out: list[list[bytes]] = [[] for _ in body.arms]
    ids: dict[int, list[str]] = {}
    for i, arm in enumerate(body.arms):
        if i in per:
            ids[i] = [orjson.loads(line)["id"] async for line in _lines(redis, keys, ds, arm, pairs)]
            if len(ids[i]) < pairs:
                raise _too_small(i, arm, len(ids[i]), pairs, f"it can serve {len(ids[i])} instructions")
        else:
            out[i] = [line async for line in _lines(redis, keys, ds, arm, pairs)][:pairs]
            if len(out[i]) < pairs:
                raise _too_small(i, arm, len(out[i]), pairs, f"its selection has {len(out[i])} pairs")
    common: list[str] = []
    if per:
        shared = set(ids[per[0]]).intersection(*(set(ids[i]) for i in per[1:]))
        common = [x for x in dict.fromkeys(ids[per[0]]) if x in shared]  # upload order
        if len(common) < pairs:
            smallest = min(per, key=lambda i: len(ids[i]))
            raise _too_small(
                smallest,
                body.arms[smallest],
                len(common),
                pairs,
                f"only {len(common)} instructions can be served by every per-instruction arm "
                f"({', '.join(body.arms[i].label() for i in per)})",
            )
        drawn = set(ex.draw_instructions(common, pairs, body.seed))
        for i in per:
            out[i] = [line async for line in _lines(redis, keys, ds, body.arms[i], pairs) if _id(line) in drawn]
    return out, len(common)


def _id(line: bytes) -> str:
    return orjson.loads(line)["id"]


async def create_experiment(
    *, redis: Redis, keys: Keys, settings: Settings, body: ExperimentCreate, who: Identity = LOCAL
) -> ExperimentCreated:
    """Check, materialize and store an experiment of `who`'s tenant, on a dataset `who` may see."""
    meta = await owned_dataset(redis, keys, who, body.dataset_id)
    base_model = body.base_model or meta["target_model"]  # the training API's checks, before any work
    if base_model.strip().startswith("job-"):
        # the base model is also evaluated, and to the evaluations API `job-…` names a training job
        raise Unprocessable(
            f"base_model: {shown(base_model)} looks like a training job id; an experiment fine-tunes a model name "
            "(GRAPE_ALLOWED_MODELS), and to evaluate a trained job use POST /v1/evaluations",
            field="base_model",
        )
    await check_model(redis=redis, keys=keys, settings=settings, name=base_model, field="base_model")
    check_chat_template(settings, body.hyperparameters.chat_template)
    check_arms(body, meta)
    # each arm is a training job on budget.pairs records with these hyperparameters: one check covers every
    # arm, before anything is stored
    check_job_budget(settings, body.hyperparameters, body.budget.pairs)
    # the tenant's quotas, before any work and before anything is stored: a slot for the experiment, and one
    # training job per arm (queued when the experiment is created, so they must fit now)
    exp_limit, exp_used = await check_free(redis, keys, settings, who.tenant, "active_experiments")
    await check_free(redis, keys, settings, who.tenant, "active_training_jobs", needed=len(body.arms))
    ds = await dataset_status(redis=redis, keys=keys, dataset_id=body.dataset_id)
    if ds.state is not DatasetState.done:
        raise Conflict(
            f"dataset_id: dataset {body.dataset_id} is {ds.state.value} ({ds.scored_items + ds.failed_items} of "
            f"{ds.items} items scored or failed): an experiment needs a fully scored dataset; retry when it is done",
            dataset_state=ds.state.value,
        )
    await eval_svc.check_tasks(redis=redis, keys=keys, settings=settings, tasks=body.evaluation.tasks)
    selections, common = await materialize(redis, keys, body)
    exp_id = ex.new_experiment_id()
    now = time.time()
    arms = []
    for i, arm in enumerate(body.arms):
        params = ex.arm_params(arm, body.budget.pairs)
        arms.append(
            {
                "index": i,
                "label": arm.label(),
                "strategy": arm.strategy,
                "params": params.model_dump(),
                "per_instruction": ex.shares_draw(arm),
                "selected_pairs": len(selections[i]),
                "state": "queued",
                "job_id": f"job-{uuid.uuid4().hex[:12]}",
                "job_created": False,
                "results": {},
            }
        )
    record = {
        "id": exp_id,
        "tenant": who.tenant,
        "state": ExperimentState.queued.value,
        "dataset_id": body.dataset_id,
        "base_model": base_model,
        "template": meta.get("template", "auto"),
        "created": now,
        "budget": body.budget.model_dump(),
        "evaluation": body.evaluation.model_dump(),
        "include_base": body.include_base,
        "seed": body.seed,
        "hyperparameters": body.hyperparameters.model_dump(),
        "lora": body.lora.model_dump() if body.lora else None,
        "instructions": common,
        "arms": arms,
        "base": {"model": base_model, "results": {}} if body.include_base else None,
        "best": {},
        "versions": {},
    }
    stored = (b"".join(lines) for lines in selections)
    await arun(redis, exp_store.create(keys, exp_id, record, stored, now, exp_limit, exp_used))
    await _advance_now(redis, keys, settings, exp_id)  # queue the jobs now
    return ExperimentCreated(id=exp_id, state=ExperimentState.queued)


# ---- reading -------------------------------------------------------------------------------------------


_STATES = frozenset(s.value for s in ExperimentState)


class Unreadable(Conflict):
    """A stored experiment record this version cannot read (409 naming DELETE, which removes it)."""


async def _load(redis: Redis, keys: Keys, exp_id: str) -> dict[str, Any]:
    try:
        exp = await arun(redis, exp_store.load(keys, exp_id)) if ex.is_experiment_id(exp_id) else None
    except ValueError as exc:  # not JSON
        raise Unreadable(
            f"experiment {exp_id}: its stored record cannot be read ({str(exc)[:200]}); DELETE /v1/experiments/"
            f"{exp_id} removes it",
            unreadable=True,
        ) from None
    if exp is None:
        raise experiment_missing(exp_id)
    if not isinstance(exp, dict) or not isinstance(exp.get("arms"), list) or exp.get("state") not in _STATES:
        raise Unreadable(
            f"experiment {exp_id}: its stored record is not an experiment; DELETE /v1/experiments/{exp_id} removes it",
            unreadable=True,
        )
    return exp


async def get_experiment(*, redis: Redis, keys: Keys, settings: Settings, exp_id: str) -> ExperimentPublic:
    await _load(redis, keys, exp_id)  # 404 first
    await _advance_now(redis, keys, settings, exp_id)
    try:
        return ExperimentPublic.model_validate(await _load(redis, keys, exp_id))
    except ValidationError as exc:
        raise Unreadable(
            f"experiment {exp_id}: its stored record cannot be read ({str(exc).splitlines()[0][:200]}); "
            f"DELETE /v1/experiments/{exp_id} removes it",
            unreadable=True,
        ) from None


async def _advance_now(redis: Redis, keys: Keys, settings: Settings, exp_id: str) -> None:
    """Advance it for a request: an error advancing is recorded on the experiment (`driver_error`) and logged,
    and the request is answered all the same."""
    try:
        await advance_one(redis=redis, keys=keys, settings=settings, exp_id=exp_id)
    except (ApiError, RedisConnectionError):
        raise
    except Exception:  # noqa: BLE001 - recorded on the experiment by advance_one
        log.exception("experiment %s: advancing failed", exp_id)


async def list_experiments(
    *, redis: Redis, keys: Keys, limit: int, tenant: str | None = None
) -> list[ExperimentPublic]:
    """The newest experiments of `tenant` (None: of every tenant)."""
    out, gone = [], []
    newest = exp_store.newest(keys, limit) if tenant is None else tenants.ids(keys, tenant, "experiments", limit)
    for exp_id in await arun(redis, newest):
        try:
            out.append(ExperimentPublic.model_validate(await _load(redis, keys, exp_id)))
        except NotFound:
            gone.append(exp_id)
        except (Unreadable, ValidationError) as exc:  # listed without it, never a 500
            log.warning("experiment %s not listed: %s", exp_id, str(exc).splitlines()[0][:300])
    if tenant is not None:
        await arun(redis, tenants.forget(keys, tenant, "experiments", gone))
    return out


async def arm_selection(*, redis: Redis, keys: Keys, exp_id: str, arm: int) -> AsyncIterator[bytes]:
    """The arm's stored selection (NDJSON), read page by page (exp_store.SELECTION_PAGE bytes per Redis read):
    the gateway never holds more than a page of it, however large it is. 404 before the first byte."""
    exp = await _load(redis, keys, exp_id)
    if not 0 <= arm < len(exp["arms"]):
        raise NotFound(f"experiment {exp_id} has arms 0..{len(exp['arms']) - 1}, not {arm}")
    size = await arun(redis, exp_store.selection_size(keys, exp_id, arm))
    if not size:
        raise NotFound(f"the selection of arm {arm} of experiment {exp_id} is not stored")
    return _selection_pages(redis, keys, exp_id, arm, size)


async def _selection_pages(redis: Redis, keys: Keys, exp_id: str, arm: int, size: int) -> AsyncIterator[bytes]:
    for start in range(0, size, exp_store.SELECTION_PAGE):
        page = await arun(redis, exp_store.selection_page(keys, exp_id, arm, start))
        if not page:  # deleted while it was being sent
            return
        yield page


# ---- the lock ------------------------------------------------------------------------------------------


class _Lock:
    """A short per-experiment lock: one process advances (or cancels) an experiment at a time."""

    def __init__(self, redis: Redis, keys: Keys, exp_id: str) -> None:
        self.redis, self.keys, self.exp_id, self.token = redis, keys, exp_id, uuid.uuid4().hex

    async def acquire(self, wait_s: float = 0.0) -> bool:
        deadline = time.monotonic() + wait_s
        while True:
            if await arun(self.redis, exp_store.try_lock(self.keys, self.exp_id, self.token)):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def release(self) -> None:
        await acall(self.redis, exp_store.unlock(self.keys, self.exp_id, self.token))


# ---- advancing -----------------------------------------------------------------------------------------


async def advance_one(*, redis: Redis, keys: Keys, settings: Settings, exp_id: str) -> None:
    """Move one experiment as far as it can go now; a no-op when another process holds its lock."""
    lock = _Lock(redis, keys, exp_id)
    if not await lock.acquire():
        return
    try:
        exp = await _load(redis, keys, exp_id)
        before = orjson.dumps(exp)
        if ExperimentState(exp["state"]) not in ex.TERMINAL:
            try:
                await _advance(redis, keys, settings, exp)
                exp.pop("driver_error", None)
            except RedisConnectionError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug or a bad record: said on the experiment, retried
                exp = await _load(redis, keys, exp_id)  # what _advance changed half-way is not saved
                exp["driver_error"] = f"{type(exc).__name__}: {str(exc)[:300]}; retried every pass"
                if orjson.dumps(exp) != before:
                    await arun(redis, exp_store.save(keys, exp_id, exp, finished=False))
                raise
        changed = orjson.dumps(exp) != before
        finished = ExperimentState(exp["state"]) in ex.TERMINAL
        ended = exp.get("finished") if finished else None
        await arun(redis, exp_store.save(keys, exp_id, exp if changed else None, finished=finished, ended_at=ended))
    finally:
        await lock.release()


async def advance_active(*, redis: Redis, keys: Keys, settings: Settings) -> None:
    """One pass over the unfinished experiments. One that raises is logged (and its error recorded on it when
    it can be read) and the pass goes on with the others: one bad record never stops the rest."""
    for exp_id in await arun(redis, exp_store.active(keys)):
        try:
            await advance_one(redis=redis, keys=keys, settings=settings, exp_id=exp_id)
        except NotFound:
            await arun(redis, exp_store.forget(keys, exp_id))
        except Unreadable as exc:  # it can never advance: left for DELETE, no longer retried
            log.warning("experiment driver: %s; no longer advanced", exc.message)
            await arun(redis, exp_store.forget(keys, exp_id))
        except RedisConnectionError:
            raise  # Redis is away: the pass ends, the driver logs it once and retries
        except Exception:  # noqa: BLE001 - see advance_one: recorded on the experiment, retried next pass
            log.exception("experiment driver: advancing experiment %s failed; the others go on", exp_id)


async def driver(
    *,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    interval_s: float,
    sweep: Callable[..., Awaitable[Any]] | None = None,
) -> None:
    """The gateway's background task: advance every unfinished experiment every `interval_s` seconds, then run
    `sweep` (the routes pass service.retention.sweep: what GRAPE_RETENTION_DAYS let expire is removed)."""
    steps: list[tuple[str, Callable[..., Awaitable[Any]]]] = [("advancing", advance_active)]
    steps += [("the retention sweep", sweep)] if sweep is not None else []
    while True:
        for what, step in steps:
            try:
                await step(redis=redis, keys=keys, settings=settings)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the driver survives Redis hiccups and bad records; logged
                log.exception("experiment driver: %s failed; retrying", what)
        await asyncio.sleep(interval_s)


def _job_spec(exp: dict[str, Any], arm: dict[str, Any]) -> JobSpec:
    p = arm["params"]
    return JobSpec(
        dataset_id=exp["dataset_id"],
        strategy=arm["strategy"],
        k=1,
        reduce=p["reduce"],
        n=p["n"],
        tau=p["tau"],
        seed=p["seed"],
        base_model=exp["base_model"],
        template=exp.get("template", "auto"),
        hyperparameters=exp["hyperparameters"],
        lora=exp["lora"],
        auto_resume=True,  # a trainer restart resumes the arm from its last checkpoint
        max_attempts=3,
        selection_ref=ex.selection_ref(exp["id"], arm["index"]),
    )


def _tenant(exp: dict[str, Any]) -> Identity:
    """Who the experiment's jobs and evaluations are made for: its tenant (an experiment acts for its owner)."""
    return Identity(owner(exp.get("tenant")), False, f"experiment:{exp['id']}")


async def _enqueue(
    redis: Redis, keys: Keys, settings: Settings, exp: dict[str, Any], arm: dict[str, Any]
) -> str | None:
    """Queue the arm's training job, in the experiment's tenant; None when queued, else why it waits."""
    job_id = arm["job_id"]
    if await arun(redis, TRAINING.field(keys, job_id, "state")) is not None:
        return None  # queued before a crash, not yet recorded
    tenant = _tenant(exp).tenant
    fields = new_job_fields(job_id, _job_spec(exp, arm), time.time())
    limit = quotas_of(settings).limit(tenant, "active_training_jobs")
    used = await count_active(redis, keys, tenant, "active_training_jobs")  # prunes, for the script's count
    res = await acall(redis, TRAINING.enqueue(keys, job_id, fields, settings.max_queued_jobs, tenant, limit))
    if res == -1:
        return f"waiting: tenant {tenant!r} has {used} of its {limit} active training jobs (quota active_training_jobs)"
    return None if res else "waiting: the training queue is full (GRAPE_MAX_QUEUED_JOBS)"


def _eval_body(exp: dict[str, Any], model: str) -> EvaluationRequest:
    ev = exp["evaluation"]
    fields = {"model": model, "tasks": ev["tasks"], "limit": ev["limit"], "num_fewshot": ev["num_fewshot"]}
    if ev.get("batch_size") is not None:
        fields["batch_size"] = ev["batch_size"]
    return EvaluationRequest(**fields)


async def _start_eval(
    redis: Redis, keys: Keys, settings: Settings, exp: dict[str, Any], slot: dict, model: str
) -> None:
    """Create the evaluation of `model` for `slot` (an arm, or the base). A missing evaluator is waited
    for (503); any other refusal fails the slot with its reason."""
    try:
        slot["eval_id"] = await eval_svc.create_evaluation(
            redis=redis,
            keys=keys,
            settings=settings,
            body=_eval_body(exp, model),
            experiment_id=exp["id"],
            who=_tenant(exp),
        )
        slot["eval_state"] = "queued"
        slot.pop("note", None)
    except OverQuota as exc:  # the tenant's other evaluations end in time: wait for a slot
        slot["note"] = f"waiting to queue the evaluation: {exc}"
    except ApiError as exc:
        if exc.status >= 500 or exc.status == 429:
            slot["note"] = f"waiting to queue the evaluation: {exc.message}"
            return
        slot["error"] = f"evaluation refused: {exc.message}"
        slot["eval_state"] = "failed"
    except ValidationError as exc:  # a record stored by an earlier version, which checked less at creation
        slot["error"] = f"evaluation refused: {str(exc).splitlines()[0][:300]}"
        slot["eval_state"] = "failed"


async def _poll_eval(redis: Redis, keys: Keys, slot: dict[str, Any]) -> None:
    try:
        ev = await eval_svc.get_evaluation(redis=redis, keys=keys, eval_id=slot["eval_id"])
    except NotFound:
        slot["eval_state"], slot["error"] = "failed", f"evaluation {slot['eval_id']} disappeared"
        return
    data = ev.model_dump(mode="json") if hasattr(ev, "model_dump") else dict(ev)
    slot["eval_state"] = str(data["state"])
    if slot["eval_state"] == "succeeded":
        slot["results"] = {
            task: {m: {"value": v["value"], "stderr": v.get("stderr")} for m, v in metrics.items()}
            for task, metrics in (data.get("results") or {}).items()
        }
        slot["versions"] = data.get("versions") or {}
    elif slot["eval_state"] in ("failed", "cancelled"):
        slot["error"] = f"evaluation {slot['eval_id']} {slot['eval_state']}: {data.get('error') or 'no reason given'}"


async def _advance_arm(redis: Redis, keys: Keys, settings: Settings, exp: dict[str, Any], arm: dict) -> None:
    if not arm["job_created"]:
        waiting = await _enqueue(redis, keys, settings, exp, arm)
        if waiting:
            arm["note"] = waiting
            return
        arm["job_created"], arm["state"] = True, "training"
        arm.pop("note", None)
    if arm["state"] == "training":
        job = await arun(redis, TRAINING.read(keys, arm["job_id"]))
        if job is None:
            arm["state"], arm["error"] = "failed", f"training job {arm['job_id']} disappeared"
            return
        if await TRAINING.areap_if_dead(redis, keys, job):  # its trainer died: resumed or failed
            job = await arun(redis, TRAINING.read(keys, arm["job_id"])) or job
        arm["job_state"] = job["state"]
        arm["step"], arm["max_steps"] = job.get("step"), job.get("max_steps")
        arm["pairs_trained"], arm["tokens_trained"] = job.get("train_records"), job.get("tokens_seen")
        arm["final_loss"] = job.get("loss")
        if job["state"] == JobState.succeeded:
            arm["state"] = "evaluating"
        elif job["state"] in (JobState.failed, JobState.cancelled):
            arm["state"] = "failed" if job["state"] == JobState.failed else "cancelled"
            arm["error"] = f"training job {arm['job_id']} {job['state']}: {job.get('error') or 'no reason given'}"
            return
    if arm["state"] == "evaluating":
        if not arm.get("eval_id") and arm.get("eval_state") != "failed":
            await _start_eval(redis, keys, settings, exp, arm, arm["job_id"])
        if arm.get("eval_id"):
            await _poll_eval(redis, keys, arm)
        if arm.get("eval_state") == "succeeded":
            arm["state"] = "succeeded"
        elif arm.get("eval_state") in ("failed", "cancelled"):
            arm["state"] = arm["eval_state"]


async def _advance(redis: Redis, keys: Keys, settings: Settings, exp: dict[str, Any]) -> None:
    for arm in exp["arms"]:
        if arm["state"] in ARM_ACTIVE:
            await _advance_arm(redis, keys, settings, exp, arm)
    base = exp.get("base")
    if base is not None and base.get("eval_state") not in TERMINAL:
        if not base.get("eval_id"):
            await _start_eval(redis, keys, settings, exp, base, exp["base_model"])
        if base.get("eval_id"):
            await _poll_eval(redis, keys, base)
    states = [a["state"] for a in exp["arms"]]
    if any(s in ("queued", "training") for s in states):
        exp["state"] = ExperimentState.training.value
    elif "evaluating" in states or (base is not None and base.get("eval_state") not in TERMINAL):
        exp["state"] = ExperimentState.evaluating.value
    else:
        ok = "succeeded" in states
        exp["state"] = (ExperimentState.succeeded if ok else ExperimentState.failed).value
        exp["finished"] = time.time()
        if not ok:
            exp["error"] = "no arm was trained and evaluated: " + "; ".join(
                f"arms[{a['index']}]: {a.get('error')}" for a in exp["arms"]
            )
    summarize(exp)


def summarize(exp: dict[str, Any]) -> None:
    """Differences from the base, the best arm per task, and the versions used, from the results so far."""
    base_results = (exp.get("base") or {}).get("results") or {}
    for arm in exp["arms"]:
        for task, metrics in (arm.get("results") or {}).items():
            for m, v in metrics.items():
                b = (base_results.get(task) or {}).get(m)
                v["delta_base"] = v["value"] - b["value"] if b else None
    best: dict[str, Any] = {}
    for task in exp["evaluation"]["tasks"]:
        sample = next(
            (s["results"][task] for s in [exp.get("base") or {}, *exp["arms"]] if (s.get("results") or {}).get(task)),
            None,
        )
        metric = ex.primary_metric(sample) if sample else None
        if metric is None:
            continue
        entry: dict[str, Any] = {"metric": metric}
        for arm in exp["arms"]:
            v = ((arm.get("results") or {}).get(task) or {}).get(metric)
            if v and (entry.get("value") is None or ex.better(metric, v["value"], entry["value"])):
                entry.update(arm=arm["index"], label=arm["label"], value=v["value"], stderr=v.get("stderr"))
                entry["delta_base"] = v.get("delta_base")
        best[task] = entry
    exp["best"] = best
    versions: dict[str, str] = {}
    for slot in [exp.get("base") or {}, *exp["arms"]]:
        for k, v in (slot.get("versions") or {}).items():
            versions.setdefault(k, str(v))
    exp["versions"] = versions


# ---- cancel --------------------------------------------------------------------------------------------


async def cancel_experiment(*, redis: Redis, keys: Keys, settings: Settings, exp_id: str) -> ExperimentPublic:
    """Cancel every training job and evaluation of the experiment that has not finished."""
    await _load(redis, keys, exp_id)
    lock = _Lock(redis, keys, exp_id)
    if not await lock.acquire(wait_s=10):
        raise Conflict(f"experiment {exp_id} is being advanced by another process; retry in a few seconds")
    try:
        exp = await _load(redis, keys, exp_id)
        if ExperimentState(exp["state"]) in ex.TERMINAL:
            raise Conflict(f"experiment {exp_id} is already {exp['state']}")
        from service.training import cancel_job

        for arm in exp["arms"]:
            if arm["state"] not in ARM_ACTIVE:
                continue
            if arm["job_created"] and arm["state"] == "training":
                with contextlib.suppress(Conflict, NotFound):  # ended meanwhile
                    await cancel_job(redis=redis, keys=keys, job_id=arm["job_id"])
            await _cancel_eval(redis, keys, arm)
            arm["state"], arm["error"] = "cancelled", "experiment cancelled"
        if exp.get("base") and exp["base"].get("eval_state") not in TERMINAL:
            await _cancel_eval(redis, keys, exp["base"])
        exp["state"], exp["finished"] = ExperimentState.cancelled.value, time.time()
        await arun(redis, exp_store.save(keys, exp_id, exp, finished=True, ended_at=exp["finished"]))
    finally:
        await lock.release()
    return ExperimentPublic.model_validate(exp)


async def _cancel_eval(redis: Redis, keys: Keys, slot: dict[str, Any]) -> None:
    if slot.get("eval_id"):
        with contextlib.suppress(ApiError):  # ended meanwhile
            await eval_svc.cancel_evaluation(redis=redis, keys=keys, eval_id=slot["eval_id"])
    slot["eval_state"] = "cancelled" if slot.get("eval_state") not in TERMINAL else slot["eval_state"]


# ---- delete --------------------------------------------------------------------------------------------


async def delete_experiment(
    *, redis: Redis, keys: Keys, settings: Settings, exp_id: str, with_runs: bool = False
) -> None:
    """Remove an experiment that has ended: its record, its arms' stored selections and its index entries. One
    that has not ended is refused (409: cancel it first). Its training jobs and evaluations are resources of
    their own (their models, listed under /v1/training-jobs and /v1/evaluations) and stay, unless `with_runs`:
    then they are removed too, and the experiment stays when one of them is still running (409)."""
    with contextlib.suppress(Unreadable):  # a record that cannot be read can still be deleted
        await _load(redis, keys, exp_id)  # the GET's own lookup: 404 first
    lock = _Lock(redis, keys, exp_id)
    if not await lock.acquire(wait_s=10):
        raise Conflict(f"experiment {exp_id} is being advanced by another process; retry in a few seconds")
    try:
        try:
            exp: dict[str, Any] | None = await _load(redis, keys, exp_id)
        except Unreadable:
            exp = None
        if exp is not None and ExperimentState(exp["state"]) not in ex.TERMINAL:
            raise Conflict(
                f"experiment {exp_id} is {exp['state']}: cancel it first (POST /v1/experiments/{exp_id}/cancel), "
                "then delete it",
                state=exp["state"],
            )
        if with_runs and exp is not None:
            await _delete_runs(redis, keys, exp)
        tenant = owner(exp.get("tenant")) if exp else None
        await arun(redis, exp_store.delete(keys, exp_id, len(exp["arms"]) if exp else 0, tenant))
    finally:
        await lock.release()


def _runs(exp: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The training job ids and evaluation ids the experiment created."""
    jobs = [a["job_id"] for a in exp["arms"] if a.get("job_created") and a.get("job_id")]
    evals = [s["eval_id"] for s in [*exp["arms"], exp.get("base") or {}] if s.get("eval_id")]
    return jobs, evals


async def _delete_runs(redis: Redis, keys: Keys, exp: dict[str, Any]) -> None:
    """Delete the experiment's jobs and evaluations; none when one of them still runs (checked first)."""
    from service.training import delete_job

    jobs, evals = _runs(exp)
    for job_id in jobs:
        if await arun(redis, TRAINING.field(keys, job_id, "state")) == JobState.running:
            raise Conflict(
                f"experiment {exp['id']}: its training job {job_id} is still running (it stops after its current "
                "step when cancelled); retry once it has ended",
                job_id=job_id,
            )
    for eval_id in evals:
        if await arun(redis, EVALUATIONS.field(keys, eval_id, "state")) in ("queued", "running"):
            raise Conflict(
                f"experiment {exp['id']}: its evaluation {eval_id} has not ended yet; retry once it has",
                eval_id=eval_id,
            )
    for job_id in jobs:
        with contextlib.suppress(NotFound):  # deleted already
            await delete_job(redis=redis, keys=keys, job_id=job_id)
    for eval_id in evals:
        with contextlib.suppress(NotFound):
            await eval_svc.delete_evaluation(redis=redis, keys=keys, eval_id=eval_id)


async def remove_expired(redis: Redis, keys: Keys, exp_id: str, cutoff: float) -> bool:
    """GRAPE_RETENTION_DAYS (service.retention): remove an experiment if it ended before `cutoff`, under its lock
    (one that has not, only has its finished-index entry put right). False: another process holds the lock
    now, and the next sweep retries."""
    lock = _Lock(redis, keys, exp_id)
    if not await lock.acquire():
        return False
    try:
        try:
            exp: dict[str, Any] | None = await _load(redis, keys, exp_id)
        except (NotFound, Unreadable):
            exp = None
        ended = exp is not None and ExperimentState(exp["state"]) in ex.TERMINAL
        finished = exp.get("finished") if exp is not None else None
        if exp is None or (ended and isinstance(finished, int | float) and finished < cutoff):
            tenant = owner(exp.get("tenant")) if exp else None
            await arun(redis, exp_store.delete(keys, exp_id, len(exp["arms"]) if exp else 0, tenant))
        else:
            at = float(finished) if ended and isinstance(finished, int | float) else None
            await arun(redis, exp_store.reindex(keys, exp_id, at))
        return True
    finally:
        await lock.release()
