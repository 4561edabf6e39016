"""Which teacher fits this student: per source, the mean local (LALP) score and the mean GRAPE score of
its candidates, with both rankings side by side (Just, Ko, Jia, arXiv 2510.03988: averaged per teacher,
local scores pick the teacher to distil from before any fine-tuning, where global scores fail).

Only items with both scores count, so both means cover the same candidates. It reads every scored item's
facts and scores (grape.store.datasets.pair_pages: sources and score records, never the texts), so, like the
summary, a result is reused while the local task's counters have not moved and recomputed
at most every `max(1 s, 10 x the last computation)` while scoring goes on.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

import anyio
from redis.asyncio import Redis

from grape.keys import Keys
from grape.store import datasets as store
from grape.store.io import apages, arun
from grape.strategies import ScoredItem
from grape.strategies.grape import candidate_score
from service.datasets import dataset_meta
from service.schemas import TeacherRanking, TeachersPublic

_CACHE_SIZE = 64
_cache: OrderedDict[tuple[str, str, int], tuple[tuple[int, int], float, float, TeachersPublic]] = OrderedDict()


class _Tally:
    def __init__(self) -> None:
        self.items = 0
        self.per: dict[str, dict[str, float]] = {}

    def add(self, page: list[ScoredItem]) -> None:
        for row in page:
            local = row.extra.get("local")
            if local is None:
                continue
            self.items += 1
            seen: set[str] = set()
            for cand, sc, lc in zip(row.item["candidates"], row.scores, local, strict=True):
                g, loc = candidate_score(sc, "mean"), float(lc["local"])
                if not (math.isfinite(g) and math.isfinite(loc)):
                    continue
                zero = {"instructions": 0, "candidates": 0, "local": 0.0, "grape": 0.0}
                s = self.per.setdefault(cand["source"], zero)
                s["candidates"] += 1
                s["local"] += loc
                s["grape"] += g
                if cand["source"] not in seen:
                    s["instructions"] += 1
                    seen.add(cand["source"])

    def result(self, dataset_id: str, max_sources: int) -> TeachersPublic:
        means = {n: (s["local"] / s["candidates"], s["grape"] / s["candidates"]) for n, s in self.per.items()}
        by_local = sorted(means, key=lambda n: (-means[n][0], n))
        by_grape = sorted(means, key=lambda n: (-means[n][1], n))
        local_rank = {n: r for r, n in enumerate(by_local, start=1)}
        grape_rank = {n: r for r, n in enumerate(by_grape, start=1)}
        shown = set(sorted(self.per, key=lambda n: (-self.per[n]["instructions"], n))[:max_sources])
        rows = [
            TeacherRanking(
                source=n,
                instructions=int(self.per[n]["instructions"]),
                candidates=int(self.per[n]["candidates"]),
                local_mean=means[n][0],
                grape_mean=means[n][1],
                local_rank=local_rank[n],
                grape_rank=grape_rank[n],
            )
            for n in by_local
            if n in shown
        ]
        k = len(means)
        rho = None
        if k >= 2:  # Spearman's rho from rank differences (the rankings have no ties: names break them)
            d2 = sum((local_rank[n] - grape_rank[n]) ** 2 for n in means)
            rho = 1 - 6 * d2 / (k * (k * k - 1))
        return TeachersPublic(
            id=dataset_id,
            scored_items=self.items,
            sources=rows,
            sources_total=k,
            rank_correlation=rho,
            computed_at=time.time(),
        )


async def teachers(*, redis: Redis, keys: Keys, dataset_id: str, max_sources: int) -> TeachersPublic:
    """404 for an unknown dataset, 422 when it did not ask for local scores (with the request that adds them)."""
    meta = await dataset_meta(redis, keys, dataset_id)
    store.check_scores(meta, ("local",), dataset_id)
    (_, per_task) = await arun(redis, store.counters(keys, dataset_id, ["local"]))  # type: ignore[list-item]
    counts = (int(per_task[0].get("scored_items", 0)), int(per_task[0].get("failed_items", 0)))
    key = (keys.prefix, dataset_id, max_sources)
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is not None and (hit[0] == counts or now - hit[1] < max(1.0, 10 * hit[2])):
        _cache.move_to_end(key)
        return hit[3]
    tally = _Tally()
    async for got in apages(redis, store.pair_pages(keys, dataset_id, ("local",)), offload=True):
        for pairs, _ in got:
            await anyio.to_thread.run_sync(lambda pairs=pairs: tally.add(pairs.rows()))
    result = tally.result(dataset_id, max_sources)
    _cache[key] = (counts, now, time.monotonic() - now, result)
    _cache.move_to_end(key)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return result
