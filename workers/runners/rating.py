"""Deita complexity and quality scores from a scorer model (Liu et al., "What Makes Good Data for Alignment?").

For each prompt below, the scorer's next-token distribution at the last position is read at the tokens
"1".."6"; a softmax over those six logits gives p_1..p_6 and the score is sum_i p_i * i (in [1, 6]).
Complexity is computed once per user turn (it depends on the instruction only), quality once per
(instruction, response). Per candidate we store:

    complexity  the final user turn's complexity
    quality     the candidate's quality as the reply to that turn
    history     sum over the earlier turns t of complexity_t * quality_t (0 for single-turn items)

so that the evol score of Deita, summed over turns for multi-turn samples, is
`history + complexity * quality`. System turns are not rated (Deita's prompts have no place for them).

Prompting: the released Deita scorers are fine-tuned on these exact prompts, rendered raw (no chat
template) and tokenized as their reference code does (`tokenizer(text)`, with the tokenizer's own
special tokens); we do the same for every scorer, so a released scorer gives its published numbers.
The digit tokens are the vocabulary entries "1".."6" themselves (the prompts end with a space, so the
answer is the bare digit); a scorer whose vocabulary lacks one of them fails every item with an error
naming the model: the reference code's silent 3.0 is never returned.
"""

from __future__ import annotations

import math
from typing import Any

from grape.records import prompt_messages
from grape.store.scoring import ItemResult
from workers.backends.base import ScoreRequest
from workers.runners.common import Prepared, run_batched

COMPLEXITY_PROMPT = (
    "You are a helpful assistant. Please identify the complexity score of the following user query. \n"
    "##Query: {instruction}  \n##Complexity: "
)
QUALITY_PROMPT = (
    "You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
    "Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: "
)
DIGITS = "123456"


class DigitTokenError(ValueError):
    """The scorer's vocabulary has no single token for one of the digits 1..6."""


def digit_token_ids(tokenizer: Any, model: str) -> list[int]:
    """The vocabulary ids of the tokens "1".."6"; a DigitTokenError naming the model if one is missing."""
    ids = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for d in DIGITS:
        tid = tokenizer.convert_tokens_to_ids(d)
        if tid is None or (unk is not None and tid == unk) or tokenizer.decode([tid]) != d:
            raise DigitTokenError(
                f"scorer model {model!r} has no single token for the digit {d!r}: Deita scores read the "
                "next-token logits of the tokens '1'..'6'; use a scorer whose vocabulary has them"
            )
        ids.append(int(tid))
    return ids


def expected_score(digit_logprobs: list[float]) -> float:
    """sum_i p_i * i with p = softmax over the six digits' log-probs (or logits: the shift cancels)."""
    if len(digit_logprobs) != len(DIGITS) or not all(math.isfinite(x) for x in digit_logprobs):
        raise ValueError(f"expected 6 finite digit log-probs, got {digit_logprobs}")
    top = max(digit_logprobs)
    weights = [math.exp(x - top) for x in digit_logprobs]
    total = sum(weights)
    return sum((i + 1) * w / total for i, w in enumerate(weights))


def turns(item: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The user turns and the earlier assistant replies of an item (system turns left out)."""
    msgs = prompt_messages(item)
    users = [m["content"] for m in msgs if m["role"] == "user"]
    replies: list[str] = []
    for i, m in enumerate(msgs):
        if m["role"] == "user" and len(replies) < len(users) - 1:
            nxt = next((x for x in msgs[i + 1 :] if x["role"] != "system"), None)
            replies.append(nxt["content"] if nxt is not None and nxt["role"] == "assistant" else "")
    return users, replies


def _encode(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text)["input_ids"]]


def prepare(backend: Any, item: dict[str, Any]) -> Prepared | ItemResult:
    tok = backend.tokenizer
    n = len(item["candidates"])
    users, replies = turns(item)
    prompts: list[list[int]] = [_encode(tok, COMPLEXITY_PROMPT.format(instruction=u)) for u in users]
    prompts += [
        _encode(tok, QUALITY_PROMPT.format(instruction=u, output=r)) for u, r in zip(users[:-1], replies, strict=True)
    ]
    for i, cand in enumerate(item["candidates"]):
        text = QUALITY_PROMPT.format(instruction=users[-1], output=cand["response"])
        prompts.append(_encode(tok, text))
        if len(prompts[-1]) > backend.max_model_len:
            return ItemResult(
                item["id"],
                n,
                error=f"too long: quality prompt of candidate {i} ({cand['source']}) is {len(prompts[-1])} "
                f"tokens > max_model_len {backend.max_model_len}",
            )
    longest = max(len(p) for p in prompts)
    if longest > backend.max_model_len:
        limit = backend.max_model_len
        return ItemResult(item["id"], n, error=f"too long: a rating prompt is {longest} tokens > max_model_len {limit}")
    return Prepared(item["id"], n, prompts, {"turns": len(users)})


def finish(p: Prepared, digit_logprobs: list[list[float]]) -> ItemResult:
    t = p.context["turns"]
    values = [expected_score(lp) for lp in digit_logprobs]
    complexity, history_quality, quality = values[:t], values[t : 2 * t - 1], values[2 * t - 1 :]
    history = sum(c * q for c, q in zip(complexity[:-1], history_quality, strict=True))
    prompt_tokens = sum(len(x) for x in p.requests[: 2 * t - 1])
    scores = [
        {
            "complexity": complexity[-1],
            "quality": q,
            "history": history,
            "tokens": len(p.requests[2 * t - 1 + i]),
            "prompt_tokens": prompt_tokens if i == 0 else 0,
        }
        for i, q in enumerate(quality)
    ]
    return ItemResult(p.item_id, p.candidates, scores=scores)


def digit_logprobs(backend: Any, prompts: list[list[int]], ids: list[int]) -> list[list[float]]:
    """log p(digit | prompt) for the six digits, per prompt. Backends with `next_token_logprobs` do it in
    one pass per prompt; any other scoring backend answers it as six one-token scoring requests."""
    fast = getattr(backend, "next_token_logprobs", None)
    if fast is not None:
        return fast(prompts, ids)
    flat = backend.score([ScoreRequest(list(p), [d]) for p in prompts for d in ids])
    return [[row[0] for row in flat[i * len(ids) : (i + 1) * len(ids)]] for i in range(len(prompts))]


def runner(backend: Any, model: str) -> Any:
    try:
        ids: list[int] | None = digit_token_ids(backend.tokenizer, model)
        problem = ""
    except DigitTokenError as exc:
        ids, problem = None, str(exc)

    def run(items: list[tuple[dict[str, Any], str]]) -> list[ItemResult]:
        if ids is None:
            return [ItemResult(it["id"], len(it["candidates"]), error=problem) for it, _ in items]
        return run_batched(
            [prepare(backend, it) for it, _ in items], lambda prompts: digit_logprobs(backend, prompts, ids), finish
        )

    return run
