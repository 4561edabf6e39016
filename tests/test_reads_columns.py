"""Issue 20, the fast reads: the built-in strategies' column forms give exactly their row forms' picks; the items'
facts (written at ingest) replace the texts for deciding, and a dataset stored without them reads the same; the
`/summary` tally is kept in Redis, so a gateway that starts continues from it (and from another gateway's saves);
the new keys go with the dataset; tenancy is unchanged.

The whole-pool references are tests/reads_reference.py (frozen), as in tests/test_bounded_reads.py."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from fastapi.testclient import TestClient

from grape.keys import Keys
from grape.settings import Settings
from grape.store import datasets, scoring, summaries
from grape.store.io import call, pages, run
from grape.store.scoring import ItemResult, results
from grape.strategies import STRATEGIES, ScoredItem, SelectParams
from grape.strategies.columns import PairPage, SourceTable, columnar, draws
from grape.strategies.random import draw
from service import summary as summary_svc
from service.app import create_app
from tests import reads_reference as ref
from tests.conftest import MODEL, load_pool
from tests.test_bounded_reads import _rows, _write_scores

# ---- column forms against row forms --------------------------------------------------------------------


def test_draws_are_the_random_strategys_draw() -> None:
    ids = [f"item-{i}-{'é' * (i % 3)}" for i in range(3000)]
    cands = [1 + i % 13 for i in range(3000)]
    for seed in (0, 1, 12345):
        expected = [draw(i, n, seed) for i, n in zip(ids, cands, strict=True)]
        assert list(draws(ids, cands, seed)) == expected
        for take in (1, 2, 5):
            assert list(draws(ids, cands, seed, take)) == [(order[:take], u) for order, u in expected]


def _odd_rows(n: int, rng: random.Random) -> list[ScoredItem]:
    """Rows with ties everywhere: equal scores, equal lengths, repeated sources, 1 to 6 candidates."""
    rows = []
    for i in range(n):
        m = rng.randint(1, 6)
        cands = [{"source": rng.choice("abcd"), "response": "r" * rng.randint(1, 40)} for _ in range(m)]
        scores = [
            {
                "logprob_sum": -float(rng.choice([1, 2, 3, 4.5, 6])),
                "tokens": rng.choice([1, 2, 3, 4]),
                "prompt_tokens": 1,
            }
            for _ in range(m)
        ]
        rows.append(ScoredItem({"id": f"odd-{i}", "instruction": "x", "candidates": cands}, scores))
    return rows


def _row_picks(name: str, rows: list[ScoredItem], params: SelectParams) -> list[tuple[str, int, float, int]]:
    return [(p.item["id"], p.candidate, p.score, p.rank) for p in STRATEGIES.get(name)(rows, params)]


def _column_picks(
    name: str, rows: list[ScoredItem], params: SelectParams, sizes: list[int]
) -> list[tuple[str, int, float, int]]:
    col = columnar(STRATEGIES.get(name), params)
    assert col is not None, name
    table, out, start = SourceTable(), [], 0
    for size in sizes:
        page = PairPage.of_rows(rows[start : start + size], table)
        start += size
        picks = col.add(page)
        out += zip(picks.id_list(), picks.candidate.tolist(), picks.score.tolist(), picks.rank.tolist(), strict=True)
    picks = col.finish()
    out += zip(picks.id_list(), picks.candidate.tolist(), picks.score.tolist(), picks.rank.tolist(), strict=True)
    return out


@pytest.mark.parametrize("name", ["grape", "longest", "random", "source:b", "source:nobody"])
def test_column_forms_pick_exactly_what_the_row_forms_pick(name: str) -> None:
    rng = random.Random(5)
    rows = _odd_rows(700, rng)
    splits = [[700], [1] * 10 + [690], [rng.randint(1, 90) for _ in range(40)]]
    for params in [
        SelectParams(),
        SelectParams(k=2, reduce="sum", n=37, seed=3),
        SelectParams(k=3, n=5, seed=9),
        SelectParams(k=1, n=0),
        SelectParams(k=7, n=100_000),
        SelectParams(k=2, n=1),
    ]:
        expected = _row_picks(name, rows, params)
        for sizes in splits:
            sizes = [s for s in sizes if s]
            sizes.append(max(0, 700 - sum(sizes)))
            assert _column_picks(name, rows, params, sizes) == expected, (name, params, sizes[:5])


def test_a_zero_token_response_is_refused_by_the_column_forms_as_by_the_row_forms() -> None:
    rows = _odd_rows(50, random.Random(1))
    bad = rows[20]
    rows[20] = ScoredItem(bad.item, [{**s, "tokens": 0} for s in bad.scores])
    for name in ("grape", *(f"source:{c['source']}" for c in bad.item["candidates"][:1])):
        with pytest.raises(ValueError, match="zero tokens") as row_error:
            _row_picks(name, rows, SelectParams())
        with pytest.raises(ValueError) as col_error:
            _column_picks(name, rows, SelectParams(), [50])
        assert str(col_error.value) == str(row_error.value)
    # the sum needs no token count
    assert _column_picks("grape", rows, SelectParams(reduce="sum"), [50]) == _row_picks(
        "grape", rows, SelectParams(reduce="sum")
    )


# ---- facts: written at ingest, and a dataset without them reads the same -------------------------------


@pytest.fixture
def pool(settings: Settings, rclient: redis.Redis, keys: Keys) -> Iterator[tuple[TestClient, str, list[dict]]]:
    with TestClient(create_app(settings.model_copy(update={"chunk_pairs": 4096}))) as api:
        r = api.post("/v1/datasets", json={"name": "facts", "target_model": MODEL, "scores": ["logprob"]})
        ds = r.json()["id"]
        items = load_pool(120, max_chars=100_000)
        assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 120
        _write_scores(rclient, keys, ds, items)
        summary_svc._cache.clear()
        yield api, ds, items
        summary_svc._cache.clear()


def _answers(api: TestClient, ds: str, source: str) -> dict[str, Any]:
    """Every read the facts serve: selections, a comparison, both summaries."""
    out: dict[str, Any] = {}
    for name in ("grape", "longest", "random", f"source:{source}"):
        for q in ({}, {"k": 2, "n": 50, "seed": 4, "reduce": "sum"}):
            r = api.get(f"/v1/datasets/{ds}/selection", params={"strategy": name, **q})
            assert r.status_code == 200, r.text
            out[f"selection {name} {q}"] = r.content
    r = api.get(f"/v1/datasets/{ds}/compare", params={"strategies": f"grape,longest,random,source:{source}"})
    assert r.status_code == 200, r.text
    out["compare"] = {k: v for k, v in r.json().items() if k != "state"}
    for reduce in ("mean", "sum"):
        body = api.get(f"/v1/datasets/{ds}/summary", params={"reduce": reduce}).json()
        body.pop("computed_at")
        out[f"summary {reduce}"] = body
    return out


def _forget_summaries(rclient: redis.Redis, keys: Keys, ds: str) -> None:
    summary_svc._cache.clear()
    rclient.delete(*summaries.all_keys(keys, ds))


def test_facts_are_stored_at_ingest_and_a_dataset_without_them_reads_the_same(
    pool: tuple[TestClient, str, list[dict]], rclient: redis.Redis, keys: Keys
) -> None:
    api, ds, items = pool
    stored = rclient.hgetall(keys.facts(ds))
    assert len(stored) == len(items)
    it = items[7]
    assert orjson.loads(stored[it["id"].encode()]) == [
        [len(c["response"]) for c in it["candidates"]],
        [c["source"] for c in it["candidates"]],
    ]
    source = items[0]["candidates"][2]["source"]
    with_facts = _answers(api, ds, source)
    # the reference: the whole-pool implementation over the whole rows
    rows = _rows(rclient, keys, ds, ())
    olds = {"grape": STRATEGIES.get("grape"), "longest": ref.longest, "random": ref.random_select}
    expected = ref.compare(rows, {**olds, f"source:{source}": STRATEGIES.get(f"source:{source}")}, SelectParams(), 100)
    assert {k: with_facts["compare"][k] for k in expected} == expected
    # half of the items lose their facts (stored before facts existed), then all of them
    half = [it["id"] for it in items[::2]]
    rclient.hdel(keys.facts(ds), *half)
    _forget_summaries(rclient, keys, ds)
    assert _answers(api, ds, source) == with_facts
    rclient.delete(keys.facts(ds))
    _forget_summaries(rclient, keys, ds)
    assert _answers(api, ds, source) == with_facts


# ---- the summary kept in Redis ---------------------------------------------------------------------------


def _reference(rclient: redis.Redis, keys: Keys, ds: str, reduce: str = "mean") -> dict[str, Any]:
    rows = _rows(rclient, keys, ds, ())
    tally = ref.Tally(reduce)
    for start in range(0, len(rows), datasets.PAGE):
        tally.add(rows[start : start + datasets.PAGE])
    out = tally.summary(ds, 100).model_dump()
    out.pop("computed_at")
    return out


def _same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """Equal, the mean scores to 1e-12 (a kept tally adds the scores in the order they arrived)."""
    got, expected = dict(got), dict(expected)
    got.pop("computed_at", None)
    for g, e in zip(got.pop("sources"), expected.pop("sources"), strict=True):
        g, e = dict(g), dict(e)
        assert g.pop("mean_score") == pytest.approx(e.pop("mean_score"), rel=1e-12)
        assert g == e
    assert got == expected


def _score_items(rclient: redis.Redis, keys: Keys, ds: str, items: list[dict], seed: int) -> None:
    rng = random.Random(seed)
    rows = [
        ItemResult(
            it["id"],
            len(it["candidates"]),
            [
                {"logprob_sum": -rng.uniform(0.1, 3) * (j + 2), "tokens": j + 2, "prompt_tokens": 3}
                for j in range(len(it["candidates"]))
            ],
        )
        for it in items
    ]
    for start in range(0, len(rows), 200):
        call(rclient, results(keys, "logprob", MODEL, ds, "", time.time(), rows[start : start + 200]))


def _synthetic(n: int) -> list[dict]:
    return [
        {
            "id": f"k-{i:06d}",
            "instruction": f"say {i}",
            "candidates": [{"source": s, "response": f"{s} {i} " + "y" * ((i * 3 + len(s)) % 90)} for s in "abcd"],
        }
        for i in range(n)
    ]


class Reads:
    """Counts the ids a summary reads (grape.store.datasets.pairs_of, the one read a refresh makes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ids: list[str] = []
        real = datasets.pairs_of

        def counting(keys: Keys, dataset_id: str, item_ids: list[str], *a: Any, **kw: Any) -> Any:
            self.ids += item_ids
            return real(keys, dataset_id, item_ids, *a, **kw)

        monkeypatch.setattr(summary_svc.store, "pairs_of", counting)

    def take(self) -> int:
        n, self.ids = len(self.ids), []
        return n


def test_a_fresh_gateway_continues_from_the_stored_summary(
    settings: Settings, rclient: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = Reads(monkeypatch)
    items = _synthetic(3000)
    with TestClient(create_app(settings.model_copy(update={"chunk_pairs": 4096}))) as api:
        ds = api.post("/v1/datasets", json={"name": "kept", "target_model": MODEL}).json()["id"]
        for start in range(0, len(items), 1000):
            api.post(f"/v1/datasets/{ds}/items", json={"items": items[start : start + 1000]})
        _score_items(rclient, keys, ds, items[:2000], 1)
        summary_svc._cache.clear()
        first = api.get(f"/v1/datasets/{ds}/summary").json()
        assert first["scored_items"] == 2000 and reads.take() >= 2000  # from scratch: read once
        _same(first, _reference(rclient, keys, ds))
        assert rclient.hget(keys.summary(ds, "mean"), "gen") == b"1"
        assert rclient.strlen(keys.summary(ds, "mean", "all")) == 8 * 2000 * 4

        summary_svc._cache.clear()  # a gateway that starts now: the stored tally, nothing read
        again = api.get(f"/v1/datasets/{ds}/summary").json()
        assert reads.take() == 0
        again.pop("computed_at")
        first.pop("computed_at")
        assert again == first

        _score_items(rclient, keys, ds, items[2000:2100], 2)  # more scores arrive
        summary_svc._cache.clear()
        later = api.get(f"/v1/datasets/{ds}/summary").json()
        assert later["scored_items"] == 2100 and reads.take() <= datasets.COLUMN_PAGE
        _same(later, _reference(rclient, keys, ds))
        assert rclient.hget(keys.summary(ds, "mean"), "gen") == b"2"

        # two gateways taking turns: each continues from the other's save, never counting an item twice
        mine, theirs = summary_svc._cache, type(summary_svc._cache)()
        for turn, end in enumerate(range(2200, 3001, 100)):
            _score_items(rclient, keys, ds, items[end - 100 : end], 10 + turn)
            monkeypatch.setattr(summary_svc, "_cache", mine if turn % 2 else theirs)
            got = api.get(f"/v1/datasets/{ds}/summary").json()
            assert got["scored_items"] == end and reads.take() <= 2 * datasets.COLUMN_PAGE
            _same(got, _reference(rclient, keys, ds))
        sums = api.get(f"/v1/datasets/{ds}/summary", params={"reduce": "sum"}).json()
        _same(sums, _reference(rclient, keys, ds, "sum"))


def test_a_save_that_lost_the_race_is_refused_and_the_next_read_takes_the_stored_tally(
    settings: Settings, rclient: redis.Redis, keys: Keys
) -> None:
    items = _synthetic(300)
    with TestClient(create_app(settings.model_copy(update={"chunk_pairs": 4096}))) as api:
        ds = api.post("/v1/datasets", json={"name": "race", "target_model": MODEL}).json()["id"]
        api.post(f"/v1/datasets/{ds}/items", json={"items": items})
        _score_items(rclient, keys, ds, items[:100], 1)
        summary_svc._cache.clear()
        api.get(f"/v1/datasets/{ds}/summary")
        gen = rclient.hget(keys.summary(ds, "mean"), "gen").decode()
        # another gateway's save with a stale generation is refused and changes nothing
        before = {k: rclient.dump(k) for k in summaries.all_keys(keys, ds) if rclient.exists(k)}
        stale = summaries.save(keys, ds, "mean", str(int(gen) - 1), 0, {"all": 0, "chosen": 0}, b"x" * 8, b"")
        assert call(rclient, stale) == -1
        assert {k: rclient.dump(k) for k in before} == before
        # a save for a dataset that is gone creates nothing
        gone = "ds-0000000000ff"
        assert call(rclient, summaries.save(keys, gone, "mean", "", 0, {"all": 0, "chosen": 0}, b"", b"")) == -1
        assert not any(rclient.exists(k) for k in summaries.all_keys(keys, gone))
        # a stored tally newer than the kept one: the kept one is set aside
        _score_items(rclient, keys, ds, items[100:150], 2)
        kept = dict(summary_svc._cache)
        summary_svc._cache.clear()
        api.get(f"/v1/datasets/{ds}/summary")  # "another gateway" saves (gen + 1)
        summary_svc._cache.clear()
        summary_svc._cache.update(kept)  # this one still holds the tally of gen
        _score_items(rclient, keys, ds, items[150:200], 3)
        _same(api.get(f"/v1/datasets/{ds}/summary").json(), _reference(rclient, keys, ds))


def test_deleting_a_dataset_removes_its_facts_and_kept_summaries(
    api: TestClient, rclient: redis.Redis, keys: Keys
) -> None:
    ds = api.post("/v1/datasets", json={"name": "gone", "target_model": MODEL}).json()["id"]
    items = _synthetic(40)
    api.post(f"/v1/datasets/{ds}/items", json={"items": items})
    _score_items(rclient, keys, ds, items, 1)
    for reduce in ("mean", "sum"):
        assert api.get(f"/v1/datasets/{ds}/summary", params={"reduce": reduce}).status_code == 200
    made = [keys.facts(ds), *summaries.all_keys(keys, ds)]
    assert all(rclient.exists(k) for k in made)
    assert api.delete(f"/v1/datasets/{ds}").status_code == 204
    assert not any(rclient.exists(k) for k in made)
    assert list(rclient.scan_iter(match=f"{keys.prefix}:ds:{ds}*")) == []
    assert api.get(f"/v1/datasets/{ds}/summary").status_code == 404
    assert list(rclient.scan_iter(match=f"{keys.prefix}:ds:{ds}*")) == []


def test_another_tenants_summary_and_compare_answer_as_unknown_and_keep_nothing(
    redis_url: str, rclient: redis.Redis, keys: Keys
) -> None:
    tokens = {"alpha": "alpha-key-1", "beta": "beta-key-1"}
    s = Settings(redis_url=redis_url, key_prefix=keys.prefix, api_keys="alpha:alpha-key-1,beta:beta-key-1")

    def auth(who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[who]}"}

    with TestClient(create_app(s)) as c:
        ds = c.post("/v1/datasets", json={"name": "a", "target_model": MODEL}, headers=auth("alpha")).json()["id"]
        items = _synthetic(30)
        assert c.post(f"/v1/datasets/{ds}/items", json={"items": items}, headers=auth("alpha")).status_code == 202
        _score_items(rclient, keys, ds, items, 1)
        summary_svc._cache.clear()
        unknown = "ds-000000000000"
        for path in ("summary", "compare?strategies=grape,longest", "selection?strategy=grape"):
            theirs = c.get(f"/v1/datasets/{ds}/{path}", headers=auth("beta"))
            nobodys = c.get(f"/v1/datasets/{unknown}/{path}", headers=auth("beta"))
            assert theirs.status_code == nobodys.status_code == 404
            assert theirs.text.replace(ds, "<id>") == nobodys.text.replace(unknown, "<id>")
        assert not any(rclient.exists(k) for k in summaries.all_keys(keys, ds))
        assert c.get(f"/v1/datasets/{ds}/summary", headers=auth("alpha")).json()["scored_items"] == 30
        assert rclient.exists(keys.summary(ds, "mean"))


# ---- memory ----------------------------------------------------------------------------------------------


def test_bytes_per_pair_with_the_facts_stay_under_a_kilobyte(rclient: redis.Redis, keys: Keys) -> None:
    """The dev pool as a worker scores it, with the facts and a kept summary: <= 1.0 KB per pair in Redis."""
    ds = run(rclient, datasets.create(keys, {"name": "t", "target_model": MODEL}))
    meta = run(rclient, datasets.require_meta(keys, ds))
    items = load_pool(50, max_chars=100_000, start=150)
    pairs = sum(len(it["candidates"]) for it in items)
    for chunk in scoring.chunked(items, 128):
        call(rclient, scoring.ingest(keys, ds, meta, chunk))
    _score_items(rclient, keys, ds, items, 3)
    table = SourceTable()
    tally = summary_svc._Tally("mean")
    for got in pages(rclient, datasets.pair_pages(keys, ds, table=table)):
        for page, _ in got:
            tally.add_page(page)
    state = {**tally.state(), "pending": [], "all": len(tally.all_scores), "chosen": len(tally.chosen)}
    call(rclient, summaries.save(keys, ds, "mean", "", 0, state, tally.all_scores.tobytes(), tally.chosen.tobytes()))
    parts = [
        keys.items(ds), keys.facts(ds), keys.scores(ds), keys.order(ds), keys.stats(ds), keys.dataset(ds),
        *summaries.all_keys(keys, ds),
    ]  # fmt: skip
    used = {k: rclient.memory_usage(k, samples=0) or 0 for k in parts}
    assert sum(used.values()) / pairs <= 1000, used
    assert used[keys.facts(ds)] / pairs <= 60, used  # the facts: a few dozen bytes a pair


def test_held_ids_come_back_exactly() -> None:
    """A pool-wide strategy holds its picks' ids as one bytes array: any id comes back as it was."""
    from grape.strategies.columns import id_array, id_list

    ids = ["a", "ends in nul\x00", "\x00", "日本語 🍇", "x" * 256, "tab\tand\nnewline"]
    assert id_list(id_array(ids)) == ids
    assert id_list(id_array([])) == []
    rows = [
        ScoredItem(
            {"id": i, "candidates": [{"source": "s", "response": "r"}]}, [{"logprob_sum": -1.0, "tokens": n + 1}]
        )
        for n, i in enumerate(ids)
    ]
    assert [p[0] for p in _column_picks("longest", rows, SelectParams(n=3), [2, 4])] == [
        "tab\tand\nnewline",
        "x" * 256,
        "日本語 🍇",
    ]


def test_compare_of_a_pool_with_a_stored_result_that_does_not_fit_is_a_422(api, rclient, keys) -> None:
    """A result whose scores do not match its item's candidates is refused by name, not a 500: the comparison's
    counting raises a ValueError that must reach the route as itself (it came wrapped in an ExceptionGroup from
    the task group that counted the pages before)."""
    ds = api.post("/v1/datasets", json={"name": "misfit", "target_model": MODEL}).json()["id"]
    cands = [{"source": "a", "response": "hi"}, {"source": "b", "response": "hello"}]
    items = [{"id": f"i{j}", "instruction": "Say hi.", "candidates": cands} for j in range(3)]
    assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).status_code == 202
    one = {"logprob_sum": -1.0, "tokens": 2, "prompt_tokens": 3}
    call(
        rclient,
        results(keys, "logprob", MODEL, ds, "", time.time(), [ItemResult(it["id"], 2, [one] * 2) for it in items]),
    )
    rclient.hset(keys.scores(ds), "i1", orjson.dumps([one]))  # one score for two candidates
    r = api.get(f"/v1/datasets/{ds}/compare", params={"strategies": "grape,longest"})
    assert r.status_code == 422 and "do not match its candidates" in r.json()["detail"], r.text
