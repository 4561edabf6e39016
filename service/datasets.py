"""Service functions behind the dataset routes: HTTP shapes over the dataset store (grape.store.datasets).
Routes validate and call exactly one of these."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import anyio
import orjson
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from starlette.concurrency import run_in_threadpool

from grape.keys import Keys, model_key
from grape.local_steps import LocalParams
from grape.records import DatasetState
from grape.redis_client import as_str
from grape.score_kinds import (
    DEFAULT_EMBEDDING_MODEL,
    ScoreTask,
    dataset_scores,
    normalize_scores,
    task_model,
    tasks_for,
)
from grape.settings import DEFAULT_TENANT, Settings
from grape.store import datasets as store
from grape.store import heartbeats, scoring, tenants
from grape.store.errors import NotFound, OverQuota
from grape.store.io import Call, apages, arun, scripts, thread_pages
from grape.store.tenants import UNLIMITED, owner
from grape.strategies import STRATEGIES, ScoredItem, SelectParams
from grape.strategies.grape import candidate_score
from grape.strategies.ifd import ifd
from grape.tenancy import quotas_of
from service.errors import Busy, Unprocessable
from service.schemas import (
    CandidatePublic,
    DatasetCreate,
    DatasetPublic,
    FailurePublic,
    IngestResult,
    ItemPublic,
    LocalParamsPublic,
    QuotaReached,
    Rejected,
    ScoresRequest,
    TaskProgress,
)
from service.tenancy import check_free


async def dataset_meta(redis: Redis, keys: Keys, dataset_id: str) -> dict[str, str]:
    """The dataset's metadata; a 404 when there is no such dataset."""
    return await arun(redis, store.require_meta(keys, dataset_id))


async def create_dataset(
    *, redis: Redis, keys: Keys, body: DatasetCreate, settings: Settings | None = None, tenant: str = DEFAULT_TENANT
) -> DatasetPublic:
    """A new dataset of `tenant`; 403 past its datasets quota (with `settings`: the quotas' source)."""
    fields = {
        "name": body.name,
        "target_model": body.target_model,
        "template": body.template.value,
        # the requested score kinds and the models that compute them
        "scores": orjson.dumps(normalize_scores(body.scores)).decode(),
        "scorer_model": body.scorer_model or body.target_model,
        "embedding_model": body.embedding_model or DEFAULT_EMBEDDING_MODEL,
        **LocalParams(body.local_segmentation, body.local_window).fields(),
    }
    limit, used = await check_free(redis, keys, settings, tenant, "datasets") if settings else (UNLIMITED, 0)
    ds = await arun(redis, store.create(keys, fields, tenant, limit, used))
    for task in tasks_for(dataset_scores(fields)):  # the queues it will use, for an autoscaler (deploy/k8s)
        await scoring.aensure_group(redis, keys.task_stream(task.value, task_model(fields, task)))
    return await dataset_status(redis=redis, keys=keys, dataset_id=ds)


def task_state(items: int, scored: int, failed: int) -> DatasetState:
    if items == 0:
        return DatasetState.empty
    return DatasetState.done if scored + failed >= items else DatasetState.scoring


def task_progress(
    meta: Mapping[str, str], items: int, candidates: int, per_task: list[store.Counters], beats: list[dict[str, Any]]
) -> dict[str, TaskProgress]:
    """Per requested task (in `per_task`'s order): its model, counters and state (every accepted item is
    queued for each), and its live workers on its model."""
    workers: dict[tuple[str, str], int] = {}
    for beat in beats:
        key = (beat.get("task", "logprob"), model_key(beat.get("model", "")))
        workers[key] = workers.get(key, 0) + 1
    out: dict[str, TaskProgress] = {}
    for t, st in zip(tasks_for(dataset_scores(meta)), per_task, strict=True):
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
            workers=workers.get((t.value, model_key(model)), 0),
        )
    return out


async def dataset_status(
    *, redis: Redis, keys: Keys, dataset_id: str, meta: dict[str, str] | None = None
) -> DatasetPublic:
    """`meta`: the dataset's metadata when the caller has read it already."""
    meta = meta or await dataset_meta(redis, keys, dataset_id)
    st, per_task = await arun(redis, store.counters(keys, dataset_id, tasks_for(dataset_scores(meta))))
    items = int(st.get("items", 0))
    scored, failed = int(st.get("scored_items", 0)), int(st.get("failed_items", 0))
    cands = int(st.get("candidates", 0))
    scored_c, failed_c = int(st.get("scored_candidates", 0)), int(st.get("failed_candidates", 0))
    tokens = int(st.get("tokens", 0))
    state = task_state(items, scored, failed)
    throughput = eta = None
    start, last = st.get("t_start"), st.get("t_last")
    if start is not None and last is not None and last > start and scored_c:
        elapsed = last - start
        throughput = tokens / elapsed
        remaining = max(cands - scored_c - failed_c, 0)
        eta = remaining / (scored_c / elapsed)
    beats = await heartbeats.live(redis, keys)
    tasks = task_progress(meta, items, cands, per_task, beats)
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
        # workers of every task on the target model
        workers=sum(1 for b in beats if model_key(b.get("model", "")) == model_key(meta["target_model"])),
        scores=dataset_scores(meta),
        scorer_model=task_model(meta, "rating"),
        embedding_model=task_model(meta, "embedding"),
        local=local_public(meta),
        tasks=tasks,
        tenant=owner(meta.get("tenant")),
    )


