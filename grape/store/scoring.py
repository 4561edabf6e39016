"""The Redis protocol between gateway and workers: two atomic scripts and the record shapes they move.

Ingest (gateway): per chunk, store each new item once (HSETNX: a re-sent id is a duplicate, never new
work), append the new ids to the dataset's order, bump the counters and XADD one stream entry naming the
chunk's item ids, all in one script so a crash never leaves an item stored but not queued.

Results (worker): per item, write its scores (or its failure), bump the counters only when the field is
new (a redelivered chunk overwrites, never double counts), then XACK + XDEL the entry, in one script.

Each script is a `Lua` beside the one function that builds its keys and arguments (`ingest`, `results`,
`handback`); a stream entry (`{"ds", "items"}`) is built by `entry` and read by `parse_entry` alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from grape.keys import GROUP, Keys
from grape.redis_client import as_str
from grape.score_kinds import extra_tasks, task_model
from grape.store.io import Call, Lua

INGEST = Lua("""
-- KEYS: items, order, stats, stream, then the streams of the dataset's extra tasks (grape.score_kinds), if any
-- ARGV: dataset id, n, then n x (item id, item json, candidates)
local new = {}
local ncand = 0
local n = tonumber(ARGV[2])
for i = 0, n - 1 do
  local id = ARGV[3 + i * 3]
  if redis.call('HSETNX', KEYS[1], id, ARGV[4 + i * 3]) == 1 then
    new[#new + 1] = id
    ncand = ncand + tonumber(ARGV[5 + i * 3])
  end
end
if #new > 0 then
  redis.call('RPUSH', KEYS[2], unpack(new))
  redis.call('HINCRBY', KEYS[3], 'items', #new)
  redis.call('HINCRBY', KEYS[3], 'candidates', ncand)
  local entry = cjson.encode(new)
  for k = 4, #KEYS do
    redis.call('XADD', KEYS[k], '*', 'ds', ARGV[1], 'items', entry)
  end
end
return new
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


def ingest(keys: Keys, dataset_id: str, meta: Mapping[str, str], items: list[dict[str, Any]]) -> Call:
    """Store one chunk of new items and queue it on the target model's stream and each extra task's."""
    streams = [keys.task_stream(t, task_model(meta, t)) for t in extra_tasks(meta)]
    args: list[Any] = [dataset_id, len(items)]
    for it in items:
        args += [it["id"], orjson.dumps(it), len(it["candidates"])]
    return INGEST.call(
        [
            keys.items(dataset_id),
            keys.order(dataset_id),
            keys.stats(dataset_id),
            keys.stream(meta["target_model"]),
            *streams,
        ],
        args,
    )


def results(
    keys: Keys, task: str, model: str, dataset_id: str, entry_id: str, now: float, rows: list[ItemResult]
) -> Call:
    """Write a task's results for items of a dataset; with `entry_id`, ack and delete that entry too."""
    args: list[Any] = [GROUP, entry_id, f"{now:.3f}", len(rows)]
    for r in rows:
        if r.scores is not None:
            args += [r.item_id, "ok", orjson.dumps(r.scores), r.candidates, r.pair_tokens]
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
