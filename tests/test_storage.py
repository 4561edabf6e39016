"""Bytes per pair in Redis (issue 20): items stored compressed, scores with their field names once; every record
reads back exactly as written, and records stored before this encoding still read."""

from __future__ import annotations

import random
import time
import zlib

import orjson
import pytest
import zstandard
from conftest import MODEL, POOL, create, ndjson

from grape.keys import Keys
from grape.store import codec, scoring
from grape.store import datasets as store
from grape.store.io import call, pages, run


def real_items(n: int, start: int = 0) -> list[dict]:
    """n items of the dev pool as they are (full responses: the bytes per pair depend on them)."""
    lines = POOL.read_bytes().splitlines()[start : start + n]
    return [orjson.loads(line) for line in lines]


def worker_scores(item: dict, rng: random.Random) -> list[dict]:
    """Scores shaped as a real worker writes them."""
    out = []
    for c in item["candidates"]:
        tokens = max(1, len(c["response"]) // 4)
        out.append({"logprob_sum": -tokens * rng.uniform(0.3, 2.5), "tokens": tokens, "prompt_tokens": 40})
    return out


def new_dataset(rclient, keys: Keys) -> tuple[str, dict[str, str]]:
    ds = run(rclient, store.create(keys, {"name": "t", "target_model": MODEL}))
    return ds, run(rclient, store.require_meta(keys, ds))


def write_scores(rclient, keys: Keys, ds: str, scores: dict[str, list[dict]], candidates: dict[str, int]) -> None:
    rows = [scoring.ItemResult(i, candidates[i], scores=s) for i, s in scores.items()]
    call(rclient, scoring.results(keys, "logprob", MODEL, ds, "", time.time(), rows))


ODD_ITEMS = [
    # a chat item, non-ASCII text, escapes, a tiny item
    {
        "messages": [{"role": "system", "content": "Tu es bref."}, {"role": "user", "content": "Ça va ? 日本語 🍇"}],
        "candidates": [{"source": "a", "response": 'Oui.\n\t"quoted" \\ \u2028'}, {"source": "b", "response": "x"}],
        "id": "chat-1",
    },
    {"instruction": "🍇🫐🥝🍋🍉", "candidates": [{"source": "c0", "response": "日本語のテキスト、ですね"}], "id": "t"},
]


def test_items_and_scores_read_back_exactly(rclient, keys) -> None:
    ds, meta = new_dataset(rclient, keys)
    items = real_items(40) + ODD_ITEMS
    call(rclient, scoring.ingest(keys, ds, meta, items))
    raw = rclient.hgetall(keys.items(ds))
    assert all(raw[it["id"].encode()][:1] == codec.PARTS for it in items[:40])
    assert raw[b"t"][:1] == b"{"  # too small to gain from a zstd frame's header: kept as JSON
    rng = random.Random(1)
    scores = {it["id"]: worker_scores(it, rng) for it in items}
    # edge values: exact floats, a negative zero, huge and tiny magnitudes, and a result whose dicts differ
    scores["t"] = [{"logprob_sum": -0.0, "tokens": 1, "prompt_tokens": 2**40}]
    scores["chat-1"] = [
        {"logprob_sum": -1e-300, "tokens": 3, "prompt_tokens": 5},
        {"tokens": 1, "prompt_tokens": 5, "logprob_sum": -1.7976931348623157e308},  # another field order
    ]
    write_scores(rclient, keys, ds, scores, {it["id"]: len(it["candidates"]) for it in items})
    assert rclient.hget(keys.scores(ds), items[0]["id"])[:1] == codec.COLUMNS
    assert rclient.hget(keys.scores(ds), "chat-1")[:1] == b"["  # fields differ: plain JSON

    nxt: int | None = 0
    stored: list[dict] = []
    while nxt is not None:
        page, nxt = run(rclient, store.items_page(keys, ds, nxt))
        stored += page
    assert orjson.dumps(stored) == orjson.dumps(items)  # same values, same key order
    for it in items:
        one = run(rclient, store.item(keys, ds, it["id"]))
        assert one.item == it and orjson.dumps(one.scores) == orjson.dumps(scores[it["id"]])
    scored = [row for page in pages(rclient, store.scored(keys, ds)) for row in page]
    assert [r.item for r in scored] == items
    assert orjson.dumps([r.scores for r in scored]) == orjson.dumps([scores[it["id"]] for it in items])
    # the worker's read of a chunk
    _, chunks = run(rclient, store.load_chunks(keys, [(ds, [items[3]["id"], "chat-1"])], set()))
    assert chunks == [[items[3], ODD_ITEMS[0]]]


def deflate_record(item: dict) -> bytes:
    """An item record as the code before zstd wrote it (GRAPE_ITEM_COMPRESSION=1 then): 0x01 and raw deflate."""
    return codec.DEFLATE + zlib.compress(orjson.dumps(item), 1, wbits=-15)


def one_frame_record(item: dict) -> bytes:
    """An item record as the code before the parts wrote it: 0x03 and one zstd frame of the whole JSON."""
    return codec.ZSTD + zstandard.ZstdCompressor(level=1).compress(orjson.dumps(item))


def test_records_stored_before_the_encoding_still_read(rclient, keys) -> None:
    ds, _ = new_dataset(rclient, keys)
    items = real_items(4, start=100)
    scores = [[{"logprob_sum": -12.5, "tokens": 4, "prompt_tokens": 9}] * len(it["candidates"]) for it in items]
    # the plain JSON records of the code before issue 20, a deflate one of the code before zstd, one zstd frame of
    # the code before the parts, and one of now
    items.append({**items[0], "id": "one-frame"})
    scores.append(scores[0])
    records = [
        orjson.dumps(items[0]),
        orjson.dumps(items[1]),
        deflate_record(items[2]),
        codec.encode_item(items[3]),
        one_frame_record(items[4]),
    ]
    assert [r[:1] for r in records] == [b"{", b"{", codec.DEFLATE, codec.PARTS, codec.ZSTD]
    for it, rec, sc in zip(items, records, scores, strict=True):
        rclient.hset(keys.items(ds), it["id"], rec)
        rclient.hset(keys.scores(ds), it["id"], orjson.dumps(sc))
        rclient.rpush(keys.order(ds), it["id"])
    rclient.hset(keys.task_results(ds, "rating"), items[0]["id"], orjson.dumps([{"rating": 7.5}]))
    one = run(rclient, store.item(keys, ds, items[0]["id"]))
    assert (one.item, one.scores, one.extra) == (items[0], scores[0], {"rating": [{"rating": 7.5}]})
    assert run(rclient, store.item(keys, ds, items[2]["id"])).item == items[2]
    scored = [row for page in pages(rclient, store.scored(keys, ds)) for row in page]
    assert [(r.item, r.scores) for r in scored] == list(zip(items, scores, strict=True))
    _, chunks = run(rclient, store.load_chunks(keys, [(ds, [items[1]["id"], items[2]["id"]])], set()))
    assert chunks == [[items[1], items[2]]]


def test_every_stored_form_of_the_dev_pool_reads_back_exactly() -> None:
    """Each item of the pool, as plain JSON, deflate (before zstd) and zstd at the levels one may set."""
    for it in real_items(403) + ODD_ITEMS:
        want = orjson.dumps(it)
        forms = [want, deflate_record(it), one_frame_record(it), *(codec.encode_item(it, level) for level in (1, 3, 9))]
        for rec in forms:
            assert orjson.dumps(codec.decode_item(rec)) == want
            assert orjson.dumps(codec.decode_item(bytes(rec).decode("latin-1").encode("latin-1"))) == want
        assert orjson.dumps(codec.decode_item(want.decode())) == want  # a str from a decoding client


def _without_responses_but(item: dict, keep: set[int]) -> dict:
    return {**item, "candidates": [c if j in keep else {**c, "response": ""} for j, c in enumerate(item["candidates"])]}


def test_an_export_reads_only_the_responses_it_emits_from_every_form() -> None:
    """`decode_item_for`: of a record in parts, the rest of the item exactly (key order too) with the chosen
    candidates' responses and every other response empty; of a record in an older form, the whole item."""
    tiny = {"id": "tiny", "instruction": "Say x. " * 40, "candidates": [{"source": "a", "response": "x"}] * 3}
    for it in [*real_items(403), *ODD_ITEMS, tiny]:
        rec = codec.encode_item(it)
        n = len(it["candidates"])
        for keep in ({0}, {n - 1}, set(range(n)), {0, n - 1}, set()):
            assert orjson.dumps(codec.decode_item_for(rec, keep)) == orjson.dumps(
                _without_responses_but(it, keep) if rec[:1] == codec.PARTS else it
            )
        assert codec.decode_item_for(rec, {n, -1}) == codec.decode_item_for(rec, set())  # no such candidate
        for old in (orjson.dumps(it), deflate_record(it), one_frame_record(it)):
            assert codec.decode_item_for(old, {0}) == it
    rec = codec.encode_item(tiny)
    assert rec[:1] == codec.PARTS  # its short responses are stored as they are (a frame would be longer)
    assert orjson.dumps(codec.decode_item(rec)) == orjson.dumps(tiny)


def test_an_item_of_another_shape_is_stored_in_one_frame() -> None:
    """A candidate without a string response (protocol tests store such items) cannot be split in parts."""
    base = real_items(1, start=50)[0]
    for odd in ({"source": "a"}, {"source": "a", "response": None}, {"source": "a", "response": ["x"]}):
        it = {**base, "candidates": [*base["candidates"], odd]}
        rec = codec.encode_item(it)
        assert rec[:1] == codec.ZSTD and codec.decode_item(rec) == it


def test_the_parts_cost_at_most_40_percent_more_bytes_than_one_frame() -> None:
    items = real_items(403)
    parts = sum(len(codec.encode_item(it)) for it in items)
    one = sum(len(one_frame_record(it)) for it in items)
    assert one < parts <= 1.4 * one, (parts, one)


def test_zstd_is_smaller_than_the_deflate_it_replaced() -> None:
    items = real_items(403)
    zstd = sum(len(one_frame_record(it)) for it in items)
    deflate = sum(len(deflate_record(it)) for it in items)
    plain = sum(len(orjson.dumps(it)) for it in items)
    assert zstd < deflate < plain / 2, (zstd, deflate, plain)


@pytest.mark.parametrize("level", [0, 1, 6])
def test_codec_round_trips_at_every_level(level: int) -> None:
    for it in real_items(5, start=200):
        rec = codec.encode_item(it, level)
        assert orjson.dumps(codec.decode_item(rec)) == orjson.dumps(it)
        assert (rec[:1] == b"{") == (level == 0) and len(rec) <= len(orjson.dumps(it))
        assert rec[:1] in (b"{", codec.PARTS)
    for it in ODD_ITEMS:  # small: compressed only when the frame is shorter than the JSON
        rec = codec.encode_item(it, level)
        assert orjson.dumps(codec.decode_item(rec)) == orjson.dumps(it) and len(rec) <= len(orjson.dumps(it))
    assert codec.decode_scores(codec.encode_scores([])) == []


def test_bytes_per_pair_of_the_dev_pool(rclient, keys) -> None:
    """A few hundred real pairs, stored and scored as the gateway and a worker do: <= 1.0 KB per pair (it was
    ~1.68 KB with the items' and the scores' JSON as they came)."""
    ds, meta = new_dataset(rclient, keys)
    items = real_items(50, start=150)
    pairs = sum(len(it["candidates"]) for it in items)
    assert pairs == 400
    for chunk in scoring.chunked(items, 128):
        call(rclient, scoring.ingest(keys, ds, meta, chunk))
    rng = random.Random(0)
    write_scores(
        rclient,
        keys,
        ds,
        {it["id"]: worker_scores(it, rng) for it in items},
        {it["id"]: len(it["candidates"]) for it in items},
    )
    parts = (keys.items(ds), keys.scores(ds), keys.order(ds), keys.stats(ds), keys.dataset(ds))
    used = {k: rclient.memory_usage(k, samples=0) for k in parts}
    per_pair = sum(used.values()) / pairs
    assert per_pair <= 1000, (per_pair, used)
    # and what the items alone took as plain JSON, for scale: the encoding is what made the difference
    plain = sum(len(orjson.dumps(it)) for it in items) / pairs
    assert plain > 1000, plain


def test_upload_through_the_gateway_stores_compressed_and_answers_the_same(api, rclient, keys) -> None:
    ds = create(api)
    items = real_items(6, start=300)
    r = api.post(f"/v1/datasets/{ds}/items", content=ndjson(items), headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 202 and r.json()["accepted"] == 6, r.text
    assert all(v[:1] == codec.PARTS for v in rclient.hvals(keys.items(ds)))
    got = api.get(f"/v1/datasets/{ds}/items/{items[2]['id']}").json()
    assert [(c["source"], c["response"]) for c in got["candidates"]] == [
        (c["source"], c["response"]) for c in items[2]["candidates"]
    ]
    assert got["instruction"] == items[2]["instruction"]


def test_compression_off_stores_plain_json(rclient, keys, settings) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(settings.model_copy(update={"item_compression": 0}))) as client:
        ds = create(client)
        items = real_items(2, start=10)
        assert client.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 2
    kept = [{"instruction": it["instruction"], "candidates": it["candidates"], "id": it["id"]} for it in items]
    assert sorted(rclient.hvals(keys.items(ds))) == sorted(orjson.dumps(it) for it in kept)  # the stored form
