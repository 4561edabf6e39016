"""A random baseline, reproducible: the same seed gives the same selection, whatever the upload order.

Per instruction, a generator seeded with `"{seed}:{item id}"` shuffles its candidates (the first `k`
are its picks, default 1) and draws a priority u in [0, 1). Without a budget every instruction is kept,
in upload order; with `n`, instructions are taken by ascending u until `n` pairs are kept. `score` is u.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable, Iterator
from typing import Any

from grape.strategies.base import (
    Choice,
    Keep,
    Pick,
    ScoredItem,
    SelectParams,
    StrategySpec,
    budget,
    picks,
    whole_item,
)


def draw(item_id: str, candidates: int, seed: int) -> tuple[list[int], float]:
    """The candidate order and the priority of one instruction."""
    rng = random.Random(f"{seed}:{item_id}")
    order = rng.sample(range(candidates), candidates)
    return order, rng.random()


class Random:
    """Without `n`: each instruction's picks as its row comes. With `n`: the (at most) `n` instructions of lowest
    priority so far, in a bounded heap (each gives at least one pair when k >= 1)."""

    def __init__(self, params: SelectParams, keep: Keep) -> None:
        self.params, self.keep = params, keep
        self.n = budget(params, None)
        self.kept = 0
        self.order = 0
        self.heap: list[tuple[float, int, list[tuple[Any, int]]]] = []  # (-u, -order, [(ref, candidate)])

    def add(self, rows: Iterable[ScoredItem]) -> Iterator[Choice]:
        k = self.params.k
        for row in rows:
            order = self.order
            self.order += 1
            cands, u = draw(row.item["id"], len(row.item["candidates"]), self.params.seed)
            if self.n is None:
                for cand in cands[:k]:
                    self.kept += 1
                    yield Choice(self.keep(row, cand), cand, u, self.kept)
                continue
            if self.n == 0 or k <= 0:
                continue
            if len(self.heap) < self.n:
                heapq.heappush(self.heap, (-u, -order, [(self.keep(row, c), c) for c in cands[:k]]))
            elif (-u, -order) > self.heap[0][:2]:
                heapq.heapreplace(self.heap, (-u, -order, [(self.keep(row, c), c) for c in cands[:k]]))

    def finish(self) -> Iterator[Choice]:
        ranked = sorted(self.heap, key=lambda e: e[:2], reverse=True)
        self.heap = []
        for neg_u, _, chosen in ranked:
            for ref, cand in chosen:
                if self.n is not None and self.kept >= self.n:
                    return
                self.kept += 1
                yield Choice(ref, cand, -neg_u, self.kept)


def accumulate(params: SelectParams, keep: Keep = whole_item) -> Random:
    return Random(params, keep)


def select(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    return picks(accumulate(params), rows)


def _columns(params: SelectParams) -> Any:
    from grape.strategies.columns import RandomColumns

    return RandomColumns(params)


SPEC = StrategySpec(
    name="random",
    summary="A reproducible random baseline: k random candidates per instruction, every instruction (with n: the "
    "n pairs of lowest seeded priority).",
    needs=(),
    per_instruction=True,
    streams=False,
    params=("k", "n", "seed"),
    accumulate=accumulate,
    texts=False,
    columns=_columns,
)
