"""The job queues: training jobs (run by trainers) and evaluations (run by evaluators), one protocol.

A record lives in one hash (`QueueKeys.record`), its log in a stream (`QueueKeys.log`). The gateway creates
it and LPUSHes its id on the queue (`enqueue`). A holder (a trainer, an evaluator) BLMOVEs the oldest id
into its own claimed list and starts it (`start`); the id stays there until the holder ends it (`finish`).
A holder publishes a heartbeat key with a TTL; when it is gone, any holder (and the gateway, when the
record is read) reaps the records of the dead one (`reap`): a running record is queued again when its kind
allows it (a training job that asked for `auto_resume`; an evaluation, which starts over), else failed with
the reason; one that was being cancelled ends cancelled. Every state change is one script, so two processes
never both move a record.

Cancel (`cancel`) ends a queued record at once and sets the cancel flag (`QueueKeys.cancel`) of a running
one, which its holder polls. The flag's other value, `requeue`, is how a holder shutting down hands its
record back: queued again (a training job resumes from its checkpoint; an evaluation's attempt is not
counted). Training jobs can also be resumed (`resume`); both kinds deleted (`delete`: not while running; an
evaluation not while queued either). Every end (finish, reap, cancel) also enters the id in the kind's
finished index (`QueueKeys.finished`) with its time, which a resume or a delete removes: GRAPE_RETENTION_DAYS
reads it (`expired`) instead of scanning records.

The two kinds differ only in what `JobQueue` is given: the holder's name field, the fields a start clears,
what a hand-back and a dead holder do, the log messages, how a record's fields decode. Each script has one
builder method here returning an `io.Call`; the plain reads and writes on a record (a holder's `watch` of the
cancel flag, progress by `set_fields`, `field`) are methods here too, so no caller lists keys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from string import Template
from typing import Any

import orjson

from grape.keys import Keys, QueueKeys
from grape.redis_client import as_str
from grape.settings import DEFAULT_TENANT
from grape.store.heartbeats import Beats
from grape.store.io import Call, Lua, Plan, acall, call, cmd, one
from grape.store.tenants import UNLIMITED

CANCEL = "cancel"
REQUEUE = "requeue"
LOG_MAXLEN = 10_000
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
"""The states a record never leaves (except a training job, by an explicit resume); JobState and EvalState
are StrEnums of these names, so their members are found in it."""


# ---- log records: one shape for both kinds ---------------------------------------------------------------


def log_fields(msg: str, level: str = "info", **data: Any) -> dict[str, str]:
    """One log record, as stream fields."""
    fields = {"t": f"{time.time():.3f}", "level": level, "msg": msg}
    if data:
        fields["data"] = orjson.dumps(data).decode()
    return fields


def decode_log(entry_id: Any, fields: dict[Any, Any]) -> dict[str, Any]:
    """A log stream entry as the record the API returns: {"id", "t", "level", "msg", "data"?}."""
    f = {as_str(k): as_str(v) for k, v in fields.items()}
    rec: dict[str, Any] = {"id": as_str(entry_id), "t": float(f.get("t", 0)), "level": f.get("level", "info")}
    rec["msg"] = f.get("msg", "")
    if "data" in f:
        rec["data"] = orjson.loads(f["data"])
    return rec


# ---- the scripts, one template each --------------------------------------------------------------------
# `$...` are the kind's parts (JobQueue); `now` is passed in (scripts stay deterministic for replication).
# `log(stream, now, level, msg)` appends one log record (the shape of `log_fields`), trimmed to LOG_MAXLEN.

_ENQUEUE = """
-- KEYS: record, ids zset, queue, log, owner's ids zset, owner's active set (pruned just before), tenants set
-- ARGV: id, now, max queued, owner's active limit, owner, then field/value pairs of the new hash
-- answers 1, 0 (the queue is full) or -1 (the owner's quota of active records is reached)
if redis.call('SCARD', KEYS[6]) >= tonumber(ARGV[4]) then return -1 end
if redis.call('LLEN', KEYS[3]) >= tonumber(ARGV[3]) then return 0 end
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[6], ARGV[1])
redis.call('SADD', KEYS[7], ARGV[5])
redis.call('LPUSH', KEYS[3], ARGV[1])
log(KEYS[4], ARGV[2], 'info', 'queued')
return 1
"""

_START = """
-- KEYS: claimed list, record, log   ARGV: id, holder, now
-- the id was just moved from the queue to this holder's claimed list; run it only if still queued
local st = redis.call('HGET', KEYS[2], 'state')
if st ~= 'queued' then
  redis.call('LREM', KEYS[1], 0, ARGV[1])
  return false
