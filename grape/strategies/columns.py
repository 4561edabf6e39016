"""Strategies over columns: a page of scored items as arrays (one entry per pair), and the built-in strategies'
rules computed on such pages with numpy.

The reads of a whole pool (`/compare`, `/summary`, a selection's pass) spend their time per pair; as rows
(grape.strategies.base.ScoredItem: a dict per item, per candidate, per score) that is ~10 µs a pair in Python.
A `PairPage` holds the same page as arrays, and the column forms here give exactly the choices, scores and ranks
of the row forms (grape.strategies.grape, source, longest, random; tests/test_reads_columns.py checks them against each
other, tests/test_bounded_reads.py against the whole-pool implementations):

- grape: per instruction its `k` candidates by (-score, candidate), a lexsort of the page;
- source:<name>: per instruction its first `k` candidates of that source;
- longest: per instruction its `k` longest, then the `n` smallest (-tokens, upload order, candidate) of the pool,
  kept as arrays (`Smallest`: sorted and cut to `n` whenever twice that many are held);
- random: the same draws (`draws`, the exact steps of `draw`), with `n` the `n` smallest (u, upload order, place in
  the draw) pairs, which are the pairs the row form's walk over its instructions gives.

A strategy without a column form (deita, ifd, lalp, a plugin) is given the page as rows (`PairPage.rows`).
"""

from __future__ import annotations

import _random
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from hashlib import sha512
from typing import Any, Protocol

import numpy as np
import orjson

from grape.strategies.base import ScoredItem, SelectParams, Strategy, StrategySpec, budget

ZERO_TOKENS = "a response of zero tokens has no mean log-probability"
"""grape.strategies.grape.candidate_score's refusal, raised by the column forms where the row forms raise it."""


