"""Service functions behind the dataset routes. Routes validate and call exactly one of these."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
from redis.asyncio import Redis

from grape.store import heartbeats
from grape.keys import Keys, model_key, new_dataset_id
from grape.store.scoring import INGEST_LUA, chunked, ingest_args
from grape.records import DatasetState
from grape.redis_client import as_str as _s
from grape.selection_io import build_page
from grape.settings import Settings
from grape.strategies import STRATEGIES, ScoredItem, SelectParams, Strategy
from grape.strategies.grape import candidate_score
from service import tasks as task_svc
from service.errors import Busy, NotFound, Unprocessable, shown
from service.schemas import (
    CandidatePublic,
    DatasetCreate,
    DatasetPublic,
    FailurePublic,
    IngestResult,
    ItemPublic,
    Rejected,
)
from service.store import dataset_meta, id_pages


async def create_dataset(*, redis: Redis, keys: Keys, body: DatasetCreate) -> DatasetPublic:
    ds = new_dataset_id()
    now = time.time()
    meta = {
        "name": body.name,
        "target_model": body.target_model,
        "template": body.template.value,
        "created": f"{now:.3f}",
        **task_svc.task_meta(body),  # requested score kinds and their models
    }
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.dataset(ds), mapping=meta)
        pipe.zadd(keys.datasets(), {ds: now})
        await pipe.execute()
    return await dataset_status(redis=redis, keys=keys, dataset_id=ds)


def live_workers(beats: list[dict[str, Any]], model: str) -> int:
    """Workers of every task on `model`, from their heartbeats."""
    return sum(1 for b in beats if model_key(b.get("model", "")) == model_key(model))


async def dataset_status(*, redis: Redis, keys: Keys, dataset_id: str) -> DatasetPublic:
    meta = await dataset_meta(redis, keys, dataset_id)
    raw = await redis.hgetall(keys.stats(dataset_id))
    st = {_s(k): float(_s(v)) for k, v in raw.items()}
    items = int(st.get("items", 0))
    scored, failed = int(st.get("scored_items", 0)), int(st.get("failed_items", 0))
    cands = int(st.get("candidates", 0))
    scored_c, failed_c = int(st.get("scored_candidates", 0)), int(st.get("failed_candidates", 0))
    tokens = int(st.get("tokens", 0))
    state = task_svc.task_state(items, scored, failed)
    throughput = eta = None
    start, last = st.get("t_start"), st.get("t_last")
    if start is not None and last is not None and last > start and scored_c:
        elapsed = last - start
        throughput = tokens / elapsed
        remaining = max(cands - scored_c - failed_c, 0)
        eta = remaining / (scored_c / elapsed)
    beats = await heartbeats.live(redis, keys)
    tasks = await task_svc.task_progress(
        redis=redis, keys=keys, dataset_id=dataset_id, meta=meta, items=items, candidates=cands, beats=beats
    )
    if state is DatasetState.done and any(t.state is not DatasetState.done for t in tasks.values()):
        state = DatasetState.scoring  # done only when every requested task is
    return DatasetPublic(
        id=dataset_id,
        name=meta["name"],
        target_model=meta["target_model"],
        template=meta["template"],
        created=float(meta["created"]),
        state=state,
        items=items,
        candidates=cands,
        scored_items=scored,
        scored_candidates=scored_c,
        failed_items=failed,
        failed_candidates=failed_c,
        tokens_scored=tokens,
        throughput_tokens_per_s=throughput,
        eta_seconds=eta,
        workers=live_workers(beats, meta["target_model"]),
        scores=task_svc.dataset_scores(meta),
        scorer_model=task_svc.task_model(meta, "rating"),
        embedding_model=task_svc.task_model(meta, "embedding"),
        tasks=tasks,
    )


async def list_datasets(*, redis: Redis, keys: Keys) -> list[DatasetPublic]:
    ids = [_s(x) for x in await redis.zrange(keys.datasets(), 0, -1)]
    out = []
    for ds in ids:
        try:
            out.append(await dataset_status(redis=redis, keys=keys, dataset_id=ds))
        except NotFound:
            continue
    return out


async def ingest(
    *,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    dataset_id: str,
    items: list[dict[str, Any]],
    rejected: list[Rejected],
    rejected_total: int | None = None,
) -> IngestResult:
    """Store and queue the valid items. `rejected`: the first rejections (capped); `rejected_total`: all."""
    n_rejected = len(rejected) if rejected_total is None else rejected_total
    meta = await dataset_meta(redis, keys, dataset_id)
    if not items and rejected:
        raise Unprocessable(
            f"no item accepted: {n_rejected} rejected"
            + (f" (the first {len(rejected)} listed)" if n_rejected > len(rejected) else ""),
            rejected=[r.model_dump() for r in rejected],
            rejected_total=n_rejected,
        )
    script = redis.register_script(INGEST_LUA)
    stream = keys.stream(meta["target_model"])
    backlog = await redis.xlen(stream)
    if backlog >= settings.max_queue_chunks:
        raise Busy(
            f"queue of {meta['target_model']} holds {backlog} chunks (limit {settings.max_queue_chunks}, "
            "GRAPE_MAX_QUEUE_CHUNKS): workers are behind; retry later",
            retry_after=10,
        )
    accepted: set[str] = set()
    for chunk in chunked(items, settings.chunk_pairs):
        new = await script(
            keys=[
                keys.items(dataset_id),
                keys.order(dataset_id),
                keys.stats(dataset_id),
                stream,
                *task_svc.extra_streams(keys, meta),
            ],
            args=ingest_args(dataset_id, chunk),
        )
        accepted.update(_s(x) for x in new or [])
    await task_svc.catch_up(
        redis=redis,
        keys=keys,
        settings=settings,
        dataset_id=dataset_id,
        before=meta,
        accepted=[it for it in items if it["id"] in accepted],
    )
    n_cands = sum(len(it["candidates"]) for it in items if it["id"] in accepted)
    return IngestResult(
        accepted=len(accepted),
        duplicates=len(items) - len(accepted),
        rejected=rejected,
        accepted_candidates=n_cands,
        rejected_total=n_rejected,
    )


async def get_item(*, redis: Redis, keys: Keys, dataset_id: str, item_id: str) -> ItemPublic:
    await dataset_meta(redis, keys, dataset_id)
    raw = await redis.hget(keys.items(dataset_id), item_id)
    if raw is None:
        raise NotFound(f"item {shown(item_id)} not found in dataset {dataset_id!r}")
    item = orjson.loads(raw)
    scores_raw = await redis.hget(keys.scores(dataset_id), item_id)
    error = await redis.hget(keys.failed(dataset_id), item_id)
    scores = orjson.loads(scores_raw) if scores_raw else None
    chosen = -1
    if scores:
        chosen = next(iter(STRATEGIES.get("grape")([ScoredItem(item, scores)], SelectParams()))).candidate
    extras = await task_svc.candidate_extras(
        redis=redis, keys=keys, dataset_id=dataset_id, item_id=item_id, scores=scores, n=len(item["candidates"])
    )
    cands = []
    for i, c in enumerate(item["candidates"]):
        sc = scores[i] if scores else {}
        cands.append(
            CandidatePublic(
                index=i,
                source=c["source"],
                response=c["response"],
                logprob_sum=sc.get("logprob_sum"),
                tokens=sc.get("tokens"),
                prompt_tokens=sc.get("prompt_tokens"),
                mean=candidate_score(sc, "mean") if sc else None,
                selected=i == chosen,
                **extras[i],
            )
        )
    state = "scored" if scores else "failed" if error else "queued"
    return ItemPublic(
        id=item_id,
        state=state,
        error=_s(error) if error and not scores else None,
        instruction=item.get("instruction"),
        messages=item.get("messages") if "messages" in item else None,
        candidates=cands,
    )


async def list_failures(*, redis: Redis, keys: Keys, dataset_id: str, limit: int) -> list[FailurePublic]:
    await dataset_meta(redis, keys, dataset_id)
    out: list[FailurePublic] = []
    async for k, v in redis.hscan_iter(keys.failed(dataset_id), count=500):
        out.append(FailurePublic(id=_s(k), error=_s(v)))
        if len(out) >= limit:
            break
    return out


async def scored_items(
    redis: Redis, keys: Keys, dataset_id: str, needs: tuple[str, ...] = ()
) -> AsyncIterator[list[ScoredItem]]:
    """Pages of scored items in upload order; unscored and failed items are left out. `needs`: extra
    task results (grape.score_kinds) to attach, where an item has them."""
    async for ids in id_pages(redis, keys, dataset_id):
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.items(dataset_id), ids)
            pipe.hmget(keys.scores(dataset_id), ids)
            raw_items, raw_scores = await pipe.execute()
        extra = await task_svc.extra_results(redis, keys, dataset_id, needs, ids)
        page = await anyio.to_thread.run_sync(build_page, raw_items, raw_scores, needs, extra)  # JSON: CPU work
        if page:
            yield page


async def selection_lines(
    *, redis: Redis, keys: Keys, dataset_id: str, strategy: str, params: SelectParams
) -> AsyncIterator[bytes]:
    """NDJSON records ready for TRL's SFTTrainer; streams page by page for per-instruction strategies."""
    meta = await dataset_meta(redis, keys, dataset_id)
    needs = tuple(task_svc.check_strategies(meta, [strategy], dataset_id))
    select = STRATEGIES.get(strategy)
    # selecting and encoding is CPU work that grows with the pool: in a worker thread, so the event loop
    # (and /healthz, and every other request) keeps answering meanwhile
    if getattr(select, "per_item", False):
        async for page in scored_items(redis, keys, dataset_id, needs):
            yield await anyio.to_thread.run_sync(_encode_picks, select, page, params)
        return
    rows: list[ScoredItem] = []
    async for page in scored_items(redis, keys, dataset_id, needs):
        rows.extend(page)
    picks = await anyio.to_thread.run_sync(lambda: list(select(rows, params)))
    for start in range(0, len(picks), 500):
        yield b"".join(orjson.dumps(p.record()) + b"\n" for p in picks[start : start + 500])


def _encode_picks(select: Strategy, rows: list[ScoredItem], params: SelectParams) -> bytes:
    return b"".join(orjson.dumps(p.record()) + b"\n" for p in select(rows, params))


async def delete_dataset(*, redis: Redis, keys: Keys, dataset_id: str) -> None:
    await dataset_meta(redis, keys, dataset_id)
    await redis.delete(
        keys.dataset(dataset_id),
        keys.items(dataset_id),
        keys.order(dataset_id),
        keys.scores(dataset_id),
        keys.failed(dataset_id),
        keys.stats(dataset_id),
        *(k(dataset_id, t) for t in task_svc.ScoreTask for k in (keys.task_results, keys.task_failed, keys.task_stats)),
    )
    await redis.zrem(keys.datasets(), dataset_id)
