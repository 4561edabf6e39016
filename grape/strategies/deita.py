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
from grape.strategies.base import Pick, ScoredItem, SelectParams, budget

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


def select(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    import numpy as np

    pairs = []
    for order, row in enumerate(rows):
        ratings, embeddings = row.extra.get("rating"), row.extra.get("embedding")
        if ratings is None or embeddings is None:
            continue
        for i, (r, e) in enumerate(zip(ratings, embeddings, strict=True)):
            pairs.append((-evol_score(r), order, i, row, e["embedding"]))
    pairs.sort(key=lambda p: p[:3])
    n = budget(params, DEFAULT_N)
    kept: list[Pick] = []
    per_item: dict[str, int] = {}
    matrix: Any = None  # the kept pairs' unit embeddings, one row each, allocated once
    for neg, _, i, row, emb in pairs:
        if n is not None and len(kept) >= n:
            break
        item_id = row.item["id"]
        if per_item.get(item_id, 0) >= params.k:
            continue
        v = unit(decode_vector(emb) if isinstance(emb, str) else emb)
        if matrix is None:
            matrix = np.empty((len(pairs) if n is None else min(n, len(pairs)), v.shape[0]))
        elif kept and float(np.max(matrix[: len(kept)] @ v)) > params.tau:
            continue
        matrix[len(kept)] = v
        per_item[item_id] = per_item.get(item_id, 0) + 1
        kept.append(Pick(row.item, i, -neg, len(kept) + 1))
    yield from kept


select.needs = ("rating", "embedding")  # type: ignore[attr-defined]
