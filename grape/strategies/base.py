"""The strategy interface: scored items in, picks out. A strategy never rescores anything."""

from __future__ import annotations

import functools
import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from grape.records import prompt_messages
from grape.score_kinds import ScoreTask


@dataclass(frozen=True)
class ScoredItem:
    item: dict[str, Any]
    """The stored item: id, instruction or messages, candidates [{source, response}]."""
    scores: list[dict[str, Any]]
    """Per candidate, in candidate order: {"logprob_sum", "tokens", "prompt_tokens"}."""
    extra: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Results of the dataset's extra tasks that the strategy `needs` (grape.score_kinds): "unconditioned",
    "rating", "embedding" -> per candidate, in candidate order. An item lacking one is not given."""


Reduce = Literal["mean", "sum"]
"""How a candidate's log-probability is reduced over its tokens: the mean per token, or the sum."""

SEED_MAX = 2**32 - 1
"""Largest seed a request may give (what numpy and torch seeding take)."""


class SelectParams(BaseModel):
    """The selection parameters, declared once with their bounds: the query of `/selection` and `/compare`, the
    base of a training job's request and of an experiment arm, the CLI's flags. A strategy reads the ones its
    record names (`StrategySpec.params`) and ignores the others."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    k: int = Field(1, ge=1, le=1000, description="Responses kept per instruction.")
    reduce: Reduce = Field(
        "mean", description="Rank by the mean log-probability per token (the paper's) or by the sum."
    )
    n: int | None = Field(
        None,
        ge=0,
        le=100_000_000,
        description="Budget: pairs kept across the pool; unset, the strategy's own default.",
    )
    tau: float = Field(
        0.9,
        ge=-1,
        le=1,
        description="Cosine similarity threshold: a pair is kept only if its similarity to every kept pair is at "
        "most tau.",
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of a random selection: the same seed, the same pairs.")

    def select_params(self) -> SelectParams:
        """Only the selection parameters, of a request that carries more (a job, an arm, a route's query)."""
        if type(self) is SelectParams:
            return self
        return SelectParams(**{name: getattr(self, name) for name in SelectParams.model_fields})


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
    """`rows` in upload order; picks in the strategy's order. What else a strategy is (the scores it reads, whether
    it streams, decides per instruction, which parameters it reads) is its record, `StrategySpec`."""

    def __call__(self, rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]: ...


def budget(params: SelectParams, default: int | None) -> int | None:
    n = params.n if params.n is not None else default
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n


def take_ranked(ranked: Iterable[tuple[ScoredItem, int, float]], params: SelectParams, n: int | None) -> list[Pick]:
    """Walk (row, candidate, score) best first; keep at most `params.k` per instruction, `n` in all."""
    kept: list[Pick] = []
    taken: dict[str, int] = {}  # pairs kept so far per instruction
    for row, cand, score in ranked:
        if n is not None and len(kept) >= n:
            break
        item_id = row.item["id"]
        if taken.get(item_id, 0) >= params.k:
            continue
        taken[item_id] = taken.get(item_id, 0) + 1
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
    """A strategy that decides each instruction alone: each page decided as it comes."""

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


Accumulate = Callable[[SelectParams, Keep], Accumulator]
"""A strategy's streaming form: `accumulate(params, keep)`."""


def streamed(select: Strategy) -> Accumulate:
    """The streaming form of a strategy that decides each instruction alone (`StrategySpec.streams`)."""
    return functools.partial(_PerItem, select)


def collected(select: Strategy) -> Accumulate:
    """The streaming form of a pool-wide strategy written as a plain function: it holds the whole pool."""
    return functools.partial(_Collect, select)


def accumulator(select: Strategy, params: SelectParams, keep: Keep = whole_item) -> Accumulator:
    """The streaming form of a strategy: its record's (`StrategySpec.accumulate`); a plain function without a
    record is taken as pool-wide and given the whole pool (it still works, in more memory)."""
    if isinstance(select, StrategySpec):
        return select.accumulate(params, keep)
    return _Collect(select, params, keep)


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy is, declared once beside its code (every field required): the registry, `/selection`,
    `/compare`, the experiment driver, the CLI's help and the documentation read it. Called, it runs the
    strategy: `spec(rows, params)` gives its picks."""

    name: str
    """What a request names it by (`strategy=`); a family's template: `source:<name>`."""
    summary: str
    """One line: what it keeps, and its default budget if it has one."""
    needs: tuple[str, ...]
    """The extra score tasks it reads (grape.score_kinds `ScoreTask` names), beyond the logprob scores; their
    results arrive in `ScoredItem.extra`."""
    per_instruction: bool
    """Without a budget it picks up to `k` responses for every instruction it can serve: an experiment draws the
    same instructions for all such arms. False: pool-wide, it ranks pairs across the pool and keeps its top `n`."""
    streams: bool
    """Decided one instruction at a time: `/selection` sends each page's picks as the page is read."""
    params: tuple[str, ...]
    """The selection parameters it reads (fields of `SelectParams`)."""
    accumulate: Accumulate
    """Its streaming form (`streamed(select)` for one that streams)."""
    texts: bool
    """Whether it reads the response texts. False: the whole-pool reads (`/compare`, `/summary`, a selection's
    pass) give it rows whose items hold `id` and each candidate's `source` only, and decode no text to decide."""
    columns: Callable[[SelectParams], Any] | None
    """Its column form (numpy over a page of pairs, grape.strategies.columns; the reads' fast path): made from the
    parameters, None where they are not covered; None for a strategy without one (it is fed rows)."""

    def __post_init__(self) -> None:
        where = f"strategy {self.name!r}"
        if not self.name or not self.summary.strip() or "\n" in self.summary:
            raise ValueError(f"{where}: a name and a one-line summary")
        unknown = [p for p in self.params if p not in SelectParams.model_fields]
        if unknown:
            raise ValueError(
                f"{where}: params {unknown} are not selection parameters ({', '.join(SelectParams.model_fields)})"
            )
        tasks = {t.value for t in ScoreTask}
        if any(n not in tasks for n in self.needs):
            raise ValueError(f"{where}: needs {list(self.needs)}, score tasks are {', '.join(sorted(tasks))}")

    def __call__(self, rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
        acc = self.accumulate(params, whole_item)
        if isinstance(acc, _PerItem):  # the whole items kept: its picks are the function's own, as they come
            return acc.select(rows, params)
        return picks(acc, rows)


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
