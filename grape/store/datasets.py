"""A dataset in Redis: its metadata, counters, items, pages of scored items and the selection by any strategy.

Every read is a plan (grape.store.io), written once: the gateway drives it with its asyncio client
(`arun`/`apages`, the JSON decoding and the selecting off the event loop with `offload=True`), the trainer and
the worker with their sync clients (`run`/`pages`). The selection is checked once (`check_selection`: the
strategies are known and the scores they need were requested) and then made by one page function,
`selection`, whose NDJSON bytes the gateway streams and the trainer writes to its file (`write_selection`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from grape.keys import Keys, ScoreQueue, is_dataset_id, new_dataset_id
from grape.redis_client import as_str
from grape.score_kinds import ScoreTask, dataset_scores, extra_tasks, normalize_scores, task_model, tasks_for
from grape.settings import DEFAULT_TENANT
from grape.store import facts, scoring, summaries
from grape.store.codec import decode_item, decode_item_for, decode_score_matrix, decode_score_tables, decode_scores
from grape.store.errors import Invalid, NotFound, OverQuota, shown
from grape.store.io import Lua, Page, Plan, cmd, one, pages, run, script
from grape.store.tenants import UNLIMITED, owner
from grape.strategies import STRATEGIES, Pick, ScoredItem, SelectParams, columns, strategy_needs
from grape.strategies.base import accumulator
from grape.strategies.columns import PairPage, Picked, SourceTable, columnar, decides_without_texts

PAGE = 500
"""Items read per round trip (and NDJSON records per chunk of a pool-wide selection)."""

ITEM_EXTRAS = ("unconditioned", "rating", "local")
"""The extra task results shown with an item (not the embeddings: large, and of no use to a reader)."""

Counters = dict[str, float]


def _text(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {as_str(k): as_str(v) for k, v in raw.items()}


def _floats(raw: Mapping[Any, Any]) -> Counters:
    return {as_str(k): float(as_str(v)) for k, v in raw.items()}


# ---- metadata and counters -----------------------------------------------------------------------------


def meta(keys: Keys, dataset_id: str) -> Plan[dict[str, str] | None]:
    """The dataset's metadata, or None when there is none (or `dataset_id` is not an id at all: a value from a
    body, like a training job's dataset_id, must not name another key)."""
    if not is_dataset_id(dataset_id):
        return None
    raw = yield from one("hgetall", keys.dataset(dataset_id))
    return _text(raw) if raw else None


def require_meta(keys: Keys, dataset_id: str) -> Plan[dict[str, str]]:
    found = yield from meta(keys, dataset_id)
    if found is None:
        raise missing(dataset_id)
    return found


def missing(dataset_id: str) -> NotFound:
    """The one answer for a dataset that is not there, or not the caller's (the same status and words)."""
    return NotFound(f"dataset {shown(dataset_id)} not found")


def exists(keys: Keys, dataset_id: str) -> Plan[bool]:
    """Whether the dataset is there (a worker checks before writing, so a deleted one's keys are not recreated)."""
    found = yield from one("exists", keys.dataset(dataset_id))
    return bool(found)


def ids(keys: Keys) -> Plan[list[str]]:
    """Every dataset id, oldest first."""
    raw = yield from one("zrange", keys.datasets(), 0, -1)
    return [as_str(x) for x in raw]


def counters(keys: Keys, dataset_id: str, tasks: Iterable[ScoreTask]) -> Plan[tuple[Counters, list[Counters]]]:
    """The dataset's counters (items, candidates, scored..., t_start, t_last) and those of each task."""
    stats, *per_task = yield [
        cmd("hgetall", keys.stats(dataset_id)),
        *(cmd("hgetall", keys.task_stats(dataset_id, t)) for t in tasks),
    ]
    return _floats(stats), [_floats(raw) for raw in per_task]


CREATE = Lua("""
-- KEYS: metadata, the datasets zset, the tenant's datasets zset, the tenants set
-- ARGV: id, now, the tenant's dataset limit, tenant, then field/value pairs of the metadata
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[3]) then return 0 end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[4])
return 1
""")

