"""The consumer side of a job queue (grape.store.jobqueue), shared by the trainer and the evaluator.

One record at a time per holder (it owns its device): BLMOVE the oldest id into this holder's claimed list,
start it, hand it to the subclass's `work`, end it. A background thread refreshes the heartbeat key (TTL
from the settings) and reaps the records of holders whose heartbeat is gone. A subclass keeps only its own
work (training, running lm-eval) and what it adds to its heartbeat.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import redis

from grape.keys import Keys
from grape.redis_client import as_str
from grape.store.io import call
from grape.store.jobqueue import JobQueue

log = logging.getLogger(__name__)


class QueueConsumer:
    """Takes records from one queue until stopped; subclasses set `queue` and implement `work`."""

    queue: JobQueue

    def __init__(self, client: redis.Redis, keys: Keys, settings: Any, *, name: str | None, block_s: float) -> None:
        self.r = client
        self.keys = keys
        self.q = self.queue.space(keys)
        self.settings = settings
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.block_s = block_s
        self.ttl = self.queue.heartbeat_s(settings)
        self.beats = self.queue.beats(keys, self.ttl)
        self.done = 0
        self.current: str | None = None
        self._stop = threading.Event()

    # what a subclass provides ----------------------------------------------------------------------
    def work(self, item_id: str, spec_json: bytes) -> None:
        """Run one started record to its end (calling `_end`); raising fails it with the error."""
        raise NotImplementedError

    def heartbeat_info(self) -> dict[str, Any]:
        """What the heartbeat key says besides name, pid, the current record and the time."""
        return {}

    def prepare(self) -> None:
        """Before the first claim."""

    def housekeeping(self) -> None:
        """Each keep-alive round, after reaping."""

    def error_of(self, exc: Exception) -> str:
        """A failed record's error, from what `work` raised."""
        return f"{type(exc).__name__}: {exc}"

    # lifecycle -----------------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        """Stop claiming; the running record is handed back by the subclass's work."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def consume(self, *, max_count: int | None = None, idle_exit_s: float | None = None) -> int:
        """Take records until stopped (or `max_count` ran, or the queue was empty `idle_exit_s`). How many ran."""
        self.prepare()
        self.heartbeat()
        keeper = threading.Thread(target=self._keep_alive, name=f"{self.queue.holder}-heartbeat", daemon=True)
        keeper.start()
        idle_since = time.monotonic()
        log.info("%s %s: waiting for %ss on %s", self.queue.holder, self.name, self.queue.what, self.q.queue())
        try:
            while not self._stop.is_set():
                if max_count is not None and self.done >= max_count:
                    break
                raw = self.r.blmove(self.q.queue(), self.q.claimed(self.name), self.block_s, "RIGHT", "LEFT")
                if raw is None:
                    if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                        break
                    continue
                self.take(as_str(raw))
                idle_since = time.monotonic()
        finally:
            self._stop.set()
            keeper.join(timeout=5)
            self.beats.remove(self.r, self.name)
        log.info("%s %s: stopped after %d %s(s)", self.queue.holder, self.name, self.done, self.queue.what)
        return self.done

    # heartbeat and reaping ------------------------------------------------------------------------
    def heartbeat(self) -> None:
        info = {"name": self.name, "pid": os.getpid(), **self.heartbeat_info(), "heartbeat": time.time()}
        self.beats.publish(self.r, self.name, info)

    def _keep_alive(self) -> None:
        while not self._stop.wait(max(0.5, self.ttl / 3)):
            try:
                self.heartbeat()
                self.reap_dead()
                self.housekeeping()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def reap_dead(self) -> dict[str, str]:
        """Records held by holders whose heartbeat is gone: queued again, cancelled or failed. id -> outcome."""
        out = self.queue.reap_dead(self.r, self.keys, alive=self.name)
        for item_id, outcome in out.items():
            log.warning("%s %s: reaped %s %s: %s", self.queue.holder, self.name, self.queue.what, item_id, outcome)
        return out

    # one record ------------------------------------------------------------------------------------
    def _log(self, item_id: str, msg: str, level: str = "info", **data: Any) -> None:
        self.queue.log(self.r, self.keys, item_id, msg, level, **data)

    def _set(self, item_id: str, **fields: Any) -> None:
        self.queue.set_fields(self.r, self.keys, item_id, fields)

    def _end(self, item_id: str, state: str, message: str, **how: Any) -> bool:
        """End the running record (state `queued`: hand it back); False when it is no longer this holder's.
        `how`: JobQueue.finish's error, level and fields."""
        return bool(call(self.r, self.queue.finish(self.keys, item_id, self.name, str(state), message, **how)))

    def take(self, item_id: str) -> None:
        """Start a claimed record and work on it; any error fails it with its reason, the loop goes on."""
        spec = call(self.r, self.queue.start(self.keys, item_id, self.name))
        if spec is None:
            log.info("%s %s was cancelled or removed before it started", self.queue.what, item_id)
            return
        self.current = item_id
        self.heartbeat()
        try:
            self.work(item_id, spec)
        except Exception as exc:  # noqa: BLE001 - any error fails the record with its reason, the loop goes on
            log.exception("%s %s failed", self.queue.what, item_id)
            error = self.error_of(exc)
            self._end(item_id, "failed", f"failed: {error}", error=error, level="error")
        finally:
            self.current = None
            self.done += 1
