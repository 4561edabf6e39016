"""The strategy interface: scored items in, picks out. A strategy never rescores anything."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from grape.records import prompt_messages


@dataclass(frozen=True)
class ScoredItem:
    item: dict[str, Any]
    """The stored item: id, instruction or messages, candidates [{source, response}]."""
    scores: list[dict[str, Any]]
    """Per candidate, in candidate order: {"logprob_sum", "tokens", "prompt_tokens"}."""


@dataclass(frozen=True)
class SelectParams:
    k: int = 1
    """Candidates kept per instruction (per-instruction strategies)."""
    reduce: Literal["mean", "sum"] = "mean"
    """GRAPE: rank by mean log-prob per token (the paper) or by the sum."""


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
    def __call__(self, rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]: ...
