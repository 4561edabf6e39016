"""Prometheus metrics of one scoring worker process, and the small HTTP server that exposes them.

Served on `--metrics-port` (GRAPE_METRICS_PORT; off when unset):

    /metrics   Prometheus text format (OpenMetrics when the scraper asks for it)
    /ready     200 once the model is loaded and Redis answers, else 503 (a Kubernetes readiness probe)
    /healthz   200 while the process serves (a liveness probe; the model may still be loading)

The counters are this process's own since it started; the gateway's /metrics has the fleet-wide view
(queues, datasets, live workers) computed from Redis. A result write counts once per write: a chunk
redelivered after a worker died is counted again by the worker that rescored it, so the sum over
workers exceeds the dataset's pairs exactly when work was done twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app

from grape.keys import model_key
from grape.store.scoring import ItemResult

_PER_DATASET = ["model", "task", "dataset"]

ITEMS_SCORED = Counter(
    "grape_worker_items_scored", "Items (instructions) scored and written by this worker.", _PER_DATASET
)
PAIRS_SCORED = Counter("grape_worker_pairs_scored", "Candidate pairs scored and written by this worker.", _PER_DATASET)
TOKENS_SCORED = Counter(
    "grape_worker_tokens_scored", "Pair tokens (prompt + response) scored by this worker.", _PER_DATASET
)
ITEMS_FAILED = Counter(
    "grape_worker_items_failed",
    "Items this worker wrote as failed (too long, unscorable, dead-lettered).",
    _PER_DATASET,
)
PAIRS_FAILED = Counter("grape_worker_pairs_failed", "Candidate pairs of the failed items.", _PER_DATASET)
BATCHES = Counter("grape_worker_batches", "Backend scoring calls (one token-budgeted batch each).", ["model"])
BATCH_ERRORS = Counter(
    "grape_worker_batch_errors",
    "Backend calls that raised (their items are then retried one by one).",
    ["model"],
)
BATCH_SECONDS = Histogram(
    "grape_worker_batch_seconds",
    "Latency of one backend scoring call.",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640),
)
BATCH_PAIRS = Histogram(
    "grape_worker_batch_pairs",
    "Pairs in one backend scoring call.",
    ["model"],
    buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384),
)
PREFIX_CACHE_TOKENS = Counter(
    "grape_worker_prefix_cache_tokens",
    "Pair tokens the backend read from its prefix cache instead of computing them (vLLM's shared prompts).",
    ["model"],
)
READY = Gauge("grape_worker_ready", "1 once the model is loaded and the worker consumes its queue.", ["model"])


def record_results(model: str, task: str, dataset: str, results: Iterable[ItemResult]) -> None:
    """Count one results write (called by the consumer loop after each write)."""
    labels = (model_key(model), str(task), dataset)
    for r in results:
        if r.error is None:
            ITEMS_SCORED.labels(*labels).inc()
            PAIRS_SCORED.labels(*labels).inc(r.candidates)
            TOKENS_SCORED.labels(*labels).inc(r.pair_tokens)
        else:
            ITEMS_FAILED.labels(*labels).inc()
            PAIRS_FAILED.labels(*labels).inc(r.candidates)


class InstrumentedBackend:
    """A scoring backend that times each `score` call; everything else is the wrapped backend's."""

    def __init__(self, backend: Any, model: str) -> None:
        self._backend = backend
        self._model = model_key(model)
        self._submitted: dict[int, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def score(self, requests: list[Any]) -> list[list[float]]:
        start = time.perf_counter()
        cached = getattr(self._backend, "cached_tokens", 0)
        BATCHES.labels(self._model).inc()
        try:
            out = self._backend.score(requests)
        except Exception:
            BATCH_ERRORS.labels(self._model).inc()
            raise
        finally:
            PREFIX_CACHE_TOKENS.labels(self._model).inc(getattr(self._backend, "cached_tokens", 0) - cached)
        BATCH_SECONDS.labels(self._model).observe(time.perf_counter() - start)
        BATCH_PAIRS.labels(self._model).observe(len(requests))
        return out

    # streaming backends (vLLM): a batch is timed from its submission to the step that completes it
    def submit(self, requests: list[Any]) -> int:
        BATCHES.labels(self._model).inc()
        BATCH_PAIRS.labels(self._model).observe(len(requests))
        ticket = self._backend.submit(requests)
        self._submitted[ticket] = time.perf_counter()
        return ticket

    def step(self) -> list[tuple[int, list[list[float]]]]:
        cached = getattr(self._backend, "cached_tokens", 0)
        try:
            done = self._backend.step()
        except Exception:
            BATCH_ERRORS.labels(self._model).inc()
            raise
        finally:
            PREFIX_CACHE_TOKENS.labels(self._model).inc(getattr(self._backend, "cached_tokens", 0) - cached)
        now = time.perf_counter()
        for ticket, _ in done:
            BATCH_SECONDS.labels(self._model).observe(now - self._submitted.pop(ticket, now))
        return done

    def abort(self) -> None:
        self._submitted.clear()
        self._backend.abort()


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """/metrics, /ready and /healthz on a port of their own, served from a daemon thread."""

    def __init__(self, port: int, host: str = "0.0.0.0", check: Callable[[], bool] | None = None) -> None:
        self.loaded = threading.Event()
        """Set once the model is loaded and the consumer loop starts (see `mark_ready`)."""
        self._check = check or (lambda: True)
        self._metrics = make_wsgi_app(REGISTRY)
        self._httpd = make_server(host, port, self._app, _Server, handler_class=_QuietHandler)
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/ready", "/healthz"):
            try:
                ok = path == "/healthz" or (self.loaded.is_set() and bool(self._check()))
            except Exception:  # noqa: BLE001 - a failing check means not ready, never a crashed server
                ok = False
            body = b"ok\n" if ok else b"not ready\n"
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [body]
        return self._metrics(environ, start_response)


def serve(port: int, host: str, redis_url: str) -> MetricsServer:
    """Start the worker's metrics server; /ready answers 200 after `mark_ready` while Redis answers."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    return MetricsServer(port, host, check=lambda: bool(client.ping())).start()


def mark_ready(model: str, server: MetricsServer | None) -> None:
    READY.labels(model_key(model)).set(1)
    if server is not None:
        server.loaded.set()
