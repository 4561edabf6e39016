"""A dataset's selection at a glance: how often each source wins, and how the scores are spread.

Computed from the stored scores with the GRAPE strategy itself (k=1), so the wins are exactly what
`/selection` would export. Kept, not recomputed: per dataset the gateway keeps its running tally (per-source
counters and the scores the histograms are drawn from, 8 bytes a pair) and where it stopped reading the
upload order; a request reads only what was scored since (the items past that point, up to the dataset's
scored count, and the few before it that were not scored yet when read). A status page polling a dataset
while it scores costs the new items, not the pool; once it is done, nothing but its counters.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from redis.asyncio import Redis

from grape.keys import Keys
from grape.store import datasets as store
from grape.store.io import arun
from grape.strategies import STRATEGIES, ScoredItem, SelectParams
from grape.strategies.grape import candidate_score
from service.datasets import dataset_status, release_memory
from service.schemas import DatasetSummary, ScoreHistogram, SourceSummary

BINS = 24
_CACHE_SIZE = 64
_CACHE_SCORES = 8_000_000
"""Scores the kept tallies may hold in all (8 bytes each: 64 MB); the least recently used go first."""


@dataclass
class _Entry:
    counts: tuple[int, int]
    tally: _Tally
    pos: int
    """Upload-order position the tally has read up to."""
    pending: list[str]
    """Ids before `pos` that were not scored when read (in flight, or failed): read again next time."""
    summary: DatasetSummary


_cache: OrderedDict[tuple[str, str, str, int], _Entry] = OrderedDict()


def histogram(all_scores: Sequence[float], selected: Sequence[float], bins: int | None = None) -> ScoreHistogram:
    """Equal-width bins over the range of all scores (more bins for more scores, at most BINS); both
    series share the edges."""
    import numpy as np

    if not len(all_scores):
        return ScoreHistogram(edges=[], all=[], selected=[])
    if bins is None:
        bins = min(BINS, max(8, 2 * math.ceil(math.sqrt(len(all_scores)))))
    values = np.asarray(all_scores, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    width = (hi - lo) / bins
    edges = [lo + i * width for i in range(bins)] + [hi]

    def counts(v: Any) -> list[int]:
        # the same float steps as int((v - lo) / width) per value, vectorized
        idx = np.minimum(((v - lo) / width).astype(np.int64), bins - 1)
        return [int(x) for x in np.bincount(idx, minlength=bins)]

    return ScoreHistogram(edges=edges, all=counts(values), selected=counts(np.asarray(selected, dtype=np.float64)))


class _Tally:
    """The running counts of a summary, fed a page of scored items at a time (in a worker thread)."""

    def __init__(self, reduce: str) -> None:
        self.reduce = reduce
        self.select = STRATEGIES.get("grape")
        self.params = SelectParams(k=1, reduce=reduce)  # type: ignore[arg-type]
        self.n_items = 0
        self.per_source: dict[str, dict[str, float]] = {}
        self.all_scores = array("d")
        self.chosen = array("d")

    def copy(self) -> _Tally:
        """A copy to update (a concurrent request may be reading or updating this one)."""
        new = _Tally(self.reduce)
        new.n_items = self.n_items
        new.per_source = {k: dict(v) for k, v in self.per_source.items()}
        new.all_scores = array("d", self.all_scores)
        new.chosen = array("d", self.chosen)
        return new

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


async def _refresh(redis: Redis, keys: Keys, dataset_id: str, entry: _Entry, scored: int) -> _Entry:
    """The entry brought up to date: pending ids read again, then the upload order read on from `pos` until the
    tally holds `scored` items (or the order ends); the decoding and counting in a worker thread."""
    tally = entry.tally.copy()
    pending, pos = [], entry.pos
    for i in range(0, len(entry.pending), store.PAGE):
        ids = entry.pending[i : i + store.PAGE]
        rows = await arun(redis, store.scored_rows(keys, dataset_id, ids), offload=True)
        await anyio.to_thread.run_sync(tally.add, rows)
        done = {row.item["id"] for row in rows}
        pending += [x for x in ids if x not in done]
    while tally.n_items < scored:
        ids = await arun(redis, store.order_page(keys, dataset_id, pos))
        if not ids:
            break
        rows = await arun(redis, store.scored_rows(keys, dataset_id, ids), offload=True)
        await anyio.to_thread.run_sync(tally.add, rows)
        done = {row.item["id"] for row in rows}
        pending += [x for x in ids if x not in done]
        pos += len(ids)
    return _Entry(entry.counts, tally, pos, pending, entry.summary)


async def compute_summary(
    *, redis: Redis, keys: Keys, dataset_id: str, reduce: str, max_sources: int = 100
) -> DatasetSummary:
    """From scratch: reads every scored item (a page at a time, counted in a worker thread)."""
    status = await dataset_status(redis=redis, keys=keys, dataset_id=dataset_id)
    entry = _Entry((0, 0), _Tally(reduce), 0, [], None)  # type: ignore[arg-type]
    entry = await _refresh(redis, keys, dataset_id, entry, status.scored_items)
    return await anyio.to_thread.run_sync(entry.tally.summary, dataset_id, max_sources)


async def dataset_summary(
    *, redis: Redis, keys: Keys, dataset_id: str, reduce: str, max_sources: int = 100
) -> DatasetSummary:
    """The summary: as kept while the dataset's counters are unchanged, else brought up to date with what was
    scored since."""
    status = await dataset_status(redis=redis, keys=keys, dataset_id=dataset_id)  # 404 for an unknown dataset
    counts = (status.scored_items, status.failed_items)
    key = (keys.prefix, dataset_id, reduce, max_sources)
    hit = _cache.get(key)
    if hit is not None and hit.counts == counts:
        _cache.move_to_end(key)
        return hit.summary
    entry = hit or _Entry(counts, _Tally(reduce), 0, [], None)  # type: ignore[arg-type]
    before = entry.pos
    entry = await _refresh(redis, keys, dataset_id, entry, status.scored_items)
    if entry.pos - before >= 20 * store.PAGE:
        release_memory()  # a long read: its freed pages go back to the system
    entry.counts = counts
    entry.summary = await anyio.to_thread.run_sync(entry.tally.summary, dataset_id, max_sources)
    current = _cache.get(key)
    if current is None or current.pos <= entry.pos:  # a concurrent request may have read further
        _cache[key] = entry
    _cache.move_to_end(key)
    held = sum(len(e.tally.all_scores) + len(e.tally.chosen) for e in _cache.values())
    while len(_cache) > 1 and (len(_cache) > _CACHE_SIZE or held > _CACHE_SCORES):
        _, gone = _cache.popitem(last=False)
        held -= len(gone.tally.all_scores) + len(gone.tally.chosen)
    return entry.summary
