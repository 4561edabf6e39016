"""A random baseline, reproducible: the same seed gives the same selection, whatever the upload order.

Per instruction, a generator seeded with `"{seed}:{item id}"` shuffles its candidates (the first `k`
are its picks, default 1) and draws a priority u in [0, 1). Without a budget every instruction is kept,
in upload order; with `n`, instructions are taken by ascending u until `n` pairs are kept. `score` is u.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

from grape.strategies.base import Pick, ScoredItem, SelectParams, budget


def draw(item_id: str, candidates: int, seed: int) -> tuple[list[int], float]:
    """The candidate order and the priority of one instruction."""
    rng = random.Random(f"{seed}:{item_id}")
    order = rng.sample(range(candidates), candidates)
    return order, rng.random()


def select(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    drawn = [(row, *draw(row.item["id"], len(row.item["candidates"]), params.seed)) for row in rows]
    n = budget(params, None)
    if n is not None:
        drawn.sort(key=lambda d: d[2])
    kept = 0
    for row, order, u in drawn:
        for cand in order[: params.k]:
            if n is not None and kept >= n:
                return
            kept += 1
            yield Pick(row.item, cand, u, kept)


select.per_instruction = True  # type: ignore[attr-defined]  # without `n`: k responses for every instruction
