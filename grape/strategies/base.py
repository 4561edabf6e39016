"""The strategy interface: scored items in, picks out. A strategy never rescores anything."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
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


# ---- streaming: a strategy fed a page of rows at a time, holding only what it may still pick ----------

Keep = Callable[[ScoredItem, int], Any]
"""What a streaming strategy holds for a pair it may pick: `keep(row, candidate)` (the caller chooses: the item
itself, its id, a few counters), so a pool-wide strategy holds its budget's worth of these, never the rows."""


def whole_item(row: ScoredItem, candidate: int) -> Any:
    return row.item


@dataclass(frozen=True)
class Choice:
    ref: Any
    """What `keep(row, candidate)` returned for the picked pair."""
    candidate: int
    score: float
    rank: int = 1


class Accumulator(Protocol):
    """A strategy run over pages of rows in upload order: `add` gives the choices it can make from a page alone
    (a per-instruction strategy: all of that page's), `finish` the rest once every page was added."""

    def add(self, rows: Iterable[ScoredItem]) -> Iterator[Choice]: ...

    def finish(self) -> Iterator[Choice]: ...


class _PerItem:
    """A per-item strategy (`per_item`): each page decided alone, as it comes."""

    def __init__(self, select: Strategy, params: SelectParams, keep: Keep) -> None:
        self.select, self.params, self.keep = select, params, keep

    def add(self, rows: Iterable[ScoredItem]) -> Iterator[Choice]:
        rows = list(rows)
        by_item = {id(row.item): row for row in rows}
        for p in self.select(rows, self.params):
            yield Choice(self.keep(by_item[id(p.item)], p.candidate), p.candidate, p.score, p.rank)

    def finish(self) -> Iterator[Choice]:
        return iter(())


class _Collect:
    """A pool-wide strategy without a streaming form of its own: it is given the whole pool (memory grows with it).
    The refs are taken as each page is added (`keep` may depend on the page being read)."""

    def __init__(self, select: Strategy, params: SelectParams, keep: Keep) -> None:
        self.select, self.params, self.keep = select, params, keep
        self.rows: list[ScoredItem] = []
        self.refs: dict[int, list[Any]] = {}

    def add(self, rows: Iterable[ScoredItem]) -> Iterator[Choice]:
        for row in rows:
            self.rows.append(row)
            self.refs[id(row.item)] = [self.keep(row, i) for i in range(len(row.item["candidates"]))]
        return iter(())

    def finish(self) -> Iterator[Choice]:
        for p in self.select(self.rows, self.params):
            yield Choice(self.refs[id(p.item)][p.candidate], p.candidate, p.score, p.rank)


def accumulator(select: Strategy, params: SelectParams, keep: Keep = whole_item) -> Accumulator:
    """The streaming form of a strategy: its own (`select.accumulate(params, keep)`), page by page for a per-item
    one, else one that collects the pool (a strategy added without a streaming form still works, in more memory)."""
    make = getattr(select, "accumulate", None)
    if make is not None:
        return make(params, keep)
    if getattr(select, "per_item", False):
        return _PerItem(select, params, keep)
    return _Collect(select, params, keep)


def picks(acc: Accumulator, rows: Iterable[ScoredItem]) -> Iterator[Pick]:
    """A streaming strategy (made with `keep=whole_item`) run over all rows at once: the plain strategy's picks."""
    for c in acc.add(rows):
        yield Pick(c.ref, c.candidate, c.score, c.rank)
    for c in acc.finish():
        yield Pick(c.ref, c.candidate, c.score, c.rank)


class TopPairs:
    """Pairs ranked by (value, upload order, candidate), lowest first; at most `k` per instruction, the first `n`
    (None: all). Each row's own best `k` are the only ones of it that can be kept (`take_ranked` skips the rest),
    so a bounded heap of `n` entries over the stream gives exactly the sort-then-walk of the whole pool."""

    def __init__(self, params: SelectParams, keep: Keep, n: int | None) -> None:
        self.k, self.n, self.keep = params.k, n, keep
        self.order = 0
        # with n: a max-heap (inverted keys) of the n best so far; without: every candidate pair
        self.heap: list[tuple[Any, ...]] = []

    def pairs(self, row: ScoredItem) -> Iterable[tuple[float, int, float]]:
        """(value, candidate, score) of the row's rankable pairs."""
        raise NotImplementedError

    def add(self, rows: Iterable[ScoredItem]) -> Iterator[Choice]:
        for row in rows:
            order = self.order
            self.order += 1
            if self.n == 0 or self.k <= 0:
                continue
            best = sorted(self.pairs(row), key=lambda p: (p[0], p[1]))[: self.k]
            for value, cand, score in best:
                if self.n is None:
                    self.heap.append((value, order, cand, self.keep(row, cand), score))
                    continue
                entry = (-value, -order, -cand, self.keep(row, cand), score)
                if len(self.heap) < self.n:
                    heapq.heappush(self.heap, entry)
                elif entry[:3] > self.heap[0][:3]:
                    heapq.heapreplace(self.heap, entry)
        return iter(())

    def finish(self) -> Iterator[Choice]:
        if self.n is None:
            ranked = sorted(self.heap, key=lambda e: e[:3])
        else:
            ranked = [(-v, -o, -c, ref, s) for v, o, c, ref, s in sorted(self.heap, key=lambda e: e[:3], reverse=True)]
        self.heap = []
        for rank, (_, _, cand, ref, score) in enumerate(ranked, start=1):
            yield Choice(ref, cand, score, rank)
