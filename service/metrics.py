"""The gateway's Prometheus metrics: the fleet-wide view, computed from Redis at scrape time.

Nothing is counted inside the gateway process: every number is read from Redis when /metrics is asked
for (the dataset counters the workers' result script keeps, the queue streams, the worker heartbeats),
so any number of gateway replicas report the same values and a restarted gateway loses nothing. The
workers' own /metrics (workers/metrics.py) add what only a worker knows: batch latency, its share of
the work.

/metrics is open (no key needed), so what anyone may scrape is the fleet-wide aggregate: no dataset id, no
worker name, and a model named only when the operator named it (GRAPE_ALLOWED_MODELS, or a live worker
serves it; any other model is counted as `other`). The per-dataset and per-worker series (marked * below) come
only with `detail` (a valid key, or the operator's GRAPE_METRICS_DETAIL; routes/metrics.py decides).

    grape_up                                 1 when Redis answered this scrape, else 0 (and nothing else)
    grape_datasets{state}                    datasets by state (empty, scoring, done)
    grape_model_items{model}                 accepted items of the model's datasets, now (gauges: a deleted
    grape_model_pairs{model}                 dataset leaves the sums); likewise scored items, pairs and
    grape_model_items_scored{model}          tokens, failed items and pairs
    grape_model_pairs_scored{model}
    grape_model_tokens_scored{model}
    grape_model_items_failed{model}
    grape_model_pairs_failed{model}
    grape_queue_entries{model, task}         chunks in the queue stream (waiting + in flight)
    grape_queue_pending{model, task}         chunks delivered to a worker and not yet acknowledged
    grape_queue_dead_letters{model, task}    chunks in the dead-letter stream
    grape_workers{model, task}               live workers (heartbeat keys)
    grape_workers_by_backend{model, task, backend, path, dtype, prefix_reuse}
                                             live workers by what they score with
  * grape_dataset_items_total                accepted items (instructions)          {dataset, model}
  * grape_dataset_pairs_total                accepted candidate pairs               {dataset, model}
  * grape_dataset_items_scored_total         items scored                           {dataset, model}
  * grape_dataset_pairs_scored_total         pairs scored                           {dataset, model}
  * grape_dataset_tokens_scored_total        pair tokens (prompt + response) scored {dataset, model}
  * grape_dataset_items_failed               items failed (a later success removes one)
  * grape_dataset_pairs_failed               pairs of the failed items
  * grape_dataset_throughput_tokens_per_second   since scoring began
  * grape_worker_backend{worker, model, task, backend, path, dtype, prefix_reuse}
                                             1 per live worker: what it scores with (also GET /v1/workers)
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from redis.asyncio import Redis
from redis.exceptions import RedisError

from grape.keys import Keys, model_key
from grape.models import allowed_models
from grape.records import DatasetState
from grape.score_kinds import ScoreTask
from grape.store import heartbeats, scoring
from grape.store.io import arun
from service.datasets import list_datasets
from service.schemas import DatasetPublic

PRIMARY_TASK = ScoreTask.logprob.value
SCRAPE_TIMEOUT_S = 5.0
"""A scrape answers within this (grape_up 0) even while the Redis client retries a lost connection."""


OTHER_MODEL = "other"
"""The label of every model the operator has not named, on a scrape without detail."""


@dataclass
class Snapshot:
    """What one scrape read from Redis."""

    redis_up: bool = True
    datasets: list[DatasetPublic] = field(default_factory=list)
    queues: scoring.QueueDepths = field(default_factory=dict)
    dead: dict[tuple[str, str], int] = field(default_factory=dict)
    workers: Counter[tuple[str, str]] = field(default_factory=Counter)
    beats: list[dict[str, Any]] = field(default_factory=list)


async def snapshot(*, redis: Redis, keys: Keys) -> Snapshot:
    try:
        return await asyncio.wait_for(_read(redis, keys), timeout=SCRAPE_TIMEOUT_S)
    except (RedisError, TimeoutError):
        return Snapshot(redis_up=False)


async def _read(redis: Redis, keys: Keys) -> Snapshot:
    snap = Snapshot(datasets=await list_datasets(redis=redis, keys=keys))
    snap.queues, snap.dead = await arun(redis, scoring.queue_depths(keys))
    snap.beats = await heartbeats.live(redis, keys)
    for info in snap.beats:
        snap.workers[(model_key(str(info.get("model", ""))), str(info.get("task", PRIMARY_TASK)))] += 1
    return snap


def operator_models(snap: Snapshot, configured: list[str]) -> set[str]:
    """Model keys the operator named: GRAPE_ALLOWED_MODELS (unless `*`), the bundled ones it defaults to, and
    the models live workers serve. With `*` a dataset may name any string, which is then the tenant's."""
    served = [str(b.get("model") or "") for b in snap.beats]
    names = allowed_models(configured, served)
    return {model_key(m) for m in (names if names is not None else served) if m.strip()}


