"""Request and response bodies of the HTTP API, one class per direction. The OpenAPI document is the contract."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from grape.local_steps import DEFAULT_WINDOW, MAX_WINDOW
from grape.records import DatasetState, ItemIn, Template
from grape.score_kinds import DEFAULT_EMBEDDING_MODEL, SCORE_KINDS
from grape.strategies import DEFAULT_STRATEGY, Reduce, SelectParams, StrategyName, strategy_specs


def model_name(v: str | None) -> str | None:
    """One name, one queue (grape.keys.model_key): surrounding spaces are not part of a model's name."""
    if v is not None and not v.strip():
        raise ValueError("a model name is not blank")
    return v.strip() if v is not None else None


class DatasetCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="A name for people; need not be unique.")
    target_model: str = Field(
        min_length=1,
        max_length=500,
        description="The model about to be fine-tuned: `smollm2-135m`, a local path or a Hugging Face id. "
        "Workers started with the same `--model` score this dataset.",
    )
    template: Template = Field(Template.auto, description="auto | chat | plain")
    scores: list[str] = Field(
        default_factory=lambda: ["logprob"],
        description=f"Score kinds to compute (grape.score_kinds), of: {', '.join(SCORE_KINDS)} (logprob always). "
        "More can be asked later with POST /v1/datasets/{id}/scores.",
    )
    scorer_model: str | None = Field(
        None, max_length=500, description="Model of the rating task (Deita scores); default: the target model."
    )
    embedding_model: str | None = Field(
        None, max_length=500, description=f"Model of the embedding task; default: {DEFAULT_EMBEDDING_MODEL}."
    )
    local_segmentation: Literal["blank_line", "line"] = Field(
        "blank_line",
        description="local (LALP) scores: where a reasoning step ends, at a blank line or at every newline.",
    )
    local_window: int = Field(
        DEFAULT_WINDOW,
        ge=1,
        le=MAX_WINDOW,
        description="local (LALP) scores: preceding steps each step is conditioned on (with the prompt).",
    )

    @field_validator("target_model", "scorer_model", "embedding_model")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        return model_name(v)

    @field_validator("scores")
    @classmethod
    def _known_scores(cls, v: list[str]) -> list[str]:
        from grape.score_kinds import normalize_scores

        return normalize_scores(v)


class TaskProgress(BaseModel):
    """One scoring task of a dataset (grape.score_kinds): which model runs it and how far it is."""

    model: str
    state: DatasetState
    items: int
    candidates: int
    scored_items: int
    scored_candidates: int
    failed_items: int
    failed_candidates: int
    tokens: int = Field(description="Model tokens processed by this task.")
    workers: int = Field(description="Live workers of this task on its model.")


class LocalParamsPublic(BaseModel):
    segmentation: str = Field(description="Where a reasoning step ends: blank_line or line.")
    window: int = Field(description="Preceding steps each step is conditioned on.")


class DatasetPublic(BaseModel):
    id: str
    name: str
    target_model: str
    template: Template
    created: float
    state: DatasetState
    items: int = Field(description="Accepted items (instructions).")
    candidates: int = Field(description="Accepted candidate responses (pairs).")
    scored_items: int
    scored_candidates: int
    failed_items: int
    failed_candidates: int
    tokens_scored: int = Field(description="Pair tokens (prompt + response) scored so far.")
    throughput_tokens_per_s: float | None = Field(description="Pair tokens per second since scoring began.")
    eta_seconds: float | None = Field(description="Estimated seconds until every accepted pair is scored.")
    workers: int = Field(description="Live workers consuming this dataset's target model.")
    scores: list[str] = Field(default_factory=lambda: ["logprob"], description="Score kinds requested.")
    scorer_model: str | None = None
    embedding_model: str | None = None
    local: LocalParamsPublic | None = Field(None, description="The LALP parameters, when local scores are requested.")
    tasks: dict[str, TaskProgress] = Field(
        default_factory=dict,
        description="Per requested task (logprob, unconditioned, rating, embedding): its progress. `state` "
        "is done only when every task is; the top-level counts are the logprob task's.",
    )
    tenant: str = Field("default", description="The tenant that owns it (GRAPE_API_KEYS `tenant:key`).")


