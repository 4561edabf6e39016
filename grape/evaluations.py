"""Evaluation jobs: one model (a base model, or what a training job produced) evaluated on lm-eval tasks.

Torch-free and lm-eval-free: the gateway and the experiments import this; only `evaluator/` runs lm-eval.

The protocol is the training jobs' one (grape.jobs) with its own keys. An evaluation lives in one hash
(`Keys.evaluation`), its log records in a stream (`Keys.eval_log`). The gateway creates it and LPUSHes its
id on `Keys.eval_queue`; an evaluator BLMOVEs the oldest id into its claimed list (`Keys.eval_claimed`) and
starts it with `START_LUA`; the id stays there until `FINISH_LUA`. An evaluator publishes a heartbeat with a
TTL (`Keys.evaluator`) and the task names it can run (`Keys.eval_tasks`). When its heartbeat is gone, any
evaluator (and the gateway, when the evaluation is read) reaps its evaluations with `REAP_LUA`: a running
one is queued again (an evaluation has no checkpoint: it starts over) until `max_attempts` runs started,
then failed with the reason.

Cancel sets a flag (`Keys.eval_cancel`) that the evaluator polls while lm-eval runs in its child process; it
kills the child. The value `requeue` is how an evaluator shutting down (SIGTERM) hands its evaluation back;
a hand-back does not count as an attempt.
"""

from __future__ import annotations

import re
import time
import uuid
from enum import StrEnum
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from grape.jobs import cancel_lua, with_log_maxlen
from grape.keys import is_job_id
from grape.redis_client import as_str as _s

EVAL_ID = re.compile(r"ev-[0-9a-f]{12}")
TASK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")


def new_eval_id() -> str:
    return f"ev-{uuid.uuid4().hex[:12]}"


def is_eval_id(value: str) -> bool:
    return EVAL_ID.fullmatch(value) is not None


class EvalState(StrEnum):
    """Where an evaluation is. Terminal states never change again."""

    queued = "queued"  # waiting for an evaluator (new, handed back, or queued again after its evaluator died)
    running = "running"  # a live evaluator runs lm-eval on it (loading the model and the tasks' data, scoring)
    succeeded = "succeeded"  # lm-eval finished; `results` holds every task's metrics
    failed = "failed"  # lm-eval raised (its reason is in `error`), or its evaluators died `max_attempts` times
    cancelled = "cancelled"  # stopped on request


TERMINAL = frozenset({EvalState.succeeded, EvalState.failed, EvalState.cancelled})


class EvaluationSettings(BaseModel):
    """How a model is evaluated: the lm-eval tasks and their bounded settings. An evaluation request and an
    experiment's `evaluation` both take these, checked by the same validators."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(
        min_length=1,
        max_length=16,
        description="lm-eval task (or group) names: lm-eval's own, or those of the YAML files in the "
        "evaluators' GRAPE_EVAL_TASK_DIR.",
    )
    limit: int | None = Field(None, ge=1, le=100_000, description="Evaluate only the first N examples of each task.")
    num_fewshot: int | None = Field(None, ge=0, le=25, description="Few-shot examples; default: each task's own.")
    batch_size: int | Literal["auto"] = Field(
        8, description='Requests per forward batch (an integer 1..1024), or "auto" (lm-eval finds the largest).'
    )

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not TASK_NAME.fullmatch(t)]
        if bad:
            raise ValueError(f"not a task name: {bad[0]!r} (letters, digits, '_', '.', '-')")
        dup = sorted({t for t in v if v.count(t) > 1})
        if dup:
            raise ValueError(f"duplicate task: {dup[0]!r}")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError("an integer from 1 to 1024, or 'auto'")
        return v


class EvaluationRequest(EvaluationSettings):
    """What a client asks: which model, on which lm-eval tasks, how."""

    model: str = Field(
        min_length=1,
        max_length=500,
        description="A model name (`smollm2-135m`, a local path or a hub id), or the id of a succeeded training "
        "job (`job-...`): its model, or its LoRA adapter on its base model.",
    )

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        v = v.strip()
        if v.startswith("job-") and not is_job_id(v):
            raise ValueError("a training job id is `job-` and 12 hex digits")
        return v


class EvalSpec(EvaluationRequest):
    """An evaluation as stored and run: the request with what the gateway resolved."""

    base_model: str = Field(description="The model lm-eval loads (`pretrained=`): a name the evaluator resolves.")
    adapter: str | None = Field(None, description="A LoRA adapter directory loaded on it (lm-eval `peft=`).")
    training_job: str | None = Field(None, description="The training job whose result this is.")
    experiment_id: str | None = None


# ---- lm-eval's answer -> ours ----------------------------------------------------------------------------


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None  # lm-eval writes "N/A" where it has no standard error
    return float(v)


def metrics_of(lm_eval_results: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """lm-eval's `results` section (`{task: {"acc,none": v, "acc_stderr,none": se, "alias": ...}}`) as
    `{task: {metric: {"value", "stderr"}}}`. A metric keeps lm-eval's name; the `,none` filter suffix is
    dropped, any other filter stays (`exact_match,strict-match`). Values are lm-eval's, unrounded."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for task, row in lm_eval_results.items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, value in row.items():
            name, sep, filt = key.partition(",")
            if not sep or name.endswith("_stderr") or _number(value) is None:
                continue
            stderr = row.get(f"{name}_stderr,{filt}")
            label = name if filt == "none" else f"{name},{filt}"
            metrics[label] = {"value": _number(value), "stderr": _number(stderr)}
        out[task] = metrics
    return out


