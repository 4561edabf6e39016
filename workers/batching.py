"""Token-budget batching with length sorting: little padding, bounded memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def budget_batches(items: Sequence[T], length: Callable[[T], int], budget: int) -> Iterator[list[int]]:
    """Indices of `items` in batches whose padded size (longest x count) stays within `budget`.

    Longest first, so the first batch shows the peak memory at once. An item longer than the budget
    gets a batch of its own rather than being refused: the budget bounds batches, the model's context
    bounds items.
    """
    order = sorted(range(len(items)), key=lambda i: length(items[i]), reverse=True)
    batch: list[int] = []
    longest = 0
    for i in order:
        n = length(items[i])
        if batch and max(longest, n) * (len(batch) + 1) > budget:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    if batch:
        yield batch
