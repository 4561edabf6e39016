"""The `local` score kind (LALP, arXiv 2510.03988): step segmentation, exactness of the stored scores against
a plain transformers forward of every window by hand (hf and vLLM backends), the `lalp` strategy in
selection, compare, training jobs and experiments, the teachers route and `grape teachers`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grape.local_steps import LocalParams, split_steps
from grape.store.codec import decode_scores
from tests.conftest import MODEL, wait_done
from workers.runners.local import prepare as local_prepare
from workers.runners.local import runner as local_runner

ROOT = Path(__file__).resolve().parents[1]
REASONING_POOL = ROOT / "examples" / "reasoning_pool.jsonl"
TOL = 1e-4  # fp32, per candidate (local score and every step's mean)


def reasoning_items(n: int) -> list[dict]:
    with open(REASONING_POOL, "rb") as f:
        return [orjson.loads(line) for line in f][:n]


# ---- segmentation ----------------------------------------------------------------------------------------


def test_steps_cover_the_response_exactly_and_are_never_empty() -> None:
    text = "\n\nFirst, add.\n\nThen   divide:\n  x = 2\n \n\n\nSo x = 2.\n\n"
    steps = split_steps(text, "blank_line")
    assert "".join(steps) == text
    # the leading break joins the first step, the trailing one the last: three steps, none blank
    assert steps == ["\n\nFirst, add.\n\n", "Then   divide:\n  x = 2\n \n\n\n", "So x = 2.\n\n"]
    lines = split_steps(text, "line")
    assert "".join(lines) == text and all(s.strip() for s in lines)
    assert [s.strip() for s in lines] == ["First, add.", "Then   divide:", "x = 2", "So x = 2."]
    # indentation stays with its line: a step break never eats the next line's leading spaces
    assert lines[2].startswith("  x = 2")
    # no boundary: one step; whitespace only: one step (scored like the logprob task would)
    assert split_steps("x = 2, so 4x = 8.", "blank_line") == ["x = 2, so 4x = 8."]
    assert split_steps(" \n\n ", "blank_line") == [" \n\n "]


def test_parameters_are_bounded_and_stored_with_the_dataset(api) -> None:
    def create(**kw):
        return api.post("/v1/datasets", json={"name": "t", "target_model": MODEL, **kw})

    for bad in ({"local_window": 0}, {"local_window": 33}, {"local_segmentation": "sentence"}):
        r = create(scores=["local"], **bad)
        assert r.status_code == 422, (bad, r.text)
    r = create(scores=["logprob", "local"], local_window=3, local_segmentation="line")
    assert r.status_code == 201, r.text
    assert r.json()["scores"] == ["logprob", "local"] and r.json()["local"] == {"segmentation": "line", "window": 3}
    assert "local" in r.json()["tasks"]
    ds = r.json()["id"]
    # asked again with other parameters once requested: refused, naming the field
    r = api.post(f"/v1/datasets/{ds}/scores", json={"scores": ["local"], "local_window": 1})
    assert r.status_code == 422 and "local_window" in r.text
    # a dataset without local scores shows none, and its parameters can be chosen when they are added
    plain = create().json()
    assert plain["local"] is None
    r = api.post(f"/v1/datasets/{plain['id']}/scores", json={"scores": ["local"], "local_window": 5})
    assert r.status_code == 202, r.text
    assert r.json()["queued_tasks"] == ["local"] and r.json()["dataset"]["local"]["window"] == 5
    # teachers and lalp need the local scores
    assert api.get(f"/v1/datasets/{create().json()['id']}/teachers").status_code == 422
    assert api.get("/v1/datasets/ds-000000000000/teachers").status_code == 404


# ---- exactness -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_model(model_path: str):
    tok = AutoTokenizer.from_pretrained(model_path)
    return tok, AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def by_hand(tok, model, instruction: str, response: str, window: int) -> list[float]:
    """Each step's mean log-prob, the textbook way: the chat prompt, steps cut at blank lines with the
    break kept at the end of its step, one forward of prompt + `window` preceding steps + the step, full
    log-softmax, gather."""
    prompt_text = tok.apply_chat_template(
        [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
    )
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    parts = response.split("\n\n")
    steps = [tok(p + "\n\n", add_special_tokens=False)["input_ids"] for p in parts[:-1]]
    steps.append(tok(parts[-1], add_special_tokens=False)["input_ids"])
    means = []
    for i, step in enumerate(steps):
        context = prompt + [t for s in steps[max(0, i - window) : i] for t in s]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([context + step])).logits[0].float(), dim=-1)
        means.append(sum(logp[len(context) + j - 1, t].item() for j, t in enumerate(step)) / len(step))
    return means


def check_exact(stored: list[dict], item: dict, plain_model, window: int) -> int:
    tok, model = plain_model
    for cand, got in zip(item["candidates"], stored, strict=True):
        means = by_hand(tok, model, item["instruction"], cand["response"], window)
        assert got["steps"] == len(means) == cand["response"].count("\n\n") + 1
        assert abs(got["local"] - sum(means) / len(means)) < TOL, (item["id"], cand["source"], got, means)
        assert abs(got["step_min"] - min(means)) < TOL and abs(got["step_max"] - max(means)) < TOL
    return len(stored)


ONE_STEP = {
    "id": "one-step",
    "instruction": "What is 6 times 7?",
    "candidates": [
        {"source": "stepwise", "response": "6 times 7 is 42."},
        {"source": "dense", "response": "Six sevens make 42, since 6 x 7 = 42."},
    ],
}


def test_scores_through_the_service_match_a_forward_by_hand_and_lalp_everywhere(
    api, worker_factory, plain_model, rclient, keys
) -> None:
    items = reasoning_items(2) + [ONE_STEP]
    r = api.post(
        "/v1/datasets", json={"name": "t", "target_model": MODEL, "scores": ["logprob", "local"], "local_window": 1}
    )
    assert r.status_code == 201, r.text
    ds = r.json()["id"]
    assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 3
    worker_factory(task="logprob", name="w-logprob")
    worker_factory(task="local", name="w-local")
    st = wait_done(api, ds, timeout=900)
    assert (st["tasks"]["local"]["scored_items"], st["tasks"]["local"]["failed_items"]) == (3, 0)

    stored = {it["id"]: decode_scores(rclient.hget(keys.task_results(ds, "local"), it["id"])) for it in items}
    assert sum(check_exact(stored[it["id"]], it, plain_model, window=1) for it in items) == 8
    # the cost is recorded: every window's forward tokens, more than the pair's own tokens for multi-step ones
    multi = stored[items[0]["id"]][0]
    assert multi["forward_tokens"] > multi["tokens"] + multi["prompt_tokens"]

    # a one-step response: its local score is its GRAPE mean (the same request as the logprob task's)
    view = api.get(f"/v1/datasets/{ds}/items/one-step").json()["candidates"]
    for got, grape in zip(stored["one-step"], view, strict=True):
        assert got["steps"] == 1 and got["tokens"] == grape["tokens"]
        assert (grape["local"], grape["local_steps"], grape["local_step_min"]) == (got["local"], 1, got["local"])
        assert abs(got["local"] - grape["mean"]) < 1e-5, (got, grape)

    # lalp: per instruction the highest local score, k of them
    def selection(**params) -> list[tuple[str, int, float]]:
        r = api.get(f"/v1/datasets/{ds}/selection", params=params)
        assert r.status_code == 200, r.text
        return [(x["id"], x["candidate"], x["score"]) for x in map(orjson.loads, r.text.splitlines())]

    want = []
    for it in items:
        local = [c["local"] for c in stored[it["id"]]]
        order = sorted(range(len(local)), key=lambda i: (-local[i], i))
        want += [(it["id"], i, local[i]) for i in order[:2]]
    assert selection(strategy="lalp", k=2) == want
    assert selection(strategy="lalp") == want[::2]  # every item has at least two candidates

    # compare: lalp beside grape and random
    r = api.get(f"/v1/datasets/{ds}/compare", params={"strategies": "lalp,grape,random"})
    assert r.status_code == 200, r.text
    lalp_row = r.json()["strategies"][0]
    assert lalp_row["name"] == "lalp" and lalp_row["selected"] == lalp_row["instructions"] == 3

    # teachers: per source, mean local and mean GRAPE over its candidates, both rankings
    t = api.get(f"/v1/datasets/{ds}/teachers").json()
    assert t["scored_items"] == 3 and t["sources_total"] == 3
    grape_view = {it["id"]: api.get(f"/v1/datasets/{ds}/items/{it['id']}").json()["candidates"] for it in items}
    for row in t["sources"]:
        pairs = [
            (stored[it["id"]][i]["local"], grape_view[it["id"]][i]["mean"])
            for it in items
            for i, c in enumerate(it["candidates"])
            if c["source"] == row["source"]
        ]
        assert row["candidates"] == len(pairs) == row["instructions"]
        assert row["local_mean"] == pytest.approx(sum(p[0] for p in pairs) / len(pairs), abs=1e-9)
        assert row["grape_mean"] == pytest.approx(sum(p[1] for p in pairs) / len(pairs), abs=1e-9)
    assert [r["local_rank"] for r in t["sources"]] == [1, 2, 3]
    assert sorted(t["sources"], key=lambda r: -r["grape_mean"])[0]["grape_rank"] == 1
    assert -1 <= t["rank_correlation"] <= 1

    # a training job with lalp is accepted (its selection has records); on a dataset without local: 422
    r = api.post("/v1/training-jobs", json={"dataset_id": ds, "strategy": "lalp"})
    assert r.status_code in (201, 202), r.text
    other = api.post("/v1/datasets", json={"name": "t", "target_model": MODEL}).json()["id"]
    r = api.post("/v1/training-jobs", json={"dataset_id": other, "strategy": "lalp"})
    assert r.status_code == 422 and "local" in r.text


def test_lalp_arm_in_an_experiment(api, worker_factory, settings, rclient, keys) -> None:
    """An experiment's arms lalp, grape and random get their selections drawn from the same instructions."""
    import anyio
    from redis.asyncio import Redis

    from grape.experiments import ExperimentRequest
    from service.experiments import materialize

    items = reasoning_items(3)
    r = api.post("/v1/datasets", json={"name": "t", "target_model": MODEL, "scores": ["logprob", "local"]})
    ds = r.json()["id"]
    api.post(f"/v1/datasets/{ds}/items", json={"items": items})
    worker_factory(task="logprob", name="w-logprob")
    worker_factory(task="local", name="w-local")
    wait_done(api, ds, timeout=900)
    body = ExperimentRequest.model_validate(
        {
            "dataset_id": ds,
            "arms": [{"strategy": "lalp"}, {"strategy": "grape"}, {"strategy": "random"}],
            "budget": {"pairs": 2},
            "evaluation": {"tasks": ["grape_tiny_mc"]},
        }
    )

    async def run() -> tuple[list[list[bytes]], int]:
        redis = Redis.from_url(settings.redis_url)
        try:
            return await materialize(redis, keys, body)
        finally:
            await redis.aclose()

    selections, common = anyio.run(run)
    assert common == 3
    ids = [sorted(orjson.loads(x)["id"] for x in arm) for arm in selections]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 2
    for pick in map(orjson.loads, selections[0]):  # the lalp arm trains on each instruction's best local score
        local = [c["local"] for c in decode_scores(rclient.hget(keys.task_results(ds, "local"), pick["id"]))]
        assert pick["candidate"] == local.index(max(local)) and pick["score"] == max(local)