# ---- the record ------------------------------------------------------------------------------------------

_FLOATS = ("created", "started", "finished", "cancel_requested", "progress_at")
_INTS = ("attempts", "max_attempts", "done_requests", "total_requests")
_JSON = ("spec", "results", "versions", "higher_is_better", "n_samples")


def decode_evaluation(raw: dict[Any, Any]) -> dict[str, Any]:
    """An evaluation hash as typed values: numbers as numbers, JSON fields parsed, empty fields None."""
    out: dict[str, Any] = {}
    for k, v in ((_s(k), _s(v)) for k, v in raw.items()):
        if v == "":
            out[k] = None
        elif k in _FLOATS:
            out[k] = float(v)
        elif k in _INTS:
            out[k] = int(float(v))
        elif k in _JSON:
            out[k] = orjson.loads(v)
        else:
            out[k] = v
    return out


def new_evaluation_fields(eval_id: str, spec: EvalSpec, now: float, max_attempts: int) -> dict[str, str]:
    return {
        "id": eval_id,
        "state": EvalState.queued.value,
        "spec": spec.model_dump_json(),
        "model": spec.model,
        "created": f"{now:.3f}",
        "attempts": "0",
        "max_attempts": str(max_attempts),
        "experiment_id": spec.experiment_id or "",
    }


def log_fields(msg: str, level: str = "info", **data: Any) -> dict[str, str]:
    fields = {"t": f"{time.time():.3f}", "level": level, "msg": msg}
    if data:
        fields["data"] = orjson.dumps(data).decode()
    return fields


def dead_evaluator_reason(evaluator: str) -> str:
    return f"evaluator {evaluator} stopped sending heartbeats (process died or lost Redis)"


# ---- the scripts -----------------------------------------------------------------------------------------
# Each takes the keys it touches; `now` is passed in (scripts stay deterministic for replication).

ENQUEUE_LUA = with_log_maxlen("""
-- KEYS: evaluation, evaluations zset, queue, log   ARGV: id, now, max queued, then field/value pairs
if redis.call('LLEN', KEYS[3]) >= tonumber(ARGV[3]) then return 0 end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', LOG_MAXLEN, '*', 't', ARGV[2], 'level', 'info', 'msg', 'queued')
return 1
""")

