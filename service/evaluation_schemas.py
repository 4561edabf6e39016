"""Request and response bodies of the evaluation routes, one class per direction."""

from __future__ import annotations

from pydantic import BaseModel, Field

from grape.evaluations import EvalState, EvaluationRequest


class EvaluationCreate(EvaluationRequest):
    """A model evaluated with lm-evaluation-harness by a `grape evaluator`. Refused (422) for a task the operator
    does not allow (GRAPE_EVAL_TASKS) or no live evaluator offers, (503) when no evaluator is running, (409) for
    a training job that has not succeeded."""


class EvaluationCreated(BaseModel):
    id: str
    state: EvalState


class MetricValue(BaseModel):
    value: float = Field(description="The metric as lm-eval reports it (unrounded).")
    stderr: float | None = Field(None, description="lm-eval's standard error of it; null where lm-eval has none.")


class EvaluationPublic(BaseModel):
    id: str
    state: EvalState = Field(description="queued, running, succeeded, failed, cancelled")
    model: str = Field(description="As asked: a model name or a training job id.")
    base_model: str = Field(description="The model lm-eval loads (`pretrained=`).")
    adapter: str | None = Field(None, description="The LoRA adapter loaded on it (lm-eval `peft=`), if any.")
    training_job: str | None = Field(None, description="The training job evaluated, when `model` named one.")
    tasks: list[str]
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int | str
    results: dict[str, dict[str, MetricValue]] | None = Field(
        None,
        description="Once succeeded: task -> metric -> value and standard error, as lm-eval reports them (the "
        "metric name without lm-eval's `,none` filter suffix; other filters stay, e.g. `exact_match,strict-match`).",
    )
    higher_is_better: dict[str, dict[str, bool | None]] | None = Field(
        None, description="lm-eval's direction of each metric, per task."
    )
    n_samples: dict[str, dict[str, int]] | None = Field(
        None, description='Examples per task as lm-eval counts them: {"original": N, "effective": n} (after limit).'
    )
    error: str | None = Field(None, description="Why it failed: lm-eval's exception, or the evaluator died too often.")
    created: float
    started: float | None = Field(None, description="When the current (or last) run started.")
    finished: float | None = None
    evaluator: str | None = Field(None, description="The evaluator running (or that ran) it.")
    attempts: int = Field(0, description="Runs started (more than one when an evaluator died).")
    max_attempts: int = Field(1, description="Runs it may start before it fails.")
    done_requests: int | None = Field(None, description="lm-eval requests scored in the current phase (progress).")
    total_requests: int | None = Field(None, description="lm-eval requests of the current phase.")
    versions: dict[str, str] | None = Field(
        None, description="Versions of lm-eval, transformers, torch, peft, trl the evaluator used."
    )
    cancel_requested: float | None = Field(None, description="When a cancel was asked (a running one stops soon).")
    experiment_id: str | None = None
    tenant: str = Field("default", description="The tenant that owns it (GRAPE_API_KEYS `tenant:key`).")


class EvaluationList(BaseModel):
    evaluations: list[EvaluationPublic]