end
local attempts = redis.call('HINCRBY', KEYS[2], 'attempts', 1)
redis.call('HSET', KEYS[2], 'state', 'running', '$holder', ARGV[2], 'started', ARGV[3], 'progress_at', ARGV[3])
redis.call('HDEL', KEYS[2], 'error', 'finished', $start_clears)
log(KEYS[3], ARGV[3], 'info', 'started on $holder ' .. ARGV[2] .. ' (attempt ' .. attempts .. ')')
return redis.call('HGET', KEYS[2], 'spec')
"""

_FINISH = """
-- KEYS: claimed list, record, log, cancel flag, queue, finished zset
-- ARGV: id, holder, state, now, error, message, level, then field/value pairs to set (results...)
-- only the holder of a running record may end it; state 'queued' hands it back
local st = redis.call('HGET', KEYS[2], 'state')
redis.call('LREM', KEYS[1], 0, ARGV[1])
if st ~= 'running' or redis.call('HGET', KEYS[2], '$holder') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[4])
redis.call('HDEL', KEYS[2], 'cancel_requested')
if ARGV[3] == 'queued' then
  $handback
  redis.call('HSET', KEYS[2], 'state', 'queued', '$holder', '')
  redis.call('RPUSH', KEYS[5], ARGV[1])
else
  redis.call('HSET', KEYS[2], 'state', ARGV[3], 'finished', ARGV[4]$end_sets)
  redis.call('ZADD', KEYS[6], ARGV[4], ARGV[1])
  if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 'error', ARGV[5]) end
end
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
log(KEYS[3], ARGV[4], ARGV[7], ARGV[6])
return 1
"""

_REAP = """
-- KEYS: holder heartbeat, its claimed list, record, log, queue, cancel flag, finished zset
-- ARGV: id, holder, now, reason
if redis.call('EXISTS', KEYS[1]) == 1 then return 'alive' end
local st = redis.call('HGET', KEYS[3], 'state')
redis.call('LREM', KEYS[2], 0, ARGV[1])
if not st then return 'gone' end
if st == 'queued' then
  -- taken from the queue by the dead holder but never started: back to the head of the queue
  if not redis.call('LPOS', KEYS[5], ARGV[1]) then redis.call('RPUSH', KEYS[5], ARGV[1]) end
  return 'requeued'
end
if st ~= 'running' or redis.call('HGET', KEYS[3], '$holder') ~= ARGV[2] then return 'skip' end
local attempts = tonumber(redis.call('HGET', KEYS[3], 'attempts') or '0')
local max = tonumber(redis.call('HGET', KEYS[3], 'max_attempts') or '1')
local cancelling = redis.call('GET', KEYS[6]) == 'cancel'
redis.call('DEL', KEYS[6])
redis.call('HDEL', KEYS[3], 'cancel_requested')
if cancelling then
  redis.call('HSET', KEYS[3], 'state', 'cancelled', 'finished', ARGV[3], '$holder', ''$end_sets)
  redis.call('ZADD', KEYS[7], ARGV[3], ARGV[1])
  log(KEYS[4], ARGV[3], 'info', ARGV[4] .. '; it was being cancelled: cancelled')
  return 'cancelled'
end
if $requeue_if attempts < max then
  redis.call('HSET', KEYS[3], 'state', 'queued', '$holder', ''$requeue_sets)
  redis.call('RPUSH', KEYS[5], ARGV[1])
  log(KEYS[4], ARGV[3], 'warning', ARGV[4] .. '; $requeue_msg (attempt ' .. attempts .. ' of ' .. max .. '$requeue_of)')
  return '$requeued'
end
local reason = ARGV[4]$fail_suffix
redis.call('HSET', KEYS[3], 'state', 'failed', 'error', reason, 'finished', ARGV[3]$end_sets)
redis.call('ZADD', KEYS[7], ARGV[3], ARGV[1])
log(KEYS[4], ARGV[3], 'error', reason)
return 'failed'
"""

_CANCEL = """
-- KEYS: record, queue, cancel flag, log, finished zset   ARGV: id, now
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 'missing' end
if st == 'queued' then
  redis.call('LREM', KEYS[2], 0, ARGV[1])
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished', ARGV[2])
  redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
  log(KEYS[4], ARGV[2], 'info', 'cancelled while queued')
  return 'cancelled-now'
