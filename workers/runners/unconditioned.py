"""log p(response) without the instruction, under the target model: the second pass of IFD.

IFD = PPL(y | x) / PPL(y) (Cherry LLM, Superfiltering). The response tokens are exactly those of the
conditioned pass (grape.formatting.response_ids with the dataset's template, so `plain` keeps its
leading space), and the context is the tokenizer's BOS token alone (grape.formatting.
unconditioned_prompt_ids). Per candidate: `logprob_sum` over `tokens` response tokens.

A tokenizer without a BOS token leaves the first response token with no context at all, and a causal
LM has no distribution for it. We then score from the second token on (the first is the context) and
record `skipped: 1`, which is also what the reference IFD code does in that case (its loss starts at the
second token); a one-token response then has no unconditioned perplexity: `logprob_sum` is null and the
IFD strategy leaves that candidate out. No number is ever made up. (SmolLM2 has a BOS token.)
"""

from __future__ import annotations

from typing import Any

from grape.formatting import FormatError, resolve_template, response_ids, unconditioned_prompt_ids
from grape.store.scoring import ItemResult
from workers.backends.base import ScoreRequest
from workers.runners.common import Prepared, run_batched


def prepare(backend: Any, item: dict[str, Any], template: str) -> Prepared | ItemResult:
    tok = backend.tokenizer
    n = len(item["candidates"])
    try:
        resolved = resolve_template(tok, template)
    except FormatError as exc:
        return ItemResult(item["id"], n, error=str(exc))
    context = unconditioned_prompt_ids(tok)
    requests: list[ScoreRequest | None] = []
    skipped: list[int] = []
    for i, cand in enumerate(item["candidates"]):
        resp = response_ids(tok, cand["response"], resolved)
        if not resp:
            return ItemResult(item["id"], n, error=f"candidate {i} ({cand['source']}): response has zero tokens")
        if context:
            req, skip = ScoreRequest(list(context), resp), 0
        elif len(resp) >= 2:
            req, skip = ScoreRequest(resp[:1], resp[1:]), 1
        else:
            req, skip = None, 1  # a one-token response and no BOS: nothing to condition on
        if req is not None and req.length > backend.max_model_len:
            return ItemResult(
                item["id"],
                n,
                error=f"too long: candidate {i} ({cand['source']}) is {req.length} tokens > "
                f"max_model_len {backend.max_model_len}",
            )
        requests.append(req)
        skipped.append(skip)
    real = [r for r in requests if r is not None]
    return Prepared(item["id"], n, real, {"slots": requests, "skipped": skipped})


def finish(p: Prepared, logprobs: list[list[float]]) -> ItemResult:
    scores = []
    it = iter(logprobs)
    for req, skip in zip(p.context["slots"], p.context["skipped"], strict=True):
        if req is None:
            scores.append({"logprob_sum": None, "tokens": 0, "prompt_tokens": 0, "skipped": skip})
            continue
        lps = next(it)
        if len(lps) != len(req.response_ids):
            raise RuntimeError(f"backend returned {len(lps)} log-probs for {len(req.response_ids)} tokens")
        scores.append(
            {"logprob_sum": float(sum(lps)), "tokens": len(lps), "prompt_tokens": len(req.prompt_ids), "skipped": skip}
        )
    return ItemResult(p.item_id, p.candidates, scores=scores)


def runner(backend: Any, model: str) -> Any:
    def run(items: list[tuple[dict[str, Any], str]]) -> list[ItemResult]:
        return run_batched([prepare(backend, it, tpl) for it, tpl in items], backend.score, finish)

    return run
