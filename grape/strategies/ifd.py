"""IFD, instruction-following difficulty (Li et al., Cherry LLM; Superfiltering): PPL(y | x) / PPL(y).

PPL(y | x) = exp(-logprob_sum / tokens) from the logprob task (the target model, given the prompt);
PPL(y) = exp(-logprob_sum / tokens) from the unconditioned task (the same response tokens, BOS as the
only context). IFD = exp(mean log p(y) - mean log p(y | x)). A pair with IFD >= 1 (the instruction does
not help predict the response) is dropped, as is one whose PPL(y) could not be computed; the rest are
ranked by IFD, highest first, at most `k` per instruction (default 1), the first `n` kept (default: no
budget). Ties go to upload order, then candidate order. `score` is the IFD.
"""

from __future__ import annotations

import math
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


def ifd(cond: dict[str, Any], uncond: dict[str, Any]) -> float | None:
    """PPL(y | x) / PPL(y) of one pair, or None when PPL(y) is not defined (no unconditioned tokens)."""
    if not cond.get("tokens") or uncond.get("logprob_sum") is None or not uncond.get("tokens"):
        return None
    return math.exp(uncond["logprob_sum"] / uncond["tokens"] - cond["logprob_sum"] / cond["tokens"])


class Ifd(TopPairs):
    def pairs(self, row: ScoredItem) -> Iterable[tuple[float, int, float]]:
        uncond = row.extra.get("unconditioned")
        if uncond is None:
            return
        for i, (c, u) in enumerate(zip(row.scores, uncond, strict=True)):
            value = ifd(c, u)
            if value is not None and value < 1:
                yield -value, i, value


def accumulate(params: SelectParams, keep: Keep = whole_item) -> Ifd:
    """Streaming: holds the `n` highest-IFD pairs so far (without `n`: every pair with IFD < 1, as `keep` refs)."""
    return Ifd(params, keep, budget(params, None))


def select(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    return picks(accumulate(params), rows)


SPEC = StrategySpec(
    name="ifd",
    summary="The pairs of highest instruction-following difficulty PPL(y|x)/PPL(y) below 1, at most k per "
    "instruction, the first n (default: no budget).",
    needs=("unconditioned",),
    per_instruction=False,
    streams=False,
    params=("k", "n"),
    accumulate=accumulate,
    texts=False,
    columns=None,
)
