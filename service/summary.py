"""A dataset's selection at a glance: how often each source wins, and how the scores are spread.

Computed from the stored scores with the GRAPE strategy itself (k=1), so the wins are exactly what
`/selection` would export. Kept, not recomputed: per dataset and `reduce` a running tally (per-source counters
and the scores the histograms are drawn from, 8 bytes a pair) and where it stopped reading the upload order are
kept in Redis (grape.store.summaries), with a copy in this gateway's memory; a request reads only what was scored
since (the items past that point, up to the dataset's scored count, and the few before it that were not scored
yet when read) and saves what it counted. A status page polling a dataset while it scores costs the new items,
not the pool; once it is done, nothing but its counters; a fresh gateway or another replica continues from the
tally in Redis instead of reading the pool again.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import anyio
from redis.asyncio import Redis

from grape.keys import Keys
from grape.store import datasets as store
from grape.store import summaries
from grape.store.io import acall, arun
from grape.strategies import STRATEGIES, ScoredItem, SelectParams
from grape.strategies.columns import PairPage, SourceTable, candidate_scores, columnar
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
    gen: str = ""
    """The stored tally's generation this one matches ("" none stored yet, "-" none: another gateway saved)."""
    saved_all: int = 0
    saved_chosen: int = 0
    """How many of the tally's values the stored arrays hold (a save appends the rest)."""


_cache: OrderedDict[tuple[str, str, str, int], _Entry] = OrderedDict()
_SLICE = 1 << 16


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
        # the same float steps as int((v - lo) / width) per value, vectorized, a slice at a time (a pool's scores
        # are 8 bytes a pair: no temporary array of that size)
        out = np.zeros(bins, dtype=np.int64)
        for start in range(0, len(v), _SLICE):
            idx = np.minimum(((v[start : start + _SLICE] - lo) / width).astype(np.int64), bins - 1)
            out += np.bincount(idx, minlength=bins)
        return [int(x) for x in out]

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

    def add_page(self, page: PairPage) -> None:
        """`add` on a page's columns: the same counts, sums added in the same order (np.cumsum is sequential), the
        same picks (the grape column form, k=1). A page that is not regular is counted from its rows."""
        import numpy as np

        if not page.regular:
            self.add(page.rows())
            return
        if not page.items:
            return
        values = candidate_scores(page, self.reduce)
        finite = np.isfinite(values)
        item, names = page.item_of_pair(), page.table.names
        for code in np.unique(page.source[finite]).tolist():
            mine = finite & (page.source == code)
            src = self.per_source.setdefault(names[code], {"candidates": 0, "items": 0, "wins": 0, "sum": 0.0})
            src["candidates"] += int(mine.sum())
            src["sum"] = float(np.cumsum(np.concatenate(([src["sum"]], values[mine])))[-1])
            src["items"] += int(np.unique(item[mine]).size)
        self.all_scores.frombytes(values[finite].tobytes())
        self.n_items += page.items
        picks = columnar(self.select, self.params).add(page)  # type: ignore[union-attr]
        won = np.isfinite(picks.score)
        for code, n in enumerate(np.bincount(picks.source[won], minlength=len(names)).tolist()):
            if n:
                self.per_source[names[code]]["wins"] += n
        self.chosen.frombytes(picks.score[won].tobytes())

    def state(self) -> dict[str, Any]:
        return {"n_items": self.n_items, "per_source": self.per_source}

    @classmethod
    def stored(cls, reduce: str, found: summaries.Stored) -> _Tally:
        tally = cls(reduce)
        tally.n_items = int(found.state["n_items"])
        tally.per_source = found.state["per_source"]
        tally.all_scores.frombytes(found.all_scores)
        tally.chosen.frombytes(found.chosen)
        return tally

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


READ = store.PAGE
"""Ids read per round trip while bringing a tally up to date: a poll after a few new scores reads at most this
many ids past the tally's position (every poll reads again the ids there that were not scored yet); a tally
behind by more reads `store.COLUMN_PAGE` a round trip (a pool counted from scratch at 1M: 1.13 s, not 1.42)."""


