"""The primary task: log p(response | prompt) of every candidate under the target model (workers.scoring)."""

from __future__ import annotations

from typing import Any

from grape.store.scoring import ItemResult
from workers.scoring import complete, finish, flat_requests, prepare_items, score_items


def runner(backend: Any, model: str) -> Any:
    def run(items: list[tuple[dict[str, Any], str]]) -> list[ItemResult]:
        return score_items(backend, items)

    # the two halves, for a worker that tokenizes the next batch while the backend computes this one
    run.prepare = lambda items: prepare_items(backend, items)  # type: ignore[attr-defined]
    run.complete = lambda prepared: complete(backend, prepared)  # type: ignore[attr-defined]
    # and for a backend that streams (vLLM: batches added to the running engine), the requests and results
    run.requests = flat_requests  # type: ignore[attr-defined]
    run.finish = finish  # type: ignore[attr-defined]
    return run