# ---- failure modes ---------------------------------------------------------------------------------------


def test_a_window_longer_than_the_context_fails_the_item_with_its_reason(hf_backend) -> None:
    item = reasoning_items(1)[0]
    small = SimpleNamespace(tokenizer=hf_backend.tokenizer, max_model_len=60)
    out = local_prepare(small, item, ("auto", LocalParams(window=2)))
    assert out.error is not None and out.error.startswith("too long: candidate 0 (stepwise) step ")
    assert "> max_model_len 60" in out.error
    # with room for every window it is prepared, one request per step, none over the limit
    roomy = SimpleNamespace(tokenizer=hf_backend.tokenizer, max_model_len=8192)
    ok = local_prepare(roomy, item, ("auto", LocalParams(window=2)))
    assert ok.context["steps"] == [c["response"].count("\n\n") + 1 for c in item["candidates"]]
    # an empty response has no tokens to score: the item fails, as in the logprob task
    empty = {"id": "e", "instruction": "x", "candidates": [{"source": "a", "response": ""}]}
    assert "zero tokens" in local_prepare(roomy, empty, "auto").error
    # the runner scores the others of a batch
    res = local_runner(hf_backend, MODEL)([(empty, "auto"), (ONE_STEP, "auto")])
    assert res[0].error and res[1].scores and res[1].scores[0]["steps"] == 1


