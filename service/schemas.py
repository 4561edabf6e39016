"""Request and response bodies of the HTTP API, one class per direction. The OpenAPI document is the contract."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from grape.records import DatasetState, ItemIn, Template


class DatasetCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="A name for people; need not be unique.")
    target_model: str = Field(
        min_length=1,
        max_length=500,
        description="The model about to be fine-tuned: `smollm2-135m`, a local path or a Hugging Face id. "
        "Workers started with the same `--model` score this dataset.",
    )
    template: Template = Field(Template.auto, description="auto | chat | plain")


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


class DatasetList(BaseModel):
    datasets: list[DatasetPublic]


class ItemsIn(BaseModel):
    """JSON upload body. For large uploads send NDJSON instead (one item per line)."""

    items: list[ItemIn]


class Rejected(BaseModel):
    index: int = Field(description="0-based position of the item in the upload (NDJSON: its line).")
    id: str | None = None
    error: str


class IngestResult(BaseModel):
    accepted: int = Field(description="New items queued for scoring.")
    duplicates: int = Field(description="Items whose id was already in the dataset: kept once, not rescored.")
    rejected: list[Rejected] = Field(description="Items refused, with the reason; the others were accepted.")
    accepted_candidates: int = 0


class CandidatePublic(BaseModel):
    index: int
    source: str
    response: str
    logprob_sum: float | None = None
    tokens: int | None = None
    prompt_tokens: int | None = None
    mean: float | None = None
    selected: bool = False


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
