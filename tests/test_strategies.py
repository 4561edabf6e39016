"""Every selection strategy against a direct computation in the test: synthetic scores with known
answers, and the real pool with response lengths counted by the real SmolLM2 tokenizer."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from grape.compare import compare, format_table
from grape.registry import UnknownName
from grape.score_kinds import decode_vector, encode_vector, normalize_scores, tasks_for
from grape.strategies import STRATEGIES, ScoredItem, SelectParams, get_strategy, strategy_needs, strategy_specs
from tests.conftest import load_pool

SOURCES = ["a", "b", "c", "d"]


def synthetic(n_items: int = 40, seed: int = 0, dim: int = 8) -> list[ScoredItem]:
    """Items with random lengths, log-probs, unconditioned log-probs, ratings and embeddings; a few
    exact ties and near-duplicate embeddings so that tie-breaking and the diversity filter matter."""
    rng = random.Random(seed)
    base = [np.array([rng.gauss(0, 1) for _ in range(dim)]) for _ in range(5)]
    rows = []
    for n in range(n_items):
        cands, scores, uncond, ratings, embeddings = [], [], [], [], []
        for i, src in enumerate(SOURCES[: rng.randint(2, 4)]):
            tokens = rng.choice([5, 10, 20, 40, 80])  # many ties
            cands.append({"source": src, "response": "x" * tokens})
            mean = rng.uniform(-3, -0.5)
            scores.append({"logprob_sum": mean * tokens, "tokens": tokens, "prompt_tokens": 7})
            umean = mean + rng.uniform(-1.5, 0.5)  # some IFD >= 1
            uncond.append({"logprob_sum": umean * tokens, "tokens": tokens, "prompt_tokens": 1, "skipped": 0})
            ratings.append(
                {"complexity": rng.choice([2.0, 3.5]), "quality": rng.choice([1.5, 4.0, 5.0]), "history": 0.0}
            )
            v = base[(n + i) % 5] + rng.gauss(0, 0.3) * np.array([rng.gauss(0, 1) for _ in range(dim)])
            embeddings.append({"embedding": encode_vector(v / np.linalg.norm(v)), "dim": dim})
        rows.append(
            ScoredItem(
                {"id": f"it-{n:03d}", "instruction": f"q{n}", "candidates": cands},
                scores,
                {"unconditioned": uncond, "rating": ratings, "embedding": embeddings},
            )
        )
    return rows


def picks(name: str, rows: list[ScoredItem], **params) -> list[tuple[str, int]]:
    return [(p.item["id"], p.candidate) for p in get_strategy(name)(rows, SelectParams(**params))]


def capped(ranked: list[tuple[str, int]], k: int, n: int | None) -> list[tuple[str, int]]:
    out, per = [], {}
    for item_id, cand in ranked:
        if n is not None and len(out) >= n:
            break
        if per.get(item_id, 0) < k:
            per[item_id] = per.get(item_id, 0) + 1
            out.append((item_id, cand))
    return out


def all_pairs(rows: list[ScoredItem]) -> list[tuple[int, int, ScoredItem]]:
    return [(o, i, row) for o, row in enumerate(rows) for i in range(len(row.scores))]


@pytest.mark.parametrize(("k", "n"), [(1, None), (1, 7), (2, 15), (3, 1000)])
def test_longest_is_a_sort_by_token_length(k: int, n: int | None) -> None:
    rows = synthetic()
    ranked = sorted(all_pairs(rows), key=lambda p: (-p[2].scores[p[1]]["tokens"], p[0], p[1]))
    want = capped([(row.item["id"], i) for _, i, row in ranked], k, 1000 if n is None else n)
    assert picks("longest", rows, k=k, n=n) == want
    if k == 1:  # per instruction its longest candidate
        for item_id, cand in want:
            row = next(r for r in rows if r.item["id"] == item_id)
            assert row.scores[cand]["tokens"] == max(s["tokens"] for s in row.scores)


def test_longest_default_budget_is_the_papers_1000() -> None:
    rows = synthetic(n_items=1200)
    assert len(picks("longest", rows)) == 1000


def direct_ifd(row: ScoredItem, i: int) -> float:
    c, u = row.scores[i], row.extra["unconditioned"][i]
    ppl_cond = math.exp(-c["logprob_sum"] / c["tokens"])
    ppl_uncond = math.exp(-u["logprob_sum"] / u["tokens"])
    return ppl_cond / ppl_uncond


@pytest.mark.parametrize(("k", "n"), [(1, None), (1, 5), (2, None)])
def test_ifd_drops_ge_1_and_ranks_highest_first(k: int, n: int | None) -> None:
    rows = synthetic(seed=3)
    scored = [(direct_ifd(row, i), o, i, row) for o, i, row in all_pairs(rows)]
    assert any(v >= 1 for v, *_ in scored) and any(v < 1 for v, *_ in scored)
    ranked = sorted([s for s in scored if s[0] < 1], key=lambda s: (-s[0], s[1], s[2]))
    want = capped([(row.item["id"], i) for _, _, i, row in ranked], k, n)
    got = list(get_strategy("ifd")(rows, SelectParams(k=k, n=n)))
    assert [(p.item["id"], p.candidate) for p in got] == want
    assert all(p.score < 1 for p in got)
    assert [p.score for p in got] == sorted((p.score for p in got), reverse=True)


def test_ifd_leaves_out_pairs_without_an_unconditioned_perplexity() -> None:
    rows = synthetic(n_items=3)
    u = rows[0].extra["unconditioned"][0]
    u.update(logprob_sum=None, tokens=0)  # a one-token response on a tokenizer without BOS
    del rows[1].extra["unconditioned"]  # its unconditioned pass failed
    got = picks("ifd", rows, k=4)
    assert (rows[0].item["id"], 0) not in got
    assert all(item_id != rows[1].item["id"] for item_id, _ in got)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def direct_deita(rows: list[ScoredItem], k: int, n: int, tau: float) -> list[tuple[str, int]]:
    evol = [
        (row.extra["rating"][i]["complexity"] * row.extra["rating"][i]["quality"], o, i, row)
        for o, i, row in all_pairs(rows)
    ]
    evol.sort(key=lambda e: (-e[0], e[1], e[2]))
    kept: list[tuple[str, int]] = []
    vectors: list[np.ndarray] = []
    per: dict[str, int] = {}
    for _, _, i, row in evol:
        if len(kept) >= n:
            break
        if per.get(row.item["id"], 0) >= k:
            continue
        v = decode_vector(row.extra["embedding"][i]["embedding"]).astype(np.float64)
        if all(cosine(v, w) <= tau for w in vectors):
            kept.append((row.item["id"], i))
            vectors.append(v)
            per[row.item["id"]] = per.get(row.item["id"], 0) + 1
    return kept


@pytest.mark.parametrize(("k", "n", "tau"), [(1, 6000, 0.9), (2, 6000, 0.8), (4, 10, 0.95), (1, 6000, 1.0)])
def test_deita_is_score_first_and_never_keeps_two_above_tau(k: int, n: int, tau: float) -> None:
    rows = synthetic(seed=5)
    got = list(get_strategy("deita")(rows, SelectParams(k=k, n=n, tau=tau)))
    assert [(p.item["id"], p.candidate) for p in got] == direct_deita(rows, k, n, tau)
    by_id = {r.item["id"]: r for r in rows}
    vecs = [decode_vector(by_id[p.item["id"]].extra["embedding"][p.candidate]["embedding"]) for p in got]
    for a in range(len(vecs)):
        for b in range(a):
            assert cosine(vecs[a], vecs[b]) <= tau + 1e-6
    assert [p.score for p in got] == sorted((p.score for p in got), reverse=True)
    if tau < 1:
        assert len(got) < sum(len(r.scores) for r in rows)  # the filter did drop near-duplicates


def test_deita_evol_adds_earlier_turns_and_skips_unrated_items() -> None:
    rows = synthetic(n_items=4)
    for r in rows[0].extra["rating"]:
        r["history"] = 100.0  # a multi-turn item: its earlier turns' complexity x quality
    del rows[1].extra["rating"]
    got = list(get_strategy("deita")(rows, SelectParams(tau=1.0)))
    assert got[0].item["id"] == rows[0].item["id"] and got[0].score > 100
    assert rows[1].item["id"] not in {p.item["id"] for p in got}


def test_random_is_reproducible_and_order_independent() -> None:
    rows = synthetic()
    a = picks("random", rows, seed=7)
    assert a == picks("random", rows, seed=7)
    assert a != picks("random", rows, seed=8)
    assert [x[0] for x in a] == [r.item["id"] for r in rows]  # every instruction, upload order
    shuffled = rows[::-1]
    assert sorted(picks("random", shuffled, seed=7)) == sorted(a)
    budget = picks("random", rows, seed=7, n=9, k=2)
    assert len(budget) == 9
    assert sorted(picks("random", shuffled, seed=7, n=9, k=2)) == sorted(budget)
    # direct: per item a generator seeded with "seed:id" shuffles the candidates and draws a priority
    want = []
    for r in rows:
        rng = random.Random(f"7:{r.item['id']}")
        want.append((r.item["id"], rng.sample(range(len(r.item["candidates"])), len(r.item["candidates"]))[0]))
    assert a == want


def test_source_returns_only_that_source() -> None:
    rows = synthetic()
    got = list(get_strategy("source:c")(rows, SelectParams()))
    have_c = [r.item["id"] for r in rows if any(c["source"] == "c" for c in r.item["candidates"])]
    assert [p.item["id"] for p in got] == have_c and 0 < len(have_c) < len(rows)
    assert all(p.item["candidates"][p.candidate]["source"] == "c" for p in got)
    assert picks("source:nobody", rows) == []


def test_registry_resolves_parameterized_names_and_refuses_unknown_ones() -> None:
    assert "source:gpt4" in STRATEGIES and "source:" not in STRATEGIES and "nope" not in STRATEGIES
    assert STRATEGIES.get("source:gpt4").streams and STRATEGIES.get("source:gpt4").name == "source:gpt4"
    assert strategy_needs("deita") == ("rating", "embedding") and strategy_needs("ifd") == ("unconditioned",)
    assert strategy_needs("longest") == () and strategy_needs("source:x") == ()
    with pytest.raises(UnknownName, match="did you mean longest"):
        STRATEGIES.get("longst")
    with pytest.raises(UnknownName, match="give a name"):
        STRATEGIES.get("source:")


def test_score_kinds_map_to_tasks() -> None:
    assert normalize_scores(["embedding", "length", "rating"]) == ["logprob", "length", "rating", "embedding"]
    assert [t.value for t in tasks_for(["length", "unconditioned"])] == ["logprob", "unconditioned"]
    with pytest.raises(ValueError, match="unknown score kind"):
        normalize_scores(["perplexity"])
    v = np.array([0.25, -1.5, 3.0], dtype=np.float32)
    assert np.array_equal(decode_vector(encode_vector(v)), v)


def test_compare_counts_lengths_shares_and_overlap() -> None:
    rows = synthetic()
    # every registered strategy the rows have the scores of (the family as source:a)
    names = [s.name.replace("<name>", "a") for s in strategy_specs() if set(s.needs) <= set(rows[0].extra)]
    assert len(names) >= 6
    params = SelectParams(n=12, tau=0.9, seed=1)
    result = compare(rows, {n: get_strategy(n) for n in names}, params)
    by_id = {r.item["id"]: r for r in rows}
    selected = {n: picks(n, rows, n=12, tau=0.9, seed=1) for n in names}
    for s in result["strategies"]:
        pairs = selected[s["name"]]
        assert s["selected"] == len(pairs)
        assert s["mean_response_tokens"] == pytest.approx(
            sum(by_id[i].scores[c]["tokens"] for i, c in pairs) / len(pairs)
        )
        assert sum(s["sources"].values()) == pytest.approx(1.0)
        for src in SOURCES:
            share = sum(by_id[i].item["candidates"][c]["source"] == src for i, c in pairs) / len(pairs)
            assert s["sources"][src] == pytest.approx(share)
    for a in names:
        for b in names:
            assert result["overlap"][a][b] == len(set(selected[a]) & set(selected[b]))
    assert result["pool"]["selected"] == sum(len(r.scores) for r in rows)
    table = format_table(result)
    assert all(n in table for n in names) and "pairs selected by both" in table


@pytest.fixture(scope="module")
def real_rows(model_path: str) -> list[ScoredItem]:
    """The whole real pool, response lengths in SmolLM2 tokens (the logprob task's `tokens`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    rows = []
    for item in load_pool(10_000, max_chars=100_000):
        lens = [len(x) for x in tok([c["response"] for c in item["candidates"]], add_special_tokens=False)["input_ids"]]
        rows.append(ScoredItem(item, [{"logprob_sum": -float(n), "tokens": n, "prompt_tokens": 1} for n in lens]))
    return rows


def test_longest_and_source_on_the_real_pool(real_rows: list[ScoredItem]) -> None:
    assert len(real_rows) > 400
    got = picks("longest", real_rows, n=100)
    lengths = sorted(
        ((max(s["tokens"] for s in r.scores), o) for o, r in enumerate(real_rows)), key=lambda x: (-x[0], x[1])
    )[:100]
    assert [real_rows[o].item["id"] for _, o in lengths] == [i for i, _ in got]
    by_id = {r.item["id"]: r for r in real_rows}
    assert [by_id[i].scores[c]["tokens"] for i, c in got] == [n for n, _ in lengths]
    gpt4 = picks("source:gpt4_1106_preview", real_rows)
    assert len(gpt4) == len(real_rows)
    assert {by_id[i].item["candidates"][c]["source"] for i, c in gpt4} == {"gpt4_1106_preview"}
