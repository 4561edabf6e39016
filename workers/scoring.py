"""Items in, per-item results out: tokenize with exact boundaries, check lengths, run the backend.

An item that cannot be scored (too long, empty response, bad template) becomes a failed ItemResult with
its reason; the others still score. If the backend raises on a batch, its items are retried one at a
time so that a poison item fails alone.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from grape.formatting import FormatError, prompt_ids, resolve_template, response_ids, response_ids_batch
from grape.records import Template
from grape.store.scoring import ItemResult
from workers.backends.base import ScoreRequest, ScoringBackend

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    item_id: str
    requests: list[ScoreRequest]


def item_prompt(tok: Any, item: dict[str, Any], template: str) -> tuple[Any, list[int]] | ItemResult:
    """The item's resolved template and prompt token ids, or the item's failure (a template that cannot render
    it, or a prompt of zero tokens): the first step of every runner that scores responses after a prompt."""
    try:
        resolved = resolve_template(tok, template)
        prompt = prompt_ids(tok, item, resolved)
    except FormatError as exc:
        return ItemResult(item["id"], len(item["candidates"]), error=str(exc))
    if not prompt:
        return ItemResult(item["id"], len(item["candidates"]), error="the prompt renders to zero tokens")
    return resolved, prompt


def prepare(
    backend: ScoringBackend, item: dict[str, Any], template: str, responses: list[list[int]] | None = None
) -> Prepared | ItemResult:
    """One item's requests, or its failure. `responses`: its candidates' response ids when the caller
    tokenized them already (`prepare_items` does, for many items in one tokenizer call)."""
    tok = backend.tokenizer
    n = len(item["candidates"])
    rendered = item_prompt(tok, item, template)
    if isinstance(rendered, ItemResult):
        return rendered
    resolved, prompt = rendered
    requests = []
    for i, cand in enumerate(item["candidates"]):
        resp = responses[i] if responses is not None else response_ids(tok, cand["response"], resolved)
        if not resp:
            return ItemResult(item["id"], n, error=f"candidate {i} ({cand['source']}): response has zero tokens")
        total = len(prompt) + len(resp)
        if total > backend.max_model_len:
            return ItemResult(
                item["id"],
                n,
                error=f"too long: candidate {i} ({cand['source']}) is {total} tokens > "
                f"max_model_len {backend.max_model_len}",
            )
        requests.append(ScoreRequest(prompt, resp))
    return Prepared(item["id"], requests)


def _result(p: Prepared, logprobs: list[list[float]]) -> ItemResult:
    scores = []
    for req, lps in zip(p.requests, logprobs, strict=True):
        if len(lps) != len(req.response_ids):
            raise RuntimeError(f"backend returned {len(lps)} log-probs for {len(req.response_ids)} tokens")
        scores.append({"logprob_sum": float(sum(lps)), "tokens": len(lps), "prompt_tokens": len(req.prompt_ids)})
    return ItemResult(p.item_id, len(p.requests), scores=scores)


def prepare_items(backend: ScoringBackend, items: list[tuple[dict[str, Any], str]]) -> list[Prepared | ItemResult]:
    """Tokenize and check (item, template) pairs: the CPU half of scoring, run ahead of the backend.
    The responses of all items that share a template are tokenized in one call."""
    tok = backend.tokenizer
    by_template: dict[Template, list[int]] = {}
    for k, (_, template) in enumerate(items):
        with contextlib.suppress(FormatError):  # prepare() reports it on the item
            by_template.setdefault(resolve_template(tok, template), []).append(k)
    responses: list[list[list[int]] | None] = [None] * len(items)
    for resolved, members in by_template.items():
        texts = [c["response"] for k in members for c in items[k][0]["candidates"]]
        ids = iter(response_ids_batch(tok, texts, resolved))
        for k in members:
            responses[k] = [next(ids) for _ in items[k][0]["candidates"]]
    return [prepare(backend, item, template, responses[k]) for k, (item, template) in enumerate(items)]


def complete(backend: ScoringBackend, prepared: list[Prepared | ItemResult]) -> list[ItemResult]:
    """Run the backend on what `prepare_items` made; results in the same order."""
    todo = [p for p in prepared if isinstance(p, Prepared)]
    done: dict[str, ItemResult] = {}
    if todo:
        flat = [r for p in todo for r in p.requests]
        try:
            logprobs = backend.score(flat)
            pos = 0
            for p in todo:
                done[p.item_id] = _result(p, logprobs[pos : pos + len(p.requests)])
                pos += len(p.requests)
        except Exception as exc:  # noqa: BLE001 - isolate the item that breaks the batch
            log.warning("batch of %d items failed (%s); retrying items one by one", len(todo), exc)
            for p in todo:
                try:
                    done[p.item_id] = _result(p, backend.score(p.requests))
                except Exception as one:  # noqa: BLE001
                    done[p.item_id] = ItemResult(p.item_id, len(p.requests), error=f"scoring failed: {one}")
    return [p if isinstance(p, ItemResult) else done[p.item_id] for p in prepared]


def flat_requests(prepared: list[Prepared | ItemResult]) -> list[ScoreRequest]:
    """The backend requests of a prepared batch, in order (what `complete` sends in one call)."""
    return [r for p in prepared if isinstance(p, Prepared) for r in p.requests]


def finish(prepared: list[Prepared | ItemResult], logprobs: list[list[float]]) -> list[ItemResult]:
    """Results of a prepared batch from the log-probs of its `flat_requests` (computed elsewhere)."""
    out: list[ItemResult] = []
    pos = 0
    for p in prepared:
        if isinstance(p, ItemResult):
            out.append(p)
            continue
        out.append(_result(p, logprobs[pos : pos + len(p.requests)]))
        pos += len(p.requests)
    if pos != len(logprobs):
        raise RuntimeError(f"backend returned {len(logprobs)} results for {pos} requests")
    return out


def score_items(backend: ScoringBackend, items: list[tuple[dict[str, Any], str]]) -> list[ItemResult]:
    """Score (item, template) pairs; results come back in the same order."""
    return complete(backend, prepare_items(backend, items))
