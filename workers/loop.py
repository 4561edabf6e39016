"""The consumer loop: claim chunks from the model's stream, score them, write results + ack atomically.

Delivery is at-least-once. A chunk pending on a dead worker is taken over with XAUTOCLAIM once it has
been idle `claim_idle_ms`; while a worker scores, a keeper thread re-claims its own entries so a slow
batch is never mistaken for a dead worker. A chunk seen for the second time is scored item by item,
writing each result at once, so a poison item that kills workers is isolated: after `max_deliveries`
it alone is failed and the rest of its chunk is queued again.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from grape import heartbeats
from grape.keys import GROUP, Keys
from grape.protocol import HANDBACK_LUA, RESULTS_LUA, ItemResult, results_args
from grape.redis_client import as_str
from workers import metrics as worker_metrics
from workers.backends.base import ScoringBackend
from workers.tasks import load_task

log = logging.getLogger(__name__)

HEARTBEAT_TTL_S = 30


@dataclass
class Entry:
    id: str
    dataset: str
    item_ids: list[str]
    deliveries: int = 1


@dataclass
class WorkerStats:
    chunks: int = 0
    items: int = 0
    failed: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.time)


def _slices(work: list[Any], budget: int) -> list[list[Any]]:
    """Consecutive runs of (entry, item, template) of about `budget` characters/4 (a token estimate
    that needs no tokenizer); an item is never split."""
    out: list[list[Any]] = [[]]
    size = 0
    for w in work:
        item = w[1]
        n = (
            sum(
                len(c["response"]) + len(str(item.get("instruction") or item.get("messages")))
                for c in item["candidates"]
            )
            // 4
        )
        if out[-1] and size + n > budget:
            out.append([])
            size = 0
        out[-1].append(w)
        size += n
    return [s for s in out if s]


class Worker:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        model: str,
        backend: ScoringBackend,
        *,
        read_count: int = 4,
        block_ms: int = 2000,
        claim_idle_ms: int = 600_000,
        max_deliveries: int = 5,
        commit_tokens: int = 65_536,
        name: str | None = None,
        task: str = "logprob",
    ) -> None:
        self.r = client
        self.keys = keys
        self.model = model
        self.task = str(task)  # grape.tasks.Task: which stream to read, which hashes to write
        self.stream = keys.task_stream(self.task, model)
        self.backend = backend
        self._run = load_task(self.task, backend, model)  # [(item, template)] -> [ItemResult]
        self.read_count = read_count
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.commit_tokens = commit_tokens
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._inflight: list[str] = []
        self._lock = threading.Lock()
        self._write = client.register_script(RESULTS_LUA)
        self._handback = client.register_script(HANDBACK_LUA)
        self._claim_cursor = "0-0"
        self._meta: dict[str, dict[str, str]] = {}

    # lifecycle -----------------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        """Stop claiming; the chunk in hand is finished and acked before the loop returns."""
        if not self._stop.is_set():
            log.info("worker %s: stopping after the current batch", self.name)
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run(self, *, idle_exit_s: float | None = None) -> WorkerStats:
        """Consume until stopped (or, with `idle_exit_s`, until the queue has been empty that long)."""
        self.ensure_group()
        keeper = threading.Thread(target=self._keep_alive, name="claim-keeper", daemon=True)
        keeper.start()
        idle_since = time.monotonic()
        heartbeats.publish(self.r, self.keys, self.name, self.status(), HEARTBEAT_TTL_S)
        log.info("worker %s: consuming %s with %s", self.name, self.stream, self.backend.info())
        try:
            while not self._stop.is_set():
                try:
                    entries = self._claim()
                except redis.ConnectionError as exc:
                    # Redis restarting: what we hold stays pending and comes back to us or another worker
                    log.warning("Redis unreachable (%s); retrying", exc)
                    self._stop.wait(2)
                    continue
                except redis.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    log.warning("consumer group missing (Redis lost its data?); creating it again")
                    self.ensure_group()
                    continue
                if not entries:
                    if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                        break
                    continue
                try:
                    self._process(entries)
                except redis.ConnectionError as exc:
                    # what was not written stays pending and is reclaimed after GRAPE_CLAIM_IDLE_MS
                    log.warning("Redis unreachable while writing results (%s); the chunks will be redelivered", exc)
                    self._stop.wait(2)
                idle_since = time.monotonic()
        finally:
            self._stop.set()
            keeper.join(timeout=5)
            heartbeats.remove(self.r, self.keys, self.name)
        log.info("worker %s: stopped after %s", self.name, self.stats)
        return self.stats

    # reading -------------------------------------------------------------------------------------
    def _claim(self) -> list[Entry]:
        entries: list[Entry] = []
        # reclaim first: old work of dead workers before new work
        cursor, claimed, *_ = self.r.xautoclaim(
            self.stream,
            GROUP,
            self.name,
            min_idle_time=self.claim_idle_ms,
            start_id=self._claim_cursor,
            count=self.read_count,
        )
        # the cursor walks a long pending list across calls instead of rescanning its head
        self._claim_cursor = as_str(cursor)
        for entry_id, fields in claimed:
            if fields is None:
                continue
            entries.append(self._entry(entry_id, fields, deliveries=self._deliveries(entry_id)))
        if len(entries) < self.read_count:
            block = None if entries else self.block_ms
            got = self.r.xreadgroup(
                GROUP, self.name, {self.stream: ">"}, count=self.read_count - len(entries), block=block
            )
            for _, rows in got or []:
                for entry_id, fields in rows:
                    entries.append(self._entry(entry_id, fields, deliveries=1))
        return entries

    def _deliveries(self, entry_id: str) -> int:
        rows = self.r.xpending_range(self.stream, GROUP, min=entry_id, max=entry_id, count=1)
        return int(rows[0]["times_delivered"]) if rows else 1

    @staticmethod
    def _entry(entry_id: Any, fields: dict[Any, Any], deliveries: int) -> Entry:
        f = {as_str(k): v for k, v in fields.items()}
        return Entry(as_str(entry_id), as_str(f["ds"]), orjson.loads(f["items"]), deliveries)

    # processing ----------------------------------------------------------------------------------
    def _process(self, entries: list[Entry]) -> None:
        with self._lock:
            self._inflight = [e.id for e in entries]
        try:
            fresh = [e for e in entries if e.deliveries <= 1]
            retried = [e for e in entries if e.deliveries > 1]
            if fresh:
                self._score_together(fresh)
            for e in retried:
                self._score_carefully(e)
        finally:
            with self._lock:
                self._inflight = []

    def _load(self, entry: Entry) -> tuple[dict[str, str] | None, list[dict[str, Any]]]:
        meta = self._meta.get(entry.dataset)
        if meta is None:
            raw = self.r.hgetall(self.keys.dataset(entry.dataset))
            meta = {as_str(k): as_str(v) for k, v in raw.items()} if raw else None
            if meta is not None:
                self._meta[entry.dataset] = meta
        if meta is None:
            return None, []
        raws = self.r.hmget(self.keys.items(entry.dataset), entry.item_ids) if entry.item_ids else []
        return meta, [orjson.loads(x) for x in raws if x is not None]

    def _score_together(self, entries: list[Entry]) -> None:
        """Normal path: all items of all entries in one backend call (one large batch)."""
        work: list[tuple[Entry, dict[str, Any], str]] = []
        for e in entries:
            meta, items = self._load(e)
            if meta is None:
                log.warning("entry %s names deleted dataset %s; dropping it", e.id, e.dataset)
                self._commit(e, [])
                continue
            self.r.hsetnx(self.keys.task_stats(e.dataset, self.task), "t_start", f"{time.time():.3f}")
            work += [(e, item, meta.get("template", "auto")) for item in items]
        # scored in slices of about `commit_tokens`: each slice's results are written at once (progress,
        # and less to redo after a crash); the entries are acked when all their items are written
        written: set[tuple[str, str]] = set()
        for part in _slices(work, self.commit_tokens):
            if self._stop.is_set():
                break  # SIGTERM: what is not scored yet is handed back below
            results = self._run([(item, tpl) for _, item, tpl in part])
            by_ds: dict[str, list[ItemResult]] = {}
            for (e, _, _), res in zip(part, results, strict=True):
                by_ds.setdefault(e.dataset, []).append(res)
            for ds, res in by_ds.items():
                # a dataset deleted while we scored: do not recreate its keys
                if self.r.exists(self.keys.dataset(ds)):
                    self._write_results(ds, "", res)
                written.update((ds, r.item_id) for r in res)
        for e in entries:
            rest = [i for i in e.item_ids if (e.dataset, i) not in written]
            loaded = {item["id"] for w_e, item, _ in work if w_e is e}
            rest = [i for i in rest if i in loaded]
            if rest:
                self._handback(keys=[self.stream], args=[GROUP, e.id, e.dataset, orjson.dumps(rest)])
                log.info("handed back %d unscored items of entry %s", len(rest), e.id)
            else:
                self._commit(e, [])

    def _score_carefully(self, entry: Entry) -> None:
        """A redelivered chunk: skip what is already written, write each item as soon as it is scored."""
        meta, items = self._load(entry)
        if meta is None:
            self._commit(entry, [])
            return
        done = set()
        if items:
            flags = self.r.hmget(self.keys.task_results(entry.dataset, self.task), [it["id"] for it in items])
            done = {it["id"] for it, f in zip(items, flags, strict=True) if f is not None}
        todo = [it for it in items if it["id"] not in done]
        if todo and entry.deliveries > self.max_deliveries:
            self._dead_letter(entry, todo)
            return
        tpl = meta.get("template", "auto")
        for item in todo:
            self._write_results(entry.dataset, "", self._run([(item, tpl)]))
        self._commit(entry, [])

    def _dead_letter(self, entry: Entry, todo: list[dict[str, Any]]) -> None:
        """The first unscored item is the one workers die on: fail it, queue the rest again."""
        poison, rest = todo[0], todo[1:]
        reason = (
            f"worker died or stalled while scoring this item ({entry.deliveries - 1} deliveries of its chunk); "
            "it is failed so the rest of the dataset can finish"
        )
        self.r.xadd(
            self.keys.task_dead(self.task, self.model),
            {"ds": entry.dataset, "entry": entry.id, "item": poison["id"], "error": reason},
        )
        self._write_results(entry.dataset, "", [ItemResult(poison["id"], len(poison["candidates"]), error=reason)])
        if rest:
            # requeue as a fresh entry: HSETNX finds them stored, so re-add the stream entry directly
            self.r.xadd(self.stream, {"ds": entry.dataset, "items": orjson.dumps([it["id"] for it in rest])})
        self._commit(entry, [])
        log.error("dead-lettered item %s of dataset %s", poison["id"], entry.dataset)

    def _commit(self, entry: Entry, results: list[ItemResult]) -> None:
        self._write_results(entry.dataset, entry.id, results)
        self.stats.chunks += 1

    def _write_results(self, dataset: str, entry_id: str, results: list[ItemResult]) -> None:
        k = self.keys
        self._write(
            keys=[
                k.task_results(dataset, self.task),
                k.task_failed(dataset, self.task),
                k.task_stats(dataset, self.task),
                self.stream,
            ],
            args=results_args(GROUP, entry_id, time.time(), results),
        )
        worker_metrics.record_results(self.model, self.task, dataset, results)
        for r in results:
            self.stats.items += 1
            self.stats.failed += r.error is not None
            self.stats.tokens += r.pair_tokens

    # keeper thread -------------------------------------------------------------------------------
    def _keep_alive(self) -> None:
        period = max(0.2, min(HEARTBEAT_TTL_S / 3, self.claim_idle_ms / 3000))
        while not self._stop.wait(period):
            try:
                with self._lock:
                    inflight = list(self._inflight)
                if inflight:
                    # resets the idle time of our own entries: we are alive, just slow
                    self.r.xclaim(self.stream, GROUP, self.name, min_idle_time=0, message_ids=inflight, justid=True)
                heartbeats.publish(self.r, self.keys, self.name, self.status(), HEARTBEAT_TTL_S)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def status(self) -> dict[str, Any]:
        info = self.backend.info()
        return {
            **info,
            "name": self.name,
            "model": self.model,
            "task": self.task,
            "model_path": info.get("model"),
            "pid": os.getpid(),
            "chunks": self.stats.chunks,
            "items": self.stats.items,
            "failed": self.stats.failed,
            "tokens": self.stats.tokens,
            "uptime_s": round(time.time() - self.stats.started, 1),
            "heartbeat": time.time(),
        }