DELETE = Lua("""
-- KEYS: metadata, the datasets zset, the owner's datasets zset, the owner's usage, stats, then the other keys
-- ARGV: id. The owner's stored pairs drop by what the dataset held, in the same step that removes it.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(redis.call('HGET', KEYS[5], 'candidates') or '0')
if n ~= 0 then redis.call('HINCRBY', KEYS[4], 'stored_pairs', -n) end
redis.call('DEL', unpack(KEYS, 5))
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
""")


def create(
    keys: Keys, fields: Mapping[str, str], tenant: str = DEFAULT_TENANT, limit: int = UNLIMITED, usage: int = 0
) -> Plan[str]:
    """A new dataset of `tenant` with these metadata fields (and `created`, `tenant`); its id. `OverQuota` when
    the tenant owns `limit` datasets already (`usage`: how many its pruned index held, for the message)."""
    dataset_id, now = new_dataset_id(), time.time()
    mapping = {**fields, "created": f"{now:.3f}", "tenant": tenant}
    args: list[Any] = [dataset_id, f"{now:.3f}", limit, tenant, *(x for kv in mapping.items() for x in kv)]
    script_keys = [keys.dataset(dataset_id), keys.datasets(), keys.tenant_ids(tenant, "datasets"), keys.tenants()]
    created = yield from one("eval", CREATE.source, len(script_keys), *script_keys, *args)
    if not created:
        raise OverQuota("datasets", limit, usage, tenant)
    return dataset_id


def delete(keys: Keys, dataset_id: str) -> Plan[None]:
    """Remove the dataset, its items, scores and counters; its owner's stored pairs drop by its candidates."""
    found = yield from require_meta(keys, dataset_id)
    tenant = owner(found.get("tenant"))
    per_task = (k(dataset_id, t) for t in ScoreTask for k in (keys.task_results, keys.task_failed, keys.task_stats))
    parts = (keys.items, keys.order, keys.scores, keys.failed, keys.facts)
    script_keys = [
        keys.dataset(dataset_id),
        keys.datasets(),
        keys.tenant_ids(tenant, "datasets"),
        keys.tenant_usage(tenant),
        keys.stats(dataset_id),
        *(k(dataset_id) for k in parts),
        *(k for k in per_task if k != keys.stats(dataset_id)),
        *summaries.all_keys(keys, dataset_id),
    ]
    yield [
        # its chunks still waiting for their turn leave the backlogs, counts and rings (fair share) in one script:
        # the backlogs are not deleted apart from it, or a count would keep chunks an upload racing it pushed
        script(scoring.drop(scoring.queues_of(keys, found), dataset_id)),
        cmd("eval", DELETE.source, len(script_keys), *script_keys, dataset_id),
    ]


# ---- items ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredItem:
    """One item as stored: the item, its logprob scores or the reason it failed, and its ITEM_EXTRAS."""

    item: dict[str, Any]
    scores: list[dict[str, Any]] | None
    error: str | None
    extra: dict[str, list[dict[str, Any]]]


def item(keys: Keys, dataset_id: str, item_id: str) -> Plan[StoredItem]:
    yield from require_meta(keys, dataset_id)
    raw, scores, error, *extra = yield [
        cmd("hget", keys.items(dataset_id), item_id),
        cmd("hget", keys.scores(dataset_id), item_id),
        cmd("hget", keys.failed(dataset_id), item_id),
        *(cmd("hget", keys.task_results(dataset_id, n), item_id) for n in ITEM_EXTRAS),
    ]
    if raw is None:
        raise NotFound(f"item {shown(item_id)} not found in dataset {dataset_id!r}")
    return StoredItem(
        decode_item(raw),
        decode_scores(scores) if scores else None,
        as_str(error) if error is not None else None,
        {n: decode_scores(x) for n, x in zip(ITEM_EXTRAS, extra, strict=True) if x is not None},
    )


