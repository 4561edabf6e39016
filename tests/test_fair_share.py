"""Fair share of a model's queue: workers take chunks round-robin across the datasets with work queued, so a small
dataset uploaded after a big one is scored while the big one is still less than half scored; and every guarantee
of the queue holds with the datasets' backlogs in front of the stream (exact deliveries, hand-back at the front,
backpressure and /metrics counting the backlogs, a deleted dataset leaving nothing queued).

The workers' backends are wrapped in a `Recorder` that counts, per dataset, the pairs that reached the backend,
in the order they did; once the small dataset's last pair has been scored it holds every further call until
the test has read the counts in Redis, so "B done while A below half" is asserted on counts, never on timing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from grape.keys import GROUP, Keys
from grape.settings import Settings
from grape.store import scoring
from grape.store.io import call, run
from service.app import create_app
from tests.conftest import MODEL, create, load_pool, wait_done
from tests.test_metrics import samples, value
from workers.backends import BackendConfig, load_backend


def _items(tag: str, n: int, candidates: int = 2) -> list[dict[str, Any]]:
    """n short synthetic items whose instruction names the dataset (`tag`), so the recorder tells them apart."""
    return [
        {
            "id": f"{tag}-{k}",
            "instruction": f"Dataset {tag}, question {k}: name a colour.",
            "candidates": [{"source": f"s{c}", "response": f"Colour {c} of {k}."} for c in range(candidates)],
        }
        for k in range(n)
    ]


def _tag_of(prompt: str) -> str:
    """The dataset of a synthetic item (`_items`), from its prompt."""
    return prompt.split("Dataset ", 1)[1].split(",", 1)[0] if "Dataset " in prompt else "?"


class Recorder:
    """A backend that counts the pairs of each dataset it scores (`tag`: the dataset of a prompt's text); the
    call that completes `small`'s pairs is let through, then every later call waits until `release()`. The
    first calls wait until `go()` (so the test can upload while a worker holds a batch of the big dataset)."""

    def __init__(self, backend: Any, small: str, small_pairs: int, tag: Callable[[str], str] = _tag_of) -> None:
        self._backend, self._small, self._small_pairs, self._tag = backend, small, small_pairs, tag
        self._lock = threading.Lock()
        self.pairs: dict[str, int] = {}
        self.at_small_done: dict[str, int] | None = None  # the counts when the small dataset's last pair was scored
        self._started = threading.Event()
        self._go = threading.Event()
        self._release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def started(self, timeout: float) -> bool:
        return self._started.wait(timeout)

    def go(self) -> None:
        self._go.set()

    def release(self) -> None:
        self._release.set()

    def score(self, requests: list[Any]) -> list[list[float]]:
        self._started.set()
        self._go.wait(120)
        with self._lock:
            frozen = self.at_small_done is not None
        if frozen:
            self._release.wait(120)
        out = self._backend.score(requests)
        tags = [self._tag(self._backend.tokenizer.decode(r.prompt_ids)) for r in requests]
        with self._lock:
            for t in tags:
                self.pairs[t] = self.pairs.get(t, 0) + 1
            if self.at_small_done is None and self.pairs.get(self._small, 0) >= self._small_pairs:
                self.at_small_done = dict(self.pairs)
        return out


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _fair_run(
    api: TestClient, rec: Recorder, start_workers: Callable[[], None], big: list[dict], small: list[dict], *, busy: bool
) -> tuple[dict, dict]:
    """Upload `big`, then `small`: with `busy`, once the workers are scoring `big` (their first batch held until
    `small` is stored); otherwise before the workers start. The status of both when `small` is done (the
    workers held meanwhile), then the big one's after everything is released and done."""
    a, b = create(api), create(api)
    assert api.post(f"/v1/datasets/{a}/items", json={"items": big}).json()["accepted"] == len(big)
    if busy:
        start_workers()
        assert rec.started(300), "no worker started scoring"
    assert api.post(f"/v1/datasets/{b}/items", json={"items": small}).json()["accepted"] == len(small)
    if not busy:
        start_workers()
    rec.go()
    try:
        st_b = wait_done(api, b, timeout=600)
        st_a = api.get(f"/v1/datasets/{a}").json()  # the workers hold every call after B's last: A stands still
    finally:
        rec.release()
    return {"a_at_b_done": st_a, "b_done": st_b}, wait_done(api, a, timeout=900)


def _drained(rclient: redis.Redis, keys: Keys) -> None:
    q = keys.score_queue("logprob", MODEL)
    assert rclient.xlen(q.stream) == 0 and rclient.xpending(q.stream, GROUP)["pending"] == 0
    assert rclient.llen(q.ring) == 0 and int(rclient.get(q.waiting) or 0) == 0
    assert not list(rclient.scan_iter(match=f"{keys.prefix}:ds:*:backlog*"))


# (a) the null backend, two workers --------------------------------------------------------------------------


def test_null_workers_score_a_small_dataset_while_a_big_one_is_less_than_half_done(
    redis_url, keys, rclient, model_path, worker_factory
) -> None:
    settings = Settings(redis_url=redis_url, key_prefix=keys.prefix, chunk_pairs=8)
    big, small = _items("A", 2000), _items("B", 20)  # 4,000 pairs in 500 chunks; 40 pairs in 5 chunks
    rec = Recorder(load_backend("null", BackendConfig(model=model_path)), "B", 40)
    with TestClient(create_app(settings)) as api:
        # the stream holds only a window of A when the workers start: the rest waits in A's backlog
        q = keys.score_queue("logprob", MODEL)

        def workers() -> None:
            assert rclient.xlen(q.stream) == settings.fair_share_window
            assert int(rclient.get(q.waiting)) == 500 - settings.fair_share_window
            for i in range(2):
                worker_factory(backend=rec, name=f"null-{i}", read_count=2)

        got, st_a = _fair_run(api, rec, workers, big, small, busy=True)
    at = got["a_at_b_done"]
    assert got["b_done"]["scored_candidates"] == 40
    # B was done while A was far from half scored: in Redis, and counted at the backend
    assert at["scored_candidates"] < 4000 / 2, at
    assert rec.at_small_done is not None and rec.at_small_done.get("A", 0) < 4000 / 2, rec.at_small_done
    # B's five chunks came after at most what the two workers held (a read of 2 chunks scoring, 2 reads tokenized
    # ahead, one waiting to be), the window and one turn per chunk of B: a few dozen of A's 500
    assert rec.at_small_done["A"] <= 8 * (2 * 4 * 2 + settings.fair_share_window + 5 + 10), rec.at_small_done
    # and A was then finished, every candidate once
    assert (st_a["scored_candidates"], st_a["failed_items"], rec.pairs) == (4000, 0, {"A": 4000, "B": 40})
    _drained(rclient, keys)


# (b) the real model ---------------------------------------------------------------------------------------------


def test_hf_worker_scores_a_one_item_dataset_before_a_twelve_item_one_is_half_done(
    redis_url, keys, rclient, hf_backend, worker_factory
) -> None:
    # one instruction (2 candidates) per chunk; a window of one chunk: A's 12 chunks wait in its backlog
    settings = Settings(redis_url=redis_url, key_prefix=keys.prefix, chunk_pairs=2, fair_share_window=1)
    big = load_pool(12, start=220, max_chars=60, candidates=2)
    (small,) = load_pool(1, start=240, max_chars=60, candidates=2)
    mark = small["instruction"][:40]
    rec = Recorder(hf_backend, "B", 2, tag=lambda prompt: "B" if mark in prompt else "A")
    with TestClient(create_app(settings)) as api:
        start = lambda: worker_factory(backend=rec, read_count=1)  # noqa: E731
        got, st_a = _fair_run(api, rec, start, big, [small], busy=False)
    at = got["a_at_b_done"]
    assert got["b_done"]["scored_items"] == 1 and got["b_done"]["failed_items"] == 0
    assert at["scored_items"] < 12 / 2, at
    # exactly: the window's A chunk, then A and B in turn (A was first in the ring): B third
    assert rec.at_small_done == {"A": 2 * 2, "B": 2}, rec.at_small_done
    assert (st_a["scored_items"], st_a["scored_candidates"], st_a["failed_items"]) == (12, 24, 0)
    _drained(rclient, keys)


# the protocol, exactly --------------------------------------------------------------------------------------------


def _take(rclient: redis.Redis, q, consumer: str, count: int) -> list[scoring.Delivery]:
    _, reclaimed, fresh = run(rclient, scoring.claim(q, consumer, "0-0", idle_ms=60_000, count=count, block_ms=10))
    assert reclaimed == []
    return fresh


def test_chunks_go_round_robin_across_datasets_and_a_hand_back_goes_first(rclient, keys) -> None:
    q = keys.score_queue("logprob", MODEL)
    meta = {"target_model": MODEL}
    a, b, c = "ds-00000000000a", "ds-00000000000b", "ds-00000000000c"
    for d in (a, b, c):  # the ingest script stores into a dataset that exists (a deleted one takes nothing)
        rclient.hset(keys.dataset(d), mapping=meta)
    for k in range(6):
        call(rclient, scoring.ingest(keys, a, meta, [{"id": f"a{k}", "candidates": [{}]}], window=2))
    assert (rclient.xlen(q.stream), rclient.llen(q.backlog(a)), int(rclient.get(q.waiting))) == (2, 4, 4)
    for k in range(2):
        call(rclient, scoring.ingest(keys, b, meta, [{"id": f"b{k}", "candidates": [{}]}], window=2))
    call(rclient, scoring.ingest(keys, c, meta, [{"id": "c0", "candidates": [{}]}], window=2))
    assert rclient.lrange(q.ring, 0, -1) == [a.encode(), b.encode(), c.encode()]
    assert run(rclient, scoring.queued(keys, MODEL)) == 9  # backpressure: the stream and every backlog
    scoring.ensure_group(rclient, q.stream)
    # the window first (A's two), then one chunk per dataset in turn, each dataset's chunks in order
    order = [(d.dataset[-1], d.item_ids) for n in (1, 2, 3) for d in _take(rclient, q, "w", n)]
    assert order == [("a", ["a0"]), ("a", ["a1"]), ("a", ["a2"]), ("b", ["b0"]), ("c", ["c0"]), ("a", ["a3"])]
    assert rclient.lrange(q.ring, 0, -1) == [b.encode(), a.encode()]  # C left the ring with its last chunk
    # a worker stopping hands its unscored chunk back into the stream: it comes before every backlog
    (held,) = _take(rclient, q, "w", 1)
    assert held.item_ids == ["b1"] and rclient.lrange(q.ring, 0, -1) == [a.encode()]
    call(rclient, scoring.handback(q.stream, held.id, b, held.item_ids))
    assert [(d.dataset, d.item_ids, d.deliveries) for d in _take(rclient, q, "v", 1)] == [(b, ["b1"], 1)]
    assert [d.item_ids for d in _take(rclient, q, "v", 5)] == [["a4"], ["a5"]]
    assert rclient.llen(q.ring) == 0 and int(rclient.get(q.waiting)) == 0
    assert run(rclient, scoring.queued(keys, MODEL)) == rclient.xpending(q.stream, GROUP)["pending"] == 9
    # nothing queued anywhere: the worker's read blocks on the stream, where the next upload's chunk wakes it
    t0 = time.monotonic()
    assert _take(rclient, q, "v", 1) == [] and time.monotonic() - t0 >= 0.01


def test_a_read_without_the_workers_group_moves_nothing(rclient, keys) -> None:
    """Redis lost its data, or no worker created the group yet: the read fails with NOGROUP (the worker creates
    the group again) and the backlog keeps its chunks."""
    q = keys.score_queue("logprob", MODEL)
    meta = {"target_model": MODEL}
    rclient.hset(keys.dataset("ds-00000000000a"), mapping=meta)
    for k in range(3):
        call(rclient, scoring.ingest(keys, "ds-00000000000a", meta, [{"id": str(k), "candidates": [{}]}], window=1))
    rclient.xgroup_create(q.stream, "other", id="0")  # a group, not the workers' one
    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        call(rclient, scoring.take(q, "w", 2))
    with pytest.raises(redis.ResponseError, match="NOGROUP"):  # XAUTOCLAIM first, as the worker sees it
        run(rclient, scoring.claim(q, "w", "0-0", idle_ms=1, count=2, block_ms=10))
    assert (rclient.xlen(q.stream), rclient.llen(q.backlog("ds-00000000000a")), int(rclient.get(q.waiting))) == (
        1,
        2,
        2,
    )
    scoring.ensure_group(rclient, q.stream)
    assert [d.item_ids for d in _take(rclient, q, "w", 3)] == [["0"], ["1"], ["2"]]


def test_backpressure_and_metrics_count_the_backlogs(redis_url, keys, rclient) -> None:
    s = Settings(redis_url=redis_url, key_prefix=keys.prefix, chunk_pairs=1, fair_share_window=1, max_queue_chunks=5)
    with TestClient(create_app(s)) as api:
        ds = create(api)
        items = _items("A", 5, candidates=1)
        assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 5
        assert rclient.xlen(keys.stream(MODEL)) == 1  # one chunk in the stream, four in the backlog
        r = api.post(f"/v1/datasets/{ds}/items", json={"items": _items("B", 1, candidates=1)})
        assert r.status_code == 429 and "holds 5 chunks" in r.json()["detail"]
        assert "GRAPE_MAX_QUEUE_CHUNKS" in r.json()["detail"]
        parsed = samples(api.get("/metrics").text)
        assert value(parsed, "grape_queue_entries", model=MODEL, task="logprob") == 5


def test_a_dataset_deleted_while_queued_leaves_nothing_behind(api, keys, rclient, model_path, worker_factory) -> None:
    q = keys.score_queue("logprob", MODEL)
    a, b = create(api), create(api)
    api.post(f"/v1/datasets/{a}/items", json={"items": _items("A", 200)})  # 25 chunks of 16 pairs
    api.post(f"/v1/datasets/{b}/items", json={"items": _items("B", 16)})
    assert rclient.lrange(q.ring, 0, -1) == [a.encode(), b.encode()]
    assert run(rclient, scoring.queued(keys, MODEL)) == 25 + 2
    assert api.delete(f"/v1/datasets/{a}").status_code == 204
    # A's chunks waiting for their turn are gone at once; those in the stream are dropped by the worker
    assert rclient.lrange(q.ring, 0, -1) == [b.encode()] and not rclient.exists(q.backlog(a))
    in_stream = sum(1 for _, f in rclient.xrange(q.stream) if f[b"ds"] == a.encode())
    assert int(rclient.get(q.waiting)) == 2 - (rclient.xlen(q.stream) - in_stream)
    assert run(rclient, scoring.queued(keys, MODEL)) == rclient.xlen(q.stream) + int(rclient.get(q.waiting))
    worker_factory(backend=load_backend("null", BackendConfig(model=model_path)))
    st = wait_done(api, b, timeout=120)
    assert (st["scored_candidates"], st["failed_items"]) == (32, 0)
    _wait(lambda: rclient.xlen(q.stream) == 0, 60, "the deleted dataset's entries are dropped")
    assert api.get(f"/v1/datasets/{a}").status_code == 404
    assert not rclient.exists(keys.scores(a)) and not rclient.exists(keys.items(a))  # not recreated
    _drained(rclient, keys)


def test_a_score_kind_requested_later_is_queued_in_turn(api, keys, rclient) -> None:
    ds = create(api)
    api.post(f"/v1/datasets/{ds}/items", json={"items": _items("A", 80)})  # 10 chunks of 16 pairs
    r = api.post(f"/v1/datasets/{ds}/scores", json={"scores": ["unconditioned"]})
    assert r.status_code == 202 and r.json()["queued_tasks"] == ["unconditioned"]
    q = keys.score_queue("unconditioned", MODEL)
    window = Settings().fair_share_window
    assert (rclient.xlen(q.stream), int(rclient.get(q.waiting))) == (window, 10 - window)
    assert rclient.lrange(q.ring, 0, -1) == [ds.encode()] and rclient.llen(q.backlog(ds)) == 10 - window
    assert api.delete(f"/v1/datasets/{ds}").status_code == 204
    assert rclient.llen(q.ring) == 0 and int(rclient.get(q.waiting)) == 0 and not rclient.exists(q.backlog(ds))


def test_a_stopped_worker_hands_its_chunks_back_ahead_of_the_backlogs(api, keys, rclient, model_path, worker_factory):
    """SIGTERM (stop) while a batch is in the backend and more are read ahead, with chunks waiting in the
    backlog: nothing stays pending, every item is scored, in the stream or in the backlog exactly once, and
    the next worker scores each candidate once."""
    q = keys.score_queue("logprob", MODEL)
    ds = create(api)
    items = _items("A", 80)  # 10 chunks of 16 pairs: 8 in the stream, 2 in the backlog
    api.post(f"/v1/datasets/{ds}/items", json={"items": items})
    rec = Recorder(load_backend("null", BackendConfig(model=model_path)), "-", 1)
    w = worker_factory(backend=rec, read_count=2)
    assert rec.started(120)
    _wait(lambda: rclient.xpending(q.stream, GROUP)["pending"] >= 6, 60, "the worker reads ahead")
    w.stop()
    rec.go()
    _wait(lambda: not rclient.exists(keys.worker(w.name)), 60, "the worker stops")
    assert rclient.xpending(q.stream, GROUP)["pending"] == 0
    in_stream = [i for _, f in rclient.xrange(q.stream) for i in scoring.parse_entry(f)[1]]
    in_backlog = [
        i for c in rclient.lrange(q.backlog(ds), 0, -1) for i in scoring.parse_entry({"ds": ds, "items": c})[1]
    ]
    scored = [k.decode() for k in rclient.hkeys(keys.scores(ds))]
    assert 0 < len(scored) < 80 and in_backlog  # stopped mid-way, with chunks still waiting their turn
    assert sorted(scored + in_stream + in_backlog) == sorted(it["id"] for it in items)
    assert in_backlog == [it["id"] for it in items[64:]]  # the hand-back went into the stream, ahead of them
    rec.release()
    worker_factory(backend=load_backend("null", BackendConfig(model=model_path)))
    st = wait_done(api, ds, timeout=120)
    assert (st["scored_candidates"], st["failed_items"], rec.pairs["A"]) == (160, 0, len(scored) * 2)
    _drained(rclient, keys)