def families(snap: Snapshot, *, detail: bool = True, configured_models: list[str] | None = None) -> Iterator[Metric]:
    """The scrape's metric families; without `detail`, no dataset ids, no worker names, and models the
    operator did not name (`configured_models`, the live workers) become `other`."""
    up = GaugeMetricFamily("grape_up", "1 when the gateway could read Redis for this scrape.")
    up.add_metric([], 1 if snap.redis_up else 0)
    yield up
    if not snap.redis_up:
        return
    known = None if detail else operator_models(snap, configured_models or [])

    def shown_model(key: str) -> str:
        return key if known is None or key in known else OTHER_MODEL

    by_state = GaugeMetricFamily("grape_datasets", "Datasets by state.", labels=["state"])
    states = Counter(d.state.value for d in snap.datasets)
    for state in DatasetState:
        by_state.add_metric([state.value], states[state.value])
    yield by_state

    per_dataset = {
        "items": ("Accepted items (instructions).", lambda d: d.items),
        "pairs": ("Accepted candidate pairs.", lambda d: d.candidates),
        "items_scored": ("Items scored.", lambda d: d.scored_items),
        "pairs_scored": ("Candidate pairs scored.", lambda d: d.scored_candidates),
        "tokens_scored": ("Pair tokens (prompt + response) scored.", lambda d: d.tokens_scored),
        "items_failed": ("Items failed (a later successful score removes one).", lambda d: d.failed_items),
        "pairs_failed": ("Candidate pairs of the failed items.", lambda d: d.failed_candidates),
    }
    for name, (doc, get) in per_dataset.items():
        sums: Counter[str] = Counter()
        for d in snap.datasets:
            sums[shown_model(model_key(d.target_model))] += get(d) or 0
        fam = GaugeMetricFamily(f"grape_model_{name}", f"{doc} Summed over the model's datasets.", labels=["model"])
        for model, total in sorted(sums.items()):
            fam.add_metric([model], total)
        yield fam

    qlabels = ["model", "task"]
    entries = GaugeMetricFamily(
        "grape_queue_entries", "Chunks in the queue stream (waiting and in flight).", labels=qlabels
    )
    pending = GaugeMetricFamily(
        "grape_queue_pending", "Chunks delivered to a worker and not yet acknowledged.", labels=qlabels
    )
    depths: Counter[tuple[str, str]] = Counter()
    pendings: Counter[tuple[str, str]] = Counter()
    for (model, task), (length, n_pending) in snap.queues.items():
        depths[(shown_model(model), task)] += length
        pendings[(shown_model(model), task)] += n_pending
    for labels in sorted(depths):
        entries.add_metric(list(labels), depths[labels])
        pending.add_metric(list(labels), pendings[labels])
    yield entries
    yield pending
    dead = GaugeMetricFamily("grape_queue_dead_letters", "Chunks in the dead-letter stream.", labels=qlabels)
    dead_sums: Counter[tuple[str, str]] = Counter()
    for (model, task), length in snap.dead.items():
        dead_sums[(shown_model(model), task)] += length
    for labels, length in sorted(dead_sums.items()):
        dead.add_metric(list(labels), length)
    yield dead
    workers = GaugeMetricFamily("grape_workers", "Live workers (fresh heartbeat keys).", labels=qlabels)
    for (model, task), n in sorted(snap.workers.items()):
        workers.add_metric([model, task], n)  # a live worker's model is the operator's by definition
    yield workers
    kinds: Counter[tuple[str, ...]] = Counter()
    for b in snap.beats:
        kinds[tuple(_label(v) for v in _backend_labels(b))] += 1
    by_backend = GaugeMetricFamily(
        "grape_workers_by_backend",
        "Live workers by what they score with: backend, path taken, dtype, prefix reuse.",
        labels=["model", "task", "backend", "path", "dtype", "prefix_reuse"],
    )
    for labels, n in sorted(kinds.items()):
        by_backend.add_metric(list(labels), n)
    yield by_backend

    if detail:
        yield from _detail(snap)


