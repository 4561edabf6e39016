"""Evaluation jobs: one model (a base model, or what a training job produced) evaluated on lm-eval tasks.

Torch-free and lm-eval-free: the gateway and the experiments import this; only `evaluator/` runs lm-eval.
The queue protocol an evaluation goes through is the training jobs' one, `grape.store.jobqueue.EVALUATIONS`:
a dead evaluator's evaluation starts over (there is no checkpoint) until `max_attempts` runs started, and an
evaluator shutting down hands its evaluation back without counting the attempt. Evaluators also publish the
task names they offer (`Keys.eval_tasks`): those the operator's GRAPE_EVAL_TASKS allows (`task_allowed`).
"""

from __future__ import annotations

import fnmatch
import re
import uuid
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from grape.keys import is_job_id
from grape.store.errors import shown

EVAL_ID = re.compile(r"ev-[0-9a-f]{12}")
TASK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")


def task_allowed(name: str, patterns: list[str], local: set[str]) -> bool:
    """Whether the operator's GRAPE_EVAL_TASKS (`patterns`: names and fnmatch globs, case-sensitive) allows a
    task; without patterns only the tasks of the evaluators' GRAPE_EVAL_TASK_DIR (`local`) are allowed."""
    if patterns:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)
    return name in local


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


class EvaluationSettings(BaseModel):
    """How a model is evaluated: the lm-eval tasks and their bounded settings. An evaluation request and an
    experiment's `evaluation` both take these, checked by the same validators."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(
        min_length=1,
        max_length=16,
        description="lm-eval task (or group) names the operator allows (GRAPE_EVAL_TASKS; by default those of "
        "the YAML files in the evaluators' GRAPE_EVAL_TASK_DIR).",
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
            raise ValueError(f"not a task name: {shown(bad[0])} (letters, digits, '_', '.', '-')")
        dup = sorted({t for t in v if v.count(t) > 1})
        if dup:
            raise ValueError(f"duplicate task: {shown(dup[0])}")
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