end
if st == 'running' then
  redis.call('SET', KEYS[3], 'cancel')
  redis.call('HSET', KEYS[1], 'cancel_requested', ARGV[2])
  log(KEYS[4], ARGV[2], 'info', 'cancel requested: $running_cancel')
  return 'cancelling'
end
return st
"""

_RESUME = """
-- KEYS: record, queue, cancel flag, log, finished zset, owner's active set (pruned just before)
-- ARGV: id, now, owner's limit
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 'missing' end
if st ~= 'failed' and st ~= 'cancelled' then return st end
if redis.call('SISMEMBER', KEYS[6], ARGV[1]) == 0 and redis.call('SCARD', KEYS[6]) >= tonumber(ARGV[3]) then
  return 'quota'
end
redis.call('SADD', KEYS[6], ARGV[1])
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'queued', 'resume', '1', '$holder', '', 'attempts', '0')
redis.call('HDEL', KEYS[1], 'error', 'finished', 'cancel_requested')
redis.call('LPUSH', KEYS[2], ARGV[1])
log(KEYS[4], ARGV[2], 'info', 'queued again to resume from its last checkpoint')
return 'queued'
"""

_REMOVE = """
-- KEYS (DELETE and EXPIRE alike): record, ids zset, queue, log, cancel flag, deleted zset, finished zset,
-- owner's ids zset, owner's active set   ARGV[1]: id, ARGV[2]: now
local function remove_record()
  redis.call('LREM', KEYS[3], 0, ARGV[1])
  redis.call('DEL', KEYS[1], KEYS[4], KEYS[5])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[7], ARGV[1])
  redis.call('ZREM', KEYS[8], ARGV[1])
  redis.call('SREM', KEYS[9], ARGV[1])
  $delete_note
end
"""

_DELETE = (
    _REMOVE
    + """
-- KEYS: record, ids zset, queue, log, cancel flag, deleted zset, finished zset, owner's ids zset, owner's active set
-- ARGV: id, now
-- a record in a state the kind refuses ($delete_refused: cancel it first) stays; anything else goes, even a
-- record that cannot be decoded
if redis.call('EXISTS', KEYS[1]) == 0 and not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZREM', KEYS[7], ARGV[1])
  return 'missing'
end
local st = redis.call('HGET', KEYS[1], 'state')
for _, refused in ipairs({$delete_refused}) do
  if st == refused then
    redis.call('ZREM', KEYS[7], ARGV[1])  -- not ended, so not in the finished index either
    return st
  end
end
remove_record()
return 'deleted'
"""
)

_EXPIRE = (
    _REMOVE
    + """
-- KEYS: record, ids zset, queue, log, cancel flag, deleted zset, finished zset, owner's ids zset, owner's active set
-- ARGV: id, now, cutoff
-- GRAPE_RETENTION_DAYS: removed as a delete does, only if it really ended before the cutoff; anything else
-- only leaves (or is put right in) the finished index
local st, fin = unpack(redis.call('HMGET', KEYS[1], 'state', 'finished'))
local ended = st == 'succeeded' or st == 'failed' or st == 'cancelled'
if ended and tonumber(fin or '') and tonumber(fin) < tonumber(ARGV[3]) then
  remove_record()
  return 'deleted'
end
if ended and tonumber(fin or '') then
  redis.call('ZADD', KEYS[7], fin, ARGV[1])
  return 'kept'
end
redis.call('ZREM', KEYS[7], ARGV[1])
if not st and redis.call('EXISTS', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[1]) end
return st or 'missing'
"""
)

_INDEX_ENDED = """
-- KEYS: finished zset, then the record of each id   ARGV: the ids
-- records that ended before the finished index existed (an upgrade) enter it with their end time
local n = 0
for i = 1, #ARGV do
  local st, fin = unpack(redis.call('HMGET', KEYS[i + 1], 'state', 'finished'))
  if (st == 'succeeded' or st == 'failed' or st == 'cancelled') and tonumber(fin or '') then
    n = n + redis.call('ZADD', KEYS[1], 'NX', fin, ARGV[i])
  end
