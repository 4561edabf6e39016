"""The gateway's `/selection` and the trainer's materialization of it agree record for record, for every
registered strategy (a new one is covered without touching this file), on one dataset in the real Redis
with every score kind present. The scores are written through the real results script with synthetic,
deterministic values: no worker, no model."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from fastapi.testclient import TestClient

from grape.keys import Keys
from grape.score_kinds import SCORE_KINDS, encode_vector
from grape.settings import Settings
from grape.store import datasets
from grape.store.io import call, cmd
from grape.store.scoring import ItemResult, results
from grape.strategies import STRATEGIES, ScoredItem, SelectParams
from service.app import create_app
from tests.conftest import MODEL

N_ITEMS = 1100  # three pages of datasets.PAGE: the paged reads and the per-page streaming are exercised
SOURCES = ("a", "b", "c")
PARAMS = SelectParams(k=1, reduce="mean", n=150, tau=0.9, seed=7)


def _items() -> list[dict]:
    rng = random.Random(13)
    return [
        {
            "id": f"it-{i:05d}",
            "instruction": f"instruction {i}",
            "candidates": [{"source": s, "response": "w " * rng.randint(1, 40)} for s in SOURCES],
        }
        for i in range(N_ITEMS)
    ]


def _write_scores(r: redis.Redis, keys: Keys, ds: str, items: list[dict]) -> None:
    """Every task's results, deterministic; a few items failed or unscored, a few lacking an extra result."""
    rng = random.Random(29)
    rows: dict[str, list[ItemResult]] = {t: [] for t in ("logprob", "unconditioned", "rating", "embedding", "local")}
    lrng = random.Random(31)  # local scores from their own stream: the other tasks' numbers stay as they were
    for i, it in enumerate(items):
        n, iid = len(it["candidates"]), it["id"]
        if i % 97 == 5:
            continue  # never scored
        if i % 89 == 7:
            rows["logprob"].append(ItemResult(iid, n, error="synthetic failure"))
            continue
        tokens = [len(c["response"]) // 2 for c in it["candidates"]]
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
        if i % 41 != 6:
            shape = {"steps": 2, "step_min": -3.5, "step_max": 0.0, "prompt_tokens": 4}
            local = [{"local": -lrng.uniform(0.1, 3), "tokens": t, **shape} for t in tokens]
            rows["local"].append(ItemResult(iid, n, local))
    for task, got in rows.items():
        for start in range(0, len(got), 200):
            call(r, results(keys, task, MODEL, ds, "", time.time(), got[start : start + 200]))


@pytest.fixture
def scored_dataset(settings: Settings, rclient: redis.Redis, keys: Keys) -> Iterator[tuple[TestClient, str]]:
    with TestClient(create_app(settings.model_copy(update={"chunk_pairs": 4096}))) as api:
        r = api.post("/v1/datasets", json={"name": "parity", "target_model": MODEL, "scores": list(SCORE_KINDS)})
        assert r.status_code == 201, r.text
        ds = r.json()["id"]
        items = _items()
        assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == N_ITEMS
        _write_scores(rclient, keys, ds, items)
        yield api, ds


def _concrete(name: str) -> str:
    """A family's placeholder (`source:<name>`) given a value the data has."""
    return name.replace("<name>", SOURCES[1])


def test_gateway_and_trainer_select_the_same_records_for_every_strategy(
    scored_dataset: tuple[TestClient, str], rclient: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    api, ds = scored_dataset
    query = {"k": PARAMS.k, "reduce": PARAMS.reduce, "n": PARAMS.n, "tau": PARAMS.tau, "seed": PARAMS.seed}
    names = [_concrete(n) for n in STRATEGIES]
    assert len(names) >= 6
    picked: dict[str, list[tuple[str, int]]] = {}
    for name in names:
        r = api.get(f"/v1/datasets/{ds}/selection", params={"strategy": name, **query})
        assert r.status_code == 200, (name, r.text)
        served = [orjson.loads(line) for line in r.content.splitlines()]
        path = tmp_path / f"{name.replace(':', '_')}.jsonl"
        n = datasets.write_selection(rclient, keys, ds, name, PARAMS, path)
        written = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        assert written == served, name
        assert n == len(served), name
        assert 0 < len(served) < N_ITEMS * len(SOURCES), (name, len(served))  # something, and a strict subset
        picked[name] = [(rec["id"], rec["candidate"]) for rec in served]
    # the strategies are not all one selection: a comparison of identical outputs would prove little
    assert len({tuple(p) for p in picked.values()}) == len(picked)


def test_the_scored_page_plan_without_redis() -> None:
    """A plan is driven by hand: its commands and what it makes of their replies, no client at all."""
    keys = Keys("t")
    page = datasets.scored(keys, "ds-000000000000", ("rating",))(0)
    assert next(page) == [cmd("lrange", keys.order("ds-000000000000"), 0, datasets.PAGE - 1)]
    item = {"id": "x", "instruction": "i", "candidates": [{"source": "a", "response": "r"}]}
    scores, rating = [{"logprob_sum": -1.0, "tokens": 1, "prompt_tokens": 1}], [{"complexity": 2, "quality": 3}]
    cmds = page.send([[b"x", b"y", b"z"]])
    assert [c[0] for c in cmds] == ["hmget", "hmget", "hmget"] and cmds[2][1][0] == keys.task_results(
        "ds-000000000000", "rating"
    )
    replies = [
        [orjson.dumps(item), orjson.dumps({**item, "id": "y"}), None],
        [orjson.dumps(scores), None, None],
        [orjson.dumps(rating), None, None],
    ]
    with pytest.raises(StopIteration) as done:
        page.send(replies)
    assert done.value.value == ([ScoredItem(item, scores, {"rating": rating})], None)  # a short page is the last
