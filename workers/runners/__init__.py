"""ScoreTask runners, registered by name: one file each, turning a batch of items into per-item results.

A runner is built once per worker, `load_task(task, backend, model)`, and then called with
`[(item, template), ...]`; it returns one `ItemResult` per item, in order. An item that cannot be
scored becomes a failed result with its reason; the others still score. The worker loop is the same
for every task: only the stream it reads, the hashes it writes and this runner differ (grape.score_kinds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grape.registry import Registry
from grape.store.scoring import ItemResult

TaskRunner = Callable[[list[tuple[dict[str, Any], str]]], list[ItemResult]]

TASKS: Registry[Callable[[Any, str], TaskRunner]] = Registry("task")
TASKS.register("logprob", "workers.runners.logprob:runner")
TASKS.register("unconditioned", "workers.runners.unconditioned:runner")
TASKS.register("rating", "workers.runners.rating:runner")
TASKS.register("embedding", "workers.runners.embedding:runner")
TASKS.register("local", "workers.runners.local:runner")


def load_task(task: str, backend: Any, model: str) -> TaskRunner:
    """The runner of `task` on this backend; `model` is the name the worker serves (for messages)."""
    return TASKS.get(str(task))(backend, model)


__all__ = ["TASKS", "TaskRunner", "load_task"]
