"""The service's scores equal a direct computation by a plain transformers forward (fp32, 1e-3)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import create, load_pool, wait_done


def direct_mean_logprob(model, tok, instruction: str, response: str) -> float:
    """log p(response | chat prompt) / N by the textbook route: one forward, full log-softmax, gather."""
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
    )
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    picked = [logp[len(p) + j - 1, t].item() for j, t in enumerate(r)]
    return sum(picked) / len(picked)


def test_service_scores_match_a_plain_forward(api, worker_factory, model_path) -> None:
    items = load_pool(3, start=10, max_chars=400, candidates=4)
    ds = create(api)
    assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).status_code == 202
    worker_factory()
    wait_done(api, ds)

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    checked = 0
    for item in items:
        got = api.get(f"/v1/datasets/{ds}/items/{item['id']}").json()
        assert got["state"] == "scored"
        for cand, scored in zip(item["candidates"], got["candidates"], strict=True):
            want = direct_mean_logprob(model, tok, item["instruction"], cand["response"])
            assert abs(scored["mean"] - want) < 1e-3, (item["id"], cand["source"], scored["mean"], want)
            assert scored["tokens"] == len(tok(cand["response"], add_special_tokens=False)["input_ids"])
            checked += 1
    assert checked == 12


def test_backend_per_token_logprobs_match_a_plain_forward(hf_backend) -> None:
    from grape.formatting import prompt_ids, response_ids
    from grape.records import Template
    from workers.backends.base import ScoreRequest

    tok, model = hf_backend.tokenizer, hf_backend.model
    items = load_pool(2, start=20, max_chars=300, candidates=3)
    reqs = [
        ScoreRequest(prompt_ids(tok, it, Template.chat), response_ids(tok, c["response"], Template.chat))
        for it in items
        for c in it["candidates"]
    ]
    got = hf_backend.score(reqs)  # batched, padded, projection at response rows only
    for req, lps in zip(reqs, got, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([req.prompt_ids + req.response_ids])).logits[0], -1)
        p = len(req.prompt_ids)
        want = [logp[p + j - 1, t].item() for j, t in enumerate(req.response_ids)]
        assert len(lps) == len(want)
        assert max(abs(a - b) for a, b in zip(lps, want, strict=True)) < 1e-3


def test_shared_prefix_path_equals_the_padded_path(hf_backend) -> None:
    """Prefix computed once per instruction (KV cache gathered per candidate) vs a plain padded forward:
    same scores to 1e-3 per candidate, over instructions of different prompt lengths in one batch."""
    from dataclasses import replace

    from grape.formatting import prompt_ids, response_ids
    from grape.records import Template
    from workers.backends.base import ScoreRequest
    from workers.backends.hf import HFBackend

    tok = hf_backend.tokenizer
    items = load_pool(3, start=90, max_chars=250, candidates=3)
    items.append(
        {
            "messages": [
                {"role": "user", "content": items[0]["instruction"]},
                {"role": "assistant", "content": items[0]["candidates"][0]["response"]},
                {"role": "user", "content": "Say that again, shorter."},
            ],
            "candidates": items[1]["candidates"],
        }
    )
    reqs = [
        ScoreRequest(prompt_ids(tok, it, Template.chat), response_ids(tok, c["response"], Template.chat))
        for it in items
        for c in it["candidates"]
    ]
    assert len({tuple(r.prompt_ids) for r in reqs}) == 4
    shared = hf_backend.score(reqs)
    assert hf_backend.info()["path"].startswith("shared-prefix")
    padded_backend = object.__new__(HFBackend)
    padded_backend.__dict__.update(hf_backend.__dict__)
    padded_backend.share_prefix = False
    padded_backend.config = replace(hf_backend.config, batch_tokens=100_000)
    padded = padded_backend.score(reqs)
    for a, b in zip(shared, padded, strict=True):
        assert len(a) == len(b)
        assert abs(sum(a) - sum(b)) < 1e-3
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3


def test_worker_tokenizes_batches_to_the_same_ids_as_one_call_each(hf_backend) -> None:
    """The worker tokenizes all responses of a batch in one tokenizer call (ahead of the backend); the ids,
    and so the response boundary, are those of one call per response, for both templates and a failure."""
    from grape.formatting import prompt_ids, resolve_template, response_ids
    from workers.scoring import Prepared, prepare, prepare_items

    tok = hf_backend.tokenizer
    items = load_pool(4, start=30, max_chars=600, candidates=4)
    empty = {"id": "empty", "instruction": "x", "candidates": [{"source": "a", "response": ""}]}
    work = [(it, tpl) for it in items for tpl in ("auto", "plain")] + [(empty, "auto")]
    batched = prepare_items(hf_backend, work)
    assert batched == [prepare(hf_backend, it, tpl) for it, tpl in work]
    assert sum(isinstance(p, Prepared) for p in batched) == 8 and "zero tokens" in batched[-1].error
    for (it, tpl), p in zip(work[:-1], batched, strict=False):
        t = resolve_template(tok, tpl)
        assert [(r.prompt_ids, r.response_ids) for r in p.requests] == [
            (prompt_ids(tok, it, t), response_ids(tok, c["response"], t)) for c in it["candidates"]
        ]