def _backend_labels(b: dict[str, Any]) -> list[Any]:
    return [
        model_key(str(b.get("model", ""))),
        b.get("task", PRIMARY_TASK),
        b.get("backend"),
        b.get("path"),
        b.get("dtype"),
        b.get("prefix_reuse"),
    ]


def _detail(snap: Snapshot) -> Iterator[Metric]:
    """The per-dataset and per-worker series: dataset ids and worker names, for key holders and operators."""
    labels = ["dataset", "model"]
    counters = {
        "items": ("grape_dataset_items", "Accepted items (instructions).", lambda d: d.items),
        "pairs": ("grape_dataset_pairs", "Accepted candidate pairs.", lambda d: d.candidates),
        "items_scored": ("grape_dataset_items_scored", "Items scored.", lambda d: d.scored_items),
        "pairs_scored": ("grape_dataset_pairs_scored", "Candidate pairs scored.", lambda d: d.scored_candidates),
        "tokens": ("grape_dataset_tokens_scored", "Pair tokens (prompt + response) scored.", lambda d: d.tokens_scored),
    }
    for name, doc, get in counters.values():
        fam = CounterMetricFamily(name, doc, labels=labels)
        for d in snap.datasets:
            fam.add_metric([d.id, model_key(d.target_model)], get(d))
        yield fam
    gauges = {
        "grape_dataset_items_failed": ("Items failed (a later successful score removes one).", "failed_items"),
        "grape_dataset_pairs_failed": ("Candidate pairs of the failed items.", "failed_candidates"),
        "grape_dataset_throughput_tokens_per_second": (
            "Pair tokens per second since scoring began.",
            "throughput_tokens_per_s",
        ),
    }
    for name, (doc, attr) in gauges.items():
        fam = GaugeMetricFamily(name, doc, labels=labels)
        for d in snap.datasets:
            value = getattr(d, attr)
            if value is not None:
                fam.add_metric([d.id, model_key(d.target_model)], value)
        yield fam
    backend = GaugeMetricFamily(
        "grape_worker_backend",
        "1 per live worker, labelled with what it scores with: backend, path taken, dtype, prefix reuse.",
        labels=["worker", "model", "task", "backend", "path", "dtype", "prefix_reuse"],
    )
    for b in sorted(snap.beats, key=lambda b: str(b.get("name", ""))):
        backend.add_metric([_label(v) for v in [b.get("name"), *_backend_labels(b)]], 1)
    yield backend


def _label(value: Any) -> str:
    """A heartbeat field as a label value: missing is empty, booleans as Prometheus writes them."""
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


class _Families:
    """The one method `generate_latest` needs from a registry."""

    def __init__(self, snap: Snapshot, detail: bool, configured_models: list[str]) -> None:
        self.snap, self.detail, self.configured_models = snap, detail, configured_models

    def collect(self) -> Iterator[Metric]:
        return families(self.snap, detail=self.detail, configured_models=self.configured_models)


async def render(
    *, redis: Redis, keys: Keys, accept: str | None, detail: bool = True, configured_models: list[str] | None = None
) -> tuple[bytes, str]:
    """The exposition body and its content type, in the format the scraper asked for."""
    encode, content_type = choose_encoder(accept or "")
    snap = await snapshot(redis=redis, keys=keys)
    return encode(_Families(snap, detail, configured_models or [])), content_type  # type: ignore[arg-type]