# ---- the vLLM backend ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_backend(model_path: str):
    from workers.backends.base import BackendConfig
    from workers.backends.vllm import VLLMBackend

    backend = VLLMBackend(
        BackendConfig(
            model=model_path,
            dtype="float32",
            max_model_len=1024,
            extra={"kv_cache_memory_bytes": 512 * 1024**2, "max_num_seqs": 32},
        )
    )
    yield backend
    backend.close()


def test_vllm_local_scores_match_a_forward_by_hand(vllm_backend, plain_model) -> None:
    """The local runner on the vLLM engine (token-id prompts, prefix cache on): every candidate's local
    score and step extremes within 1e-4 of the hand computation; the windows' shared prompt is read from
    the prefix cache."""
    items = reasoning_items(2)
    before = vllm_backend.cached_tokens
    params = LocalParams(window=2)
    results = local_runner(vllm_backend, MODEL)([(it, ("auto", params)) for it in items])
    assert all(r.error is None for r in results), [r.error for r in results]
    assert sum(check_exact(r.scores, it, plain_model, window=2) for r, it in zip(results, items, strict=True)) == 6
    assert vllm_backend.info()["prefix_reuse"] is True
    assert vllm_backend.cached_tokens > before  # steps and candidates share their instruction's prompt


def test_a_vllm_worker_scores_a_local_dataset(api, worker_factory, vllm_backend, plain_model, rclient, keys) -> None:
    items = reasoning_items(1) + [ONE_STEP]
    body = {"name": "t", "target_model": MODEL, "scores": ["logprob", "local"], "local_window": 1}
    ds = api.post("/v1/datasets", json=body).json()["id"]
    api.post(f"/v1/datasets/{ds}/items", json={"items": items})
    worker_factory(task="logprob", name="w-logprob")  # hf
    worker_factory(backend=vllm_backend, task="local", name="w-local-vllm")
    st = wait_done(api, ds, timeout=900)
    assert (st["tasks"]["local"]["scored_items"], st["tasks"]["local"]["failed_items"]) == (2, 0)
    for it in items:
        stored = decode_scores(rclient.hget(keys.task_results(ds, "local"), it["id"]))
        check_exact(stored, it, plain_model, window=1)
