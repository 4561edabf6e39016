"""Request and response bodies of the experiment routes, one class per direction."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from grape.experiments import Budget, EvaluationSpec, ExperimentRequest, ExperimentState

ArmState = Literal["queued", "training", "evaluating", "succeeded", "failed", "cancelled"]


class ExperimentCreate(ExperimentRequest):
    """Train one model per arm on an equal budget of pairs, evaluate each (and the base model) with
    lm-evaluation-harness. Refused before anything trains when an arm's selection is smaller than the
    budget (422), the dataset is still scoring (409), a strategy or task is unknown (422)."""


class ExperimentCreated(BaseModel):
    id: str
    state: ExperimentState


class MetricPublic(BaseModel):
    value: float
    stderr: float | None = Field(None, description="Standard error as lm-eval reports it (null when it has none).")
    delta_base: float | None = Field(None, description="value minus the base model's value (null without a base).")


Results = dict[str, dict[str, MetricPublic]]
"""task -> metric (as lm-eval names it, without the filter suffix) -> value."""


class ArmPublic(BaseModel):
    index: int
    label: str = Field(description="The strategy and its non-default parameters.")
    strategy: str
    params: dict[str, Any] = Field(description="k, reduce, n, tau, seed as the selection ran.")
    per_instruction: bool = Field(
        description="True: the arm chose responses for the experiment's shared instructions; false: a pool-wide "
        "strategy that took its own top pairs."
    )
    selected_pairs: int = Field(description="Pairs in the stored selection (GET .../arms/{i}/selection).")
    state: ArmState
    job_id: str
    job_state: str | None = None
    step: int | None = Field(None, description="Training steps done.")
    max_steps: int | None = None
    pairs_trained: int | None = Field(None, description="Records the training job trained on.")
    tokens_trained: int | None = Field(None, description="Non-padding tokens the training job saw.")
    final_loss: float | None = Field(None, description="The training loss at the last logging step.")
    eval_id: str | None = None
    eval_state: str | None = None
    results: Results = Field(default_factory=dict)
    error: str | None = Field(None, description="Why the arm failed (its training job or its evaluation).")
    note: str | None = Field(None, description="What the arm waits for, when it waits (e.g. an evaluator).")


class BasePublic(BaseModel):
    model: str
    eval_id: str | None = None
    eval_state: str | None = None
    results: Results = Field(default_factory=dict)
    error: str | None = None
    note: str | None = None


class BestPublic(BaseModel):
    metric: str = Field(description="The task's metric the comparison uses.")
    arm: int | None = Field(None, description="Index of the best arm (null while no arm has results).")
    label: str | None = None
    value: float | None = None
    stderr: float | None = None
    delta_base: float | None = None


class ExperimentPublic(BaseModel):
    id: str
    state: ExperimentState = Field(description="queued, training, evaluating, succeeded, failed, cancelled")
    dataset_id: str
    base_model: str
    created: float
    finished: float | None = None
    budget: Budget
    evaluation: EvaluationSpec
    include_base: bool
    seed: int
    hyperparameters: dict[str, Any]
    lora: dict[str, Any] | None = None
    instructions: int = Field(description="Instructions every per-instruction arm could serve (the draw's pool).")
    arms: list[ArmPublic]
    base: BasePublic | None = None
    best: dict[str, BestPublic] = Field(default_factory=dict, description="Per task: the best arm.")
    versions: dict[str, str] = Field(
        default_factory=dict, description="Versions the evaluations (and trainers) ran: lm_eval, trl, transformers…"
    )
    error: str | None = None
    tenant: str = Field("default", description="The tenant that owns it (GRAPE_API_KEYS `tenant:key`).")
    driver_error: str | None = Field(
        None,
        description="The last error the gateway met advancing it (retried every pass; cleared when a pass works).",
    )


class ExperimentList(BaseModel):
    experiments: list[ExperimentPublic]
