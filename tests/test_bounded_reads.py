"""Issue 20: reads in memory independent of the pool, summaries kept, and answers identical to the whole-pool
implementations they replaced (tests/reads_reference.py, frozen copies) on the real pool.

The real pool (403 instructions x 8 responses) is uploaded through the gateway and scored for every task with
synthetic, deterministic values through the real results script (tests/test_selection_parity.py)."""

from __future__ import annotations

import random
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from fastapi.testclient import TestClient

from grape.keys import Keys
from grape.score_kinds import SCORE_KINDS, encode_vector
from grape.settings import Settings
from grape.store import datasets
from grape.store.io import call, pages
from grape.store.scoring import ItemResult, results
from grape.strategies import STRATEGIES, ScoredItem, SelectParams
from service import summary as summary_svc
from service.app import create_app
from tests import reads_reference as ref
from tests.conftest import MODEL, load_pool


def _write_scores(r: redis.Redis, keys: Keys, ds: str, items: list[dict]) -> None:
    """Every task's results, deterministic; a few items failed or unscored, a few lacking an extra result."""
    rng = random.Random(29)
    rows: dict[str, list[ItemResult]] = {t: [] for t in ("logprob", "unconditioned", "rating", "embedding")}
    for i, it in enumerate(items):
        n, iid = len(it["candidates"]), it["id"]
        if i % 97 == 5:
            continue  # never scored
        if i % 89 == 7:
            rows["logprob"].append(ItemResult(iid, n, error="synthetic failure"))
            continue
        tokens = [max(1, len(c["response"]) // 2) for c in it["candidates"]]
        rows["logprob"].append(
            ItemResult(
                iid, n, [{"logprob_sum": -rng.uniform(0.1, 3) * t, "tokens": t, "prompt_tokens": 4} for t in tokens]
            )
        )
        if i % 31 != 3:
            rows["unconditioned"].append(
                ItemResult(
                    iid, n, [{"logprob_sum": -rng.uniform(0.1, 4) * t, "tokens": t, "prompt_tokens": 1} for t in tokens]
                )
            )
        if i % 37 != 4:
            rating = [
                {
                    "complexity": rng.uniform(1, 6),
                    "quality": rng.uniform(1, 6),
                    "history": 0.0,
                    "tokens": 2,
                    "prompt_tokens": 0,
                }
                for _ in tokens
            ]
            rows["rating"].append(ItemResult(iid, n, rating))
        vectors = [encode_vector([rng.gauss(0, 1) for _ in range(6)]) for _ in tokens]
        embedding = [
            {"embedding": v, "dim": 6, "tokens": t, "prompt_tokens": 0} for v, t in zip(vectors, tokens, strict=True)
        ]
        rows["embedding"].append(ItemResult(iid, n, embedding))
    for task, got in rows.items():
        for start in range(0, len(got), 200):
            call(r, results(keys, task, MODEL, ds, "", time.time(), got[start : start + 200]))


OLD: dict[str, Any] = {
    "longest": ref.longest,
    "ifd": ref.ifd_select,
    "random": ref.random_select,
    "deita": ref.deita,
}
PARAM_SETS = [
    SelectParams(),
    SelectParams(k=1, reduce="mean", n=150, tau=0.9, seed=7),
    SelectParams(k=2, reduce="sum", n=333, tau=0.5, seed=3),
    SelectParams(k=3, n=100_000, seed=11),
    SelectParams(k=1, n=0),
]


def _old(name: str) -> Any:
    return OLD.get(name, STRATEGIES.get(name))  # grape and source: are unchanged per-item functions


def _query(p: SelectParams) -> dict[str, Any]:
    q = {"k": p.k, "reduce": p.reduce, "tau": p.tau, "seed": p.seed}
    return q if p.n is None else {**q, "n": p.n}


def _rows(r: redis.Redis, keys: Keys, ds: str, needs: tuple[str, ...]) -> list[ScoredItem]:
    return [row for page in pages(r, datasets.scored(keys, ds, needs)) for row in page]


@pytest.fixture
def real_pool(settings: Settings, rclient: redis.Redis, keys: Keys) -> Iterator[tuple[TestClient, str, list[dict]]]:
    with TestClient(create_app(settings.model_copy(update={"chunk_pairs": 4096}))) as api:
        r = api.post("/v1/datasets", json={"name": "real", "target_model": MODEL, "scores": list(SCORE_KINDS)})
        assert r.status_code == 201, r.text
        ds = r.json()["id"]
        items = load_pool(403, max_chars=100_000)
        assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 403
        _write_scores(rclient, keys, ds, items)
        yield api, ds, items


def _names(items: list[dict]) -> list[str]:
    sources = sorted({c["source"] for it in items for c in it["candidates"]})
    return [n.replace("<name>", sources[0]) for n in STRATEGIES]


def test_selections_match_the_whole_pool_implementation_for_every_strategy(
    real_pool: tuple[TestClient, str, list[dict]], rclient: redis.Redis, keys: Keys
) -> None:
    api, ds, items = real_pool
    names = _names(items)
    assert {"grape", "longest", "deita", "ifd", "random"} <= set(names) and any(n.startswith("source:") for n in names)
    for name in names:
        rows = _rows(rclient, keys, ds, datasets.selection_needs([name]))
        for params in PARAM_SETS:
            expected = b"".join(orjson.dumps(p.record()) + b"\n" for p in _old(name)(rows, params))
            got = api.get(f"/v1/datasets/{ds}/selection", params={"strategy": name, **_query(params)})
            assert got.status_code == 200, got.text
            assert got.content == expected, (name, params)
            # the strategy function itself, given the whole pool, still agrees (the plain API)
            assert [(p.item["id"], p.candidate, p.score, p.rank) for p in STRATEGIES.get(name)(rows, params)] == [
                (p.item["id"], p.candidate, p.score, p.rank) for p in _old(name)(rows, params)
            ], (name, params)


def test_compare_matches_the_whole_pool_implementation(
    real_pool: tuple[TestClient, str, list[dict]], rclient: redis.Redis, keys: Keys, settings: Settings
) -> None:
    api, ds, items = real_pool
    names = _names(items)
    groups = [names[i : i + settings.max_compare_strategies] for i in range(0, len(names), 4)]
    groups.append(["grape", "longest", "random", names[-1]])
    for group in groups:
        needs = datasets.selection_needs(group)
        rows = _rows(rclient, keys, ds, needs)
        for params in PARAM_SETS[:4]:
            for max_sources in (settings.max_report_sources, 3):
                expected = ref.compare(rows, {n: _old(n) for n in group}, params, max_sources)
                got = datasets_compare(api, rclient, keys, ds, group, params, max_sources, settings)
                assert got == expected, (group, params, max_sources)


def datasets_compare(
    api: TestClient,
    r: redis.Redis,
    keys: Keys,
    ds: str,
    group: list[str],
    params: SelectParams,
    max_sources: int,
    settings: Settings,
) -> dict[str, Any]:
    """The gateway's answer, its body fields that grape.compare computes (max_sources other than the setting:
    the pure function, fed page by page as the service feeds it)."""
    if max_sources == settings.max_report_sources:
        r = api.get(f"/v1/datasets/{ds}/compare", params={"strategies": ",".join(group), **_query(params)})
        assert r.status_code == 200, r.text
        body = r.json()
        return {k: body[k] for k in ("items", "sources", "sources_total", "pool", "strategies", "overlap")}
    from grape.compare import Comparison

    c = Comparison({n: STRATEGIES.get(n) for n in group}, params, max_sources)
    for page in pages(r, datasets.scored(keys, ds, datasets.selection_needs(group))):
        c.add(page)
    return c.result()


def _reference_summary(rows: list[ScoredItem], ds: str, reduce: str, max_sources: int) -> dict[str, Any]:
    tally = ref.Tally(reduce)
    for start in range(0, len(rows), datasets.PAGE):
        tally.add(rows[start : start + datasets.PAGE])
    out = tally.summary(ds, max_sources).model_dump()
    out.pop("computed_at")
    return out


def test_summary_matches_the_whole_pool_implementation_and_is_kept(
    real_pool: tuple[TestClient, str, list[dict]], rclient: redis.Redis, keys: Keys, settings: Settings
) -> None:
    api, ds, items = real_pool
    rows = _rows(rclient, keys, ds, ())
    for reduce in ("mean", "sum"):
        got = api.get(f"/v1/datasets/{ds}/summary", params={"reduce": reduce}).json()
        got.pop("computed_at")
        assert got == _reference_summary(rows, ds, reduce, settings.max_report_sources), reduce


def _score(r: redis.Redis, keys: Keys, ds: str, items: list[dict], value: float = -1.0) -> None:
    rows = [
        ItemResult(
            it["id"],
            len(it["candidates"]),
            [
                {"logprob_sum": value * (j + 1) - len(it["id"]) % 7, "tokens": 3 + j, "prompt_tokens": 2}
                for j in range(len(it["candidates"]))
            ],
        )
        for it in items
    ]
    for start in range(0, len(rows), 500):
        call(r, results(keys, "logprob", MODEL, ds, "", time.time(), rows[start : start + 500]))


def _synthetic(n: int, tag: str = "") -> list[dict]:
    return [
        {
            "id": f"s{tag}-{i:07d}",
            "instruction": f"instruction {i} " + "x" * (i % 50),
            "candidates": [
                {"source": s, "response": f"{s} answers {i} " + "y" * ((i * 7 + len(s)) % 300)} for s in "abc"
            ],
        }
        for i in range(n)
    ]


def test_summary_reads_only_what_was_scored_since(
    settings: Settings, rclient: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kept summary: a poll with unchanged counters reads no item; one after a few new scores reads a page
    of the upload order at most, whatever the pool's size; and the answer equals a summary from scratch (means
    to 1e-12: the scores are added in another order)."""
    read: list[int] = []
    real = datasets.pairs_of  # the one read a summary's refresh makes

    def counting(keys: Keys, dataset_id: str, item_ids: list[str], *a: Any, **kw: Any) -> Any:
        read.append(len(item_ids))
        return real(keys, dataset_id, item_ids, *a, **kw)

    monkeypatch.setattr(summary_svc.store, "pairs_of", counting)
    with TestClient(create_app(settings.model_copy(update={"chunk_pairs": 4096}))) as api:
        per_pool = []
        for n in (2000, 8000):
            ds = api.post("/v1/datasets", json={"name": "kept", "target_model": MODEL}).json()["id"]
            items = _synthetic(n, str(n))
            for start in range(0, n, 1000):
                assert api.post(f"/v1/datasets/{ds}/items", json={"items": items[start : start + 1000]}).status_code
            scored = n - 1000
            _score(rclient, keys, ds, items[:scored:2])
            _score(rclient, keys, ds, items[1:scored:2])
            first = api.get(f"/v1/datasets/{ds}/summary").json()
            assert first["scored_items"] == scored
            read.clear()
            assert api.get(f"/v1/datasets/{ds}/summary").json() == first  # unchanged counters: nothing read
            assert read == []
            _score(rclient, keys, ds, items[scored : scored + 10])
            _score(rclient, keys, ds, items[scored + 20 : scored + 30])  # out of order: 10 left pending
            second = api.get(f"/v1/datasets/{ds}/summary").json()
            step_one = sum(read)
            read.clear()
            _score(rclient, keys, ds, items[scored + 10 : scored + 20])
            third = api.get(f"/v1/datasets/{ds}/summary").json()
            step_two = sum(read)
            assert second["scored_items"] == scored + 20 and third["scored_items"] == scored + 30
            per_pool.append((step_one, step_two))
            fresh = _reference_summary(_rows(rclient, keys, ds, ()), ds, "mean", settings.max_report_sources)
            for got in (third,):
                got.pop("computed_at")
                for s_got, s_ref in zip(got.pop("sources"), fresh.pop("sources"), strict=True):
                    assert s_got.pop("mean_score") == pytest.approx(s_ref.pop("mean_score"), rel=1e-12)
                    assert s_got == s_ref
                assert got == fresh
        # a page of the order after the last read position, then only the ids still pending there
        assert per_pool[0] == per_pool[1]
        assert per_pool[0][0] <= datasets.PAGE and per_pool[0][1] <= datasets.PAGE


def _peak(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_selection_and_compare_memory_does_not_grow_with_the_pool(
    settings: Settings, rclient: redis.Redis, keys: Keys
) -> None:
    """Peak Python memory of a selection (each strategy the scores allow, pool-wide ones with their default
    budget) and of a comparison, over a pool of N items and of 4N: within 1.3x (the whole-pool reads grew ~4x)."""
    from grape.compare import Comparison

    sizes = (3000, 12000)
    peaks: dict[str, list[int]] = {}
    with TestClient(create_app(settings.model_copy(update={"chunk_pairs": 4096}))) as api:
        for n in sizes:
            ds = api.post("/v1/datasets", json={"name": "mem", "target_model": MODEL}).json()["id"]
            items = _synthetic(n, f"m{n}")
            for start in range(0, n, 1000):
                api.post(f"/v1/datasets/{ds}/items", json={"items": items[start : start + 1000]})
            _score(rclient, keys, ds, items)
            del items
            for name in ("grape", "longest", "random", "source:b"):
                for params in (SelectParams(), SelectParams(n=500)):

                    def export(name: str = name, params: SelectParams = params, ds: str = ds) -> None:
                        for got in pages(rclient, datasets.selection(keys, ds, name, params)):
                            for records in got:
                                records.render()

                    peaks.setdefault(f"selection {name} {params.n}", []).append(_peak(export))

            def compare(ds: str = ds) -> None:
                c = Comparison(
                    {s: STRATEGIES.get(s) for s in ("grape", "longest", "random", "source:b")}, SelectParams()
                )
                for page in pages(rclient, datasets.scored(keys, ds)):
                    c.add(page)
                c.result()

            compare()  # once unmeasured: first-use allocations (imports, caches) are not the pool's
            peaks.setdefault("compare", []).append(_peak(compare))
    grown = {k: round(big / small, 2) for k, (small, big) in peaks.items()}
    assert all(g < 1.3 for g in grown.values()), grown


def test_a_pool_wide_strategy_without_a_streaming_form_still_compares_and_selects() -> None:
    """A strategy registered without `accumulate` (a new one, say) is given the whole pool, and agrees."""
    from grape.compare import compare
    from grape.strategies.base import accumulator, picks

    rows = [
        ScoredItem(it, [{"logprob_sum": -1.0 - j, "tokens": 1 + (i + j) % 5, "prompt_tokens": 1} for j in range(3)])
        for i, it in enumerate(_synthetic(700, "plain"))
    ]

    def plain(rows: Any, params: SelectParams) -> Any:  # longest, as a plain function
        return ref.longest(rows, params)

    params = SelectParams(n=40, k=2)
    assert [(p.item["id"], p.candidate) for p in picks(accumulator(plain, params), rows)] == [
        (p.item["id"], p.candidate) for p in ref.longest(rows, params)
    ]
    assert compare(rows, {"plain": plain, "grape": STRATEGIES.get("grape")}, params) == ref.compare(
        rows, {"plain": ref.longest, "grape": STRATEGIES.get("grape")}, params
    )
