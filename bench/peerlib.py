"""What bench/peers.py and bench/gpu_check.py share: the pools, the exact tokenization, GRAPE picks.

Pools are built as text (responses capped in tokens, then decoded), so the same items can be uploaded
to the service and fed to every peer; every peer then sees the same pairs, and pair-tokens are counted
once, here, with the service's own tokenization (`grape.formatting`: chat template with the generation
prompt, then the response tokenized alone).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

POOLS = ("real", "long-prefix")
DEFAULT_ITEMS = {"real": 8, "long-prefix": 4}
MAX_RESPONSE_TOKENS = 300
"""Responses are capped as bench/score_throughput.py and bench/backends_throughput.py cap them."""


def load_pool(pool: str, items: int, tokenizer: Any, max_response_tokens: int = MAX_RESPONSE_TOKENS) -> list[dict]:
    """`items` items of the real dev pool (all candidates, responses capped) or of the long-prefix pool
    (multi-turn histories of 500+ tokens, 10 candidates of ~100 tokens), as bench/score_throughput.py
    builds them."""
    from score_throughput import long_prefix_pool, real_pool

    if pool == "real":
        return real_pool(items, max_response_tokens, tokenizer)
    if pool == "long-prefix":
        return long_prefix_pool(items, tokenizer)
    raise ValueError(f"unknown pool {pool!r}: choose one of {', '.join(POOLS)}")


def pair_requests(tokenizer: Any, items: list[dict], template: str = "auto") -> tuple[list[Any], list[int]]:
    """One ScoreRequest per candidate, tokenized as the worker tokenizes it, and each one's item index."""
    from grape.formatting import prompt_ids, resolve_template, response_ids
    from workers.backends.base import ScoreRequest

    tmpl = resolve_template(tokenizer, template)
    requests, owners = [], []
    for n, item in enumerate(items):
        p = prompt_ids(tokenizer, item, tmpl)
        for cand in item["candidates"]:
            requests.append(ScoreRequest(prompt_ids=p, response_ids=response_ids(tokenizer, cand["response"], tmpl)))
            owners.append(n)
    return requests, owners


def prompt_text(tokenizer: Any, item: dict) -> str:
    """The prompt rendering the service scores after: the chat template with the generation prompt."""
    from grape.records import prompt_messages

    return tokenizer.apply_chat_template(prompt_messages(item), add_generation_prompt=True, tokenize=False)


def grape_picks(means: list[float], owners: list[int]) -> dict[int, int]:
    """Per item, the index of the candidate with the highest mean log-prob (first one on ties)."""
    best: dict[int, tuple[float, int]] = {}
    for i, (m, item) in enumerate(zip(means, owners, strict=True)):
        if item not in best or m > best[item][0]:
            best[item] = (m, i)
    return {item: i for item, (_, i) in best.items()}


def machine_load() -> str:
    """The 1/5/15-minute load averages: the machine is shared, so every table says how busy it was."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"