def local_public(meta: Mapping[str, str]) -> LocalParamsPublic | None:
    if ScoreTask.local not in tasks_for(dataset_scores(meta)):
        return None
    params = LocalParams.from_meta(meta)
    return LocalParamsPublic(segmentation=params.segmentation, window=params.window)


async def list_datasets(*, redis: Redis, keys: Keys, tenant: str | None = None) -> list[DatasetPublic]:
    """The datasets of `tenant` (None: of every tenant), oldest first."""
    found = await arun(redis, store.ids(keys) if tenant is None else tenants.ids(keys, tenant, "datasets"))
    out, gone = [], []
    for ds in found if tenant is None else reversed(found):
        try:
            out.append(await dataset_status(redis=redis, keys=keys, dataset_id=ds))
        except NotFound:
            gone.append(ds)
    if tenant is not None:
        await arun(redis, tenants.forget(keys, tenant, "datasets", gone))
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
    positions: list[int] | None = None,
) -> IngestResult:
    """Store and queue the valid items (at `positions` in the upload), as many as the dataset owner's stored_pairs
    quota lets in: the others are rejected naming it (403 when none fits). `rejected`: the first rejections
    (capped); `rejected_total`: all."""
    n_rejected = len(rejected) if rejected_total is None else rejected_total
    rejected = list(rejected)
    meta = await dataset_meta(redis, keys, dataset_id)
    if not items and rejected:
        raise Unprocessable(
            f"no item accepted: {n_rejected} rejected"
            + (f" (the first {len(rejected)} listed)" if n_rejected > len(rejected) else ""),
            rejected=[r.model_dump() for r in rejected],
            rejected_total=n_rejected,
        )
    backlog = await arun(redis, scoring.queued(keys, meta["target_model"]))
    if backlog >= settings.max_queue_chunks:
        raise Busy(
            f"queue of {meta['target_model']} holds {backlog} chunks (limit {settings.max_queue_chunks}, "
            "GRAPE_MAX_QUEUE_CHUNKS): workers are behind; retry later",
            retry_after=10,
        )
    tenant = owner(meta.get("tenant"))  # the dataset's owner holds the pairs, whoever uploads them
    limit = quotas_of(settings).limit(tenant, "stored_pairs")
    accepted: set[str] = set()
    over: set[str] = set()
    used = 0
    chunks = scoring.chunked(items, settings.chunk_pairs)

    def build() -> list[Call]:
        return [
            scoring.ingest(
                keys,
                dataset_id,
                meta,
                chunk,
                limit,
                settings.fair_share_window,
                settings.item_compression,
            )
            for chunk in chunks
        ]

    # compressing the items is most of an upload's CPU: in a thread (zstd lets the others run meanwhile); the
    # chunks' scripts then go in one round trip, in order, each seeing the quota the ones before it left
    for res in await arun(redis, scripts(await run_in_threadpool(build))):
        if res is None:  # deleted while the upload ran
            raise store.missing(dataset_id)
        new, refused, used = res
        accepted.update(as_str(x) for x in new)
        over.update(as_str(x) for x in refused)
    fresh = [it for it in items if it["id"] in accepted]
    await arun(redis, store.catch_up(keys, dataset_id, meta, fresh, settings.chunk_pairs, settings.fair_share_window))
    quota = None
    if over:
        used = int(used)
        quota = QuotaReached(quota="stored_pairs", limit=limit, usage=used, tenant=tenant)
        refused = [(i, it) for i, it in zip(positions or range(len(items)), items, strict=True) if it["id"] in over]
        if not accepted:
            raise OverQuota("stored_pairs", limit, used, tenant, sum(len(it["candidates"]) for _, it in refused))
        n_rejected += len(refused)
        for index, it in refused[: max(settings.max_rejections - len(rejected), 0)]:
            why = (
                f"quota stored_pairs of tenant {tenant!r}: the item's {len(it['candidates'])} pairs do not fit "
                f"(limit {limit}, in use {used}); delete a dataset, or ask the operator for more"
            )
            rejected.append(Rejected(index=index, id=it["id"][:256], error=why))
        rejected.sort(key=lambda r: r.index)
    return IngestResult(
        accepted=len(accepted),
        duplicates=len(items) - len(accepted) - len(over),
        rejected=rejected,
        accepted_candidates=sum(len(it["candidates"]) for it in fresh),
        rejected_total=n_rejected,
        quota=quota,
    )


