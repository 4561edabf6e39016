"""Long Is More for Alignment (Zhao et al., 2024): the pairs with the longest responses.

Every scored pair is ranked by its response length in target-model tokens (the `tokens` the logprob
task counted: exactly the response tokens, as scored), longest first; at most `k` (default 1: its
longest candidate) per instruction; the first `n` (default 1000, the paper's budget) are kept. Ties go
to the earlier instruction in upload order, then the earlier candidate. `score` is the length.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from grape.strategies.base import Pick, ScoredItem, SelectParams, budget, take_ranked

DEFAULT_N = 1000


def select(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    pairs = [(-int(sc["tokens"]), order, i, row) for order, row in enumerate(rows) for i, sc in enumerate(row.scores)]
    pairs.sort(key=lambda p: p[:3])
    yield from take_ranked(((row, i, float(-neg)) for neg, _, i, row in pairs), params, budget(params, DEFAULT_N))
