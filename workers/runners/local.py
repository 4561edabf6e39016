"""The `local` task: LALP step scores of every candidate under the target model (grape.local_steps).

Each step of each candidate is one backend request, `prompt + at most window preceding steps` as context
and the step's tokens as the scored part, so the same backends score it exactly (hf: each distinct context
runs once; vLLM: token-id prompts, the prefix cache shares the prompt between steps and candidates). Per
candidate: `local` (mean of the step means), `steps`, `step_min`, `step_max`, `tokens` (scored tokens of
all steps), `prompt_tokens` (the prompt rendering, as the logprob task counts it) and `forward_tokens`
(every token the steps' forwards ran over: the cost). An item fails with its reason when a candidate has
no tokens, more than MAX_STEPS steps, or a step request longer than the backend's `max_model_len` (never
truncated).
"""

from __future__ import annotations

from typing import Any

from grape.local_steps import MAX_STEPS, LocalParams, aggregate, step_ids, window_requests
from grape.store.scoring import ItemResult
from workers.backends.base import ScoreRequest
from workers.runners.common import Prepared, run_batched
from workers.scoring import item_prompt


def context(meta: dict[str, str]) -> tuple[str, LocalParams]:
    """What the worker loop hands this runner with each item: the template and the dataset's LALP parameters."""
    return meta.get("template", "auto"), LocalParams.from_meta(meta)


def prepare(backend: Any, item: dict[str, Any], ctx: tuple[str, LocalParams] | str) -> Prepared | ItemResult:
    template, params = ctx if isinstance(ctx, tuple) else (ctx, LocalParams())
    tok = backend.tokenizer
    n = len(item["candidates"])
    rendered = item_prompt(tok, item, template)
    if isinstance(rendered, ItemResult):
        return rendered
    resolved, prompt = rendered
    requests: list[ScoreRequest] = []
    counts: list[int] = []
    for i, cand in enumerate(item["candidates"]):
        who = f"candidate {i} ({cand['source']})"
        steps = step_ids(tok, cand["response"], resolved, params.segmentation)
        if not any(steps):
            return ItemResult(item["id"], n, error=f"{who}: response has zero tokens")
        if len(steps) > MAX_STEPS:
            return ItemResult(item["id"], n, error=f"{who}: {len(steps)} steps > {MAX_STEPS} (local scoring's limit)")
        for j, (ctx_ids, ids) in enumerate(window_requests(prompt, steps, params.window)):
            req = ScoreRequest(ctx_ids, ids)
            if req.length > backend.max_model_len:
                return ItemResult(
                    item["id"],
                    n,
                    error=f"too long: {who} step {j} with its window is {req.length} tokens > "
                    f"max_model_len {backend.max_model_len}",
                )
            requests.append(req)
        counts.append(len(steps))
    return Prepared(item["id"], n, requests, {"steps": counts, "prompt_tokens": len(prompt)})


def finish(p: Prepared, logprobs: list[list[float]]) -> ItemResult:
    scores = []
    pos = 0
    for count in p.context["steps"]:
        reqs, lps = p.requests[pos : pos + count], logprobs[pos : pos + count]
        pos += count
        for req, lp in zip(reqs, lps, strict=True):
            if len(lp) != len(req.response_ids):
                raise RuntimeError(f"backend returned {len(lp)} log-probs for {len(req.response_ids)} tokens")
        scores.append(
            {
                **aggregate(lps),
                "prompt_tokens": p.context["prompt_tokens"],
                "forward_tokens": sum(r.length for r in reqs),
            }
        )
    return ItemResult(p.item_id, p.candidates, scores=scores)


def runner(backend: Any, model: str) -> Any:
    def run(items: list[tuple[dict[str, Any], Any]]) -> list[ItemResult]:
        return run_batched([prepare(backend, it, ctx) for it, ctx in items], backend.score, finish)

    run.context = context  # type: ignore[attr-defined]  # the worker loop passes (template, params) per item
    return run
