"""The Redis protocol on a real Redis: idempotent results, reclaiming from dead consumers, poison items; the
store's stream functions (grape.store.scoring, grape.store.logs) one by one."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio

from grape.keys import GROUP, Keys
from grape.store import datasets, logs, scoring
from grape.store.io import arun, call, run
from grape.store.jobqueue import log_fields
from grape.store.scoring import Delivery, ItemResult, results
from tests.conftest import MODEL, create, load_pool, wait_done
from workers.loop import Worker


def test_a_redelivered_result_overwrites_and_never_double_counts(api, rclient, keys) -> None:
    ds = create(api)
    api.post(f"/v1/datasets/{ds}/items", json={"items": load_pool(1, max_chars=50, candidates=2)})
    item_id = load_pool(1)[0]["id"]
    res = ItemResult(item_id, 2, scores=[{"logprob_sum": -3.0, "tokens": 3, "prompt_tokens": 5}] * 2)
    for _ in range(3):
        call(rclient, results(keys, "logprob", MODEL, ds, "", time.time(), [res]))
    st = api.get(f"/v1/datasets/{ds}").json()
    assert (st["scored_items"], st["scored_candidates"], st["tokens_scored"], st["state"]) == (1, 2, 16, "done")
    # a late failure report for an item already scored changes nothing
    call(rclient, results(keys, "logprob", MODEL, ds, "", time.time(), [ItemResult(item_id, 2, error="late")]))
    st = api.get(f"/v1/datasets/{ds}").json()
    assert (st["scored_items"], st["failed_items"]) == (1, 0)


def test_chunk_of_a_dead_consumer_is_reclaimed_and_finished(api, rclient, keys, hf_backend, worker_factory) -> None:
    ds = create(api)
    api.post(f"/v1/datasets/{ds}/items", json={"items": load_pool(2, start=40, max_chars=150, candidates=2)})
    stream = keys.stream(MODEL)
    dead = Worker(rclient, keys, MODEL, hf_backend, name="dead-one")
    dead.ensure_group()
    taken = rclient.xreadgroup(GROUP, "dead-one", {stream: ">"}, count=10)  # ...and then it "dies"
    assert taken and len(taken[0][1]) == 1
    assert rclient.xpending(stream, GROUP)["pending"] == 1
    worker_factory(claim_idle_ms=300, name="live-one")
    st = wait_done(api, ds, timeout=120)
    assert (st["scored_items"], st["failed_items"]) == (2, 0)
    assert rclient.xpending(stream, GROUP)["pending"] == 0
    assert rclient.xlen(stream) == 0  # acked entries are deleted: payloads are not kept twice


def test_poison_item_fails_alone_after_max_deliveries(api, rclient, keys, hf_backend, worker_factory) -> None:
    items = load_pool(3, start=50, max_chars=150, candidates=2)
    ds = create(api)
    api.post(f"/v1/datasets/{ds}/items", json={"items": items})
    stream = keys.stream(MODEL)
    Worker(rclient, keys, MODEL, hf_backend).ensure_group()
    ((entry_id, _),) = rclient.xreadgroup(GROUP, "crashy", {stream: ">"}, count=1)[0][1]
    # the first item was scored before the crash; then workers kept dying on the second one
    scored = ItemResult(items[0]["id"], 2, scores=[{"logprob_sum": -1.0, "tokens": 1, "prompt_tokens": 1}] * 2)
    call(rclient, results(keys, "logprob", MODEL, ds, "", time.time(), [scored]))
    for _ in range(3):  # three more deliveries that "died": delivery count now 4
        rclient.xclaim(stream, GROUP, "crashy", min_idle_time=0, message_ids=[entry_id])
    worker_factory(claim_idle_ms=200, max_deliveries=3)
    st = wait_done(api, ds, timeout=120)
    assert st["failed_items"] == 1
    failed = api.get(f"/v1/datasets/{ds}/items/{items[1]['id']}").json()
    assert failed["state"] == "failed" and "worker died or stalled" in failed["error"]
    assert api.get(f"/v1/datasets/{ds}/items/{items[2]['id']}").json()["state"] == "scored"
    dead = rclient.xrange(keys.dead(MODEL))
    assert len(dead) == 1 and dead[0][1][b"item"] == items[1]["id"].encode()


def _claim(rclient: redis.Redis, stream: str, consumer: str, **kw: int) -> tuple[str, list, list]:
    kw = {"idle_ms": 60_000, "count": 10, "block_ms": 10, **kw}
    return run(rclient, scoring.claim(stream, consumer, cursor="0-0", **kw))


def test_claim_reads_new_entries_then_reclaims_idle_ones_with_their_delivery_count(rclient, keys) -> None:
    stream = keys.stream(MODEL)
    with pytest.raises(redis.ResponseError, match="NOGROUP"):  # the worker recreates a lost group on this
        _claim(rclient, stream, "a")
    scoring.ensure_group(rclient, stream)
    scoring.ensure_group(rclient, stream)  # an existing group is no error
    ids = [rclient.xadd(stream, scoring.entry("ds-1", [f"i{n}", f"j{n}"])).decode() for n in range(3)]
    _, reclaimed, fresh = _claim(rclient, stream, "a", count=2)
    assert reclaimed == [] and fresh == [Delivery(ids[n], "ds-1", [f"i{n}", f"j{n}"], 1) for n in range(2)]
    time.sleep(0.05)
    # "a" went silent: "b" takes its two entries over (second delivery) and reads the third, new
    _, reclaimed, fresh = _claim(rclient, stream, "b", idle_ms=20, count=3)
    assert [(d.id, d.deliveries) for d in reclaimed] == [(ids[0], 2), (ids[1], 2)]
    assert fresh == [Delivery(ids[2], "ds-1", ["i2", "j2"], 1)]
    # nothing new and nothing idle: an empty answer after blocking block_ms
    assert _claim(rclient, stream, "b", idle_ms=60_000)[1:] == ([], [])


def test_touch_keeps_a_slow_consumers_entries_from_looking_idle(rclient, keys) -> None:
    stream = keys.stream(MODEL)
    scoring.ensure_group(rclient, stream)
    entry_id = rclient.xadd(stream, scoring.entry("ds-1", ["i"])).decode()
    _claim(rclient, stream, "slow")
    time.sleep(0.15)
    run(rclient, scoring.touch(stream, "slow", [entry_id]))
    assert _claim(rclient, stream, "other", idle_ms=100)[1] == []
    time.sleep(0.15)
    assert [d.id for d in _claim(rclient, stream, "other", idle_ms=100)[1]] == [entry_id]


def test_written_flags_start_time_dead_letter_and_requeue(rclient, keys) -> None:
    ds = "ds-000000000001"
    rclient.hset(keys.task_results(ds, "rating"), "b", "{}")
    assert run(rclient, scoring.written(keys, "rating", ds, ["a", "b", "c"])) == [False, True, False]
    run(rclient, scoring.mark_started(keys, "rating", [ds], 100.0))
    run(rclient, scoring.mark_started(keys, "rating", [ds], 200.0))  # the first start is kept
    assert rclient.hget(keys.task_stats(ds, "rating"), "t_start") == b"100.000"
    assert rclient.hget(keys.stats(ds), "t_start") is None
    run(rclient, scoring.dead_letter(keys, "rating", MODEL, ds, "1-1", "a", "it killed workers"))
    ((_, fields),) = rclient.xrange(keys.task_dead("rating", MODEL))
    assert fields == {b"ds": ds.encode(), b"entry": b"1-1", b"item": b"a", b"error": b"it killed workers"}
    run(rclient, scoring.requeue(keys.task_stream("rating", MODEL), ds, ["b", "c"]))
    ((_, fields),) = rclient.xrange(keys.task_stream("rating", MODEL))
    assert scoring.parse_entry(fields) == (ds, ["b", "c"])
    assert run(rclient, datasets.exists(keys, ds)) is False
    rclient.hset(keys.dataset(ds), "name", "x")
    assert run(rclient, datasets.exists(keys, ds)) is True


def _gateway(redis_url: str, plan):  # the gateway's driver: asyncio client, as service/ runs these plans
    async def go():
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await arun(client, plan)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_queue_depths_and_dead_letters_by_model_and_task(rclient, redis_url, keys) -> None:
    assert _gateway(redis_url, scoring.queue_depths(keys)) == ({}, {})
    stream, extra = keys.stream(MODEL), keys.task_stream("rating", "org/judge:v1")
    scoring.ensure_group(rclient, stream)
    for n in range(3):
        rclient.xadd(stream, scoring.entry("ds-1", [str(n)]))
    rclient.xadd(extra, scoring.entry("ds-1", ["x"]))  # no worker read it yet: no group, no pending
    _claim(rclient, stream, "w", count=2)
    rclient.xadd(keys.task_dead("rating", "org/judge:v1"), {"ds": "ds-1"})
    assert _gateway(redis_url, scoring.queued(keys, MODEL)) == 3
    assert _gateway(redis_url, scoring.queue_depths(keys)) == (
        {(MODEL, "logprob"): (3, 2), ("org/judge%3Av1", "rating"): (1, 0)},
        {("org/judge%3Av1", "rating"): 1},
    )


def test_log_pages_after_a_record_and_waiting_for_the_next(rclient, redis_url, keys: Keys) -> None:
    log_key = keys.training.log("job-000000000001")
    ids = [rclient.xadd(log_key, log_fields(f"m{n}", step=n)).decode() for n in range(3)]
    first = _gateway(redis_url, logs.page(log_key, "0-0", 2))
    assert [(r["id"], r["msg"], r["level"], r["data"]) for r in first] == [
        (ids[0], "m0", "info", {"step": 0}),
        (ids[1], "m1", "info", {"step": 1}),
    ]
    assert [r["id"] for r in _gateway(redis_url, logs.page(log_key, ids[0]))] == ids[1:]
    assert _gateway(redis_url, logs.wait(log_key, ids[2], 10)) is False
    assert _gateway(redis_url, logs.wait(log_key, ids[1], 10)) is True