end
return n
"""


_LOG = f"""local function log(stream, now, level, msg)
  redis.call('XADD', stream, 'MAXLEN', '~', {LOG_MAXLEN}, '*', 't', now, 'level', level, 'msg', msg)
end
"""


def _now() -> str:
    return f"{time.time():.3f}"


def _text(raw: Any) -> str | None:
    return None if raw is None else as_str(raw)


def _lua(template: str, parts: dict[str, str]) -> Lua:
    return Lua(_LOG + Template(template).substitute(parts))


# ---- the queue -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoding:
    """How a record's hash fields decode: numbers as numbers, JSON parsed, empty fields None."""

    floats: frozenset[str]
    ints: frozenset[str]
    json: frozenset[str]
    defaults: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, floats: str, ints: str, json: str, defaults: tuple[tuple[str, Any], ...] = ()) -> Decoding:
        """From space-separated field names."""
        return cls(frozenset(floats.split()), frozenset(ints.split()), frozenset(json.split()), defaults)

    def __call__(self, raw: dict[Any, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in ((as_str(k), as_str(v)) for k, v in raw.items()):
            if v == "":
                out[k] = None
            elif k in self.floats:
                x = float(v)
                out[k] = x if math.isfinite(x) else None  # a diverged loss (nan) is "unknown", never a bad reply
            elif k in self.ints:
                x = float(v)
                out[k] = int(x) if math.isfinite(x) else None
            elif k in self.json:
                out[k] = orjson.loads(v)
            else:
                out[k] = v
        for k, v in self.defaults:
            out.setdefault(k, v)
        return out


@dataclass(frozen=True)
class ScriptParts:
    """What the scripts of one kind say differently: Lua snippets and words put into the templates above."""

    start_clears: str  # the progress fields a (re)start removes, as Lua strings
    handback: str  # what a hand-back (finish as `queued`) does besides queueing again
    requeue_msg: str  # a dead holder's record queued again: what the log says
    requeued: str  # ... and what the reap script answers
    running_cancel: str  # the log of a running record's cancel: what happens next
    end_sets: str = ""  # field/value pairs an end also sets
    requeue_if: str = ""  # a condition (ending in `and`) for queueing a dead holder's record again
    requeue_sets: str = ""  # field/value pairs set when it is
    requeue_of: str = ""  # words after "(attempt N of M"
    fail_suffix: str = ""  # a Lua expression appended to the failed record's error
    delete_refused: str = "'running'"  # the states a delete refuses, as Lua strings (cancel first)
    delete_note: str = ""  # what a delete does besides removing the record (tell the holders, say)


class JobQueue:
    """One kind of queued work: its key space, its scripts (each with its call builder), its record decoding,
    and the operations both its holders and the gateway use."""

    def __init__(
        self,
        *,
        space: Callable[[Keys], QueueKeys],
        holder: str,
        what: str,
        scripts: ScriptParts,
        decoding: Decoding,
        holders_index: bool = False,
    ) -> None:
        self.space = space
        self.holder = holder  # the record's field naming its holder, and the holder's kind in its keys
        self.what = what
        self.decode = decoding
        self.holders_index = holders_index  # whether holders also list themselves in `QueueKeys.holders()`
        parts = {"holder": holder, **asdict(scripts)}
        self._enqueue, self._start, self._finish = _lua(_ENQUEUE, parts), _lua(_START, parts), _lua(_FINISH, parts)
        self._reap, self._cancel, self._resume = _lua(_REAP, parts), _lua(_CANCEL, parts), _lua(_RESUME, parts)
        self._delete = _lua(_DELETE, parts)
        self._expire, self._index_ended = _lua(_EXPIRE, parts), _lua(_INDEX_ENDED, parts)

    def beats(self, keys: Keys, ttl: float) -> Beats:
        """Where this kind's holders publish their heartbeats."""
        q = self.space(keys)
        return Beats(q.holder, q.holders() if self.holders_index else None, ttl)

    def dead_reason(self, holder: str, step: Any = None) -> str:
        at = f" at step {step}" if step not in (None, "", b"") else ""
        return f"{self.holder} {holder} stopped sending heartbeats{at} (process died or lost Redis)"

    def heartbeat_s(self, settings: Any) -> float:
        """A holder's heartbeat TTL, from the settings (GRAPE_TRAINER_HEARTBEAT_S, GRAPE_EVALUATOR_HEARTBEAT_S)."""
        return float(getattr(settings, f"{self.holder}_heartbeat_s"))  # trainer_heartbeat_s, evaluator_...

    # the script calls --------------------------------------------------------------------------------
    def enqueue(
        self,
        keys: Keys,
        item_id: str,
        fields: dict[str, str],
        max_queued: int,
        tenant: str = DEFAULT_TENANT,
        limit: int = UNLIMITED,
    ) -> Call:
        """Create the record of `tenant` (its `tenant` field) and queue it; the script answers 0 when `max_queued`
        are queued already, -1 when the tenant has `limit` active records of this kind (prune its set first)."""
        q = self.space(keys)
        args: list[Any] = [item_id, fields.get("created") or _now(), max_queued, limit, tenant]
        for k, v in {**fields, "tenant": tenant}.items():
            args += [k, v]
        script_keys = [q.record(item_id), q.ids(), q.queue(), q.log(item_id), *self.tenant_keys(keys, tenant)]
        return self._enqueue.call([*script_keys, keys.tenants()], args)

    def tenant_keys(self, keys: Keys, tenant: str) -> tuple[str, str]:
        """A tenant's index of this kind and its set of active ones (grape.store.tenants)."""
        kind = self.space(keys).plural
        return keys.tenant_ids(tenant, kind), keys.tenant_active(tenant, kind)

    def start(self, keys: Keys, item_id: str, holder: str) -> Call:
        """Run a claimed record: its spec (JSON), or None when it is no longer queued."""
        q = self.space(keys)
        return self._start.call([q.claimed(holder), q.record(item_id), q.log(item_id)], [item_id, holder, _now()])

    def finish(
        self,
        keys: Keys,
        item_id: str,
        holder: str,
        state: str,
        message: str,
        *,
        error: str = "",
        level: str = "info",
        fields: dict[str, Any] | None = None,
    ) -> Call:
        """End a running record as `state` (`queued`: hand it back), setting `fields` (JSON-encoded) with it."""
        q = self.space(keys)
        args: list[Any] = [item_id, holder, state, _now(), error, message, level]
        for k, v in (fields or {}).items():
            args += [k, orjson.dumps(v).decode()]
        keys_ = [q.claimed(holder), q.record(item_id), q.log(item_id), q.cancel(item_id), q.queue(), q.finished()]
        return self._finish.call(keys_, args)

    def reap(self, keys: Keys, item_id: str, holder: str, step: Any = None) -> Call:
        """The record of a holder whose heartbeat is gone: queued again, cancelled or failed (see the module)."""
        q = self.space(keys)
        keys_ = [q.holder(holder), q.claimed(holder), q.record(item_id), q.log(item_id), q.queue(), q.cancel(item_id)]
        keys_.append(q.finished())
        return self._reap.call(keys_, [item_id, holder, _now(), self.dead_reason(holder, step)])

    def _move(self, script: Lua, keys: Keys, item_id: str) -> Call:
        q = self.space(keys)
        keys_ = [q.record(item_id), q.queue(), q.cancel(item_id), q.log(item_id), q.finished()]
        return script.call(keys_, [item_id, _now()])

    def cancel(self, keys: Keys, item_id: str) -> Call:
        """Answers `cancelled-now`, `cancelling`, `missing`, or the state it cannot be cancelled in."""
        return self._move(self._cancel, keys, item_id)

    def resume(self, keys: Keys, item_id: str, tenant: str = DEFAULT_TENANT, limit: int = UNLIMITED) -> Call:
        """Queue a failed or cancelled record of `tenant` again; answers `queued`, `missing`, `quota` (the tenant
        has `limit` active records of this kind), or the state it is in."""
        q = self.space(keys)
        script_keys = [
            q.record(item_id),
            q.queue(),
            q.cancel(item_id),
            q.log(item_id),
            q.finished(),
            self.tenant_keys(keys, tenant)[1],
        ]
        return self._resume.call(script_keys, [item_id, _now(), limit])

    def delete(self, keys: Keys, item_id: str, tenant: str = DEFAULT_TENANT) -> Call:
        """Remove a record (of `tenant`: it leaves that tenant's index), its log and flags, unless it is in a state
        this kind refuses (training jobs: running; evaluations: queued or running); answers `deleted`, `missing`
        or the refused state."""
        q = self.space(keys)
        keys_ = [q.record(item_id), q.ids(), q.queue(), q.log(item_id), q.cancel(item_id), q.deleted(), q.finished()]
        return self._delete.call([*keys_, *self.tenant_keys(keys, tenant)], [item_id, _now()])

    def expire(self, keys: Keys, item_id: str, cutoff: float, tenant: str = DEFAULT_TENANT) -> Call:
        """GRAPE_RETENTION_DAYS: remove a record of `tenant` (as `delete` does) if it ended before `cutoff`;
        answers `deleted`, `kept` (it ended later), `missing` or the state it is in (not ended: it stays)."""
        q = self.space(keys)
        keys_ = [q.record(item_id), q.ids(), q.queue(), q.log(item_id), q.cancel(item_id), q.deleted(), q.finished()]
        return self._expire.call([*keys_, *self.tenant_keys(keys, tenant)], [item_id, _now(), cutoff])

    def index_ended(self, keys: Keys, item_ids: list[str]) -> Call:
        """Enter those of `item_ids` that have ended into the finished index (records older than the index)."""
        q = self.space(keys)
        return self._index_ended.call([q.finished(), *(q.record(i) for i in item_ids)], list(item_ids))

    def created_after(self, keys: Keys, after: float, until: float, limit: int) -> Plan[list[tuple[str, float]]]:
        """Up to `limit` (id, creation time) created in (`after`, `until`], oldest first: a walk over the ids."""
        rows = yield from one(
            "zrangebyscore", self.space(keys).ids(), f"({after}", until, start=0, num=limit, withscores=True
        )
        return [(as_str(i), float(t)) for i, t in rows]

    # reads (plans: one implementation, run by io.run or io.arun) ---------------------------------------
    def read(self, keys: Keys, item_id: str) -> Plan[dict[str, Any] | None]:
        """The decoded record, or None when there is none (decoding errors propagate: the caller names them)."""
        raw = yield from one("hgetall", self.space(keys).record(item_id))
        return self.decode(raw) if raw else None

    def expired(self, keys: Keys, before: float, limit: int) -> Plan[list[str]]:
        """The ids of up to `limit` records that reached a terminal state before `before` (GRAPE_RETENTION_DAYS),
        oldest first: a bounded read of the finished index, never a scan of the keyspace."""
        ids = yield from one("zrangebyscore", self.space(keys).finished(), "-inf", f"({before}", start=0, num=limit)
        return [as_str(x) for x in ids]

    def newest(self, keys: Keys, limit: int) -> Plan[list[str]]:
        """The ids of the newest `limit` records."""
        ids = yield from one("zrevrange", self.space(keys).ids(), 0, limit - 1)
        return [as_str(x) for x in ids]

    def field(self, keys: Keys, item_id: str, name: str) -> Plan[str | None]:
        """One field of the record as text (None: no such field or record), the rest left unread and undecoded."""
        return _text((yield from one("hget", self.space(keys).record(item_id), name)))

    def watch(self, keys: Keys, item_id: str, holder: str) -> Plan[tuple[str | None, bool]]:
        """What a holder polls while it runs a record, in one round trip: the cancel flag (CANCEL, REQUEUE or
        None) and whether the record still runs under `holder` (a reaper may have taken it)."""
        q = self.space(keys)
        flag, (state, by) = yield [
            cmd("get", q.cancel(item_id)),
            cmd("hmget", q.record(item_id), ["state", self.holder]),
        ]
        return _text(flag), (_text(state), _text(by)) == ("running", holder)

    # what a holder does (sync) -----------------------------------------------------------------------
    def log(self, client: Any, keys: Keys, item_id: str, msg: str, level: str = "info", **data: Any) -> None:
        """Append one record to a record's log."""
        client.xadd(self.space(keys).log(item_id), log_fields(msg, level, **data), maxlen=LOG_MAXLEN)

    def set_fields(self, client: Any, keys: Keys, item_id: str, fields: Mapping[str, Any]) -> None:
        """Write fields of a held record (progress, where its output is, results the end does not carry)."""
        client.hset(self.space(keys).record(item_id), mapping=dict(fields))

    def hand_back(self, client: Any, keys: Keys, item_id: str) -> None:
        """Ask the holder's own running record back (it is shutting down): REQUEUE on the cancel flag, which
        the holder's work polls; a cancel already asked stays a cancel."""
        client.set(self.space(keys).cancel(item_id), REQUEUE, nx=True)

    def release(self, client: Any, keys: Keys, item_id: str, holder: str) -> None:
        """Drop a record from `holder`'s claimed list without ending it: it was taken from the holder while it
        ran (reaped, say), and whoever took it has moved it on already."""
        client.lrem(self.space(keys).claimed(holder), 0, item_id)

    def deleted_ids(self, client: Any, keys: Keys, keep_s: float) -> list[str]:
        """The ids of the records deleted in the last `keep_s` seconds (older ones are dropped from the list):
        each holder removes what it keeps of them on its own disk."""
        key = self.space(keys).deleted()
        client.zremrangebyscore(key, "-inf", time.time() - keep_s)
        return [as_str(x) for x in client.zrange(key, 0, 9999)]

    def reap_dead(self, client: Any, keys: Keys, *, alive: str) -> dict[str, str]:
        """Reap the records held by holders (other than `alive`) whose heartbeat is gone. id -> outcome."""
        q = self.space(keys)
        out: dict[str, str] = {}
        prefix = q.claimed("")
        for key in client.scan_iter(match=q.claimed_pattern(), count=200):
            holder = as_str(key)[len(prefix) :]
            if holder == alive or client.exists(q.holder(holder)):
                continue
            for raw in client.lrange(key, 0, -1):
                item_id = as_str(raw)
                step = client.hget(q.record(item_id), "step")
                out[item_id] = as_str(call(client, self.reap(keys, item_id, holder, step and as_str(step))))
        return out

    # what the gateway does (async) -------------------------------------------------------------------
    async def areap_if_dead(self, redis: Any, keys: Keys, record: dict[str, Any]) -> bool:
        """A running record whose holder has no heartbeat is reaped now, not left running. Whether it was."""
        holder = record.get(self.holder)
        if record.get("state") != "running" or not holder or await redis.exists(self.space(keys).holder(holder)):
            return False
        res = await acall(redis, self.reap(keys, record["id"], holder, record.get("step")))
        return as_str(res) != "alive"


# ---- the two kinds ---------------------------------------------------------------------------------------


TRAINING = JobQueue(
    space=lambda keys: keys.training,
    holder="trainer",
    what="training job",
    scripts=ScriptParts(
        start_clears="'eta_seconds'",
        handback="redis.call('HSET', KEYS[2], 'resume', '1')",  # the next run resumes from the checkpoint
        requeue_msg="queued again to resume from its last checkpoint",
        requeued="resumed",
        running_cancel="stopping after the current step, with a checkpoint",
        end_sets=", 'eta_seconds', ''",
        requeue_if="redis.call('HGET', KEYS[3], 'auto_resume') == '1' and",
        requeue_sets=", 'resume', '1'",
        # holders remove what they keep of it when they see it here (trainer.loop.TrainerLoop.remove_deleted)
        delete_note="redis.call('ZADD', KEYS[6], ARGV[2], ARGV[1])",
    ),
    decoding=Decoding.of(
        "created started finished epoch loss learning_rate grad_norm eta_seconds progress_at cancel_requested "
        "steps_per_second",
        "step max_steps tokens_seen attempts train_records max_attempts",
        "spec checkpoints",
        defaults=(("checkpoints", []),),
    ),
)
"""Training jobs (grape.jobs): a dead trainer's job is queued again to resume when it asked for it."""

EVALUATIONS = JobQueue(
    space=lambda keys: keys.evaluations,
    holder="evaluator",
    what="evaluation",
    scripts=ScriptParts(
        start_clears="'done_requests', 'total_requests'",
        handback="redis.call('HINCRBY', KEYS[2], 'attempts', -1)",  # a hand-back does not count as an attempt
        requeue_msg="queued again to start over",
        requeued="requeued",
        running_cancel="the evaluator stops lm-eval",
        requeue_of=" done",
        fail_suffix=" .. ' (attempt ' .. attempts .. ' of ' .. max .. ')'",
        delete_refused="'queued', 'running'",  # cancel it first; an evaluator keeps nothing of it on disk
    ),
    decoding=Decoding.of(
        "created started finished cancel_requested progress_at",
        "attempts max_attempts done_requests total_requests",
        "spec results versions higher_is_better n_samples",
    ),
    holders_index=True,
)
"""Evaluations (grape.evaluations): no checkpoint, so a dead evaluator's evaluation starts over, until
`max_attempts` runs started."""