class DatasetList(BaseModel):
    datasets: list[DatasetPublic]


class ItemsIn(BaseModel):
    """JSON upload body. For large uploads send NDJSON instead (one item per line)."""

    items: list[ItemIn]


class Rejected(BaseModel):
    index: int = Field(description="0-based position of the item in the upload (NDJSON: its line).")
    id: str | None = None
    error: str


class QuotaReached(BaseModel):
    quota: str = Field(description="The quota that refused something (stored_pairs for an upload).")
    limit: int
    usage: int = Field(description="What the tenant holds now, after this request.")
    tenant: str


class IngestResult(BaseModel):
    accepted: int = Field(description="New items queued for scoring.")
    duplicates: int = Field(description="Items whose id was already in the dataset: kept once, not rescored.")
    rejected: list[Rejected] = Field(
        description="Items refused, with the reason (the first GRAPE_MAX_REJECTIONS); the others were accepted."
    )
    accepted_candidates: int = 0
    rejected_total: int = Field(0, description="Items refused in all (more than `rejected` lists past the cap).")
    quota: QuotaReached | None = Field(
        None, description="Set when the tenant's stored_pairs quota refused items (listed in `rejected`)."
    )


class CandidatePublic(BaseModel):
    index: int
    source: str
    response: str
    logprob_sum: float | None = None
    tokens: int | None = None
    prompt_tokens: int | None = None
    mean: float | None = None
    selected: bool = False
    uncond_logprob_sum: float | None = Field(None, description="log p(response | BOS), when requested.")
    uncond_tokens: int | None = None
    ifd: float | None = Field(None, description="PPL(y | x) / PPL(y), when unconditioned scores exist.")
    complexity: float | None = Field(None, description="Deita complexity of the instruction (1..6).")
    quality: float | None = Field(None, description="Deita quality of this response (1..6).")
    evol: float | None = Field(None, description="Deita evol score: complexity x quality (+ earlier turns).")
    local: float | None = Field(None, description="LALP local score (mean of the step means), when requested.")
    local_steps: int | None = Field(None, description="Reasoning steps the local score averages.")
    local_step_min: float | None = Field(None, description="The lowest step mean (the least natural step).")


class ItemPublic(BaseModel):
    id: str
    state: Literal["queued", "scored", "failed"]
    error: str | None = None
    instruction: str | None = None
    messages: list[dict[str, Any]] | None = None
    candidates: list[CandidatePublic]


class FailurePublic(BaseModel):
    id: str
    error: str


class FailureList(BaseModel):
    failures: list[FailurePublic]


class Health(BaseModel):
    status: Literal["ok"]
    redis: bool
    version: str


class WorkerPublic(BaseModel):
    """A live scoring worker, from its heartbeat; a backend may report more fields than these."""

    model_config = {"extra": "allow"}

    name: str
    model: str
    task: str = "logprob"
    backend: str | None = None
    dtype: str | None = None
    path: str | None = Field(None, description="the scoring path the backend took (e.g. vLLM's prompt_logprobs)")
    path_reason: str | None = None
    prefix_reuse: bool | None = Field(None, description="vLLM: instruction prompts read from its prefix cache")
    items: int = 0
    tokens: int = 0
    uptime_s: float = 0.0
    heartbeat: float = Field(0.0, description="unix time of its last heartbeat")


class WorkerList(BaseModel):
    workers: list[WorkerPublic]


class SourceSummary(BaseModel):
    source: str = Field(description="Who wrote the candidates (the `source` of the uploaded candidates).")
    candidates: int = Field(description="Scored candidates from this source.")
    items: int = Field(description="Scored items where this source had a candidate.")
    wins: int = Field(description="Items where GRAPE selected this source's candidate (k=1).")
    win_rate: float = Field(description="wins / items.")
    mean_score: float = Field(description="Average score of this source's candidates.")


class ScoreHistogram(BaseModel):
    edges: list[float] = Field(description="Bin edges (one more than the counts), ascending.")
    all: list[int] = Field(description="Candidates per bin, every scored candidate.")
    selected: list[int] = Field(description="Candidates per bin, only the selected ones.")


