"""The strategy interface: scored items in, picks out. A strategy never rescores anything."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from grape.records import prompt_messages


@dataclass(frozen=True)
class ScoredItem:
    item: dict[str, Any]
    """The stored item: id, instruction or messages, candidates [{source, response}]."""
    scores: list[dict[str, Any]]
    """Per candidate, in candidate order: {"logprob_sum", "tokens", "prompt_tokens"}."""
    extra: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Results of the dataset's extra tasks that the strategy `needs` (grape.score_kinds): "unconditioned",
    "rating", "embedding" -> per candidate, in candidate order. An item lacking one is not given."""


@dataclass(frozen=True)
class SelectParams:
    k: int = 1
    """Candidates kept per instruction (per-instruction strategies)."""
    reduce: Literal["mean", "sum"] = "mean"
    """GRAPE: rank by mean log-prob per token (the paper) or by the sum."""
    n: int | None = None
    """Budget: pairs kept across the pool by the pool-wide strategies (longest, deita, ifd, random);
    None is the strategy's default (longest 1000 and deita 6000 as in their papers; ifd and random: no
    budget). Per-instruction strategies (grape, source) keep k per instruction and ignore it."""
    tau: float = 0.9
    """Deita: a pair is kept only if its cosine similarity to every kept pair is <= tau."""
    seed: int = 0
    """random: the seed; the same seed gives the same selection."""


@dataclass(frozen=True)
class Pick:
    item: dict[str, Any]
    candidate: int
    score: float
    rank: int = 1

    def record(self) -> dict[str, Any]:
        """The SFT record, in the conversational form TRL's SFTTrainer reads."""
        cand = self.item["candidates"][self.candidate]
        return {
            "id": self.item["id"],
            "messages": [*prompt_messages(self.item), {"role": "assistant", "content": cand["response"]}],
            "source": cand["source"],
            "score": self.score,
            "candidate": self.candidate,
            "rank": self.rank,
        }


class Strategy(Protocol):
    """`rows` in upload order; picks in the strategy's order. Optional attributes: `per_item = True` when
    each instruction is decided alone (the service then streams page by page), `needs` = the extra
    tasks whose results the strategy reads (grape.score_kinds; they arrive in `ScoredItem.extra`),
    `per_instruction = True` when, without a budget `n`, it picks responses for every instruction it can
    serve (grape, source:, random): experiments then give such arms the same instructions (pool-wide
    strategies, longest, deita, ifd, rank pairs across the pool and take their own top `n`)."""

    def __call__(self, rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]: ...


def budget(params: SelectParams, default: int | None) -> int | None:
    n = params.n if params.n is not None else default
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n


def take_ranked(ranked: Iterable[tuple[ScoredItem, int, float]], params: SelectParams, n: int | None) -> list[Pick]:
    """Walk (row, candidate, score) best first; keep at most `params.k` per instruction, `n` in all."""
    kept: list[Pick] = []
    per_item: dict[str, int] = {}
    for row, cand, score in ranked:
        if n is not None and len(kept) >= n:
            break
        item_id = row.item["id"]
        if per_item.get(item_id, 0) >= params.k:
            continue
        per_item[item_id] = per_item.get(item_id, 0) + 1
        kept.append(Pick(row.item, cand, score, len(kept) + 1))
    return kept