def candidate_extras(stored: store.StoredItem) -> list[dict[str, Any]]:
    """Per candidate, the extra task results shown in the item view (IFD and Deita's evol score with them)."""
    uncond, rating = stored.extra.get("unconditioned"), stored.extra.get("rating")
    local = stored.extra.get("local")
    out: list[dict[str, Any]] = [{} for _ in stored.item["candidates"]]
    for i, extra in enumerate(out):
        if uncond is not None:
            u = uncond[i]
            extra.update(uncond_logprob_sum=u.get("logprob_sum"), uncond_tokens=u.get("tokens"))
            if stored.scores:
                extra["ifd"] = ifd(stored.scores[i], u)
        if rating is not None:
            r = rating[i]
            extra.update(
                complexity=r["complexity"],
                quality=r["quality"],
                evol=r.get("history", 0.0) + r["complexity"] * r["quality"],
            )
        if local is not None:
            lc = local[i]
            extra.update(local=lc["local"], local_steps=lc["steps"], local_step_min=lc["step_min"])
    return out


async def get_item(*, redis: Redis, keys: Keys, dataset_id: str, item_id: str) -> ItemPublic:
    stored = await arun(redis, store.item(keys, dataset_id, item_id))
    item, scores = stored.item, stored.scores
    chosen = -1
    if scores:
        chosen = next(iter(STRATEGIES.get("grape")([ScoredItem(item, scores)], SelectParams()))).candidate
    extras = candidate_extras(stored)
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
    return ItemPublic(
        id=item_id,
        state="scored" if scores else "failed" if stored.error else "queued",
        error=stored.error if stored.error and not scores else None,
        instruction=item.get("instruction"),
        messages=item.get("messages") if "messages" in item else None,
        candidates=cands,
    )


async def list_failures(*, redis: Redis, keys: Keys, dataset_id: str, limit: int) -> list[FailurePublic]:
    rows = await arun(redis, store.failures(keys, dataset_id, limit))
    return [FailurePublic(id=k, error=v) for k, v in rows]


def _libc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_malloc_trim = _libc_trim()


def release_memory() -> None:
    """After a read of a whole pool: hand the freed heap back to the system. glibc keeps the arenas that the
    worker threads decoding pages used, so without this the gateway stays at its peak after the read ends."""
    if _malloc_trim is not None:
        _malloc_trim(0)


async def selection_lines(
    *,
    redis: Redis,
    keys: Keys,
    dataset_id: str,
    strategy: str,
    params: SelectParams,
    redis_threads: SyncRedis | None = None,
) -> AsyncIterator[bytes]:
    """NDJSON records ready for TRL's SFTTrainer, once the caller has checked the strategy
    (grape.store.datasets.check_selection); streams page by page for per-instruction strategies."""
    # deciding, decoding and encoding is CPU work that grows with the pool: in worker threads, so the event loop
    # (and /healthz, and every other request) keeps answering meanwhile. With the threads' own client (an export),
    # a page is read and decided in one thread while the page before is written in another and the one before
    # that is sent (bench/reads.py at 100k pairs, with the item parts: 44 -> 54-60 MB/s)
    plan = store.selection(keys, dataset_id, strategy, params)
    read = thread_pages(redis_threads, plan) if redis_threads is not None else apages(redis, plan, offload=True)
    try:
        async for got in read:
            for records in got:
                chunk = await anyio.to_thread.run_sync(records.render)
                if chunk:
                    yield chunk
    finally:
        release_memory()


async def selection(
    *, redis: Redis, redis_threads: SyncRedis, keys: Keys, dataset_id: str, strategy: str, params: SelectParams
) -> tuple[DatasetPublic, AsyncIterator[bytes]]:
    """`GET /selection`: the strategy checked once (an unknown one before the dataset: 422, then 404), the
    dataset's status for the headers, and its records."""
    needs = store.selection_needs([strategy])
    meta = await dataset_meta(redis, keys, dataset_id)
    store.check_scores(meta, needs, dataset_id)
    status = await dataset_status(redis=redis, keys=keys, dataset_id=dataset_id, meta=meta)
    lines = selection_lines(
        redis=redis, keys=keys, dataset_id=dataset_id, strategy=strategy, params=params, redis_threads=redis_threads
    )
    return status, lines


async def request_scores(
    *, redis: Redis, keys: Keys, settings: Settings, dataset_id: str, body: ScoresRequest
) -> list[str]:
    """Add score kinds to a dataset; the tasks that are new, for which its stored items were queued."""
    models = {"scorer_model": body.scorer_model, "embedding_model": body.embedding_model}
    local = {"local_segmentation": body.local_segmentation, "local_window": body.local_window}
    plan = store.request_scores(
        keys, dataset_id, body.scores, models, settings.chunk_pairs, settings.fair_share_window, local=local
    )
    return await arun(redis, plan)


async def delete_dataset(*, redis: Redis, keys: Keys, dataset_id: str) -> None:
    await arun(redis, store.delete(keys, dataset_id))