class SourceTable:
    """Source names as small integer codes, shared by the pages of one read (a page's `source` indexes `names`)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._codes: dict[str, int] = {}
        self._lists: dict[tuple[str, ...], np.ndarray] = {}
        self._raw: dict[bytes, np.ndarray] = {}

    def code(self, name: str) -> int:
        found = self._codes.get(name)
        if found is None:
            found = self._codes[name] = len(self.names)
            self.names.append(name)
        return found

    def codes_of_json(self, raw: bytes) -> np.ndarray:
        """The codes of a JSON list of source names (a stored facts record's second half)."""
        found = self._raw.get(raw)
        if found is None:
            if len(self._raw) > 10_000:
                self._raw.clear()
            found = self._raw[raw] = self.codes(orjson.loads(raw))
        return found

    def codes(self, sources: Sequence[str]) -> np.ndarray:
        """The codes of one item's candidate sources (items of a pool mostly share one list: computed once)."""
        key = tuple(sources)
        found = self._lists.get(key)
        if found is None:
            if len(self._lists) > 10_000:  # a pool with a source per pair: do not keep every list
                self._lists.clear()
            found = self._lists[key] = np.array([self.code(s) for s in key], dtype=np.int32)
        return found


@dataclass
class PairPage:
    """A page of scored items in upload order, as columns: one entry per pair (item j's pairs are
    `bounds[j]:bounds[j + 1]`, in candidate order). `regular`: every item has one score per candidate with numeric
    `logprob_sum` and `tokens`, so `logprob` and `tokens` hold (the column forms refuse a page that is not)."""

    ids: list[str]
    bounds: np.ndarray
    source: np.ndarray
    table: SourceTable
    chars: np.ndarray
    logprob: np.ndarray
    tokens: np.ndarray
    """float64 as stored (grape divides by it); `whole_tokens` is int(tokens), what longest and compare count."""
    regular: bool
    make_rows: Callable[[], list[ScoredItem]]
    _rows: list[ScoredItem] | None = field(default=None, repr=False)
    _ids: np.ndarray | None = field(default=None, repr=False)

    def id_array(self) -> np.ndarray:
        if self._ids is None:
            self._ids = id_array(self.ids)
        return self._ids

    def rows(self) -> list[ScoredItem]:
        """The page as rows (built once), for the strategies without a column form."""
        if self._rows is None:
            self._rows = self.make_rows()
        return self._rows

    @property
    def items(self) -> int:
        return len(self.ids)

    @property
    def pairs(self) -> int:
        return int(self.bounds[-1])

    def item_of_pair(self) -> np.ndarray:
        return np.repeat(np.arange(self.items, dtype=np.int64), np.diff(self.bounds))

    def candidate_of_pair(self) -> np.ndarray:
        return np.arange(self.pairs, dtype=np.int64) - np.repeat(self.bounds[:-1], np.diff(self.bounds))

    def whole_tokens(self) -> np.ndarray:
        return np.trunc(self.tokens).astype(np.int64)

    def check(self) -> None:
        if not self.regular:
            raise ValueError(
                "the stored scores of an item on this page do not match its candidates (one numeric logprob_sum and "
                "tokens per candidate)"
            )

    @classmethod
    def of_rows(cls, rows: Sequence[ScoredItem], table: SourceTable) -> PairPage:
        """A page of whole rows (the plain API: grape.compare.compare), the same columns a read builds."""
        rows = list(rows)
        facts = [
            ([len(c["response"]) for c in r.item["candidates"]], [c["source"] for c in r.item["candidates"]])
            for r in rows
        ]
        scores = score_matrix([_table(r.scores) for r in rows])
        return build([r.item["id"] for r in rows], *facts_columns(facts, table), table, scores, lambda: rows)


def _table(scores: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    fields = list(scores[0]) if scores else []
    return fields, [[s.get(f) for f in fields] for s in scores]


ScoreMatrix = tuple[list[str], np.ndarray, np.ndarray]
"""Scores of a page's items: the field names, their values as float64 (a row per candidate, a column per field)
and how many rows each item has."""


def facts_columns(
    facts: Sequence[tuple[list[int], list[str]]], table: SourceTable
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidates per item, response lengths, source codes) of items' facts (grape.store.facts)."""
    counts = np.fromiter((len(c) for c, _ in facts), dtype=np.int64, count=len(facts))
    chars = np.fromiter((x for c, _ in facts for x in c), dtype=np.int64, count=int(counts.sum()))
    codes = [table.codes(s) for _, s in facts]
    return counts, chars, np.concatenate(codes) if codes else np.zeros(0, dtype=np.int32)


def score_matrix(tables: Sequence[tuple[list[str], list[list[Any]]]]) -> ScoreMatrix | None:
    """The matrix of decoded results (grape.store.codec.decode_score_tables), or None when they do not share their
    field names or hold something that is not a number."""
    fields = tables[0][0] if tables else []
    if any(f != fields for f, _ in tables):
        return None
    try:
        values = np.array([r for _, rows in tables for r in rows], dtype=np.float64)
    except (TypeError, ValueError):  # a value that is not a number, a row of another length
        return None
    rows = np.fromiter((len(r) for _, r in tables), dtype=np.int64, count=len(tables))
    return fields, values.reshape(len(values), len(fields)) if values.size == 0 else values, rows


def build(
    ids: list[str],
    counts: np.ndarray,
    chars: np.ndarray,
    source: np.ndarray,
    table: SourceTable,
    scores: ScoreMatrix | None,
    make_rows: Callable[[], list[ScoredItem]],
) -> PairPage:
    """A page from its items' facts (`facts_columns`) and scores (None: not columns: the page is not regular)."""
    bounds = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=bounds[1:])
    logprob, tokens, regular = _score_columns(scores, counts)
    return PairPage(ids, bounds, source, table, chars, logprob, tokens, regular and len(chars) == bounds[-1], make_rows)


def _score_columns(scores: ScoreMatrix | None, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    empty = np.zeros(0, dtype=np.float64)
    if not len(counts):
        return empty, empty, True
    if scores is None:
        return empty, empty, False
    fields, values, rows = scores
    if "logprob_sum" not in fields or "tokens" not in fields or values.ndim != 2:
        return empty, empty, False
    if not (np.array_equal(rows, counts) and counts.all() and values.shape == (int(counts.sum()), len(fields))):
        return empty, empty, False
    logprob, tokens = values[:, fields.index("logprob_sum")], values[:, fields.index("tokens")]
    if not (np.isfinite(logprob).all() and np.isfinite(tokens).all()):
        return empty, empty, False
    return np.ascontiguousarray(logprob), np.ascontiguousarray(tokens), True


def candidate_scores(page: PairPage, reduce: str, pairs: np.ndarray | None = None) -> np.ndarray:
    """grape.strategies.grape.candidate_score of every pair (or of `pairs`): the mean refuses zero tokens as it does."""
    lp = page.logprob if pairs is None else page.logprob[pairs]
    if reduce == "sum":
        return lp.copy() if pairs is None else lp
    tok = page.tokens if pairs is None else page.tokens[pairs]
    if (tok <= 0).any():
        raise ValueError(ZERO_TOKENS)
    return lp / tok


# ---- picks ---------------------------------------------------------------------------------------------


def id_array(ids: Sequence[str]) -> np.ndarray:
    """Item ids as one fixed-width bytes array (what a pool-wide strategy holds of its picks: no object per id), each
    with a closing byte so that none ends in a NUL (which such an array would drop)."""
    return np.array([i.encode() + b"." for i in ids], dtype=np.bytes_) if ids else np.zeros(0, dtype="S1")


def id_list(ids: np.ndarray) -> list[str]:
    """The ids of an `id_array`."""
    return [i[:-1].decode() for i in ids.tolist()]


@dataclass
class Picked:
    """Picks in the strategy's order, as columns: the item (its id, an `id_array`, and its position among the scored
    items read), the candidate, score and rank, and what a comparison counts of the pair (tokens, response length,
    source code)."""

    ids: np.ndarray
    order: np.ndarray
    candidate: np.ndarray
    score: np.ndarray
    rank: np.ndarray
    tokens: np.ndarray
    chars: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.order)

    def id_list(self) -> list[str]:
        return id_list(self.ids)

    @classmethod
    def empty(cls) -> Picked:
        i, f = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        return cls(np.zeros(0, dtype="S1"), i, i, f, i, i, i, np.zeros(0, dtype=np.int32))

    @classmethod
    def of_pairs(cls, page: PairPage, first: int, pairs: np.ndarray, score: np.ndarray, rank: np.ndarray) -> Picked:
        """Pairs of a page (`first`: the position of its first item among the scored items read)."""
        item = np.searchsorted(page.bounds, pairs, side="right") - 1
        return cls(
            page.id_array()[item],
            item + first,
            pairs - page.bounds[item],
            score,
            rank,
            np.trunc(page.tokens[pairs]).astype(np.int64) if page.regular else np.zeros(len(pairs), np.int64),
            page.chars[pairs],
            page.source[pairs],
        )

    def take(self, idx: np.ndarray) -> Picked:
        return Picked(*(getattr(self, f)[idx] for f in _PICKED))

    @classmethod
    def concat(cls, parts: Sequence[Picked]) -> Picked:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in _PICKED))


