"""The whole-pool implementations of the reads as they were before issue 20 (strategies sorting the pool, the
comparison and the summary tally over a list of every row): the reference the bounded, streaming ones must
match answer for answer (tests/test_bounded_reads.py). Frozen copies: do not "fix" them."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from grape.score_kinds import decode_vector
from grape.strategies.base import Pick, ScoredItem, SelectParams, Strategy, budget, take_ranked
from grape.strategies.deita import DEFAULT_N as DEITA_N
from grape.strategies.deita import evol_score, unit
from grape.strategies.grape import candidate_score
from grape.strategies.grape import select as grape_select
from grape.strategies.ifd import ifd
from grape.strategies.longest import DEFAULT_N as LONGEST_N
from grape.strategies.random import draw
from service.schemas import DatasetSummary, ScoreHistogram, SourceSummary


def longest(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    pairs = [(-int(sc["tokens"]), order, i, row) for order, row in enumerate(rows) for i, sc in enumerate(row.scores)]
    pairs.sort(key=lambda p: p[:3])
    yield from take_ranked(((row, i, float(-neg)) for neg, _, i, row in pairs), params, budget(params, LONGEST_N))


def ifd_select(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
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


def random_select(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
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


def deita(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    import numpy as np  # noqa: PLC0415

    pairs = []
    for order, row in enumerate(rows):
        ratings, embeddings = row.extra.get("rating"), row.extra.get("embedding")
        if ratings is None or embeddings is None:
            continue
        for i, (r, e) in enumerate(zip(ratings, embeddings, strict=True)):
            pairs.append((-evol_score(r), order, i, row, e["embedding"]))
    pairs.sort(key=lambda p: p[:3])
    n = budget(params, DEITA_N)
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


def _summary(name: str, pairs: Sequence[tuple[ScoredItem, int]], sources: list[str]) -> dict[str, Any]:
    counts = Counter(row.item["candidates"][i]["source"] for row, i in pairs)
    n = len(pairs)
    return {
        "name": name,
        "selected": n,
        "instructions": len({row.item["id"] for row, _ in pairs}),
        "mean_response_tokens": sum(row.scores[i]["tokens"] for row, i in pairs) / n if n else None,
        "mean_response_chars": sum(len(row.item["candidates"][i]["response"]) for row, i in pairs) / n if n else None,
        "sources": {s: counts.get(s, 0) / n if n else 0.0 for s in sources},
    }


def compare(
    rows: Sequence[ScoredItem],
    strategies: Mapping[str, Strategy],
    params: SelectParams,
    max_sources: int | None = None,
) -> dict[str, Any]:
    """Run each strategy on the same rows with the same parameters and summarize.

    - `pool`: every scored pair (the reference row: what choosing at random among all pairs would give).
    - `strategies`: per strategy, pairs selected, instructions covered, mean response length (target
      tokens and characters) and each source's share of the selected pairs.
    - `overlap[a][b]`: pairs selected by both a and b (`overlap[a][a]` is a's count).
    - `sources`: the sources whose shares are shown, by name: all of them, or the `max_sources` with the
      most candidates in the pool (so the answer stays small on a pool with a source per pair);
      `sources_total` counts them all.
    """
    by_id = {row.item["id"]: row for row in rows}
    in_pool = Counter(c["source"] for row in rows for c in row.item["candidates"])
    ranked = sorted(in_pool, key=lambda s: (-in_pool[s], s))
    sources = sorted(ranked if max_sources is None else ranked[:max_sources])
    picked: dict[str, set[tuple[str, int]]] = {}
    summaries = []
    for name, select in strategies.items():
        pairs = [(p.item["id"], p.candidate) for p in select(rows, params)]
        picked[name] = set(pairs)
        summaries.append(_summary(name, [(by_id[i], c) for i, c in pairs], sources))
    pool = _summary("pool", [(row, i) for row in rows for i in range(len(row.scores))], sources)
    overlap = {a: {b: len(picked[a] & picked[b]) for b in picked} for a in picked}
    return {
        "items": len(rows),
        "sources": sources,
        "sources_total": len(in_pool),
        "pool": pool,
        "strategies": summaries,
        "overlap": overlap,
    }


BINS = 24


def histogram(all_scores: list[float], selected: list[float], bins: int | None = None) -> ScoreHistogram:
    """Equal-width bins over the range of all scores (more bins for more scores, at most BINS); both
    series share the edges."""
    if not all_scores:
        return ScoreHistogram(edges=[], all=[], selected=[])
    if bins is None:
        bins = min(BINS, max(8, 2 * math.ceil(math.sqrt(len(all_scores)))))
    lo, hi = min(all_scores), max(all_scores)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    width = (hi - lo) / bins
    edges = [lo + i * width for i in range(bins)] + [hi]

    def counts(values: list[float]) -> list[int]:
        out = [0] * bins
        for v in values:
            out[min(int((v - lo) / width), bins - 1)] += 1
        return out

    return ScoreHistogram(edges=edges, all=counts(all_scores), selected=counts(selected))


class Tally:
    """The running counts of a summary, fed a page of scored items at a time (in a worker thread)."""

    def __init__(self, reduce: str) -> None:
        self.reduce = reduce
        self.select = grape_select
        self.params = SelectParams(k=1, reduce=reduce)  # type: ignore[arg-type]
        self.n_items = 0
        self.per_source: dict[str, dict[str, float]] = {}
        self.all_scores: list[float] = []
        self.chosen: list[float] = []

    def add(self, page: list[ScoredItem]) -> None:
        for row in page:
            self.n_items += 1
            seen = set()
            for cand, sc in zip(row.item["candidates"], row.scores, strict=False):
                value = candidate_score(sc, self.reduce)
                if not math.isfinite(value):
                    continue
                src = self.per_source.setdefault(cand["source"], {"candidates": 0, "items": 0, "wins": 0, "sum": 0.0})
                src["candidates"] += 1
                src["sum"] += value
                if cand["source"] not in seen:
                    src["items"] += 1
                    seen.add(cand["source"])
                self.all_scores.append(value)
        for pick in self.select(page, self.params):
            source = pick.item["candidates"][pick.candidate]["source"]
            if source in self.per_source and math.isfinite(pick.score):
                self.per_source[source]["wins"] += 1
                self.chosen.append(pick.score)

    def summary(self, dataset_id: str, max_sources: int) -> DatasetSummary:
        sources = [
            SourceSummary(
                source=name,
                candidates=int(s["candidates"]),
                items=int(s["items"]),
                wins=int(s["wins"]),
                win_rate=s["wins"] / s["items"] if s["items"] else 0.0,
                mean_score=s["sum"] / s["candidates"] if s["candidates"] else 0.0,
            )
            for name, s in self.per_source.items()
        ]
        sources.sort(key=lambda s: (-s.wins, s.source))
        return DatasetSummary(
            id=dataset_id,
            reduce=self.reduce,  # type: ignore[arg-type]
            scored_items=self.n_items,
            sources=sources[:max_sources],
            sources_total=len(sources),
            histogram=histogram(self.all_scores, self.chosen),
            computed_at=time.time(),
        )