class DatasetSummary(BaseModel):
    id: str
    reduce: Reduce = Field(description="Score: mean log-prob per response token, or the sum.")
    scored_items: int = Field(description="Items the summary covers (scored when it was computed).")
    sources: list[SourceSummary] = Field(
        description="Per source, most wins first (the first GRAPE_MAX_REPORT_SOURCES)."
    )
    sources_total: int = Field(0, description="Sources in the scored pool (more than `sources` lists past the cap).")
    histogram: ScoreHistogram
    computed_at: float = Field(description="Unix time the summary was computed (it is cached briefly).")


class TeacherRanking(BaseModel):
    source: str = Field(description="Who wrote the candidates (the teacher).")
    instructions: int = Field(description="Instructions this source answered that have both scores.")
    candidates: int = Field(description="Its candidates with both scores.")
    local_mean: float = Field(description="Mean local (LALP) score of its candidates.")
    grape_mean: float = Field(description="Mean GRAPE score (mean token log-prob of the whole response).")
    local_rank: int = Field(description="1 = the source the target model finds most natural step by step.")
    grape_rank: int = Field(description="1 = the source the target model finds most probable as whole responses.")


class TeachersPublic(BaseModel):
    id: str
    scored_items: int = Field(description="Items with both logprob and local scores, the ones counted.")
    sources: list[TeacherRanking] = Field(
        description="Best local mean first (the first GRAPE_MAX_REPORT_SOURCES of the sources that answered most)."
    )
    sources_total: int = Field(description="Sources in those items (more than `sources` lists past the cap).")
    rank_correlation: float | None = Field(
        description="Spearman correlation of the two rankings over every source (None below 2 sources): "
        "low or negative is where global and local selection disagree about the teacher."
    )
    computed_at: float


class ScoresRequest(BaseModel):
    scores: list[str] = Field(min_length=1, description="Score kinds to add (see DatasetCreate.scores).")
    scorer_model: str | None = Field(None, max_length=500, description="Rating model, if rating is new.")
    embedding_model: str | None = Field(None, max_length=500, description="Embedding model, if embedding is new.")
    local_segmentation: Literal["blank_line", "line"] | None = Field(
        None, description="LALP step segmentation, if local is new (default blank_line)."
    )
    local_window: int | None = Field(
        None, ge=1, le=MAX_WINDOW, description="LALP window in steps, if local is new (default 2)."
    )

    @field_validator("scorer_model", "embedding_model")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        return model_name(v)


class ScoresQueued(BaseModel):
    queued_tasks: list[str] = Field(description="Tasks newly requested; the stored items were queued for them.")
    dataset: DatasetPublic


def _strategy_names() -> str:
    return ", ".join(s.name for s in strategy_specs())


class SelectionQuery(SelectParams):
    """The query of `GET /v1/datasets/{id}/selection`: a strategy and the selection parameters."""

    strategy: StrategyName = Field(DEFAULT_STRATEGY, description=f"The selection strategy: {_strategy_names()}.")


class CompareQuery(SelectParams):
    """The query of `GET /v1/datasets/{id}/compare`: strategies and the selection parameters they all run with."""

    strategies: str = Field(description=f"Comma-separated strategy names, of: {_strategy_names()}.")


class StrategySummary(BaseModel):
    name: str
    selected: int = Field(description="Pairs selected.")
    instructions: int = Field(description="Instructions with at least one selected pair.")
    mean_response_tokens: float | None = Field(description="Mean response length, target-model tokens.")
    mean_response_chars: float | None = Field(description="Mean response length, characters.")
    sources: dict[str, float] = Field(description="Share of the selected pairs written by each source.")


class ComparisonPublic(BaseModel):
    dataset_id: str
    state: DatasetState
    params: dict[str, Any] = Field(description="The parameters every strategy ran with.")
    items: int = Field(description="Scored instructions in the pool compared.")
    sources: list[str] = Field(
        description="The pool's most frequent sources (at most GRAPE_MAX_REPORT_SOURCES), whose shares are shown."
    )
    sources_total: int = Field(0, description="Sources in the pool (more than `sources` lists past the cap).")
    pool: StrategySummary = Field(description="Every scored pair: the reference row.")
    strategies: list[StrategySummary]
    overlap: dict[str, dict[str, int]] = Field(description="overlap[a][b]: pairs selected by both a and b.")
