"""The Redis protocol on a real Redis: idempotent results, reclaiming from dead consumers, poison items."""

from __future__ import annotations

import time

from grape.keys import GROUP
from grape.store.io import call
from grape.store.scoring import ItemResult, results
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