def failures(keys: Keys, dataset_id: str, limit: int) -> Plan[list[tuple[str, str]]]:
    """Up to `limit` failed items as (id, reason), in the hash's scan order."""
    yield from require_meta(keys, dataset_id)
    out: list[tuple[str, str]] = []
    cursor = 0
    while True:
        cursor, page = yield from one("hscan", keys.failed(dataset_id), cursor, count=500)
        for k, v in page.items():
            out.append((as_str(k), as_str(v)))
            if len(out) >= limit:
                return out
        if not cursor:
            return out


def items_page(keys: Keys, dataset_id: str, start: int) -> Plan[Page[dict[str, Any]]]:
    """A page of stored items in upload order (the next page starts after it; None: this was the last)."""
    order = yield from one("lrange", keys.order(dataset_id), start, start + PAGE - 1)
    if not order:
        return [], None
    raws = yield from one("hmget", keys.items(dataset_id), order)
    return [decode_item(x) for x in raws if x is not None], start + len(order) if len(order) == PAGE else None


def load_chunks(
    keys: Keys, chunks: list[tuple[str, list[str]]], known: Collection[str]
) -> Plan[tuple[dict[str, dict[str, str]], list[list[dict[str, Any]]]]]:
    """For a worker's claimed chunks (dataset id, item ids), in one round trip: the metadata of the datasets
    not `known` yet (a deleted one is left out) and each chunk's stored items."""
    unknown = sorted({ds for ds, _ in chunks if ds not in known})
    got = yield [
        *(cmd("hgetall", keys.dataset(ds)) for ds in unknown),
        *(cmd("hmget", keys.items(ds), item_ids) if item_ids else cmd("echo", "") for ds, item_ids in chunks),
    ]
    metas = {ds: _text(raw) for ds, raw in zip(unknown, got, strict=False) if raw}
    items = [
        [decode_item(x) for x in raws if x is not None] if item_ids else []
        for (_, item_ids), raws in zip(chunks, got[len(unknown) :], strict=True)
    ]
    return metas, items


# ---- score kinds ---------------------------------------------------------------------------------------


def _enqueue(
    dataset_id: str, queues: list[ScoreQueue], items: list[dict[str, Any]], pairs: int, window: int
) -> Plan[None]:
    chunks = [[it["id"] for it in c] for c in scoring.chunked(items, pairs)]
    if queues and chunks:
        yield [script(scoring.enqueue(q, dataset_id, chunks, window)) for q in queues]


def request_scores(
    keys: Keys,
    dataset_id: str,
    scores: list[str],
    models: Mapping[str, str | None],
    pairs: int,
    window: int = scoring.DEFAULT_WINDOW,
    local: Mapping[str, str | int | None] | None = None,
) -> Plan[list[str]]:
    """Add score kinds to a dataset and queue its stored items (chunks of about `pairs` pairs) for the tasks
    that are new; the tasks queued. `models` ("scorer_model", "embedding_model") and `local`
    ("local_segmentation", "local_window", grape.local_steps): chosen only for a task not requested before."""
    found = yield from require_meta(keys, dataset_id)
    try:
        wanted = normalize_scores([*dataset_scores(found), *scores])
    except ValueError as exc:
        raise Invalid(f"scores: {exc}") from None
    before = set(tasks_for(dataset_scores(found)))
    new_tasks = [t for t in tasks_for(wanted) if t not in before]
    update: dict[str, str] = {"scores": orjson.dumps(wanted).decode()}
    for field, task in (("scorer_model", ScoreTask.rating), ("embedding_model", ScoreTask.embedding)):
        value = models.get(field)
        if value is None or value == task_model(found, task):
            continue
        if task in before:
            raise Invalid(f"{field}: the {task.value} scores were already requested with {task_model(found, task)!r}")
        update[field] = value
    for field, value in (local or {}).items():
        if value is None or str(value) == str(found.get(field)):
            continue
        if ScoreTask.local in before:
            raise Invalid(f"{field}: the local scores were already requested with {found.get(field)!r}")
        update[field] = str(value)
    yield [cmd("hset", keys.dataset(dataset_id), mapping=update)]
    found.update(update)
    # after the metadata: an upload running now either sees the new tasks or is seen here (catch_up)
    queues = [keys.score_queue(t, task_model(found, t)) for t in new_tasks]
    nxt: int | None = 0
    while queues and nxt is not None:
        stored, nxt = yield from items_page(keys, dataset_id, nxt)
        yield from _enqueue(dataset_id, queues, stored, pairs, window)
    return [t.value for t in new_tasks]


