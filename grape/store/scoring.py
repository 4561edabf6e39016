"""The Redis protocol between gateway and workers: its atomic scripts and the record shapes they move.

Ingest (gateway): per chunk, store each new item once (a re-sent id is a duplicate, never new work) that
fits the owner's stored-pairs quota (what does not fit is refused in the same step, so concurrent uploads
never overshoot it), append the new ids to the dataset's order, bump the counters and queue one chunk naming
the item ids, all in one script so a crash never leaves an item stored but not queued.

Fair share: a chunk is queued into its dataset's backlog (a list per dataset and queue), and the dataset joins
the queue's ring of datasets with work. Workers still read one stream per queue through its consumer group
(pending lists, XAUTOCLAIM, dead letters and hand-back are unchanged): the `take` script a worker reads with
first moves chunks from the backlogs into the stream, one per dataset in turn, only as many as it reads,
and the ingest tops a nearly empty stream up to `window` chunks so a blocked worker wakes. A small dataset's
chunks thus wait behind a few chunks, not behind every chunk of the datasets uploaded before it.

Results (worker): per item, write its scores (or its failure), bump the counters only when the field is
new (a redelivered chunk overwrites, never double counts), then XACK + XDEL the entry, in one script.

Each script is a `Lua` beside the one function that builds its keys and arguments (`ingest`, `enqueue`,
`take`, `drop`, `results`, `handback`); a stream entry (`{"ds", "items"}`) is built by `entry` and read by
`parse_entry` alone.

The rest of the streams' protocol is here too, as plans (grape.store.io): a worker's side (`ensure_group`,
`claim`, `written`, `mark_started`, `dead_letter`, `requeue`, `touch`), run with its sync client, and the
gateway's view of the queues (`queued` for backpressure, `queue_depths` for /metrics).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from redis.exceptions import ResponseError

from grape.keys import GROUP, Keys, ScoreQueue
from grape.redis_client import as_str
from grape.score_kinds import ScoreTask, extra_tasks, task_model
from grape.settings import DEFAULT_TENANT
from grape.store import codec, facts
from grape.store.io import Call, Cmd, Lua, Plan, cmd, one, script

FAIR = """
-- The fair share of a queue (grape.keys.ScoreQueue): chunks wait in a backlog list per dataset; `refill` moves
-- them into the stream, one chunk per dataset in turn (the ring of datasets with chunks waiting rotates), only
-- while the stream's undelivered part is under `target`. Workers read the stream as ever (consumer group,
-- pending lists, XAUTOCLAIM, dead letters, hand-back), and a dataset that arrives waits behind at most that
-- small part and one turn of the ring, however many chunks other datasets have waiting.
local function pending_of(stream, group)
  local p = redis.pcall('XPENDING', stream, group)
  if type(p) == 'table' and p.err then return 0, p end  -- no group yet: no worker has read the stream
  return p[1], nil
end

local function refill(stream, ring, waiting, head, tail, pending, target)
  -- acked entries are deleted (RESULTS, HANDBACK): what the stream holds beyond its pending list is undelivered
  local want = target - math.max(redis.call('XLEN', stream) - pending, 0)
  local moved = 0
  for _ = 1, want + 16 do  -- bounded: each turn moves a chunk or drops a dataset with nothing left
    if moved >= want then break end
    local ds = redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
    if not ds then break end
    local backlog = head .. ds .. tail
    local chunk = redis.call('LPOP', backlog)
    if chunk then
      redis.call('XADD', stream, '*', 'ds', ds, 'items', chunk)
      moved = moved + 1
    end
    if redis.call('LLEN', backlog) == 0 then redis.call('LREM', ring, -1, ds) end
  end
  if moved > 0 then redis.call('DECRBY', waiting, moved) end
  return moved
end

