"""`source:<name>`: always that source's response (the "distill from the strongest model" baseline).

Per instruction, its candidates whose `source` is exactly `<name>` (normally one; at most `k`), in
upload order; instructions without that source are left out. `score` is the candidate's log-probability
under the target model (mean per token, or the sum with reduce=sum), for information only.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import Any

from grape.strategies.base import Pick, ScoredItem, SelectParams, StrategySpec, streamed
from grape.strategies.grape import candidate_score


def select_source(name: str, rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    for row in rows:
        mine = [i for i, c in enumerate(row.item["candidates"]) if c["source"] == name]
        for rank, i in enumerate(mine[: params.k], start=1):
            yield Pick(row.item, i, candidate_score(row.scores[i], params.reduce), rank)


def _columns(name: str, params: SelectParams) -> Any:
    from grape.strategies.columns import SourceColumns  # numpy, and columns builds on the strategies' rules

    return SourceColumns(name, params)


def named(name: str) -> StrategySpec:
    """The strategy `source:<name>`."""
    if not name:
        raise ValueError("source: give a source name, as in source:gpt4_1106_preview")
    return StrategySpec(
        name=f"source:{name}",
        summary="Per instruction, the response of that source (the distill-from-one-teacher baseline); instructions "
        "without it are left out.",
        needs=(),
        per_instruction=True,
        streams=True,
        params=("k", "reduce"),
        accumulate=streamed(functools.partial(select_source, name)),
        texts=False,
        columns=functools.partial(_columns, name),
    )
