"""Several selection strategies side by side on one scored pool: what each keeps, and how they overlap.

Pure: rows (grape.strategies.ScoredItem, in upload order, with the extra task results the strategies
need) in, a plain dict out (the body of `GET /v1/datasets/{id}/compare`), and `format_table` for people.
A pair is (item id, candidate index); response length is counted in target-model tokens (the logprob
task's `tokens`) and in characters.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from grape.strategies import ScoredItem, SelectParams, Strategy
from grape.strategies.base import Accumulator, accumulator
from grape.strategies.columns import Columnar, PairPage, Picked, SourceTable, columnar, decides_without_texts


class _Counts:
    """One strategy's (or the pool's) running counts: pairs, instructions, lengths and sources."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.selected = 0
        self.tokens = 0
        self.chars = 0
        self.sources: Counter[str] = Counter()
        self.codes = array("q")  # (upload order << 32) | candidate of each pair: overlaps and instructions
        self.code_parts: list[Any] = []  # the same, as arrays, from the column forms

    def count(self, order: int, candidate: int, tokens: int, chars: int, source: str) -> None:
        self.selected += 1
        self.tokens += tokens
        self.chars += chars
        self.sources[source] += 1
        self.codes.append((order << 32) | candidate)

    def count_picked(self, picks: Picked, names: list[str]) -> None:
        if not len(picks):
            return
        self.selected += len(picks)
        self.tokens += int(picks.tokens.sum())
        self.chars += int(picks.chars.sum())
        _add_codes(self.sources, picks.source, names)
        self.code_parts.append((picks.order << 32) | picks.candidate)

    def pairs(self) -> Any:
        import numpy as np

        return np.unique(np.concatenate([np.frombuffer(self.codes, dtype=np.int64), *self.code_parts]))

    def summary(self, sources: list[str], instructions: int) -> dict[str, Any]:
        n = self.selected
        return {
            "name": self.name,
            "selected": n,
            "instructions": instructions,
            "mean_response_tokens": self.tokens / n if n else None,
            "mean_response_chars": self.chars / n if n else None,
            "sources": {s: self.sources.get(s, 0) / n if n else 0.0 for s in sources},
        }


def _add_codes(counter: Counter[str], codes: Any, names: list[str]) -> None:
    import numpy as np

    for code, n in enumerate(np.bincount(codes, minlength=len(names)).tolist()):
        if n:
            counter[names[code]] += n