local function enqueue(stream, ring, waiting, backlog, ds, chunks, group, head, tail, window)
  if redis.call('LLEN', backlog) == 0 then redis.call('RPUSH', ring, ds) end  -- in the ring iff it has a backlog
  redis.call('RPUSH', backlog, unpack(chunks))
  redis.call('INCRBY', waiting, #chunks)
  -- a stream kept nearly empty: top it up, so a worker blocked on it wakes for the new work
  local pending = pending_of(stream, group)
  refill(stream, ring, waiting, head, tail, pending, window)
end
"""

INGEST = Lua(
    FAIR
    + """
-- KEYS: items, order, stats, metadata, owner's usage, then per queue (the target model's, then the dataset's extra
--       tasks' (grape.score_kinds), if any) its stream, ring, waiting count and this dataset's backlog, then facts
-- ARGV: dataset id, n, the owner's stored-pairs limit, group, backlog head, window, then n x (item id, item json,
--       candidates), then per queue its backlog tail, then n x the item's facts (grape.store.facts)
-- answers {new ids, ids refused by the quota, stored pairs after}, or nothing when the dataset is gone
if redis.call('EXISTS', KEYS[4]) == 0 then return false end
local new, over = {}, {}
local ncand = 0
local n = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local used = tonumber(redis.call('HGET', KEYS[5], 'stored_pairs') or '0')
for i = 0, n - 1 do
  local id, c = ARGV[7 + i * 3], tonumber(ARGV[9 + i * 3])
  if redis.call('HEXISTS', KEYS[1], id) == 0 then
    if used + c > limit then
      over[#over + 1] = id
    else
      redis.call('HSET', KEYS[1], id, ARGV[8 + i * 3])
      redis.call('HSET', KEYS[#KEYS], id, ARGV[#ARGV - n + 1 + i])
      new[#new + 1] = id
      ncand = ncand + c
      used = used + c
    end
  end
end
if #new > 0 then
  redis.call('RPUSH', KEYS[2], unpack(new))
  redis.call('HINCRBY', KEYS[3], 'items', #new)
  redis.call('HINCRBY', KEYS[3], 'candidates', ncand)
  redis.call('HINCRBY', KEYS[5], 'stored_pairs', ncand)
  local chunk = {cjson.encode(new)}
  for q = 0, (#KEYS - 6) / 4 - 1 do
    local k = 6 + q * 4
    enqueue(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], ARGV[1], chunk, ARGV[4], ARGV[5], ARGV[7 + n * 3 + q],
      tonumber(ARGV[6]))
  end
end
return {new, over, used}
"""
)

ENQUEUE = Lua(
    FAIR
    + """
-- KEYS: stream, ring, waiting, the dataset's backlog   ARGV: dataset id, group, backlog head, tail, window, chunks...
enqueue(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], {unpack(ARGV, 6)}, ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]))
return #ARGV - 5
"""
)

TAKE = Lua(
    FAIR
    + """
-- KEYS: stream, ring, waiting   ARGV: group, consumer, count, backlog head, tail
-- A worker's read: first top the stream's undelivered part up to `count` from the backlogs, in turn, then read.
local pending, err = pending_of(KEYS[1], ARGV[1])
if err then return err end  -- NOGROUP: the worker creates the group again (and nothing was moved)
refill(KEYS[1], KEYS[2], KEYS[3], ARGV[4], ARGV[5], pending, tonumber(ARGV[3]))
return redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
"""
)

DROP = Lua("""
-- KEYS: per queue its ring, waiting count and this dataset's backlog   ARGV: dataset id
-- A dataset deleted: its chunks leave the backlogs and the rings (what is in a stream already is dropped by the
-- worker that reads it).
for k = 1, #KEYS, 3 do
  local n = redis.call('LLEN', KEYS[k + 2])
  if n > 0 then
    redis.call('DECRBY', KEYS[k + 1], n)
    redis.call('DEL', KEYS[k + 2])
  end
  redis.call('LREM', KEYS[k], 0, ARGV[1])
end
return 1
""")

RESULTS = Lua("""
-- KEYS: scores, failed, stats, stream
-- ARGV: group, entry id ('' for none), now, n, then n x (item id, 'ok'|'fail', payload, candidates, tokens)
local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  local b = 5 + i * 5
  local id, kind, payload = ARGV[b], ARGV[b + 1], ARGV[b + 2]
  local ncand, ntok = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  if kind == 'ok' then
    if redis.call('HSET', KEYS[1], id, payload) == 1 then
      redis.call('HINCRBY', KEYS[3], 'scored_items', 1)
      redis.call('HINCRBY', KEYS[3], 'scored_candidates', ncand)
      redis.call('HINCRBY', KEYS[3], 'tokens', ntok)
      if redis.call('HDEL', KEYS[2], id) == 1 then
        redis.call('HINCRBY', KEYS[3], 'failed_items', -1)
        redis.call('HINCRBY', KEYS[3], 'failed_candidates', -ncand)
      end
    end
  elseif redis.call('HEXISTS', KEYS[1], id) == 0 then
    if redis.call('HSET', KEYS[2], id, payload) == 1 then
      redis.call('HINCRBY', KEYS[3], 'failed_items', 1)
      redis.call('HINCRBY', KEYS[3], 'failed_candidates', ncand)
    end
  end
end
if n > 0 then
  redis.call('HSET', KEYS[3], 't_last', ARGV[3])
end
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[4], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[4], ARGV[2])
end
return n
""")

HANDBACK = Lua("""
-- KEYS: stream   ARGV: group, entry id, dataset id, json list of the item ids not yet scored
-- A stopping worker queues what it did not score as a fresh entry and acks the old one, atomically.
redis.call('XADD', KEYS[1], '*', 'ds', ARGV[3], 'items', ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
""")


def entry(dataset_id: str, item_ids: list[str]) -> dict[str, Any]:
    """The fields of a stream entry: one chunk of a dataset's item ids (the scripts write the same two)."""
    return {"ds": dataset_id, "items": orjson.dumps(item_ids)}


def parse_entry(fields: Mapping[Any, Any]) -> tuple[str, list[str]]:
    """A stream entry's dataset id and item ids."""
    f = {as_str(k): v for k, v in fields.items()}
    return as_str(f["ds"]), orjson.loads(f["items"])


DEFAULT_WINDOW = 8
"""Undelivered chunks an upload keeps in a queue's stream (GRAPE_FAIR_SHARE_WINDOW): the rest waits in the
dataset's backlog for its turn."""


def queues_of(keys: Keys, meta: Mapping[str, str]) -> list[ScoreQueue]:
    """The queues a dataset's chunks go to: its target model's (logprob), then each extra task's."""
    return [keys.score_queue(t, task_model(meta, t)) for t in (ScoreTask.logprob, *extra_tasks(meta))]


def ingest(
    keys: Keys,
    dataset_id: str,
    meta: Mapping[str, str],
    items: list[dict[str, Any]],
    limit: int = 2**62,
    window: int = DEFAULT_WINDOW,
    level: int = codec.DEFAULT_LEVEL,
) -> Call:
    """Store one chunk of new items and queue it for the target model and each extra task: into the dataset's
    backlogs, in turn with the other datasets (`window`: how many undelivered chunks a stream is topped up to).
    The dataset's owner may hold `limit` stored pairs: a new item that does not fit is refused, the rest stored.
    Items are stored compressed at zstd `level` (grape.store.codec); building the call is CPU work (zstd lets
    other threads run meanwhile): the gateway builds it off its event loop."""
    queues = queues_of(keys, meta)
    tenant = meta.get("tenant") or DEFAULT_TENANT
    args: list[Any] = [dataset_id, len(items), limit, GROUP, queues[0].backlog_head, window]
    for it, record in zip(items, codec.encode_items(items, level), strict=True):
        args += [it["id"], record, len(it["candidates"])]
    args += [q.backlog_tail for q in queues]
    args += [facts.encode(it) for it in items]  # beside each item: what the reads decide from (grape.store.facts)
    return INGEST.call(
        [
            keys.items(dataset_id),
            keys.order(dataset_id),
            keys.stats(dataset_id),
            keys.dataset(dataset_id),
            keys.tenant_usage(tenant),
            *(k for q in queues for k in (q.stream, q.ring, q.waiting, q.backlog(dataset_id))),
            keys.facts(dataset_id),
        ],
        args,
    )


def enqueue(queue: ScoreQueue, dataset_id: str, chunks: list[list[str]], window: int = DEFAULT_WINDOW) -> Call:
    """Queue chunks of items already stored (a score kind requested later) into the dataset's backlog."""
    args = [dataset_id, GROUP, queue.backlog_head, queue.backlog_tail, window, *(orjson.dumps(c) for c in chunks)]
    return ENQUEUE.call([queue.stream, queue.ring, queue.waiting, queue.backlog(dataset_id)], args)


def drop(queues: Iterable[ScoreQueue], dataset_id: str) -> Call:
    """Remove a dataset's waiting chunks from the backlogs and rings of these queues."""
    return DROP.call([k for q in queues for k in (q.ring, q.waiting, q.backlog(dataset_id))], [dataset_id])


def results(
    keys: Keys, task: str, model: str, dataset_id: str, entry_id: str, now: float, rows: list[ItemResult]
) -> Call:
    """Write a task's results for items of a dataset; with `entry_id`, ack and delete that entry too."""
    args: list[Any] = [GROUP, entry_id, f"{now:.3f}", len(rows)]
    for r in rows:
        if r.scores is not None:
            args += [r.item_id, "ok", codec.encode_scores(r.scores), r.candidates, r.pair_tokens]
        else:
            args += [r.item_id, "fail", r.error or "unknown error", r.candidates, 0]
    stream = keys.task_stream(task, model)
    return RESULTS.call(
        [
            keys.task_results(dataset_id, task),
            keys.task_failed(dataset_id, task),
            keys.task_stats(dataset_id, task),
            stream,
        ],
        args,
    )


def handback(stream: str, entry_id: str, dataset_id: str, item_ids: list[str]) -> Call:
    """Queue the unscored items of an entry as a fresh entry and ack the old one, atomically."""
    return HANDBACK.call([stream], [GROUP, entry_id, dataset_id, orjson.dumps(item_ids)])


@dataclass(frozen=True)
class ItemResult:
    """What a worker writes for one item: every candidate's score, or the reason it failed."""

    item_id: str
    candidates: int
    scores: list[dict[str, Any]] | None = None  # [{"logprob_sum", "tokens", "prompt_tokens"}, ...]
    error: str | None = None

    @property
    def pair_tokens(self) -> int:
        return sum(s["tokens"] + s["prompt_tokens"] for s in self.scores or [])


def chunked(items: list[dict[str, Any]], pairs: int) -> list[list[dict[str, Any]]]:
    """Split items into chunks of about `pairs` pairs; an instruction's candidates stay together."""
    chunks: list[list[dict[str, Any]]] = []
    cur: list[dict[str, Any]] = []
    size = 0
    for it in items:
        if cur and size + len(it["candidates"]) > pairs:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += len(it["candidates"])
    if cur:
        chunks.append(cur)
    return chunks


# ---- a worker's side of the stream -------------------------------------------------------------------


class Delivery(NamedTuple):
    """A stream entry handed to a worker: one chunk of a dataset's item ids, and how often it was delivered."""

    id: str
    dataset: str
    item_ids: list[str]
    deliveries: int


def ensure_group(client: Any, stream: str) -> None:
    """Create the workers' consumer group on a stream (and the stream) unless it exists (sync client: a plan
    cannot catch the BUSYGROUP error of a group that does)."""
    try:
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def aensure_group(client: Any, stream: str) -> None:
    """`ensure_group` with the gateway's async client: the gateway makes the group when a dataset is created, so
    an autoscaler watching the group's lag (KEDA) finds it before any worker ever ran (deploy/k8s)."""
    try:
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _deliveries(reply: Any) -> list[tuple[str, Any]]:
    """(id, fields) of an XREADGROUP reply: redis-py's ([[stream, [(id, {fields})]]]) or a script's (fields as a
    flat list), or nothing."""
    return [
        (as_str(i), f if isinstance(f, Mapping) else dict(zip(f[::2], f[1::2], strict=True)))
        for _, rows in reply or []
        for i, f in rows
    ]


def take(queue: ScoreQueue, consumer: str, count: int) -> Call:
    """Up to `count` new entries for `consumer`, the stream topped up from the backlogs first (fair share)."""
    return TAKE.call(
        [queue.stream, queue.ring, queue.waiting], [GROUP, consumer, count, queue.backlog_head, queue.backlog_tail]
    )


def claim(
    queue: ScoreQueue | str, consumer: str, cursor: str, *, idle_ms: int, count: int, block_ms: int
) -> Plan[tuple[str, list[Delivery], list[Delivery]]]:
    """Up to `count` entries for `consumer`: the cursor to pass next time, the reclaimed ones and the new ones.
    First those pending longer than `idle_ms` on a silent consumer (XAUTOCLAIM from `cursor`: it walks a long
    pending list across calls instead of rescanning its head), with their delivery counts; then new ones: for
    a `ScoreQueue`, the stream topped up from the datasets' backlogs in turn and read in one script (`take`), and
    only when that found nothing anywhere a blocking read of up to `block_ms` (the gateway's next chunk or a
    hand-back wakes it); for a bare stream, XREADGROUP, blocking only when nothing was reclaimed. Two round
    trips, three when idle."""
    stream = queue if isinstance(queue, str) else queue.stream
    ((nxt, claimed, *_),) = yield [cmd("xautoclaim", stream, GROUP, consumer, idle_ms, cursor, count)]
    # an entry deleted while pending comes back without fields (Redis < 7): nothing to score
    taken = [(as_str(i), f) for i, f in claimed if f is not None]
    want = count - len(taken)
    read: list[Cmd] = []
    if want > 0:
        if isinstance(queue, str):
            read = [cmd("xreadgroup", GROUP, consumer, {stream: ">"}, want, None if taken else block_ms)]
        else:
            read = [script(take(queue, consumer, want))]
    replies = yield [*(cmd("xpending_range", stream, GROUP, i, i, 1) for i, _ in taken), *read]
    reclaimed = [
        Delivery(i, *parse_entry(f), int(rows[0]["times_delivered"]) if rows else 1)
        for (i, f), rows in zip(taken, replies[: len(taken)], strict=True)
    ]
    new = [e for reply in replies[len(taken) :] for e in _deliveries(reply)]
    if not isinstance(queue, str) and want > 0 and not taken and not new:
        (reply,) = yield [cmd("xreadgroup", GROUP, consumer, {stream: ">"}, want, block_ms)]
        new = _deliveries(reply)
    fresh = [Delivery(i, *parse_entry(f), 1) for i, f in new]
    return as_str(nxt), reclaimed, fresh


def touch(stream: str, consumer: str, entry_ids: list[str]) -> Plan[None]:
    """Reset the idle time of a consumer's own pending entries (XCLAIM JUSTID): it is alive, just slow."""
    yield [cmd("xclaim", stream, GROUP, consumer, 0, entry_ids, justid=True)]


def written(keys: Keys, task: str, dataset_id: str, item_ids: list[str]) -> Plan[list[bool]]:
    """Per item, whether the task's result for it is written (a redelivered chunk skips those)."""
    flags = yield from one("hmget", keys.task_results(dataset_id, task), item_ids)
    return [f is not None for f in flags]


def mark_started(keys: Keys, task: str, dataset_ids: Iterable[str], now: float) -> Plan[None]:
    """The time a task's scoring of each dataset began, kept from the first worker on (HSETNX): throughput and
    ETA count from it."""
    yield [cmd("hsetnx", keys.task_stats(ds, task), "t_start", f"{now:.3f}") for ds in dataset_ids]


def dead_letter(
    keys: Keys, task: str, model: str, dataset_id: str, entry_id: str, item_id: str, reason: str
) -> Plan[None]:
    """Record the item a chunk's deliveries died on in the dead-letter stream of the task's queue."""
    fields = {"ds": dataset_id, "entry": entry_id, "item": item_id, "error": reason}
    yield [cmd("xadd", keys.task_dead(task, model), fields)]


def requeue(stream: str, dataset_id: str, item_ids: list[str]) -> Plan[None]:
    """Queue items already stored as a fresh entry (the ingest script would find them stored and skip them)."""
    yield [cmd("xadd", stream, entry(dataset_id, item_ids))]


# ---- the gateway's view of the queues ------------------------------------------------------------------


def queued(keys: Keys, model: str) -> Plan[int]:
    """Chunks in a target model's queue: in its stream (waiting and in flight) and in the datasets' backlogs
    (the gateway's backpressure)."""
    q = keys.score_queue(ScoreTask.logprob, model)
    length, waiting = yield [cmd("xlen", q.stream), cmd("get", q.waiting)]
    return int(length) + int(waiting or 0)


def _queue_of(suffix: str) -> tuple[str, str]:
    """(model, task) of a stream key suffix: `{model}` for the logprob task, `{task}:{model}` otherwise."""
    task, sep, model = suffix.partition(":")
    return (model, task) if sep else (suffix, ScoreTask.logprob.value)


def _streams(pattern: str) -> Plan[list[str]]:
    """The stream keys matching a pattern (SCAN, each once)."""
    found: dict[str, None] = {}
    cursor = 0
    while True:
        cursor, raw = yield from one("scan", cursor, match=pattern, count=500, _type="stream")
        found.update((as_str(k), None) for k in raw)
        if not cursor:
            return list(found)


QueueDepths = dict[tuple[str, str], tuple[int, int]]
"""(model, task) -> (entries in its queue stream, entries delivered and not acknowledged)."""


def queue_depths(keys: Keys) -> Plan[tuple[QueueDepths, dict[tuple[str, str], int]]]:
    """Every queue's depth (its stream's entries and the chunks waiting in the datasets' backlogs) and pending
    count, and every dead-letter stream's length, by (model, task)."""
    queue_prefix, dead_prefix, waiting_prefix = f"{keys.prefix}:q:", f"{keys.prefix}:dead:", f"{keys.prefix}:waiting:"
    queues = yield from _streams(f"{queue_prefix}*")
    dead = yield from _streams(f"{dead_prefix}*")
    suffixes = [q[len(queue_prefix) :] for q in queues]
    # XINFO GROUPS, not XPENDING: a stream no worker has read has no group yet, an empty list and no error
    replies = yield [
        *(c for q in queues for c in (cmd("xlen", q), cmd("xinfo_groups", q))),
        *(cmd("xlen", d) for d in dead),
        *(cmd("get", f"{waiting_prefix}{s}") for s in suffixes),
    ]
    depths: QueueDepths = {}
    waiting = replies[2 * len(queues) + len(dead) :]
    for j, s in enumerate(suffixes):
        length, groups = replies[2 * j], replies[2 * j + 1]
        pending = sum(int(g["pending"]) for g in groups if as_str(g["name"]) == GROUP)
        depths[_queue_of(s)] = (int(length) + int(waiting[j] or 0), pending)
    dead_lengths = replies[2 * len(queues) : 2 * len(queues) + len(dead)]
    letters = {_queue_of(d[len(dead_prefix) :]): int(n) for d, n in zip(dead, dead_lengths, strict=True)}
    return depths, letters
