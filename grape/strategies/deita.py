"""Deita (Liu et al., "What Makes Good Data for Alignment?"): score-first, diversity-aware selection.

Per pair, evol score = complexity x quality from the scorer model (the rating task; multi-turn items
add the earlier turns' complexity x quality: `history`). Pairs are walked by descending evol score
(ties: upload order, then candidate order); a pair is kept only if the cosine similarity of its
embedding (the embedding task) to every pair kept so far is <= tau (default 0.9), and only while its
instruction has fewer than `k` kept pairs (default 1); the walk stops when `n` pairs are kept (default
6000, the paper's budget). Pairs without a rating or an embedding are not candidates. `score` is the
evol score.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from grape.score_kinds import decode_vector
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

DEFAULT_N = 6000


def evol_score(rating: dict[str, Any]) -> float:
    return float(rating.get("history", 0.0)) + float(rating["complexity"]) * float(rating["quality"])


def unit(vector: Any) -> Any:
    import numpy as np

    v = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if norm == 0:
        raise ValueError("a zero embedding has no direction")
    return v / norm


class Deita:
    """Collects the rated and embedded pairs (their keys, `keep` refs and embeddings, not the rows); the walk runs
    at `finish`. Its memory still grows with the pool (one embedding per pair): the walk may need any of them."""

    def __init__(self, params: SelectParams, keep: Keep) -> None:
        self.params, self.keep = params, keep
        self.n = budget(params, DEFAULT_N)
        self.order = 0
        self.pairs: list[tuple[float, int, int, Any, Any]] = []

    def add(self, rows: Iterable[ScoredItem]) -> Iterator[Choice]:
        for row in rows:
            order = self.order
            self.order += 1
            ratings, embeddings = row.extra.get("rating"), row.extra.get("embedding")
            if ratings is None or embeddings is None:
                continue
            for i, (r, e) in enumerate(zip(ratings, embeddings, strict=True)):
                self.pairs.append((-evol_score(r), order, i, (self.keep(row, i), row.item["id"]), e["embedding"]))
        return iter(())

    def finish(self) -> Iterator[Choice]:
        import numpy as np

        pairs, self.pairs = self.pairs, []
        pairs.sort(key=lambda p: p[:3])
        n, params = self.n, self.params
        kept = 0
        taken: dict[str, int] = {}
        matrix: Any = None  # the kept pairs' unit embeddings, one row each, allocated once
        for neg, _, i, (ref, item_id), emb in pairs:
            if n is not None and kept >= n:
                break
            if taken.get(item_id, 0) >= params.k:
                continue
            v = unit(decode_vector(emb) if isinstance(emb, str) else emb)
            if matrix is None:
                matrix = np.empty((len(pairs) if n is None else min(n, len(pairs)), v.shape[0]))
            elif kept and float(np.max(matrix[:kept] @ v)) > params.tau:
                continue
            matrix[kept] = v
            taken[item_id] = taken.get(item_id, 0) + 1
            kept += 1
            yield Choice(ref, i, -neg, kept)


def accumulate(params: SelectParams, keep: Keep = whole_item) -> Deita:
    return Deita(params, keep)


def select(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    return picks(accumulate(params), rows)


SPEC = StrategySpec(
    name="deita",
    summary=f"Deita: pairs by descending complexity x quality, each kept only if its embedding's cosine similarity "
    f"to every kept pair is at most tau (n default {DEFAULT_N}).",
    needs=("rating", "embedding"),
    per_instruction=False,
    streams=False,
    params=("k", "n", "tau"),
    accumulate=accumulate,
    texts=False,
    columns=None,
)
