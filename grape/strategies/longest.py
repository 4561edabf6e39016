"""Long Is More for Alignment (Zhao et al., 2024): the pairs with the longest responses.

Every scored pair is ranked by its response length in target-model tokens (the `tokens` the logprob
task counted: exactly the response tokens, as scored), longest first; at most `k` (default 1: its
longest candidate) per instruction; the first `n` (default 1000, the paper's budget) are kept. Ties go
to the earlier instruction in upload order, then the earlier candidate. `score` is the length.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from grape.strategies.base import (
    Keep,
    Pick,
    ScoredItem,
    SelectParams,
    StrategySpec,
    TopPairs,
    budget,
    picks,
    whole_item,
)

DEFAULT_N = 1000


class Longest(TopPairs):
    def pairs(self, row: ScoredItem) -> Iterable[tuple[float, int, float]]:
        return ((-int(sc["tokens"]), i, float(sc["tokens"])) for i, sc in enumerate(row.scores))


def accumulate(params: SelectParams, keep: Keep = whole_item) -> Longest:
    """Streaming: holds the `n` longest pairs so far (default 1000), never the pool."""
    return Longest(params, keep, budget(params, DEFAULT_N))


def select(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    return picks(accumulate(params), rows)


def _columns(params: SelectParams) -> Any:
    from grape.strategies.columns import LongestColumns

    return LongestColumns(params, DEFAULT_N)


SPEC = StrategySpec(
    name="longest",
    summary=f"The n pairs with the longest responses in target-model tokens, at most k per instruction "
    f"(n default {DEFAULT_N}).",
    needs=(),
    per_instruction=False,
    streams=False,
    params=("k", "n"),
    accumulate=accumulate,
    texts=False,
    columns=_columns,
)
