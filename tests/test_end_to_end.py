"""Create, upload (JSON and NDJSON), score on the real model through real Redis, select."""

from __future__ import annotations

import orjson

from tests.conftest import create, load_pool, ndjson, wait_done


def _selection(api, ds: str, **params) -> list[dict]:
    r = api.get(f"/v1/datasets/{ds}/selection", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [orjson.loads(line) for line in r.text.splitlines() if line]


def test_grape_selection_end_to_end(api, worker_factory) -> None:
    items = load_pool(4, max_chars=300, candidates=4)
    ds = create(api)
    first = api.post(f"/v1/datasets/{ds}/items", json={"items": items[:2]})
    assert first.status_code == 202 and first.json()["accepted"] == 2
    second = api.post(
        f"/v1/datasets/{ds}/items", content=ndjson(items[2:]), headers={"Content-Type": "application/x-ndjson"}
    )
    assert second.status_code == 202 and second.json()["accepted"] == 2, second.text
    worker_factory()
    st = wait_done(api, ds)
    assert (st["items"], st["candidates"], st["scored_candidates"], st["failed_items"]) == (4, 16, 16, 0)
    assert st["tokens_scored"] > 0 and st["throughput_tokens_per_s"] > 0

    scored = {it["id"]: api.get(f"/v1/datasets/{ds}/items/{it['id']}").json() for it in items}
    selection = _selection(api, ds, strategy="grape", k=1, reduce="mean")
    assert [r["id"] for r in selection] == [it["id"] for it in items]  # upload order, one per instruction
    for rec, item in zip(selection, items, strict=True):
        means = [c["mean"] for c in scored[item["id"]]["candidates"]]
        best = max(range(len(means)), key=lambda i: (means[i], -i))
        assert rec["candidate"] == best
        assert rec["source"] == item["candidates"][best]["source"]
        assert abs(rec["score"] - means[best]) < 1e-9
        assert rec["messages"] == [
            {"role": "user", "content": item["instruction"]},
            {"role": "assistant", "content": item["candidates"][best]["response"]},
        ]
        assert [c["selected"] for c in scored[item["id"]]["candidates"]] == [i == best for i in range(4)]

    top2 = _selection(api, ds, k=2, reduce="sum")
    assert len(top2) == 8
    for item in items:
        sums = [c["logprob_sum"] for c in scored[item["id"]]["candidates"]]
        want = sorted(range(4), key=lambda i: (-sums[i], i))[:2]
        assert [r["candidate"] for r in top2 if r["id"] == item["id"]] == want


def test_reupload_is_not_scored_twice(api, worker_factory, rclient, keys) -> None:
    items = load_pool(2, start=5, max_chars=200, candidates=3)
    ds = create(api)
    api.post(f"/v1/datasets/{ds}/items", json={"items": items})
    worker_factory()
    before = wait_done(api, ds)
    again = api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()
    assert (again["accepted"], again["duplicates"]) == (0, 2)
    assert rclient.xlen(keys.stream("smollm2-135m")) == 0  # nothing new was queued
    after = api.get(f"/v1/datasets/{ds}").json()
    assert after["scored_candidates"] == before["scored_candidates"] == 6
    assert after["items"] == 2


def test_items_without_ids_get_content_ids_and_dedupe(api) -> None:
    item = {"instruction": "Say hi.", "candidates": [{"response": "Hi!"}, {"source": "b", "response": "Hello."}]}
    ds = create(api)
    a = api.post(f"/v1/datasets/{ds}/items", json={"items": [item]}).json()
    b = api.post(f"/v1/datasets/{ds}/items", json={"items": [item]}).json()
    assert (a["accepted"], b["duplicates"]) == (1, 1)


def test_too_long_pair_fails_its_item_and_the_rest_scores(api, worker_factory) -> None:
    items = load_pool(2, start=30, max_chars=200, candidates=2)
    long_item = {
        "id": "too-long",
        "instruction": "Repeat.",
        "candidates": [{"source": "short", "response": "ok"}, {"source": "huge", "response": "word " * 9000}],
    }
    ds = create(api)
    api.post(f"/v1/datasets/{ds}/items", json={"items": [items[0], long_item, items[1]]})
    worker_factory()
    st = wait_done(api, ds)
    assert (st["scored_items"], st["failed_items"], st["failed_candidates"]) == (2, 1, 2)
    failed = api.get(f"/v1/datasets/{ds}/items/too-long").json()
    assert failed["state"] == "failed"
    assert failed["error"].startswith("too long: candidate 1 (huge)")
    assert "max_model_len 8192" in failed["error"]
    failures = api.get(f"/v1/datasets/{ds}/failures").json()["failures"]
    assert [f["id"] for f in failures] == ["too-long"]
    assert [r["id"] for r in _selection(api, ds)] == [items[0]["id"], items[1]["id"]]


def test_plain_template_and_multi_turn_items(api, worker_factory) -> None:
    ds = create(api, template="plain")
    item = {
        "id": "mt",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
        "candidates": [{"source": "right", "response": "2 + 2 = 4."}, {"source": "odd", "response": "Purple."}],
    }
    assert api.post(f"/v1/datasets/{ds}/items", json={"items": [item]}).json()["accepted"] == 1
    worker_factory()
    wait_done(api, ds)
    (rec,) = _selection(api, ds)
    assert rec["messages"][:3] == item["messages"]
    assert rec["messages"][3]["role"] == "assistant"
    got = api.get(f"/v1/datasets/{ds}/items/mt").json()
    assert all(c["tokens"] > 0 and c["logprob_sum"] < 0 for c in got["candidates"])
