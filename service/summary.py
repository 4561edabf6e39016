"""A dataset's selection at a glance: how often each source wins, and how the scores are spread.

Computed from the stored scores with the GRAPE strategy itself (k=1), so the wins are exactly what
`/selection` would export. It reads every scored item, so a result is kept and reused while the
dataset's counters have not moved, and while scoring goes on it is recomputed at most every
`max(1 s, 10 x the time the last computation took)`: a status page polling a million-pair dataset
costs the gateway about a tenth of one core, not all of it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import anyio
from redis.asyncio import Redis

from grape.keys import Keys
from grape.strategies import STRATEGIES, ScoredItem, SelectParams
from grape.strategies.grape import candidate_score
from service.datasets import dataset_status, scored_items
from service.schemas import DatasetSummary, ScoreHistogram, SourceSummary

BINS = 24
_CACHE_SIZE = 64


@dataclass
class _Entry:
    counts: tuple[int, int]
    at: float
    took: float
    summary: DatasetSummary


_cache: OrderedDict[tuple[str, str, str, int], _Entry] = OrderedDict()


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


class _Tally:
    """The running counts of a summary, fed a page of scored items at a time (in a worker thread)."""

    def __init__(self, reduce: str) -> None:
        self.reduce = reduce
        self.select = STRATEGIES.get("grape")
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


async def compute_summary(
    *, redis: Redis, keys: Keys, dataset_id: str, reduce: str, max_sources: int = 100
) -> DatasetSummary:
    """Reads every scored item; the counting runs in a worker thread a page at a time, so the event loop
    keeps answering other requests meanwhile. Lists the `max_sources` sources with most wins."""
    tally = _Tally(reduce)
    async for page in scored_items(redis, keys, dataset_id):
        await anyio.to_thread.run_sync(tally.add, page)
    return await anyio.to_thread.run_sync(tally.summary, dataset_id, max_sources)


async def dataset_summary(
    *, redis: Redis, keys: Keys, dataset_id: str, reduce: str, max_sources: int = 100
) -> DatasetSummary:
    """The summary, from the cache while the dataset's counters are unchanged or it is fresh enough."""
    status = await dataset_status(redis=redis, keys=keys, dataset_id=dataset_id)  # 404 for an unknown dataset
    counts = (status.scored_items, status.failed_items)
    key = (keys.prefix, dataset_id, reduce, max_sources)
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is not None and (hit.counts == counts or now - hit.at < max(1.0, 10 * hit.took)):
        _cache.move_to_end(key)
        return hit.summary
    summary = await compute_summary(
        redis=redis, keys=keys, dataset_id=dataset_id, reduce=reduce, max_sources=max_sources
    )
    _cache[key] = _Entry(counts, now, time.monotonic() - now, summary)
    _cache.move_to_end(key)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return summary
