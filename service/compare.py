"""The strategy comparison (`GET /v1/datasets/{id}/compare`): every named strategy over one read of the scored
pool, side by side (grape.compare)."""

from __future__ import annotations

import anyio
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from grape.compare import Comparison
from grape.keys import Keys
from grape.settings import Settings
from grape.store import datasets as store
from grape.store.datasets import check_selection
from grape.store.io import thread_pages
from grape.strategies import STRATEGIES, SelectParams, strategy_specs
from service.datasets import dataset_meta, dataset_status, release_memory
from service.errors import Unprocessable
from service.schemas import ComparisonPublic


async def compare(
    *,
    redis: Redis,
    redis_threads: SyncRedis,
    keys: Keys,
    settings: Settings,
    dataset_id: str,
    strategies: list[str],
    params: SelectParams,
) -> ComparisonPublic:
    """The strategies side by side (grape.compare), in one pass over the pool. Its work grows with strategies x
    pool: the number of strategies is capped (GRAPE_MAX_COMPARE_STRATEGIES) and the counting runs in a worker
    thread, so the event loop keeps answering other requests meanwhile."""
    if not strategies:
        known = ", ".join(s.name for s in strategy_specs())
        raise Unprocessable(f"strategies: name at least one, comma-separated, of: {known}")
    if len(strategies) > settings.max_compare_strategies:
        raise Unprocessable(
            f"strategies: {len(strategies)} named, at most {settings.max_compare_strategies} per comparison "
            "(GRAPE_MAX_COMPARE_STRATEGIES)"
        )
    if len(set(strategies)) != len(strategies):
        raise Unprocessable("strategies: a strategy is named twice")
    meta = await dataset_meta(redis, keys, dataset_id)
    needs = check_selection(meta, strategies, dataset_id)
    chosen = {name: STRATEGIES.get(name) for name in strategies}
    # one streaming pass over the items' facts and scores (never their texts): each page is counted in a worker
    # thread and dropped, so the gateway holds counters and the pool-wide strategies' budgets, never the pool
    try:
        comparison = Comparison(chosen, params, settings.max_report_sources)
        read = store.pair_pages(keys, dataset_id, needs, whole=comparison.whole, table=comparison.table)
        async for got in thread_pages(redis_threads, read):  # the next page is read while this one is counted
            for page, _ in got:
                await anyio.to_thread.run_sync(comparison.add_page, page)
        result = await anyio.to_thread.run_sync(comparison.result)
    except ValueError as exc:
        raise Unprocessable(str(exc)) from None
    finally:
        release_memory()
    status = await dataset_status(redis=redis, keys=keys, dataset_id=dataset_id)
    return ComparisonPublic(
        dataset_id=dataset_id,
        state=status.state,
        params=params.model_dump(),
        **result,
    )
