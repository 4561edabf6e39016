"""GRAPE: per instruction, the candidate the target model finds most probable.

score = (1/N) * sum_t log p(y_t | x, y_<t) over the N response tokens (reduce="mean", the paper's
length-normalized ranking), or the plain sum (reduce="sum"). Ties go to the earlier candidate, so the
selection is deterministic when two candidates have the same text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from grape.strategies.base import Pick, ScoredItem, SelectParams, StrategySpec, streamed


def candidate_score(score: dict[str, float], reduce: str) -> float:
    if reduce == "sum":
        return float(score["logprob_sum"])
    if score["tokens"] <= 0:
        raise ValueError("a response of zero tokens has no mean log-probability")
    return float(score["logprob_sum"]) / score["tokens"]


def select(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    for row in rows:
        ranked = sorted(range(len(row.scores)), key=lambda i: (-candidate_score(row.scores[i], params.reduce), i))
        for rank, i in enumerate(ranked[: params.k], start=1):
            yield Pick(row.item, i, candidate_score(row.scores[i], params.reduce), rank)


def _columns(params: SelectParams) -> Any:
    from grape.strategies.columns import GrapeColumns  # numpy, and columns builds on this module's rule

    return GrapeColumns(params)


SPEC = StrategySpec(
    name="grape",
    summary="Per instruction, the k candidates the target model finds most probable (mean log-prob per token, "
    "or the sum).",
    needs=(),
    per_instruction=True,
    streams=True,
    params=("k", "reduce"),
    accumulate=streamed(select),
    texts=False,
    columns=_columns,
)