START_LUA = with_log_maxlen("""
-- KEYS: claimed list, evaluation, log   ARGV: id, evaluator, now
-- just moved from the queue to this evaluator's claimed list; run it only if still queued
local st = redis.call('HGET', KEYS[2], 'state')
if st ~= 'queued' then
  redis.call('LREM', KEYS[1], 0, ARGV[1])
  return false
end
local attempts = redis.call('HINCRBY', KEYS[2], 'attempts', 1)
redis.call('HSET', KEYS[2], 'state', 'running', 'evaluator', ARGV[2], 'started', ARGV[3], 'progress_at', ARGV[3])
redis.call('HDEL', KEYS[2], 'error', 'finished', 'done_requests', 'total_requests')
redis.call('XADD', KEYS[3], 'MAXLEN', '~', LOG_MAXLEN, '*', 't', ARGV[3], 'level', 'info',
  'msg', 'started on evaluator ' .. ARGV[2] .. ' (attempt ' .. attempts .. ')')
return redis.call('HGET', KEYS[2], 'spec')
""")

FINISH_LUA = with_log_maxlen("""
-- KEYS: claimed list, evaluation, log, cancel flag, queue
-- ARGV: id, evaluator, state, now, error, message, level, then field/value pairs to set (results...)
-- only the evaluator holding a running evaluation may end it; state 'queued' hands it back
local st = redis.call('HGET', KEYS[2], 'state')
redis.call('LREM', KEYS[1], 0, ARGV[1])
if st ~= 'running' or redis.call('HGET', KEYS[2], 'evaluator') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[4])
redis.call('HDEL', KEYS[2], 'cancel_requested')
if ARGV[3] == 'queued' then
  redis.call('HINCRBY', KEYS[2], 'attempts', -1)
  redis.call('HSET', KEYS[2], 'state', 'queued', 'evaluator', '')
  redis.call('RPUSH', KEYS[5], ARGV[1])
else
  redis.call('HSET', KEYS[2], 'state', ARGV[3], 'finished', ARGV[4])
  if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 'error', ARGV[5]) end
end
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', LOG_MAXLEN, '*', 't', ARGV[4], 'level', ARGV[7], 'msg', ARGV[6])
return 1
""")

REAP_LUA = with_log_maxlen("""
-- KEYS: evaluator heartbeat, its claimed list, evaluation, log, queue, cancel flag   ARGV: id, evaluator, now, reason
if redis.call('EXISTS', KEYS[1]) == 1 then return 'alive' end
local st = redis.call('HGET', KEYS[3], 'state')
redis.call('LREM', KEYS[2], 0, ARGV[1])
if not st then return 'gone' end
if st == 'queued' then
  -- taken from the queue by the dead evaluator but never started: back to the head of the queue
  if not redis.call('LPOS', KEYS[5], ARGV[1]) then redis.call('RPUSH', KEYS[5], ARGV[1]) end
  return 'requeued'
end
if st ~= 'running' or redis.call('HGET', KEYS[3], 'evaluator') ~= ARGV[2] then return 'skip' end
local attempts = tonumber(redis.call('HGET', KEYS[3], 'attempts') or '0')
local max = tonumber(redis.call('HGET', KEYS[3], 'max_attempts') or '1')
local cancelling = redis.call('GET', KEYS[6]) == 'cancel'
redis.call('DEL', KEYS[6])
redis.call('HDEL', KEYS[3], 'cancel_requested')
if cancelling then
  redis.call('HSET', KEYS[3], 'state', 'cancelled', 'finished', ARGV[3], 'evaluator', '')
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', LOG_MAXLEN, '*', 't', ARGV[3], 'level', 'info',
    'msg', ARGV[4] .. '; it was being cancelled: cancelled')
  return 'cancelled'
end
if attempts < max then
  redis.call('HSET', KEYS[3], 'state', 'queued', 'evaluator', '')
  redis.call('RPUSH', KEYS[5], ARGV[1])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', LOG_MAXLEN, '*', 't', ARGV[3], 'level', 'warning',
    'msg', ARGV[4] .. '; queued again to start over (attempt ' .. attempts .. ' of ' .. max .. ' done)')
  return 'requeued'
end
local reason = ARGV[4] .. ' (attempt ' .. attempts .. ' of ' .. max .. ')'
redis.call('HSET', KEYS[3], 'state', 'failed', 'error', reason, 'finished', ARGV[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', LOG_MAXLEN, '*', 't', ARGV[3], 'level', 'error', 'msg', reason)
return 'failed'
""")

CANCEL_LUA = cancel_lua("the evaluator stops lm-eval")
