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

from grape.strategies.base import Pick, ScoredItem, SelectParams, budget, take_ranked


def ifd(cond: dict[str, Any], uncond: dict[str, Any]) -> float | None:
    """PPL(y | x) / PPL(y) of one pair, or None when PPL(y) is not defined (no unconditioned tokens)."""
    if not cond.get("tokens") or uncond.get("logprob_sum") is None or not uncond.get("tokens"):
        return None
    return math.exp(uncond["logprob_sum"] / uncond["tokens"] - cond["logprob_sum"] / cond["tokens"])


def select(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    pairs = []
    for order, row in enumerate(rows):
        uncond = row.extra.get("unconditioned")
        if uncond is None:
            continue
        for i, (c, u) in enumerate(zip(row.scores, uncond, strict=True)):
            value = ifd(c, u)
            if value is not None and value < 1:
                pairs.append((-value, order, i, row))
    pairs.sort(key=lambda p: p[:3])
    yield from take_ranked(((row, i, -neg) for neg, _, i, row in pairs), params, budget(params, None))


select.needs = ("unconditioned",)  # type: ignore[attr-defined]