async def _refresh(redis: Redis, keys: Keys, dataset_id: str, entry: _Entry, scored: int) -> _Entry:
    """The entry brought up to date: pending ids read again, then the upload order read on from `pos` until the
    tally holds `scored` items (or the order ends); from the items' facts and scores, never their texts; the
    decoding and counting in a worker thread. `entry` is left as it was (a kept one may be read meanwhile): the
    tally is copied before anything is added to it."""
    tally = entry.tally
    table = SourceTable()
    pending, pos = [], entry.pos

    async def count(ids: list[str]) -> None:
        nonlocal tally
        page, _ = await arun(redis, store.pairs_of(keys, dataset_id, ids, table=table), offload=True)
        if page.items and tally is entry.tally:
            tally = tally.copy()
        await anyio.to_thread.run_sync(tally.add_page, page)
        done = set(page.ids)
        pending.extend(x for x in ids if x not in done)

    for i in range(0, len(entry.pending), READ):
        await count(entry.pending[i : i + READ])
    while tally.n_items < scored:
        size = store.COLUMN_PAGE if scored - tally.n_items > READ else READ
        ids = await arun(redis, store.order_page(keys, dataset_id, pos, size))
        if not ids:
            break
        await count(ids)
        pos += len(ids)
    return replace(entry, tally=tally, pos=pos, pending=pending)


def _from_store(reduce: str, found: summaries.Stored | None) -> _Entry:
    if found is None:
        return _Entry((-1, -1), _Tally(reduce), 0, [], None, "", 0, 0)  # type: ignore[arg-type]
    tally = _Tally.stored(reduce, found)
    return _Entry(
        (-1, -1),
        tally,
        found.pos,
        list(found.state["pending"]),
        None,
        found.gen,
        len(tally.all_scores),
        len(tally.chosen),
    )  # type: ignore[arg-type]


async def _save(redis: Redis, keys: Keys, dataset_id: str, reduce: str, before: _Entry, entry: _Entry) -> None:
    """Store what the refresh counted (appended to the stored arrays); the entry names the new generation, or ""
    when another gateway saved first (the next request reads the stored tally then)."""
    tally = entry.tally
    if (before.gen and tally.n_items == before.tally.n_items and entry.pos == before.pos
            and entry.pending == before.pending):  # fmt: skip
        return
    state = {**tally.state(), "pending": entry.pending, "all": len(tally.all_scores), "chosen": len(tally.chosen)}
    call = summaries.save(
        keys,
        dataset_id,
        reduce,
        entry.gen,
        entry.pos,
        state,
        memoryview(tally.all_scores).cast("B")[8 * entry.saved_all :],  # views: redis-py sends them as they are
        memoryview(tally.chosen).cast("B")[8 * entry.saved_chosen :],
    )
    gen = await acall(redis, call)
    if int(gen) < 0:
        entry.gen = "-"  # not the stored one: never matches a stored gen
        return
    entry.gen, entry.saved_all, entry.saved_chosen = str(gen), len(tally.all_scores), len(tally.chosen)


async def compute_summary(
    *, redis: Redis, keys: Keys, dataset_id: str, reduce: str, max_sources: int = 100
) -> DatasetSummary:
    """From scratch: reads every scored item (a page at a time, counted in a worker thread); nothing is kept."""
    status = await dataset_status(redis=redis, keys=keys, dataset_id=dataset_id)
    entry = _from_store(reduce, None)
    entry = await _refresh(redis, keys, dataset_id, entry, status.scored_items)
    return await anyio.to_thread.run_sync(entry.tally.summary, dataset_id, max_sources)


async def dataset_summary(
    *, redis: Redis, keys: Keys, dataset_id: str, reduce: str, max_sources: int = 100
) -> DatasetSummary:
    """The summary: as kept while the dataset's counters are unchanged, else brought up to date with what was
    scored since, from the tally kept in this gateway or, when another gateway saved one since (or this one just
    started), the tally stored in Redis (grape.store.summaries); what the update counted is stored for the next."""
    status = await dataset_status(redis=redis, keys=keys, dataset_id=dataset_id)  # 404 for an unknown dataset
    counts = (status.scored_items, status.failed_items)
    key = (keys.prefix, dataset_id, reduce, max_sources)
    hit = _cache.get(key)
    if hit is not None and hit.counts == counts:
        _cache.move_to_end(key)
        return hit.summary
    stored_gen = await arun(redis, summaries.gen(keys, dataset_id, reduce))
    if hit is None or hit.gen != stored_gen:  # another gateway counted since: continue from its tally
        found = await arun(redis, summaries.load(keys, dataset_id, reduce), offload=True) if stored_gen else None
        hit = _from_store(reduce, found)
    before = hit
    entry = await _refresh(redis, keys, dataset_id, hit, status.scored_items)
    if entry.pos - before.pos >= 20 * store.PAGE:
        release_memory()  # a long read: its freed pages go back to the system
    await _save(redis, keys, dataset_id, reduce, before, entry)
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