class Comparison:
    """`compare` over pages fed one at a time in upload order (`add_page`: columns, grape.strategies.columns; `add`:
    rows): it holds per strategy a few counters and one 8-byte code per selected pair (for the overlaps), and what
    its strategy holds (a pool-wide one: its budget's pairs), never the pool. Each strategy runs in its column form
    when it has one, else in its streaming form over the page's rows."""

    def __init__(self, strategies: Mapping[str, Strategy], params: SelectParams, max_sources: int | None = None):
        self.max_sources = max_sources
        self.items = 0
        self.in_pool: Counter[str] = Counter()
        self.pool = _Counts("pool")
        self.pool_instructions = 0
        self.table = SourceTable()
        self.whole = not all(decides_without_texts(select) for select in strategies.values())
        """Whether a strategy needs whole items in its rows (one without a column form that may read texts)."""
        self._page: PairPage | None = None
        self._first = 0
        self._index: dict[int, int] = {}
        self.runs: list[tuple[_Counts, Columnar | None, Accumulator | None]] = []
        for name, select in strategies.items():
            col = columnar(select, params)
            self.runs.append((_Counts(name), col, None if col is not None else accumulator(select, params, self._keep)))

    def _keep(self, row: ScoredItem, i: int) -> tuple[int, int, int, str]:
        page = self._page
        assert page is not None
        j = self._index[id(row)]
        p = int(page.bounds[j]) + i
        return self._first + j, int(row.scores[i]["tokens"]), int(page.chars[p]), page.table.names[page.source[p]]

    def add(self, rows: Sequence[ScoredItem]) -> None:
        """A page of whole rows (the plain API)."""
        self.add_page(PairPage.of_rows(rows, self.table))

    def add_page(self, page: PairPage) -> None:
        page.check()  # every scored pair counted: one score per candidate
        names = page.table.names
        _add_codes(self.in_pool, page.source, names)
        pool = self.pool  # every pair: counted, never coded (the pool has no overlaps)
        pool.selected += page.pairs
        pool.tokens += int(page.whole_tokens().sum())
        pool.chars += int(page.chars.sum())
        _add_codes(pool.sources, page.source, names)
        self.pool_instructions += page.items
        for counts, col, acc in self.runs:
            if col is not None:
                counts.count_picked(col.add(page), names)
                continue
            assert acc is not None
            rows = page.rows()
            self._page, self._first = page, self.items
            self._index = {id(row): j for j, row in enumerate(rows)}
            for c in acc.add(rows):
                counts.count(*c.ref[:1], c.candidate, *c.ref[1:])
        self.items += page.items
        self._page, self._index = None, {}

    def result(self) -> dict[str, Any]:
        import numpy as np

        for counts, col, acc in self.runs:
            if col is not None:
                counts.count_picked(col.finish(), self.table.names)
            else:
                assert acc is not None
                for c in acc.finish():
                    counts.count(*c.ref[:1], c.candidate, *c.ref[1:])
        ranked = sorted(self.in_pool, key=lambda s: (-self.in_pool[s], s))
        sources = sorted(ranked if self.max_sources is None else ranked[: self.max_sources])
        picked = {counts.name: counts.pairs() for counts, _, _ in self.runs}
        summaries = [counts.summary(sources, len(np.unique(picked[counts.name] >> 32))) for counts, _, _ in self.runs]
        overlap = {
            a: {
                b: len(picked[a]) if a == b else int(np.intersect1d(picked[a], picked[b], assume_unique=True).size)
                for b in picked
            }
            for a in picked
        }
        return {
            "items": self.items,
            "sources": sources,
            "sources_total": len(self.in_pool),
            "pool": self.pool.summary(sources, self.pool_instructions),
            "strategies": summaries,
            "overlap": overlap,
        }


def compare(
    rows: Sequence[ScoredItem],
    strategies: Mapping[str, Strategy],
    params: SelectParams,
    max_sources: int | None = None,
) -> dict[str, Any]:
    """Run each strategy on the same rows with the same parameters and summarize.

    - `pool`: every scored pair (the reference row: what choosing at random among all pairs would give).
    - `strategies`: per strategy, pairs selected, instructions covered, mean response length (target
      tokens and characters) and each source's share of the selected pairs.
    - `overlap[a][b]`: pairs selected by both a and b (`overlap[a][a]` is a's count).
    - `sources`: the sources whose shares are shown, by name: all of them, or the `max_sources` with the
      most candidates in the pool (so the answer stays small on a pool with a source per pair);
      `sources_total` counts them all.

    One pass (`Comparison`): fed page by page, it never holds the pool.
    """
    comparison = Comparison(strategies, params, max_sources)
    comparison.add(rows)
    return comparison.result()


def format_table(result: Mapping[str, Any]) -> str:
    """The comparison as two plain-text tables: per strategy, then the pairwise overlap."""
    sources = list(result["sources"])
    head = ["strategy", "selected", "instr.", "mean tok", "mean chars", *sources]
    lines = []
    for s in [*result["strategies"], result["pool"]]:
        tok, chars = s["mean_response_tokens"], s["mean_response_chars"]
        lines.append(
            [
                s["name"],
                str(s["selected"]),
                str(s["instructions"]),
                "-" if tok is None else f"{tok:.1f}",
                "-" if chars is None else f"{chars:.0f}",
                *(f"{s['sources'][src]:.1%}" for src in sources),
            ]
        )
    out = [_grid(head, lines, left=1)]
    names = [s["name"] for s in result["strategies"]]
    if names:
        rows = [[a, *(str(result["overlap"][a][b]) for b in names)] for a in names]
        out.append("pairs selected by both (row x column):")
        out.append(_grid(["", *names], rows, left=1))
    return "\n\n".join(out)


def _grid(head: list[str], rows: list[list[str]], left: int) -> str:
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if c < left else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(head), *(line(r) for r in rows)])
