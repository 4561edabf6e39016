"""What every task runner shares: one backend call per batch, and item-by-item retry when it fails."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grape.store.scoring import ItemResult

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One item turned into backend requests; `finish` turns their outputs into the item's result."""

    item_id: str
    candidates: int
    requests: list[Any]
    context: dict[str, Any] = field(default_factory=dict)


def run_batched(
    prepared: list[Prepared | ItemResult],
    compute: Callable[[list[Any]], list[Any]],
    finish: Callable[[Prepared, list[Any]], ItemResult],
) -> list[ItemResult]:
    """All requests of all items in one `compute` call; if it raises, each item alone, so that the item
    that breaks the batch fails with the reason and the others still score. Results in input order."""
    todo = [p for p in prepared if isinstance(p, Prepared)]
    done: dict[int, ItemResult] = {}
    if todo:
        try:
            outputs = compute([r for p in todo for r in p.requests])
            pos = 0
            for p in todo:
                done[id(p)] = finish(p, outputs[pos : pos + len(p.requests)])
                pos += len(p.requests)
        except Exception as exc:  # noqa: BLE001 - isolate the item that breaks the batch
            log.warning("batch of %d items failed (%s); retrying items one by one", len(todo), exc)
            for p in todo:
                try:
                    done[id(p)] = finish(p, compute(p.requests))
                except Exception as one:  # noqa: BLE001
                    done[id(p)] = ItemResult(p.item_id, p.candidates, error=f"scoring failed: {one}")
    return [p if isinstance(p, ItemResult) else done[id(p)] for p in prepared]
