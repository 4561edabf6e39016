"""Service functions for a dataset's scoring tasks (grape.score_kinds); the strategy comparison is service.compare.

A dataset asks for score kinds when it is created (`"scores": [...]`) or later
(`POST /v1/datasets/{id}/scores`). Each extra task has its own stream on its own model; at ingest the
gateway adds the chunk's entry to those streams in the same script that stores the items, and a later
request queues the items already stored. Per-task progress comes from per-task counters written by the
same result script as the logprob task's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from redis.asyncio import Redis

from grape.store import heartbeats
from grape.keys import Keys, model_key
from grape.store.scoring import chunked
from grape.records import DatasetState
from grape.redis_client import as_str as _s
from grape.settings import Settings
from grape.strategies import STRATEGIES
from grape.strategies.ifd import ifd
from grape.score_kinds import (
    DEFAULT_EMBEDDING_MODEL,
    ScoreTask,
    dataset_scores,
    normalize_scores,
    task_model,
    tasks_for,
)
from service.errors import Unprocessable
from service.schemas import DatasetCreate, ScoresRequest, TaskProgress
from service.store import dataset_meta, id_pages, read_meta


def task_meta(body: DatasetCreate) -> dict[str, str]:
    """The dataset hash fields of the score kinds and the models that compute them."""
    return {
        "scores": orjson.dumps(normalize_scores(body.scores)).decode(),
        "scorer_model": body.scorer_model or body.target_model,
        "embedding_model": body.embedding_model or DEFAULT_EMBEDDING_MODEL,
    }


def extra_tasks(meta: Mapping[str, str]) -> list[ScoreTask]:
    return [t for t in tasks_for(dataset_scores(meta)) if t is not ScoreTask.logprob]


def extra_streams(keys: Keys, meta: Mapping[str, str]) -> list[str]:
    """Streams of the dataset's extra tasks, for INGEST_LUA's trailing keys."""
    return [keys.task_stream(t, task_model(meta, t)) for t in extra_tasks(meta)]


def _live_workers(beats: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    """Live workers per (task, model key), from their heartbeats."""
    seen: Counter[tuple[str, str]] = Counter()
    for beat in beats:
        seen[(beat.get("task", "logprob"), model_key(beat.get("model", "")))] += 1
    return seen


def task_state(items: int, scored: int, failed: int) -> DatasetState:
    if items == 0:
        return DatasetState.empty
    return DatasetState.done if scored + failed >= items else DatasetState.scoring


async def task_progress(
    *,
    redis: Redis,
    keys: Keys,
    dataset_id: str,
    meta: Mapping[str, str],
    items: int,
    candidates: int,
    beats: list[dict[str, Any]] | None = None,
) -> dict[str, TaskProgress]:
    """Per requested task: its model, counters and state (every accepted item is queued for each).

    `beats`: the live workers' heartbeats when the caller has read them already.
    """
    tasks = tasks_for(dataset_scores(meta))
    async with redis.pipeline(transaction=False) as pipe:
        for t in tasks:
            pipe.hgetall(keys.task_stats(dataset_id, t))
        raws = await pipe.execute()
    workers = _live_workers(await heartbeats.live(redis, keys) if beats is None else beats)
    out: dict[str, TaskProgress] = {}
    for t, raw in zip(tasks, raws, strict=True):
        st = {_s(k): float(_s(v)) for k, v in raw.items()}
        scored, failed = int(st.get("scored_items", 0)), int(st.get("failed_items", 0))
        model = task_model(meta, t)
        out[t.value] = TaskProgress(
            model=model,
            state=task_state(items, scored, failed),
            items=items,
            candidates=candidates,
            scored_items=scored,
            scored_candidates=int(st.get("scored_candidates", 0)),
            failed_items=failed,
            failed_candidates=int(st.get("failed_candidates", 0)),
            tokens=int(st.get("tokens", 0)),
            workers=workers[(t.value, model_key(model))],
        )
    return out


async def _enqueue(
    redis: Redis, keys: Keys, settings: Settings, dataset_id: str, stream: str, items: Iterable[dict[str, Any]]
) -> int:
    n = 0
    for chunk in chunked(list(items), settings.chunk_pairs):
        await redis.xadd(stream, {"ds": dataset_id, "items": orjson.dumps([it["id"] for it in chunk])})
        n += 1
    return n


async def catch_up(
    *,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    dataset_id: str,
    before: Mapping[str, str],
    accepted: list[dict[str, Any]],
) -> None:
    """After an upload: queue its new items for tasks requested while it was running (the upload's
    script only knew the tasks of `before`). A duplicate entry is harmless: results are idempotent."""
    if not accepted:
        return
    meta = await read_meta(redis, keys, dataset_id)
    if meta is None:
        return
    known = set(extra_tasks(before))
    for t in extra_tasks(meta):
        if t not in known:
            await _enqueue(redis, keys, settings, dataset_id, keys.task_stream(t, task_model(meta, t)), accepted)


async def _stored_items(redis: Redis, keys: Keys, dataset_id: str) -> Any:
    async for ids in id_pages(redis, keys, dataset_id):
        raws = await redis.hmget(keys.items(dataset_id), ids)
        yield [orjson.loads(x) for x in raws if x is not None]


async def request_scores(
    *, redis: Redis, keys: Keys, settings: Settings, dataset_id: str, body: ScoresRequest
) -> list[str]:
    """Add score kinds to a dataset and queue its stored items for the tasks that are new. Returns the
    tasks queued. Models can be chosen only for a task not requested before."""
    meta = await dataset_meta(redis, keys, dataset_id)
    try:
        wanted = normalize_scores([*dataset_scores(meta), *body.scores])
    except ValueError as exc:
        raise Unprocessable(f"scores: {exc}") from None
    before = set(tasks_for(dataset_scores(meta)))
    new_tasks = [t for t in tasks_for(wanted) if t not in before]
    update: dict[str, str] = {"scores": orjson.dumps(wanted).decode()}
    for field, value, task in (
        ("scorer_model", body.scorer_model, ScoreTask.rating),
        ("embedding_model", body.embedding_model, ScoreTask.embedding),
    ):
        if value is None or value == task_model(meta, task):
            continue
        if task in before:
            current = task_model(meta, task)
            raise Unprocessable(f"{field}: the {task.value} scores were already requested with {current!r}")
        update[field] = value
    await redis.hset(keys.dataset(dataset_id), mapping=update)
    meta.update(update)
    # after the metadata: an upload running now either sees the new tasks or is seen here (catch_up)
    for t in new_tasks:
        stream = keys.task_stream(t, task_model(meta, t))
        async for page in _stored_items(redis, keys, dataset_id):
            await _enqueue(redis, keys, settings, dataset_id, stream, page)
    return [t.value for t in new_tasks]


def missing_scores(meta: Mapping[str, str], needs: Iterable[str]) -> list[str]:
    have = set(tasks_for(dataset_scores(meta)))
    return [n for n in needs if ScoreTask(n) not in have]


async def extra_results(redis: Redis, keys: Keys, dataset_id: str, needs: Iterable[str], ids: list[Any]) -> list[Any]:
    """Per need, the raw results of those items (None where missing)."""
    needs = list(needs)
    if not needs or not ids:
        return [[None] * len(ids) for _ in needs]
    async with redis.pipeline(transaction=False) as pipe:
        for n in needs:
            pipe.hmget(keys.task_results(dataset_id, n), ids)
        return await pipe.execute()


async def candidate_extras(
    *, redis: Redis, keys: Keys, dataset_id: str, item_id: str, scores: list[dict[str, Any]] | None, n: int
) -> list[dict[str, Any]]:
    """Per candidate, the extra task results shown in the item view (not the embeddings)."""
    raws = await extra_results(redis, keys, dataset_id, ["unconditioned", "rating"], [item_id])
    uncond, rating = (orjson.loads(r[0]) if r[0] is not None else None for r in raws)
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for i in range(n):
        if uncond is not None:
            u = uncond[i]
            out[i].update(uncond_logprob_sum=u.get("logprob_sum"), uncond_tokens=u.get("tokens"))
            if scores:
                out[i]["ifd"] = ifd(scores[i], u)
        if rating is not None:
            r = rating[i]
            out[i].update(
                complexity=r["complexity"],
                quality=r["quality"],
                evol=r.get("history", 0.0) + r["complexity"] * r["quality"],
            )
    return out


async def check_selection(*, redis: Redis, keys: Keys, dataset_id: str, strategy: str) -> None:
    """Before a selection starts streaming: the dataset exists, the strategy is known and has its scores."""
    check_strategies(await dataset_meta(redis, keys, dataset_id), [strategy], dataset_id)


def check_strategies(meta: Mapping[str, str], names: Iterable[str], dataset_id: str) -> list[str]:
    """The strategies, each known and with the scores it needs requested; their needs, unioned."""
    needs: list[str] = []
    for name in names:
        if name not in STRATEGIES:
            try:
                STRATEGIES.get(name)
            except (KeyError, ValueError) as exc:
                raise Unprocessable(f"strategy: {exc}") from None
        for need in getattr(STRATEGIES.get(name), "needs", ()):
            if need not in needs:
                needs.append(need)
    missing = missing_scores(meta, needs)
    if missing:
        raise Unprocessable(
            f"strategy needs the scores {', '.join(missing)}, not requested for this dataset: "
            f'POST /v1/datasets/{dataset_id}/scores {{"scores": {orjson.dumps(missing).decode()}}}'
        )
    return needs