def catch_up(
    keys: Keys,
    dataset_id: str,
    before: Mapping[str, str],
    accepted: list[dict[str, Any]],
    pairs: int,
    window: int = scoring.DEFAULT_WINDOW,
) -> Plan[None]:
    """After an upload: queue its new items for the tasks requested while it ran (its ingest script only knew
    the tasks of `before`). A duplicate entry is harmless: results are idempotent."""
    if not accepted:
        return
    now = yield from meta(keys, dataset_id)
    if now is None:
        return
    known = set(extra_tasks(before))
    queues = [keys.score_queue(t, task_model(now, t)) for t in extra_tasks(now) if t not in known]
    yield from _enqueue(dataset_id, queues, accepted, pairs, window)


# ---- selection -----------------------------------------------------------------------------------------


def selection_needs(names: Iterable[str]) -> tuple[str, ...]:
    """The strategies' extra tasks (grape.score_kinds), unioned; `Invalid` for a strategy that is not known."""
    needs: list[str] = []
    for name in names:
        try:
            needs += [n for n in strategy_needs(name) if n not in needs]
        except (KeyError, ValueError) as exc:
            raise Invalid(f"strategy: {exc}") from None
    return tuple(needs)


def check_scores(found: Mapping[str, str], needs: Iterable[str], dataset_id: str) -> None:
    """`Invalid` when the dataset did not ask for scores the strategies need."""
    have = set(tasks_for(dataset_scores(found)))
    missing = [n for n in needs if ScoreTask(n) not in have]
    if missing:
        raise Invalid(
            f"strategy needs the scores {', '.join(missing)}, not requested for this dataset: "
            f'POST /v1/datasets/{dataset_id}/scores {{"scores": {orjson.dumps(missing).decode()}}}'
        )


def check_selection(found: Mapping[str, str], names: Iterable[str], dataset_id: str) -> tuple[str, ...]:
    """The strategies, each known and with the scores it needs requested; their needs."""
    needs = selection_needs(names)
    check_scores(found, needs, dataset_id)
    return needs


def scored_rows(
    keys: Keys, dataset_id: str, item_ids: list[str], needs: tuple[str, ...] = ()
) -> Plan[list[ScoredItem]]:
    """The scored items among `item_ids`, in that order (one round trip; the one place scored items are
    decoded): unscored, failed and unknown ids are left out. `needs`: extra task results attached where an
    item has them."""
    if not item_ids:
        return []
    raw_items, raw_scores, *extra = yield [
        cmd("hmget", keys.items(dataset_id), item_ids),
        cmd("hmget", keys.scores(dataset_id), item_ids),
        *(cmd("hmget", keys.task_results(dataset_id, n), item_ids) for n in needs),
    ]
    return [
        ScoredItem(
            decode_item(it),
            decode_scores(sc),
            {n: decode_scores(x[j]) for n, x in zip(needs, extra, strict=True) if x[j] is not None},
        )
        for j, (it, sc) in enumerate(zip(raw_items, raw_scores, strict=True))
        if it is not None and sc is not None
    ]


def order_page(keys: Keys, dataset_id: str, start: int, size: int = PAGE) -> Plan[list[str]]:
    """The ids of up to `size` items in upload order from position `start`."""
    raw = yield from one("lrange", keys.order(dataset_id), start, start + size - 1)
    return [as_str(x) for x in raw]


