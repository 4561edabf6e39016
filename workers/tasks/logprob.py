"""The primary task: log p(response | prompt) of every candidate under the target model (workers.scoring)."""

from __future__ import annotations

from typing import Any

from grape.protocol import ItemResult
from workers.scoring import score_items


def runner(backend: Any, model: str) -> Any:
    def run(items: list[tuple[dict[str, Any], str]]) -> list[ItemResult]:
        return score_items(backend, items)

    return run