_PICKED = ("ids", "order", "candidate", "score", "rank", "tokens", "chars", "source")


class Columnar(Protocol):
    """A strategy's column form, fed the pages of a pool in upload order: `add` gives the picks a page decides
    (a per-instruction strategy: all of that page's), `finish` the rest once every page was added."""

    def add(self, page: PairPage) -> Picked: ...

    def finish(self) -> Picked: ...


def _best_per_item(page: PairPage, key: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per item its `k` pairs of smallest `key` (ties: the lower candidate first): their indexes, grouped by item in
    upload order, and each one's place within its item (0-based)."""
    item, cand = page.item_of_pair(), page.candidate_of_pair()
    idx = np.lexsort((cand, key, item))
    place = np.arange(page.pairs, dtype=np.int64) - page.bounds[item[idx]]  # the page stays grouped by item
    keep = place < k
    return idx[keep], place[keep]


class GrapeColumns:
    def __init__(self, params: SelectParams) -> None:
        self.k, self.reduce, self.items = params.k, params.reduce, 0

    def add(self, page: PairPage) -> Picked:
        page.check()
        first, self.items = self.items, self.items + page.items
        score = candidate_scores(page, self.reduce)
        pairs, place = _best_per_item(page, -score, self.k)  # by (-score, candidate), as the row form sorts
        return Picked.of_pairs(page, first, pairs, score[pairs], place + 1)

    def finish(self) -> Picked:
        return Picked.empty()


class SourceColumns:
    def __init__(self, name: str, params: SelectParams) -> None:
        self.name, self.k, self.reduce, self.items = name, params.k, params.reduce, 0

    def add(self, page: PairPage) -> Picked:
        page.check()
        first, self.items = self.items, self.items + page.items
        mine = page.source == page.table.code(self.name)
        seen = np.cumsum(mine)  # per pair: this source's candidates up to it, since the page's start
        before = np.concatenate(([0], seen))[page.bounds[:-1]]  # ... before each item
        rank = seen - np.repeat(before, np.diff(page.bounds))
        pairs = np.flatnonzero(mine & (rank <= self.k))
        return Picked.of_pairs(page, first, pairs, candidate_scores(page, self.reduce, pairs), rank[pairs])

    def finish(self) -> Picked:
        return Picked.empty()


class Smallest:
    """The `n` smallest entries by the key (a, upload order, c) over a stream of pages, with their picks, in
    arrays: cut back to `n` (sorted) whenever a quarter more are held, so memory is bounded by the budget (a cut
    copies what is held: at 1M pairs and n=100k, cutting at 2n put the gateway's peak at 1.31x its 100k figure,
    at 1.25n 1.26-1.27x, most of the rest the allocator's; after the first cut only entries better than the n-th
    enter, so cuts stay rare). With `n` None every entry is held (the row form holds them all too)."""

    def __init__(self, n: int | None) -> None:
        self.n = n
        self.parts: list[tuple[np.ndarray, np.ndarray, Picked]] = []  # (a, c, picks: their order completes the key)
        self.held = 0
        self.worst: float | None = None  # the largest a kept once n were held: new entries need a smaller one

    def add(self, a: np.ndarray, c: np.ndarray, picks: Picked) -> None:
        if self.n == 0 or not len(picks):
            return
        if self.worst is not None:  # a later entry ties only with a larger upload order: strictly smaller a
            better = np.flatnonzero(a < self.worst)
            if not len(better):
                return
            a, c, picks = a[better], c[better], picks.take(better)
        self.parts.append((a, c, picks))
        self.held += len(picks)
        if self.n is not None and self.held > self.n + max(self.n // 4, 1024):
            self._cut()

    def _cut(self) -> Picked:
        a = np.concatenate([p[0] for p in self.parts]) if self.parts else np.zeros(0)
        c = np.concatenate([p[1] for p in self.parts]) if self.parts else np.zeros(0, dtype=np.int64)
        picks = Picked.concat([p[2] for p in self.parts])
        idx = np.lexsort((c, picks.order, a))
        if self.n is not None:
            idx = idx[: self.n]
        a, c, picks = a[idx], c[idx], picks.take(idx)
        self.parts, self.held = [(a, c, picks)], len(picks)
        if self.n and len(picks) >= self.n:
            self.worst = float(a[-1])
        return picks

    def finish(self) -> Picked:
        """The held picks in key order, ranked 1, 2, ..."""
        picks = self._cut()
        self.parts, self.held = [], 0
        picks.rank = np.arange(1, len(picks) + 1, dtype=np.int64)
        return picks


class LongestColumns:
    def __init__(self, params: SelectParams, default_n: int) -> None:
        self.k, self.items = params.k, 0
        self.best = Smallest(budget(params, default_n))

    def add(self, page: PairPage) -> Picked:
        page.check()
        first, self.items = self.items, self.items + page.items
        value = -page.whole_tokens()
        pairs, _ = _best_per_item(page, value, self.k)  # per item its k best: the only ones it can give
        picks = Picked.of_pairs(page, first, pairs, page.tokens[pairs], np.zeros(len(pairs), dtype=np.int64))
        self.best.add(value[pairs].astype(np.float64), picks.candidate, picks)
        return Picked.empty()

    def finish(self) -> Picked:
        return self.best.finish()


def draws(
    ids: Sequence[str], candidates: Sequence[int], seed: int, take: int | None = None
) -> Iterable[tuple[list[int], float]]:
    """grape.strategies.random.draw of each (item id, candidates), with the same steps inlined: the string seed as
    `random.seed` makes it (version 2: the text and its SHA-512 as one integer) and `Random.sample` of the whole
    range (its pool branch, `_randbelow` by rejection), then `random()`. `take`: only the first `take` places of
    each order are given (the later draws still consume the generator as the sample does). tests/test_reads_columns.py
    checks them equal to `draw`."""
    rng = random.Random()
    reseed, bits, uniform, from_bytes = _random.Random.seed, rng.getrandbits, rng.random, int.from_bytes
    prefix = f"{seed}:".encode()
    steps: dict[int, tuple[int, tuple[tuple[int, int], ...]]] = {}  # per count: places given, (m, bits of m) a draw
    for item_id, n in zip(ids, candidates, strict=True):
        text = prefix + item_id.encode()
        reseed(rng, from_bytes(text + sha512(text).digest(), "big"))
        plan = steps.get(n)
        if plan is None:
            plan = steps[n] = (
                n if take is None else min(take, n),
                tuple((n - i, (n - i).bit_length()) for i in range(n)),
            )
        first, widths = plan
        pool = list(range(n))
        order = [0] * first
        for i in range(first):
            m, width = widths[i]
            r = bits(width)
            while r >= m:
                r = bits(width)
            order[i] = pool[r]
            pool[r] = pool[m - 1]
        for m, width in widths[first:]:  # the rest of the sample: only its draws matter
            while bits(width) >= m:
                pass
        yield order, uniform()


class RandomColumns:
    def __init__(self, params: SelectParams) -> None:
        self.k, self.seed, self.items, self.kept = params.k, params.seed, 0, 0
        self.n = budget(params, None)
        self.best = Smallest(self.n)

    def add(self, page: PairPage) -> Picked:
        first, self.items = self.items, self.items + page.items
        if self.n == 0:
            return Picked.empty()
        drawn = list(draws(page.ids, np.diff(page.bounds).tolist(), self.seed, self.k))
        if self.k == 1:  # one pick an instruction: no list per instruction
            p = page.bounds[:-1] + np.array([chosen[0] for chosen, _ in drawn], dtype=np.int64)
            score = np.array([value for _, value in drawn], dtype=np.float64)
            place: Any = np.zeros(len(p), dtype=np.int64)
        else:
            pairs: list[int] = []
            u: list[float] = []
            place = []
            for start, (chosen, value) in zip(page.bounds[:-1].tolist(), drawn, strict=True):
                pairs += [start + c for c in chosen]
                u += [value] * len(chosen)
                place += range(len(chosen))
            p = np.array(pairs, dtype=np.int64)
            score = np.array(u, dtype=np.float64)
        if self.n is None:  # every instruction, as its row comes
            rank = np.arange(self.kept + 1, self.kept + len(p) + 1, dtype=np.int64)
            self.kept += len(p)
            return Picked.of_pairs(page, first, p, score, rank)
        # by (u, upload order, place in the draw): the row form's walk over its n lowest instructions, pair by pair
        picks = Picked.of_pairs(page, first, p, score, np.zeros(len(p), dtype=np.int64))
        self.best.add(score, np.asarray(place, dtype=np.int64), picks)
        return Picked.empty()

    def finish(self) -> Picked:
        return Picked.empty() if self.n is None else self.best.finish()


def columnar(select: Strategy, params: SelectParams) -> Columnar | None:
    """The column form of a strategy (its record's `columns`), or None (a strategy without one, or parameters it
    does not cover)."""
    if params.k < 1 or not isinstance(select, StrategySpec) or select.columns is None:
        return None
    return select.columns(params)


def decides_without_texts(select: Strategy) -> bool:
    """Whether a strategy decides from ids, sources and task results alone (its record says `texts=False`): it is
    given rows whose items hold `id` and the candidates' `source`, not their texts. Any other is given whole items."""
    return isinstance(select, StrategySpec) and not select.texts