def scored(keys: Keys, dataset_id: str, needs: tuple[str, ...] = ()) -> Callable[[int], Plan[Page[ScoredItem]]]:
    """Pages of scored items in upload order (for `pages`/`apages`); unscored and failed items are left out.
    `needs`: extra task results (grape.score_kinds) attached where an item has them."""

    def page(start: int) -> Plan[Page[ScoredItem]]:
        order = yield from one("lrange", keys.order(dataset_id), start, start + PAGE - 1)
        if not order:
            return [], None
        rows = yield from scored_rows(keys, dataset_id, order, needs)
        return rows, start + len(order) if len(order) == PAGE else None

    return page


def _pair_keys(keys: Keys, dataset_id: str, needs: tuple[str, ...], with_items: bool) -> list[str]:
    return [
        keys.facts(dataset_id),
        keys.scores(dataset_id),
        *(keys.task_results(dataset_id, n) for n in needs),
        *([keys.items(dataset_id)] if with_items else []),
    ]


def pairs_of(
    keys: Keys,
    dataset_id: str,
    item_ids: list[str],
    needs: tuple[str, ...] = (),
    *,
    table: SourceTable,
    whole: bool = False,
    records: bool = False,
) -> Plan[tuple[PairPage, dict[str, bytes]]]:
    """The scored items among `item_ids`, in that order, as columns (grape.strategies.columns.PairPage), read from
    their facts and scores, not their texts (an item stored without facts, before they existed, is read whole for
    them: one more round trip). Unscored, failed and unknown ids are left out, as `scored_rows` leaves them.
    The page's rows hold light items (`id` and the candidates' `source`: what the built-in strategies decide from),
    or the whole items with `whole`, and the `needs` task results. `records`: the scored items' stored records
    too, by id (a selection decodes only those it emits)."""
    if not item_ids:
        return columns.build([], [], [], table, list), {}
    hashes = _pair_keys(keys, dataset_id, needs, whole or records)
    replies = yield [cmd("hmget", h, item_ids) for h in hashes]
    return (yield from _pairs(keys, dataset_id, item_ids, replies, needs, table, whole, records))


def _pairs(
    keys: Keys,
    dataset_id: str,
    item_ids: list[str],
    replies: list[list[Any]],
    needs: tuple[str, ...],
    table: SourceTable,
    whole: bool,
    records: bool,
) -> Plan[tuple[PairPage, dict[str, bytes]]]:
    with_items = whole or records
    raw_facts, raw_scores, *rest = replies
    extra = rest[: len(needs)]
    raw_items: list[Any] = rest[len(needs)] if with_items else [None] * len(item_ids)
    if not with_items:  # an item without facts (stored before them): its record, for them
        lacking = [
            j for j, (f, sc) in enumerate(zip(raw_facts, raw_scores, strict=True)) if f is None and sc is not None
        ]
        if lacking:
            (got,) = yield [cmd("hmget", keys.items(dataset_id), [item_ids[j] for j in lacking])]
            for j, raw in zip(lacking, got, strict=True):
                raw_items[j] = raw
    keep = [
        j
        for j, (f, sc, it) in enumerate(zip(raw_facts, raw_scores, raw_items, strict=True))
        if sc is not None and (it is not None if with_items else f is not None or it is not None)
    ]
    ids = [item_ids[j] for j in keep]
    decoded = {j: decode_item(raw_items[j]) for j in keep if whole or raw_facts[j] is None}
    kept_facts = [raw_facts[j] if raw_facts[j] is not None else facts.encode(decoded[j]) for j in keep]
    kept_scores = [raw_scores[j] for j in keep]
    split = facts.split_many(kept_facts)
    if split is not None:  # the usual form: lengths parsed in one call, each distinct source list once
        chars, lists = split
        codes = [table.codes_of_json(x) for x in lists]
        counts = np.fromiter(map(len, codes), dtype=np.int64, count=len(codes))
        source = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int32)
    else:
        counts, chars, source = columns.facts_columns(facts.decode_many(kept_facts), table)
    scores = decode_score_matrix(kept_scores) or columns.score_matrix(decode_score_tables(kept_scores))

    def rows() -> list[ScoredItem]:  # built when a strategy without a column form asks
        names, bounds = table.names, [0, *np.cumsum(counts).tolist()]  # (not the page's: no reference cycle)
        return [
            ScoredItem(
                decoded[j]
                if whole
                else {"id": item_ids[j], "candidates": [{"source": names[c]} for c in source[a:b].tolist()]},
                decode_scores(raw_scores[j]),
                {n: decode_scores(x[j]) for n, x in zip(needs, extra, strict=True) if x[j] is not None},
            )
            for j, a, b in zip(keep, bounds[:-1], bounds[1:], strict=True)
        ]

    page = columns.build(ids, counts, chars, source, table, scores, rows)
    return page, ({item_ids[j]: raw_items[j] for j in keep} if records else {})


