"""The consumer loop: claim chunks from the model's stream, score them, write results + ack atomically.

Each read first moves chunks from the datasets' backlogs into the stream, one dataset after another (fair
share, grape.store.scoring.take), so every dataset with work queued gets its turn.

Three threads keep the backend busy: a reader claims chunks, loads their items and tokenizes the next
batches while the backend computes the current one (`prefetch` batches ahead); the compute thread (the
caller of `run`) only runs the backend, and with a backend that streams (vLLM) adds the next batch to the
running engine before the current one is done, so the engine never drains between batches; a writer
writes each batch's results as soon as it is scored and acks a chunk when the last of its items is written.

Delivery is at-least-once, result writes are idempotent (grape.store.scoring.RESULTS): an item is counted
once however often it is written. A chunk pending on a dead worker is taken over with XAUTOCLAIM once it
has been idle `claim_idle_ms` (30 s by default); while a worker holds chunks, a keeper thread re-claims
them six times per idle time, so a slow batch on a live worker is never mistaken for a dead worker. A
chunk seen for the second time is scored item by item, writing each result at once, so a poison item
that kills workers is isolated: after `max_deliveries` it alone is failed and the rest of its chunk is
queued again. On SIGTERM the worker stops claiming, finishes the batch in the backend, writes it, and
hands every unscored item of its chunks back to the queue as a fresh entry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from grape.keys import Keys
from grape.settings import DEFAULT_CLAIM_IDLE_MS
from grape.store import datasets, heartbeats, scoring
from grape.store.io import call, run
from grape.store.scoring import ItemResult
from workers import metrics as worker_metrics
from workers.backends.base import ScoringBackend
from workers.runners import load_task

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Entry:
    id: str
    dataset: str
    item_ids: list[str]
    deliveries: int = 1
    todo: set[str] | None = None
    """Ids of its items queued for scoring and not written yet (None until scheduled); the entry is acked
    when it empties."""


@dataclass
class Batch:
    """Items the backend scores in one call, as (entry, item, template), tokenized ahead when the task can."""

    parts: list[tuple[Entry, dict[str, Any], str]]
    prepared: Any = None


_END = object()  # ends a queue between the threads


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
        prompt = len(str(item.get("instruction") or item.get("messages")))
        n = sum(len(c["response"]) + prompt for c in item["candidates"]) // 4
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
        claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
        max_deliveries: int = 5,
        commit_tokens: int = 65_536,
        name: str | None = None,
        task: str = "logprob",
        prefetch: int = 2,
    ) -> None:
        self.r = client
        self.keys = keys
        self.model = model
        self.task = str(task)  # grape.score_kinds.ScoreTask: which stream to read, which hashes to write
        self.queue = keys.score_queue(self.task, model)  # its stream, and the backlogs it is refilled from
        self.stream = self.queue.stream
        self.backend = backend
        self._run = load_task(self.task, backend, model)  # [(item, template)] -> [ItemResult]
        # tasks that can tokenize apart from computing get their tokenizing done by the reader thread
        self._prepare: Callable[[list[Any]], Any] | None = getattr(self._run, "prepare", None)
        self._complete: Callable[[Any], list[ItemResult]] | None = getattr(self._run, "complete", None)
        self._requests_of: Callable[[Any], list[Any]] | None = getattr(self._run, "requests", None)
        self._finish: Callable[[Any, list[Any]], list[ItemResult]] | None = getattr(self._run, "finish", None)
        # what a runner gets with each item from its dataset's metadata: the template, or the runner's own view
        self._context: Callable[[dict[str, str]], Any] = getattr(
            self._run, "context", lambda meta: meta.get("template", "auto")
        )
        self._streaming = bool(getattr(backend, "streams", False)) and None not in (
            self._prepare,
            self._complete,
            self._requests_of,
            self._finish,
        )
        self._ahead = max(1, prefetch)  # batches in a streaming engine at once
        self.read_count = read_count
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.commit_tokens = commit_tokens
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._held: dict[str, Entry] = {}  # claimed and not acked/handed back: the keeper refreshes them
        self._ready: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))  # reader -> compute
        self._done: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))  # compute -> writer
        self._error: BaseException | None = None
        self._claim_cursor = "0-0"
        self._meta: dict[str, dict[str, str]] = {}

    # lifecycle -----------------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        """Stop claiming; the batch in the backend is finished and written, the rest handed back."""
        if not self._stop.is_set():
            log.info("worker %s: stopping after the current batch", self.name)
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def ensure_group(self) -> None:
        scoring.ensure_group(self.r, self.stream)

    def run(self, *, idle_exit_s: float | None = None) -> WorkerStats:
        """Consume until stopped (or, with `idle_exit_s`, until nothing was held for that long)."""
        self.ensure_group()
        keeper = threading.Thread(target=self._keep_alive, name="claim-keeper", daemon=True)
        reader = threading.Thread(target=self._guard, args=(self._read_loop, idle_exit_s), name="reader", daemon=True)
        writer = threading.Thread(target=self._guard, args=(self._write_loop,), name="writer", daemon=True)
        heartbeats.publish(self.r, self.keys, self.name, self.status())
        log.info("worker %s: consuming %s with %s", self.name, self.stream, self.backend.info())
        keeper.start()
        reader.start()
        writer.start()
        try:
            self._compute_loop()
        except BaseException as exc:
            self._error = self._error or exc
        finally:
            self._stop.set()
            while reader.is_alive():  # unblock a reader waiting for room; what it queued is handed back
                with contextlib.suppress(queue.Empty):
                    self._ready.get(timeout=0.1)
            while writer.is_alive():
                try:
                    self._done.put(_END, timeout=0.1)
                    break
                except queue.Full:
                    pass
            writer.join()
            if self._error is None:
                self._hand_back()
            else:
                # no hand-back: what is held stays pending with its delivery count and is reclaimed after
                # the idle time, so a poison chunk still reaches the dead letters
                with self._lock:
                    self._held.clear()
            keeper.join(timeout=5)
            heartbeats.remove(self.r, self.keys, self.name)
        if self._error is not None:
            raise self._error
        log.info("worker %s: stopped after %s", self.name, self.stats)
        return self.stats

    def _guard(self, loop: Callable[..., None], *args: Any) -> None:
        """A thread's loop; an error in it stops the worker and is raised by `run`."""
        try:
            loop(*args)
        except BaseException as exc:
            log.exception("worker %s: %s failed", self.name, threading.current_thread().name)
            self._error = self._error or exc
            self._stop.set()

    @staticmethod
    def _put(q: queue.Queue[Any], value: Any, force: bool = False, stop: threading.Event | None = None) -> bool:
        """Put into a bounded queue, giving up when `stop` is set (unless `force`, for the end marker)."""
        while True:
            try:
                q.put(value, timeout=0.1)
                return True
            except queue.Full:
                if not force and stop is not None and stop.is_set():
                    return False

    # reading (reader thread) ---------------------------------------------------------------------
    def _read_loop(self, idle_exit_s: float | None) -> None:
        idle_since: float | None = None
        try:
            while not self._stop.is_set():
                entries = []
                try:
                    entries = self._claim()
                    if entries:
                        self._schedule(entries)
                except redis.ConnectionError as exc:
                    self._release([e for e in entries if e.todo is None])
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
                if idle_exit_s is not None and not entries:
                    with self._lock:
                        busy = bool(self._held)
                    now = time.monotonic()
                    idle_since = None if busy else (idle_since or now)
                    if idle_since is not None and now - idle_since > idle_exit_s:
                        break
                else:
                    idle_since = None
        finally:
            self._put(self._ready, _END, force=True)

    def _release(self, entries: list[Entry]) -> None:
        """Stop refreshing entries we could not schedule: they stay pending and are reclaimed after the idle
        time (by us or another worker), with their delivery count."""
        with self._lock:
            for e in entries:
                self._held.pop(e.id, None)

    def _claim(self) -> list[Entry]:
        while self._ready.full() and not self._stop.is_set():
            self._stop.wait(0.01)  # a full pipeline: claim nothing more until the compute thread takes some
        if self._stop.is_set():
            return []
        # reclaim first: old work of dead workers before new work
        opts = {"idle_ms": self.claim_idle_ms, "count": self.read_count, "block_ms": self.block_ms}
        claim = scoring.claim(self.queue, self.name, self._claim_cursor, **opts)
        self._claim_cursor, reclaimed, fresh = run(self.r, claim)
        if reclaimed:
            log.warning(
                "worker %s: taking over %d chunk(s) left idle %.0f s by a silent worker",
                self.name,
                len(reclaimed),
                self.claim_idle_ms / 1000,
            )
        entries = [Entry(*d) for d in reclaimed + fresh]
        with self._lock:
            self._held.update((e.id, e) for e in entries)
        return entries

    def _load(self, entries: list[Entry]) -> list[tuple[dict[str, str] | None, list[dict[str, Any]]]]:
        """Each entry's dataset settings and items, in one round trip for all of them."""
        chunks = [(e.dataset, e.item_ids) for e in entries]
        metas, items = run(self.r, datasets.load_chunks(self.keys, chunks, known=self._meta))
        self._meta.update(metas)
        return [(self._meta.get(e.dataset), its) for e, its in zip(entries, items, strict=True)]

    def _schedule(self, entries: list[Entry]) -> None:
        """Turn claimed entries into batches for the compute thread. Fresh entries are scored together, in
        slices of about `commit_tokens`; a redelivered one item by item (what is already written skipped)."""
        fresh: list[tuple[Entry, dict[str, Any], str]] = []
        batches: list[list[tuple[Entry, dict[str, Any], str]]] = []
        started: set[str] = set()
        for e, (meta, items) in zip(entries, self._load(entries), strict=True):
            if meta is None:
                log.warning("entry %s names deleted dataset %s; dropping it", e.id, e.dataset)
                self._ack(e)
                continue
            started.add(e.dataset)
            tpl = self._context(meta)
            if e.deliveries > 1:
                if items:
                    flags = run(self.r, scoring.written(self.keys, self.task, e.dataset, [it["id"] for it in items]))
                    items = [it for it, done in zip(items, flags, strict=True) if not done]
                if items and e.deliveries > self.max_deliveries:
                    self._dead_letter(e, items)
                    continue
                batches += [[(e, it, tpl)] for it in items]
            else:
                fresh += [(e, it, tpl) for it in items]
            if not items:
                self._ack(e)
                continue
            with self._lock:
                e.todo = {it["id"] for it in items}
        if started:
            run(self.r, scoring.mark_started(self.keys, self.task, started, time.time()))
        for parts in _slices(fresh, self.commit_tokens) + batches:
            prepared = self._prepare([(item, tpl) for _, item, tpl in parts]) if self._prepare else None
            if not self._put(self._ready, Batch(parts, prepared), stop=self._stop):
                return  # stopping: what is not queued is handed back by `run`

    def _dead_letter(self, entry: Entry, todo: list[dict[str, Any]]) -> None:
        """The first unscored item is the one workers die on: fail it, queue the rest again."""
        poison, rest = todo[0], todo[1:]
        reason = (
            f"worker died or stalled while scoring this item ({entry.deliveries - 1} deliveries of its chunk); "
            "it is failed so the rest of the dataset can finish"
        )
        run(
            self.r, scoring.dead_letter(self.keys, self.task, self.model, entry.dataset, entry.id, poison["id"], reason)
        )
        self._write_results(entry.dataset, "", [ItemResult(poison["id"], len(poison["candidates"]), error=reason)])
        if rest:
            run(self.r, scoring.requeue(self.stream, entry.dataset, [it["id"] for it in rest]))
        self._ack(entry)
        log.error("dead-lettered item %s of dataset %s", poison["id"], entry.dataset)

    # computing (the caller's thread) -------------------------------------------------------------
    def _compute_loop(self) -> None:
        if self._streaming:
            return self._compute_streaming()
        while True:
            batch = self._ready.get()
            if batch is _END:
                return
            if self._stop.is_set():
                continue  # stopping: not scored, its items are handed back
            if self._complete is not None:
                results = self._complete(batch.prepared)
            else:
                results = self._run([(item, tpl) for _, item, tpl in batch.parts])
            self._emit(batch, results)

    def _compute_streaming(self) -> None:
        """A backend that streams (vLLM): the next batch goes into the running engine while it computes
        this one, so the engine never drains between batches; a batch is written when its last request
        is done. An engine error falls back to one call per batch (which isolates a failing item)."""
        assert self._complete is not None
        inflight: dict[int, Batch] = {}
        ending = False
        while True:
            while not ending and len(inflight) < self._ahead:
                try:
                    batch = self._ready.get(block=not inflight)
                except queue.Empty:
                    break
                if batch is _END:
                    ending = True
                elif not self._stop.is_set():  # stopping: not added, its items are handed back
                    try:
                        inflight[self.backend.submit(self._requests_of(batch.prepared))] = batch
                    except Exception as exc:  # noqa: BLE001 - e.g. a pair too long: scored the careful way
                        log.warning("could not add a batch to the engine (%s); scoring it in one call", exc)
                        self._emit(batch, self._complete(batch.prepared))
            if not inflight:
                if ending:
                    return
                continue
            try:
                done = self.backend.step()
            except Exception as exc:  # noqa: BLE001
                log.warning("engine step failed (%s); scoring the %d batches in it one call each", exc, len(inflight))
                self.backend.abort()
                for batch in inflight.values():
                    self._emit(batch, self._complete(batch.prepared))
                inflight.clear()
                continue
            for ticket, logprobs in done:
                batch = inflight.pop(ticket)
                try:
                    results = self._finish(batch.prepared, logprobs)
                except Exception as exc:  # noqa: BLE001
                    log.warning("bad engine output (%s); scoring the batch again in one call", exc)
                    results = self._complete(batch.prepared)
                self._emit(batch, results)

    def _emit(self, batch: Batch, results: list[ItemResult]) -> None:
        while self._error is None:  # also on SIGTERM: what was scored is written
            try:
                self._done.put((batch, results), timeout=0.1)
                return
            except queue.Full:
                pass

    # writing (writer thread) ---------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            got = self._done.get()
            if got is _END:
                return
            batch, results = got
            by_ds: dict[str, list[ItemResult]] = {}
            for (e, _, _), res in zip(batch.parts, results, strict=True):
                by_ds.setdefault(e.dataset, []).append(res)
            for ds, res in by_ds.items():
                self._retrying(lambda ds=ds, res=res: self._write_results(ds, "", res, only_if_dataset=True))
            finished: dict[str, Entry] = {}
            with self._lock:
                for e, item, _ in batch.parts:
                    assert e.todo is not None
                    e.todo.discard(item["id"])
                    if not e.todo:
                        finished[e.id] = e
            for e in finished.values():
                self._retrying(lambda e=e: self._ack(e))

    def _retrying(self, write: Callable[[], Any]) -> Any:
        """Redis down: results wait for it (idempotent writes), until the worker is stopped."""
        delay = 0.5
        while True:
            try:
                return write()
            except redis.ConnectionError as exc:
                if self._stop.is_set() and delay > 4:
                    raise
                log.warning("Redis unreachable while writing results (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(2 * delay, 10)

    def _hand_back(self) -> None:
        """After a stop: every unscored item of every held chunk goes back to the queue, atomically."""
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for e in held:
            if e.todo is None:
                continue  # never scheduled: left pending, reclaimed after the idle time
            rest = [i for i in e.item_ids if i in e.todo]
            if rest:
                call(self.r, scoring.handback(self.stream, e.id, e.dataset, rest))
                log.info("handed back %d unscored items of entry %s", len(rest), e.id)
            else:
                self._ack(e)

    def _ack(self, entry: Entry) -> None:
        self._write_results(entry.dataset, entry.id, [])
        with self._lock:
            self._held.pop(entry.id, None)
        self.stats.chunks += 1

    def _write_results(
        self, dataset: str, entry_id: str, results: list[ItemResult], only_if_dataset: bool = False
    ) -> None:
        if only_if_dataset and not run(self.r, datasets.exists(self.keys, dataset)):
            return  # a dataset deleted while we scored: do not recreate its keys
        call(self.r, scoring.results(self.keys, self.task, self.model, dataset, entry_id, time.time(), results))
        worker_metrics.record_results(self.model, self.task, dataset, results)
        for r in results:
            self.stats.items += 1
            self.stats.failed += r.error is not None
            self.stats.tokens += r.pair_tokens

    # keeper thread -------------------------------------------------------------------------------
    def _keep_alive(self) -> None:
        # six refreshes per idle time: a live worker's entries never look idle, even if a few refreshes fail
        period = max(0.05, min(heartbeats.TTL_S / 3, self.claim_idle_ms / 6000))
        while not self._stop.wait(period):
            try:
                with self._lock:
                    inflight = list(self._held)
                if inflight:
                    # resets the idle time of our own entries: we are alive, just slow
                    run(self.r, scoring.touch(self.stream, self.name, inflight))
                heartbeats.publish(self.r, self.keys, self.name, self.status())
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