READ_PAGE = Lua("""
-- KEYS: order, then hashes   ARGV: start, count
-- A page of the upload order and each hash's values for its ids, in one step: the ids never travel back.
local ids = redis.call('LRANGE', KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[1]) + tonumber(ARGV[2]) - 1)
local out = {ids}
if #ids == 0 then return out end
for k = 2, #KEYS do out[k] = redis.call('HMGET', KEYS[k], unpack(ids)) end
return out
""")

COLUMN_PAGE = 1000
"""Items per round trip of the reads that decide from facts and scores (~0.5 KB of records an item; at most a few
thousand: `READ_PAGE` passes them to HMGET as arguments)."""


def pair_pages(
    keys: Keys,
    dataset_id: str,
    needs: tuple[str, ...] = (),
    *,
    whole: bool = False,
    records: bool = False,
    table: SourceTable | None = None,
    size: int = COLUMN_PAGE,
) -> Callable[[int], Plan[Page[tuple[PairPage, dict[str, bytes]]]]]:
    """Pages of scored items in upload order as columns (`pairs_of`, for `pages`/`apages`), a source table shared
    by them all; a page is one round trip (`READ_PAGE`), and one more for the items' records when they are read
    (a plain HMGET: Redis copies ~4 KB records through a script's Lua strings ~3x slower than it answers them)."""
    shared = table or SourceTable()
    script_keys = [keys.order(dataset_id), *_pair_keys(keys, dataset_id, needs, False)]
    with_items = whole or records

    def page(start: int) -> Plan[Page[tuple[PairPage, dict[str, bytes]]]]:
        (reply,) = yield [script(READ_PAGE.call(script_keys, [start, size]))]
        order, *replies = reply
        if not order:
            return [], None
        ids = [x.decode() if isinstance(x, bytes) else x for x in order]  # (a missing field comes back as None)
        if with_items:
            replies.append((yield from one("hmget", keys.items(dataset_id), ids)))
        got = yield from _pairs(keys, dataset_id, ids, replies, needs, shared, whole, records)
        return [got], start + len(order) if len(order) == size else None

    return page


def _item_id(row: ScoredItem, candidate: int) -> str:
    return row.item["id"]


Chosen = tuple[str, int, float, int]
"""A selected pair as the selection holds it until its record is written: item id, candidate, score, rank."""


def _chosen(picks: Picked) -> list[Chosen]:
    return list(zip(picks.id_list(), picks.candidate.tolist(), picks.score.tolist(), picks.rank.tolist(), strict=True))


def _records(chosen: list[Chosen], raws: Mapping[str, Any]) -> bytes:
    """The NDJSON of the chosen pairs whose items are in `raws` (stored records by id), each item decoded once, with
    only its chosen candidates' responses."""
    wanted: dict[str, set[int]] = {}
    for item_id, cand, _, _ in chosen:
        if raws.get(item_id) is not None:
            wanted.setdefault(item_id, set()).add(cand)
    items = {i: decode_item_for(raws[i], cands) for i, cands in wanted.items()}
    out = [
        orjson.dumps(Pick(items[item_id], cand, score, rank).record())
        for item_id, cand, score, rank in chosen
        if item_id in items
    ]
    return b"\n".join(out) + b"\n" if out else b""


@dataclass(frozen=True)
class Records:
    """Picks of a selection whose records are not written yet, with their items' stored records: `render()` gives
    their NDJSON. Deciding a page and writing its records are apart so a reader can write one page's records while
    the next page is read and decided (the gateway does, in two threads)."""

    chosen: list[Chosen]
    raws: Mapping[str, Any]

    def render(self) -> bytes:
        return _records(self.chosen, self.raws)


def selection(keys: Keys, dataset_id: str, strategy: str, params: SelectParams) -> Callable[[int], Plan[Page[Records]]]:
    """The selected SFT records, page after page, as `Records` to render into NDJSON chunks (for `pages`/`apages`; check
    the strategy first, `check_selection`). One pass over the pool decides from the items' facts and scores
    (`pair_pages`: no text is read to decide), in the strategy's column form when it has one
    (grape.strategies.columns), else in its streaming form over rows (grape.strategies.base `accumulator`), holding
    only item ids of what it may still pick. The picks a page decides (a per-item strategy: all of them) are written
    as that page is read, their items read with it; the rest (a pool-wide strategy's top `n`) come after the last
    page, their items read by id, PAGE records a chunk. Only the items of picked pairs are decoded, and the pool is
    never held."""
    select = STRATEGIES.get(strategy)
    per_item = select.streams  # decided one instruction at a time
    col = columnar(select, params)
    acc = None if col is not None else accumulator(select, params, _item_id)
    read = pair_pages(
        keys, dataset_id, strategy_needs(strategy), whole=not decides_without_texts(select), records=per_item
    )
    rest: list[Chosen] = []  # the picks held to the end: as tuples from a row form,
    held: list[Picked] = []  # or as columns from a column form (no object per pick)
    total = [0]

    def decide(page: PairPage) -> list[Chosen]:
        if col is not None:
            return _chosen(col.add(page))
        assert acc is not None
        return [(c.ref, c.candidate, c.score, c.rank) for c in acc.add(page.rows())]

    def finish() -> int:
        if col is not None:
            held.append(col.finish())
            return len(held[0])
        assert acc is not None
        rest.extend((c.ref, c.candidate, c.score, c.rank) for c in acc.finish())
        return len(rest)

    def held_chunk(done: int) -> list[Chosen]:
        if held:
            return _chosen(held[0].take(np.arange(done, min(done + PAGE, len(held[0])))))
        return rest[done : done + PAGE]

    def items_of(chosen: list[Chosen]) -> Plan[dict[str, Any]]:
        ids = list(dict.fromkeys(c[0] for c in chosen))
        if not ids:
            return {}
        raws = yield from one("hmget", keys.items(dataset_id), ids)
        return dict(zip(ids, raws, strict=True))

    def page(start: int) -> Plan[Page[Records]]:
        if start < 0:  # after the pool: the held picks, -1 - start of them given so far
            done = -1 - start
            chunk = held_chunk(done)
            raws = yield from items_of(chunk)
            return [Records(chunk, raws)] if chunk else [], -1 - (done + PAGE) if done + PAGE < total[0] else None
        got, nxt = yield from read(start)
        out: list[Records] = []
        for pairs, records in got:
            chosen = decide(pairs)
            if chosen and not per_item:  # a pool-wide strategy's picks of this page (random without n)
                records = yield from items_of(chosen)
            if chosen:
                out.append(Records(chosen, records))
        if nxt is None:
            total[0] = finish()
            nxt = -1 if total[0] else None
        return out, nxt

    return page


def write_selection(r: Any, keys: Keys, dataset_id: str, strategy: str, params: SelectParams, path: str | Path) -> int:
    """Write the selection as NDJSON (to a temporary name, then renamed), exactly as the gateway's `/selection`
    answers it; the record count."""
    check_selection(run(r, require_meta(keys, dataset_id)), [strategy], dataset_id)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    with open(tmp, "wb") as f:
        for got in pages(r, selection(keys, dataset_id, strategy, params)):
            for records in got:
                chunk = records.render()
                f.write(chunk)
                n += chunk.count(b"\n")  # one per record: orjson escapes newlines inside strings
    os.replace(tmp, path)
    return n
